"""The LoRA oracle the format tests share (test_lora_formats, test_native): the naming each format's module
names are in, and the delta an entry makes, computed straight from its factors (float64), not by the
converter under test."""
import torch

from fluxbridge.convert.lora.synth import NO_ALPHA, Entry

NAMING = {"kohya": "bfl", "comfy": "bfl", "bfl-peft": "bfl", "bfl-control": "bfl", "fal-kontext": "bfl",
          "diffusers": "diffusers", "ai-toolkit": "diffusers", "peft": "diffusers", "peft-named": "diffusers",
          "diffusers-legacy": "diffusers", "onetrainer": "diffusers", "lycoris": "diffusers", "omi": "omi",
          "xlabs": "xlabs"}
BIAS = ("bfl-peft", "bfl-control", "fal-kontext", "diffusers", "peft")  # formats that carry a bias delta


def lora_scale(e: Entry, fmt: str) -> float:
    r = e.tensors["down"].shape[0]
    return e.alpha / r if e.alpha is not None and (fmt not in NO_ALPHA or fmt == "diffusers") else 1.0


def ref_delta(e: Entry, fmt: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """ΔW, Δb of an entry from its factors (float64), in the entry's own naming and rows."""
    t = {k: v.double() for k, v in e.tensors.items()}
    if e.kind == "lora":
        s = lora_scale(e, fmt)
        return s * t["up"] @ t["down"], (s * t["up_bias"] if "up_bias" in t else None)
    if e.kind == "loha":
        s = e.alpha / t["hada_w1_b"].shape[0]
        return s * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]), None
    if e.kind == "lokr":
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        rank = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0]
        return (e.alpha / rank) * torch.kron(w1, w2), None
    if e.kind == "full":
        return t.get("diff"), t.get("diff_b")
    raise AssertionError(e.kind)


def lora_entries(modules: dict, gen: torch.Generator, ranks, alphas, skip, bias: bool, std: float) -> list[Entry]:
    """Random plain-LoRA entries, one per source module ({name: (rows, in features)}) that `skip` keeps:
    rank and alpha drawn per module from `ranks` (inclusive range) and `alphas`, factors of scale `std`."""
    entries = []
    for name, (rows, inp) in modules.items():
        if skip(name):
            continue
        r = int(torch.randint(ranks[0], ranks[1] + 1, (1,), generator=gen))
        alpha = alphas[int(torch.randint(0, len(alphas), (1,), generator=gen))]
        t = {"down": torch.randn(r, inp, generator=gen) * std, "up": torch.randn(rows, r, generator=gen) * std}
        if bias:
            t["up_bias"] = torch.randn(rows, generator=gen) * std
        entries.append(Entry(name, "lora", t, alpha))
    return entries
