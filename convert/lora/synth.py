"""Synthetic LoRA files in every format, for tests and benchmarks (nothing here reads a table).

`write_keys(entries, fmt)` spells `Entry`s, named in the format's own convention (dotted, no prefix:
BFL names for kohya / comfy / bfl-peft / bfl-control / fal-kontext / omi, diffusers names for diffusers /
peft / onetrainer / lycoris, XLabs processor names for xlabs), as that format's keys.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch


@dataclass
class Entry:
    name: str
    kind: str = "lora"                      # lora | loha | lokr | full | set
    tensors: dict = field(default_factory=dict)   # roles as in formats.Part (down, up, up_bias, ...)
    alpha: float | None = None


# fmt: (prefix, underscored, down suffix, up suffix, bias suffix, writes .alpha)
FORMATS = {
    "kohya": ("lora_unet_", True, "lora_down.weight", "lora_up.weight", None, True),
    "comfy": ("diffusion_model.", False, "lora_down.weight", "lora_up.weight", None, True),
    "bfl-peft": ("diffusion_model.", False, "lora_A.weight", "lora_B.weight", "lora_B.bias", False),
    "bfl-control": ("", False, "lora_A.weight", "lora_B.weight", "lora_B.bias", False),
    "fal-kontext": ("base_model.model.", False, "lora_A.weight", "lora_B.weight", "lora_B.bias", False),
    "diffusers": ("transformer.", False, "lora_A.weight", "lora_B.weight", "lora_B.bias", False),
    "ai-toolkit": ("transformer.", False, "lora_A.weight", "lora_B.weight", None, False),
    "peft": ("base_model.model.", False, "lora_A.weight", "lora_B.weight", "lora_B.bias", False),
    "peft-named": ("transformer.", False, "lora_A.default.weight", "lora_B.default.weight", None, False),
    "diffusers-legacy": ("transformer.", False, "lora.down.weight", "lora.up.weight", None, False),
    "onetrainer": ("lora_transformer_", True, "lora_down.weight", "lora_up.weight", None, True),
    "omi": ("transformer.", False, "lora_down.weight", "lora_up.weight", None, True),
    "lycoris": ("lycoris_", True, "lora_down.weight", "lora_up.weight", None, True),
    "xlabs": ("", False, "down.weight", "up.weight", None, False),
    "kohya-te1": ("lora_te1_", True, "lora_down.weight", "lora_up.weight", None, True),
    "kohya-te2": ("lora_te2_", True, "lora_down.weight", "lora_up.weight", None, True),
    "kohya-te3": ("lora_te3_", True, "lora_down.weight", "lora_up.weight", None, True),
    "comfy-clip": ("text_encoders.clip_l.transformer.", False, "lora_down.weight", "lora_up.weight", None, True),
    "comfy-t5": ("text_encoders.t5xxl.transformer.", False, "lora_down.weight", "lora_up.weight", None, True),
    "diffusers-clip": ("text_encoder.", False, "lora_A.weight", "lora_B.weight", None, False),
}
# Which naming each format's entries use.
NAMING = {f: ("diffusers" if f in ("diffusers", "ai-toolkit", "peft", "peft-named", "diffusers-legacy",
                                   "onetrainer", "lycoris") else "xlabs" if f == "xlabs" else
              "text" if f.startswith(("kohya-te", "comfy-clip", "comfy-t5", "diffusers-clip")) else "bfl")
          for f in FORMATS}
# Formats whose loaders take no alpha: scale 1 (alpha = rank).
NO_ALPHA = {f for f, spec in FORMATS.items() if not spec[5]}


def write_keys(entries: list[Entry], fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) of `entries` in format `fmt`."""
    prefix, underscored, down, up, bias, alphas = FORMATS[fmt]
    sd: dict[str, torch.Tensor] = {}
    meta_alphas, meta_ranks = {}, {}
    for e in entries:
        base = prefix + (e.name.replace(".", "_") if underscored else e.name)
        t = e.tensors
        if e.kind == "lora":
            sd[f"{base}.{down}"] = t["down"]
            sd[f"{base}.{up}"] = t["up"]
            if "up_bias" in t:
                if bias is None:
                    raise ValueError(f"{fmt} has no LoRA bias")
                sd[f"{base}.{bias}"] = t["up_bias"]
            if "dora_scale" in t:
                sd[f"{base}.dora_scale"] = t["dora_scale"]
            if "magnitude" in t:
                sd[f"{base}.lora_magnitude_vector"] = t["magnitude"]
            meta_ranks[e.name] = t["down"].shape[0]
        elif e.kind == "set":
            sd[base] = t["value"]
            continue
        else:  # loha / lokr / full: LyCORIS suffixes
            for role, v in t.items():
                sd[f"{base}.{role}"] = v
        if e.alpha is not None:
            if alphas or e.kind in ("loha", "lokr"):
                sd[f"{base}.alpha"] = torch.tensor(float(e.alpha))
            else:
                meta_alphas[e.name] = float(e.alpha)
    metadata = {}
    if fmt == "diffusers-clip" and meta_ranks:  # one rank, no alpha: scale 1
        ranks = list(meta_ranks.values())
        metadata["lora_adapter_metadata"] = json.dumps({
            "text_encoder.r": ranks[0], "text_encoder.lora_alpha": ranks[0],
            "text_encoder.target_modules": sorted(n.removeprefix("text_model.") for n in meta_ranks)})
    if fmt == "diffusers" and meta_alphas:
        ranks = list(meta_ranks.values())
        common_r = max(set(ranks), key=ranks.count)
        packed = {"transformer.r": common_r, "transformer.lora_alpha": common_r,
                  "transformer.rank_pattern": {f"^{n}": r for n, r in meta_ranks.items() if r != common_r},
                  "transformer.alpha_pattern": {f"^{n}": meta_alphas.get(n, meta_ranks[n])
                                                for n in meta_ranks},
                  "transformer.target_modules": sorted(meta_ranks)}
        metadata["lora_adapter_metadata"] = json.dumps(packed)
    if fmt == "ai-toolkit":
        metadata["software"] = json.dumps({"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit"})
    return sd, metadata


def merge_metadata(*metas: dict) -> dict:
    """One metadata dict from several `write_keys` results (their `lora_adapter_metadata` merged)."""
    out, packed = {}, {}
    for m in metas:
        for k, v in m.items():
            if k == "lora_adapter_metadata":
                packed.update(json.loads(v))
            else:
                out[k] = v
    if packed:
        out["lora_adapter_metadata"] = json.dumps(packed)
    return out

