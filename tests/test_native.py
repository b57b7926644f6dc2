"""Our conversion for ComfyUI's native models, through the ComfyUI stubs (tests/comfy_stubs: ModelPatcher
clone / add_patches / patch_model, `comfy.lora.calculate_weight` and the weight adapters, with ComfyUI 0.3.64's
signatures and patch forms).

* The LoRA node on a native MODEL (the BFL layout under `diffusion_model.`) changes every tensor by exactly the
  reference delta of the file, and nothing else. The reference is computed here from the file's factors with
  the textbook formulas (float64), placed on BFL rows by a map written out by hand from the reference
  (flux-lora-formats.md §1, §3): qkv = q, k, v thirds; linear1 = D, D, D, 4D; final layer halves swapped.
* Text parts land on the native CLIP's `clip_l.transformer.` / `t5xxl.transformer.` tensors.
* The native loader hands ComfyUI's builder the BFL twin of any layout; the oracle is diffusers' own
  BFL → diffusers converter (for the diffusers files) and gguf-py / the scale formula (for quantized files).
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from fluxbridge.common.errors import BadInput
from fluxbridge.convert.lora import load_lora
from fluxbridge.convert.lora.native import native_plan
from fluxbridge.convert.lora.synth import Entry, write_keys
from lora_reference import BIAS, NAMING, lora_entries, ref_delta  # tests/helpers

pytestmark = pytest.mark.usefixtures("one_thread")

D, HEADS, DOUBLE, SINGLE, IN, CTX, VEC = 32, 2, 1, 1, 64, 24, 20
HD = D // HEADS


def bfl_shapes() -> dict[str, tuple]:
    """The BFL state dict of a small FLUX.1-dev transformer, written out by hand (§1 of the reference)."""
    s = {"img_in": (D, IN), "txt_in": (D, CTX), "time_in.in_layer": (D, 256), "time_in.out_layer": (D, D),
         "vector_in.in_layer": (D, VEC), "vector_in.out_layer": (D, D), "guidance_in.in_layer": (D, 256),
         "guidance_in.out_layer": (D, D), "final_layer.linear": (IN, D), "final_layer.adaLN_modulation.1": (2 * D, D)}
    for i in range(DOUBLE):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}_"
            s.update({b + "mod.lin": (6 * D, D), b + "attn.qkv": (3 * D, D), b + "attn.proj": (D, D),
                      b + "mlp.0": (4 * D, D), b + "mlp.2": (D, 4 * D)})
    for i in range(SINGLE):
        b = f"single_blocks.{i}."
        s.update({b + "linear1": (7 * D, D), b + "linear2": (D, 5 * D), b + "modulation.lin": (3 * D, D)})
    out = {}
    for module, shape in s.items():
        out[module + ".weight"] = shape
        out[module + ".bias"] = shape[:1]
    for i in range(DOUBLE):
        for stream in ("img", "txt"):
            for n in ("query_norm", "key_norm"):
                out[f"double_blocks.{i}.{stream}_attn.norm.{n}.scale"] = (HD,)
    for i in range(SINGLE):
        for n in ("query_norm", "key_norm"):
            out[f"single_blocks.{i}.norm.{n}.scale"] = (HD,)
    return out


def bfl_state(seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) * 0.1 for k, shape in bfl_shapes().items()}


def diffusers_rows() -> dict[str, tuple[str, int, int, bool]]:
    """diffusers module -> (BFL module, first row, rows, halves swapped). By hand, from the reference."""
    m = {"x_embedder": ("img_in", 0, D, False), "context_embedder": ("txt_in", 0, D, False),
         "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", 0, D, False),
         "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", 0, D, False),
         "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", 0, D, False),
         "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", 0, D, False),
         "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", 0, D, False),
         "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", 0, D, False),
         "proj_out": ("final_layer.linear", 0, IN, False),
         "norm_out.linear": ("final_layer.adaLN_modulation.1", 0, 2 * D, True)}
    for i in range(DOUBLE):
        t, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        m.update({t + "norm1.linear": (d + "img_mod.lin", 0, 6 * D, False),
                  t + "norm1_context.linear": (d + "txt_mod.lin", 0, 6 * D, False),
                  t + "attn.to_out.0": (d + "img_attn.proj", 0, D, False),
                  t + "attn.to_add_out": (d + "txt_attn.proj", 0, D, False),
                  t + "ff.net.0.proj": (d + "img_mlp.0", 0, 4 * D, False),
                  t + "ff.net.2": (d + "img_mlp.2", 0, D, False),
                  t + "ff_context.net.0.proj": (d + "txt_mlp.0", 0, 4 * D, False),
                  t + "ff_context.net.2": (d + "txt_mlp.2", 0, D, False)})
        for k, x in enumerate("qkv"):
            m[t + f"attn.to_{x}"] = (d + "img_attn.qkv", k * D, D, False)
            m[t + f"attn.add_{x}_proj"] = (d + "txt_attn.qkv", k * D, D, False)
    for i in range(SINGLE):
        t, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for k, x in enumerate("qkv"):
            m[t + f"attn.to_{x}"] = (d + "linear1", k * D, D, False)
        m[t + "proj_mlp"] = (d + "linear1", 3 * D, 4 * D, False)
        m[t + "proj_out"] = (d + "linear2", 0, D, False)
        m[t + "norm.linear"] = (d + "modulation.lin", 0, 3 * D, False)
    return m


SHAPES = bfl_shapes()
ROWS = diffusers_rows()
BFL_MODULES = sorted(k[:-len(".weight")] for k, s in SHAPES.items() if k.endswith(".weight") and len(s) == 2)


def sources(naming: str) -> dict[str, tuple[str, int, int, bool, int]]:
    """Source modules of a naming -> (BFL module, first row, rows, swap, in features)."""
    if naming == "bfl":
        return {b: (b, 0, SHAPES[b + ".weight"][0], False, SHAPES[b + ".weight"][1]) for b in BFL_MODULES}
    if naming == "diffusers":
        return {n: r + (SHAPES[r[0] + ".weight"][1],) for n, r in ROWS.items()}
    if naming == "omi":  # fused BFL modules split by index: qkv.0/.1/.2, linear1.0-.3
        out = {}
        for n, (b, start, rows, swap) in ROWS.items():
            parts = sorted((s for s in ROWS.values() if s[0] == b), key=lambda s: s[1])
            name = b if len(parts) == 1 else f"{b}.{parts.index((b, start, rows, swap))}"
            out[name] = (b, start, rows, False, SHAPES[b + ".weight"][1])  # BFL names: BFL row order
        return out
    if naming == "xlabs":
        out = {}
        for i in range(DOUBLE):
            d = f"double_blocks.{i}."
            for proc, b in (("qkv_lora1", "img_attn.qkv"), ("qkv_lora2", "txt_attn.qkv"),
                            ("proj_lora1", "img_attn.proj"), ("proj_lora2", "txt_attn.proj")):
                out[d + "processor." + proc] = (d + b, 0, SHAPES[d + b + ".weight"][0], False, D)
        for i in range(SINGLE):
            s = f"single_blocks.{i}."
            out[s + "processor.qkv_lora"] = (s + "linear1", 0, 3 * D, False, D)  # q, k, v only
            out[s + "processor.proj_lora"] = (s + "linear2", 0, D, False, 5 * D)
        return out
    raise AssertionError(naming)


def place(expected: dict, bfl_key: str, start: int, delta: torch.Tensor, swap: bool) -> None:
    if swap:
        h = delta.shape[0] // 2
        delta = torch.cat([delta[h:], delta[:h]])
    if bfl_key not in expected:
        expected[bfl_key] = torch.zeros(SHAPES[bfl_key], dtype=torch.float64)
    expected[bfl_key][start:start + delta.shape[0]] += delta


def reference(entries, fmt: str, strength: float) -> dict[str, torch.Tensor]:
    """Expected change of every BFL tensor (float64)."""
    src = sources(NAMING[fmt])
    expected = {}
    for e in entries:
        b, start, rows, swap, _ = src[e.name]
        dw, db = ref_delta(e, fmt)
        if dw is not None:
            place(expected, b + ".weight", start, strength * dw, swap)
        if db is not None:
            place(expected, b + ".bias", start, strength * db, swap)
    return expected


def make_entries(fmt: str, gen, ranks=(1, 6), alphas=(None, 1.0, 4.0, 16.0), skip=lambda name: False):
    modules = {name: (rows, inp) for name, (_, _, rows, _, inp) in sources(NAMING[fmt]).items()}
    return lora_entries(modules, gen, ranks, alphas, skip, bias=fmt in BIAS, std=0.3)


# ------------------------------------------------------------------------------------- native objects

def native_model(comfy_stubs, state=None):
    """A native MODEL as ComfyUI's builder returns it (a ModelPatcher; state dict under `diffusion_model.`)."""
    import comfy.sd
    return comfy.sd.load_diffusion_model_state_dict(dict(state or bfl_state()))


def patched_state(native) -> dict[str, torch.Tensor]:
    """The weights a sampler sees: the clone's patches applied (ModelPatcher.patch_model), then undone."""
    patcher = getattr(native, "patcher", native)
    patcher.patch_model()
    try:
        return {k: v.detach().clone() for k, v in patcher.model_state_dict().items()}
    finally:
        patcher.unpatch_model()


def apply(native, lora, strength=1.0, families=("flux-transformer",)):
    from fluxbridge.runtime import host
    plan = native_plan(lora, families, host.native_state_shapes(native))
    clone, taken = host.patched_clone(native, plan.batches(), strength)
    assert taken == len(plan.patches)
    return clone, plan


def assert_deltas(before: dict, after: dict, expected: dict, prefix="diffusion_model.", tol=1e-6):
    """`after - before` is `expected` on the expected tensors (relative error), bitwise 0 elsewhere."""
    for k, v in before.items():
        name = k[len(prefix):] if k.startswith(prefix) else None
        if name in expected:
            got = after[k].double() - v.double()
            want = expected[name]
            err = float((got - want).norm() / want.norm().clamp_min(1e-30))
            assert err <= tol, f"{name}: relative error {err:.3g}"
        else:
            assert torch.equal(after[k], v), f"{k} changed"


# ------------------------------------------------------------------------------------------ formats

@pytest.mark.parametrize("fmt", sorted(NAMING))
def test_every_format_patches_its_reference_delta(comfy_stubs, fmt):
    """Mixed ranks and alphas; the diffusers-named formats miss to_v and proj_mlp (zero-filled rows)."""
    gen = torch.Generator().manual_seed(sorted(NAMING).index(fmt))
    missing = ("attn.to_v", "proj_mlp") if NAMING[fmt] == "diffusers" else ()
    entries = make_entries(fmt, gen, skip=lambda n: n.endswith(missing))
    lora = load_lora(*write_keys(entries, fmt), name=f"{fmt}.safetensors")
    assert not lora.not_placed
    model = native_model(comfy_stubs)
    before = patched_state(model)
    clone, plan = apply(model, lora, 0.7)
    assert_deltas(before, patched_state(clone), reference(entries, fmt, 0.7))
    assert torch.equal(patched_state(model)["diffusion_model.img_in.weight"], before["diffusion_model.img_in.weight"])
    assert model.patches == {}  # the input MODEL is left alone: patches live on the clone
    if missing:
        zero = {z["module"]: z["missing"] for z in plan.report["zero_filled"]}
        assert zero["single_blocks.0.linear1"] == ["single_transformer_blocks.0.attn.to_v",
                                                  "single_transformer_blocks.0.proj_mlp"]
        assert "diffusion_model.single_blocks.0.linear1[0:32]" in plan.report["patched"]
    assert plan.report["not_placed"] == []


def test_side_b_parts_are_row_slices_of_the_fused_weight(comfy_stubs):
    """A diffusers q/k/v LoRA is three (key, (0, start, length)) patches on the fused qkv, as ComfyUI's own
    key map has them; norm_out.linear goes through the function slot (halves swapped)."""
    gen = torch.Generator().manual_seed(1)
    entries = make_entries("diffusers", gen, skip=lambda n: not n.startswith(("transformer_blocks.0.attn.to_",
                                                                              "norm_out")) or n.endswith("out.0"))
    model = native_model(comfy_stubs)
    clone, plan = apply(model, load_lora(*write_keys(entries, "diffusers"), name="d"))
    qkv = clone.patches["diffusion_model.double_blocks.0.img_attn.qkv.weight"]
    assert sorted(p[3] for p in qkv) == [(0, 0, D), (0, D, D), (0, 2 * D, D)]
    final = clone.patches["diffusion_model.final_layer.adaLN_modulation.1.weight"]
    assert len(final) == 1 and final[0][3] is None and final[0][4] is not None


def test_alpha_is_the_files_own_where_the_scale_is_alpha_over_rank(comfy_stubs):
    """kohya: ComfyUI gets the file's alpha (its LoraLoader's very arithmetic); PEFT metadata alphas and
    rsLoRA give the alpha that makes ComfyUI's alpha / rank the scale."""
    import comfy.weight_adapter as wa
    gen = torch.Generator().manual_seed(2)
    e = make_entries("kohya", gen, ranks=(4, 4), alphas=(3.0,), skip=lambda n: n != "img_in")
    clone, _ = apply(native_model(comfy_stubs), load_lora(*write_keys(e, "kohya"), name="k"))
    adapter = clone.patches["diffusion_model.img_in.weight"][0][1]
    assert isinstance(adapter, wa.LoRAAdapter) and adapter.weights[2] == 3.0
    e = make_entries("diffusers", gen, ranks=(4, 4), alphas=(None,), skip=lambda n: n != "x_embedder")
    sd, _ = write_keys(e, "diffusers")
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8,
                                                 "transformer.use_rslora": True})}
    lora = load_lora(sd, meta, name="rs")
    model = native_model(comfy_stubs)
    before = patched_state(model)
    clone, _ = apply(model, lora)
    assert clone.patches["diffusion_model.img_in.weight"][0][1].weights[2] == pytest.approx(8 / 2 * 4)
    t = {k: v.double() for k, v in e[0].tensors.items()}
    assert_deltas(before, patched_state(clone), {"img_in.weight": (8 / 4 ** 0.5) * t["up"] @ t["down"],
                                                 "img_in.bias": (8 / 4 ** 0.5) * t["up_bias"]})


def test_lycoris_kinds_norm_differences_and_dora(comfy_stubs):
    """LoHa, LoKr (w1 full or factorized), full diff + diff_b on a fused module, a norm difference, and
    DoRA on both axes: LyCORIS [1, in] on the fused qkv, PEFT magnitude on q's rows and on norm_out.linear
    (halves swapped), checked against the textbook formulas on the BFL weights."""
    gen = torch.Generator().manual_seed(3)
    r = 3
    loha = Entry("double_blocks.0.img_attn.proj", "loha", {
        "hada_w1_a": torch.randn(D, r, generator=gen), "hada_w1_b": torch.randn(r, D, generator=gen),
        "hada_w2_a": torch.randn(D, r, generator=gen), "hada_w2_b": torch.randn(r, D, generator=gen)}, alpha=2.0)
    lokr = Entry("double_blocks.0.img_attn.qkv", "lokr", {
        "lokr_w1": torch.randn(4, 4, generator=gen), "lokr_w2_a": torch.randn(24, 2, generator=gen),
        "lokr_w2_b": torch.randn(2, 8, generator=gen)}, alpha=4.0)
    lokr2 = Entry("single_blocks.0.linear2", "lokr", {
        "lokr_w1_a": torch.randn(2, 2, generator=gen), "lokr_w1_b": torch.randn(2, 4, generator=gen),
        "lokr_w2_a": torch.randn(16, 2, generator=gen), "lokr_w2_b": torch.randn(2, 40, generator=gen)}, alpha=1.0)
    full = Entry("single_blocks.0.linear1", "full", {"diff": torch.randn(7 * D, D, generator=gen),
                                                     "diff_b": torch.randn(7 * D, generator=gen)})
    entries = [loha, lokr, lokr2, full]
    sd, _ = write_keys(entries, "kohya")
    norm_diff = torch.randn(HD, generator=gen)
    sd["diffusion_model.double_blocks.0.txt_attn.norm.key_norm.scale.diff"] = norm_diff
    model = native_model(comfy_stubs)
    before = patched_state(model)
    clone, plan = apply(model, load_lora(sd, name="lycoris"), 0.5)
    expected = reference(entries, "kohya", 0.5)
    expected["double_blocks.0.txt_attn.norm.key_norm.scale"] = 0.5 * norm_diff.double()
    assert_deltas(before, patched_state(clone), expected)

    w = {k[len("diffusion_model."):]: v.double() for k, v in before.items()}
    lyco = Entry("double_blocks.0.txt_attn.qkv", "lora", {
        "down": torch.randn(4, D, generator=gen) * .3, "up": torch.randn(3 * D, 4, generator=gen) * .3,
        "dora_scale": torch.rand(1, D, generator=gen) + 0.5}, alpha=8.0)
    q = Entry("transformer_blocks.0.attn.to_q", "lora", {
        "down": torch.randn(2, D, generator=gen) * .3, "up": torch.randn(D, 2, generator=gen) * .3,
        "magnitude": torch.rand(D, generator=gen) + 0.5})
    final = Entry("norm_out.linear", "lora", {
        "down": torch.randn(2, D, generator=gen) * .3, "up": torch.randn(2 * D, 2, generator=gen) * .3,
        "magnitude": torch.rand(2 * D, generator=gen) + 0.5})
    sd, _ = write_keys([lyco], "kohya")
    sd.update(write_keys([q, final], "diffusers")[0])
    clone, plan = apply(model, load_lora(sd, name="dora"), 0.8)
    after = patched_state(clone)

    def dora(weight, e, axis):  # m·(W+ΔW)/‖W+ΔW‖ on the magnitude's axis, interpolated by the strength
        merged = weight + ref_delta(e, "kohya" if "dora_scale" in e.tensors else "diffusers")[0]
        m = (e.tensors.get("dora_scale", e.tensors.get("magnitude"))).double()
        new = merged * (m / merged.norm(dim=0, keepdim=True)) if axis == 0 else \
            merged * (m[:, None] / merged.norm(dim=1, keepdim=True))
        return weight + 0.8 * (new - weight)

    swap = lambda t: torch.cat([t[D:], t[:D]])  # noqa: E731
    qkv = w["double_blocks.0.img_attn.qkv.weight"]
    want = {"double_blocks.0.txt_attn.qkv.weight": dora(w["double_blocks.0.txt_attn.qkv.weight"], lyco, 0),
            "double_blocks.0.img_attn.qkv.weight": torch.cat([dora(qkv[:D], q, 1), qkv[D:]]),
            "final_layer.adaLN_modulation.1.weight": swap(dora(swap(w["final_layer.adaLN_modulation.1.weight"]),
                                                               final, 1))}
    assert_deltas(before, after, {k: v - w[k] for k, v in want.items()})
    assert {p.kind for p in plan.patches} == {"dora"}


def test_bfl_control_bias_set_and_input_expansion(comfy_stubs):
    """BFL control LoRA: img_in's LoRA takes 128 inputs: the weight is zero-padded first (a zero `diff`
    with pad_weight), then patched; lora_B.bias is a bias delta; *_norm.scale overwrites (`set`)."""
    gen = torch.Generator().manual_seed(4)
    entries = make_entries("bfl-control", gen, skip=lambda n: n not in ("img_in", "double_blocks.0.img_attn.qkv"))
    img_in = entries[[e.name for e in entries].index("img_in")].tensors
    img_in["down"] = torch.randn(img_in["down"].shape[0], 2 * IN, generator=gen)
    norms = {f"double_blocks.0.{s}_attn.norm.{n}.scale": torch.rand(HD, generator=gen) + .5
             for s in ("img", "txt") for n in ("query_norm", "key_norm")}
    sd, meta = write_keys(entries + [Entry(n, "set", {"value": v}) for n, v in norms.items()], "bfl-control")
    lora = load_lora(sd, meta, name="control")
    assert lora.format == "bfl-control"
    model = native_model(comfy_stubs)
    before = patched_state(model)
    clone, plan = apply(model, lora)
    after = patched_state(clone)
    assert after["diffusion_model.img_in.weight"].shape == (D, 2 * IN)
    e = entries[[x.name for x in entries].index("img_in")]
    dw, db = ref_delta(e, "bfl-control")
    padded = torch.cat([before["diffusion_model.img_in.weight"], torch.zeros(D, IN)], 1).double()
    got = after["diffusion_model.img_in.weight"].double() - padded
    assert float((got - dw).norm() / dw.norm()) < 1e-6
    for n, v in norms.items():
        assert torch.equal(after["diffusion_model." + n], v)
    rest = reference([x for x in entries if x is not e], "bfl-control", 1.0)
    rest["img_in.bias"] = db
    for n in norms:
        rest[n] = norms[n].double() - before["diffusion_model." + n].double()
    assert_deltas({k: v for k, v in before.items() if k != "diffusion_model.img_in.weight"}, after, rest)
    pads = clone.patches["diffusion_model.img_in.weight"]
    assert pads[0][1][0] == "diff" and pads[0][1][1][1] == {"pad_weight": True}  # the pad comes first


def test_text_parts_go_to_the_native_clip(comfy_stubs):
    """CLIP-L (kohya lora_te1_, diffusers text_encoder.) and T5 (lora_te3_) parts patch the Flux CLIP's
    `clip_l.transformer.` / `t5xxl.transformer.` tensors by their reference deltas, at the text strength."""
    import comfy.sd
    gen = torch.Generator().manual_seed(5)
    clip_names = {f"text_model.encoder.layers.0.{m}": (24, 16) for m in ("self_attn.q_proj", "mlp.fc2")}
    t5_names = {"encoder.block.0.layer.0.SelfAttention.q": (16, 12), "encoder.block.0.layer.1.DenseReluDense.wo": (12, 20)}
    state = {"clip_l.transformer." + n + ".weight": torch.randn(s, generator=gen) for n, s in clip_names.items()}
    state.update({"t5xxl.transformer." + n + ".weight": torch.randn(s, generator=gen) for n, s in t5_names.items()})
    state["clip_l.transformer.text_model.final_layer_norm.weight"] = torch.randn(24, generator=gen)
    clip = comfy.sd.CLIP._from_state_dict(state)

    def entry(name, shape, alpha):
        return Entry(name, "lora", {"down": torch.randn(2, shape[1], generator=gen),
                                    "up": torch.randn(shape[0], 2, generator=gen)}, alpha)

    e_clip = entry("text_model.encoder.layers.0.self_attn.q_proj", (24, 16), 4.0)
    e_diff = entry("text_model.encoder.layers.0.mlp.fc2", (24, 16), None)
    e_t5 = entry("encoder.block.0.layer.1.DenseReluDense.wo", (12, 20), 1.0)
    flux = make_entries("kohya", gen, skip=lambda n: n != "img_in")
    sd, _ = write_keys([e_clip], "kohya-te1")
    sd.update(write_keys([e_t5], "kohya-te3")[0])
    sd.update(write_keys(flux, "kohya")[0])
    d_sd, d_meta = write_keys([e_diff], "diffusers-clip")
    sd.update(d_sd)
    lora = load_lora(sd, d_meta, name="text")
    before = patched_state(clip)
    clone, plan = apply(clip, lora, 0.6, families=("clip-l", "t5-xxl"))
    assert isinstance(clone, comfy.sd.CLIP) and clip.patcher.patches == {}

    def ref(e, s):
        t = {k: v.double() for k, v in e.tensors.items()}
        return 0.6 * s * t["up"] @ t["down"]

    expected = {"clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": ref(e_clip, 2.0),
                "clip_l.transformer.text_model.encoder.layers.0.mlp.fc2.weight": ref(e_diff, 1.0),
                "t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wo.weight": ref(e_t5, 0.5)}
    assert_deltas(before, patched_state(clone), expected, prefix="")
    assert plan.report["parts"] == 3 and plan.report["not_placed"] == []


def test_plan_reports_what_does_not_fit(comfy_stubs):
    """A transformer of another width, a module this model lacks, a CLIP without T5: not placed, with why."""
    gen = torch.Generator().manual_seed(6)
    entries = make_entries("diffusers", gen, skip=lambda n: n not in ("x_embedder", "transformer_blocks.0.attn.to_q"))
    x_embedder = entries[[e.name for e in entries].index("x_embedder")].tensors
    x_embedder["down"] = torch.randn(x_embedder["down"].shape[0], 48, generator=gen)  # the model has 64 inputs
    entries.append(Entry("transformer_blocks.5.attn.to_k", "lora", {"down": torch.randn(2, D), "up": torch.randn(D, 2)}))
    e_t5 = Entry("encoder.block.0.layer.0.SelfAttention.q", "lora", {"down": torch.randn(2, 8), "up": torch.randn(8, 2)})
    sd, meta = write_keys(entries, "diffusers")
    sd.update(write_keys([e_t5], "kohya-te3")[0])
    lora = load_lora(sd, meta, name="misfit")
    from fluxbridge.runtime import host
    model = native_model(comfy_stubs)
    plan = native_plan(lora, ["flux-transformer", "t5-xxl"], host.native_state_shapes(model))
    reasons = {n["key"].split(".lora")[0]: n["reason"] for n in plan.report["not_placed"]}
    assert "shape mismatch" in reasons["transformer.x_embedder"]
    assert "not in this model" in reasons["transformer.transformer_blocks.5.attn.to_k"]
    assert reasons["lora_te3_encoder_block_0_layer_0_SelfAttention_q"] == "this model has no T5-XXL"
    assert plan.report["patched"] == ["diffusion_model.double_blocks.0.img_attn.qkv[0:32]"]


# --------------------------------------------------------------------------------------------- nodes

@pytest.fixture
def comfy_models(comfy_stubs):
    """The stubs' ComfyUI folders (models/loras, models/diffusion_models ...)."""
    return comfy_stubs.models


def test_lora_node_clones_reports_and_stacks_with_native_patches(comfy_stubs, comfy_models):
    """The node returns a patched clone (the input MODEL keeps no patch), its UI report, and stacks after a
    patch a native LoRA node already added (ComfyUI applies both, in order)."""
    import comfy.weight_adapter as wa
    from fluxbridge.nodes.native import NativeLoRA
    gen = torch.Generator().manual_seed(7)
    entries = make_entries("onetrainer", gen, skip=lambda n: n.endswith(("attn.to_k", "proj_mlp")))
    sd, meta = write_keys(entries, "onetrainer")
    save_file(sd, str(comfy_models / "loras" / "ot.safetensors"), metadata=meta)
    model = native_model(comfy_stubs)
    before = patched_state(model)
    native = model.clone()  # what LoraLoader leaves: a clone with a LoRAAdapter patch on img_in
    up, down = torch.randn(D, 2, generator=gen), torch.randn(2, IN, generator=gen)
    native.add_patches({"diffusion_model.img_in.weight": wa.LoRAAdapter(set(), (up, down, None, None, None, None))})
    out = NativeLoRA.execute(model=native, lora_name="ot.safetensors", strength_model=0.9, strength_clip=1.0)
    new_model, new_clip = out.args
    assert new_clip is None and native.patches.keys() == {"diffusion_model.img_in.weight"}
    expected = reference(entries, "onetrainer", 0.9)
    expected["img_in.weight"] = expected.get("img_in.weight", 0) + (up.double() @ down.double())
    assert_deltas(before, patched_state(new_model), expected)
    payload = out.ui["fluxbridge"][0]
    assert payload["format"] == "onetrainer" and payload["not_placed"] == []
    assert {z["module"] for z in payload["zero_filled"]} == {"double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"}
    assert out.ui["text"][0].startswith("ot.safetensors: format onetrainer; patched ")
    same = NativeLoRA.execute(model=model, lora_name="ot.safetensors", strength_model=0.0, strength_clip=0.0)
    assert same.args[0] is model  # strength 0: the MODEL as it came (as LoraLoader does)


def test_lora_node_refuses_a_lora_for_another_model(comfy_stubs, comfy_models):
    from fluxbridge.nodes.native import NativeLoRA
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 8),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(8, 2)}
    save_file(sd, str(comfy_models / "loras" / "sd15.safetensors"))
    with pytest.raises(BadInput, match="not a Flux LoRA"):
        NativeLoRA.execute(model=native_model(comfy_stubs), lora_name="sd15.safetensors")
    sd = write_keys(make_entries("kohya", torch.Generator().manual_seed(8), skip=lambda n: n != "img_in"), "kohya")[0]
    save_file(sd, str(comfy_models / "loras" / "flux.safetensors"))
    other = native_model(comfy_stubs, {"input_blocks.0.0.weight": torch.zeros(4, 4)})  # not a Flux MODEL
    with pytest.raises(BadInput, match="none of the LoRA's 1 transformer part"):
        NativeLoRA.execute(model=other, lora_name="flux.safetensors")
    assert "outside the loras folder" in NativeLoRA.validate_inputs(lora_name="../x.safetensors")


def test_nodes_need_comfyui_outside_it(standalone_host, models_dir):
    from fluxbridge.nodes.native import LoadNativeModel
    save_file({k: v for k, v in bfl_state().items()}, str(models_dir / "diffusion_models" / "f.safetensors"))
    with pytest.raises(BadInput, match="needs ComfyUI"):
        LoadNativeModel.execute(model_name="f.safetensors")


# -------------------------------------------------------------------------------------- native loader

def diffusers_twin(bfl: dict, folder):
    """The BFL weights in diffusers names by the hand-written map above (diffusers' own converter only takes
    D = 3072), loaded strictly into diffusers' FluxTransformer2DModel (every name and shape checked by
    diffusers) and saved as diffusers saves them."""
    from diffusers import FluxTransformer2DModel
    converted = {}
    for name, (b, start, rows, swap) in ROWS.items():
        for p in ("weight", "bias"):
            t = bfl[f"{b}.{p}"][start:start + rows]
            converted[f"{name}.{p}"] = torch.cat([t[rows // 2:], t[:rows // 2]]) if swap else t
    norms = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
             "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
    for i in range(DOUBLE):
        for a, b in norms.items():
            converted[f"transformer_blocks.{i}.{b}.weight"] = bfl[f"double_blocks.{i}.{a}.scale"]
    for i in range(SINGLE):
        for a, b in (("query_norm", "norm_q"), ("key_norm", "norm_k")):
            converted[f"single_transformer_blocks.{i}.attn.{b}.weight"] = bfl[f"single_blocks.{i}.norm.{a}.scale"]
    model = FluxTransformer2DModel(patch_size=1, in_channels=IN, num_layers=DOUBLE,  # config: "out_channels": null
                                   num_single_layers=SINGLE, attention_head_dim=HD, num_attention_heads=HEADS,
                                   joint_attention_dim=CTX, pooled_projection_dim=VEC, guidance_embeds=True,
                                   axes_dims_rope=(4, 6, 6))
    model.load_state_dict(converted, strict=True)
    model.save_pretrained(str(folder))
    return model


@pytest.mark.parametrize("where", ["folder", "pipeline folder", "single file"])
def test_native_loader_hands_comfyui_the_bfl_twin_of_a_diffusers_model(comfy_stubs, comfy_models, where):
    import comfy.sd
    from fluxbridge.nodes.native import LoadNativeModel
    bfl = bfl_state(9)
    root = comfy_models / "diffusion_models"
    model = diffusers_twin(bfl, root / "d" / "transformer")
    if where == "pipeline folder":
        (root / "d" / "model_index.json").write_text("{}")
        name = "d"
    elif where == "folder":
        name = "d/transformer"
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "d.safetensors"))
        name = "d.safetensors"
    out = LoadNativeModel.execute(model_name=name, weight_dtype="default")
    (_, (sd,), kw), = [c for c in comfy.sd._calls if c[0] == "load_diffusion_model_state_dict"]
    assert kw == {"model_options": {}}
    assert sd.keys() == bfl.keys()
    for k, v in bfl.items():
        assert torch.equal(sd[k], v), k
    assert out.args[0].model_state_dict()["diffusion_model.img_in.weight"].shape == (D, IN)
    info = out.ui["fluxbridge"][0]
    assert (info["layout"], info["variant"], info["dtype"]) == ("diffusers", "dev", "float32")
    assert info["config"]["out_channels"] == IN  # config.json says null: the shapes tell
    assert "layout diffusers" in out.ui["text"][0]
    if where != "single file":  # the diffusers-model loader reads such a config.json too
        from fluxbridge.convert.load import load_model
        loaded = load_model(root / "d" / "transformer")
        assert loaded.variant == "dev" and loaded.model.config.out_channels == IN


def test_native_loader_dtypes_and_quantized_files(comfy_stubs, comfy_models):
    """bf16 asked: every tensor in bf16 and ComfyUI told to keep it; fp8 choices are UNETLoader's (ComfyUI
    stores fp8); a scaled-fp8 ComfyUI file and a GGUF are dequantized (to bf16 by default)."""
    import comfy.sd
    from fluxbridge.nodes.native import LoadNativeModel
    bfl = bfl_state(10)
    root = comfy_models / "diffusion_models"
    save_file({"model.diffusion_model." + k: v for k, v in bfl.items()}, str(root / "comfy.safetensors"))

    def load(name, dtype):
        comfy.sd._calls.clear()
        LoadNativeModel.execute(model_name=name, weight_dtype=dtype)
        return comfy.sd._calls[0][1][0], comfy.sd._calls[0][2]["model_options"]

    sd, options = load("comfy.safetensors", "bf16")
    assert options == {"dtype": torch.bfloat16} and all(torch.equal(sd[k], v.bfloat16()) for k, v in bfl.items())
    sd, options = load("comfy.safetensors", "fp8_e4m3fn_fast")
    assert options == {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True}
    assert all(torch.equal(sd[k], v) for k, v in bfl.items())  # ComfyUI casts to fp8 itself

    scaled, want = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, {}
    for k, v in bfl.items():
        if v.dim() == 2:
            scale = v.abs().max() / 448.0
            q = (v / scale).to(torch.float8_e4m3fn)
            scaled[k], scaled[k.replace(".weight", ".scale_weight")] = q, scale.reshape(1)
            want[k] = (q.float() * scale).bfloat16()
        else:
            scaled[k], want[k] = v, v
    save_file(scaled, str(root / "scaled.safetensors"))
    sd, options = load("scaled.safetensors", "default")
    assert options == {} and sd.keys() == bfl.keys()
    assert all(torch.equal(sd[k], want[k]) for k in bfl)

    gguf = pytest.importorskip("gguf")
    import numpy as np
    w = gguf.GGUFWriter(str(root / "q8.gguf"), "flux")
    want, quantized = {}, set()  # gguf-py's own dequantization (float32)
    for k, v in bfl.items():
        if v.dim() == 2 and v.shape[1] % 32 == 0:  # Q8_0 blocks of 32 (txt_in / vector_in stay F32)
            raw = gguf.quants.quantize(v.numpy(), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(k, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            deq = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)
            want[k] = torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32)).reshape(v.shape)
            quantized.add(k)
        else:
            w.add_tensor(k, v.numpy())
            want[k] = v
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    sd, options = load("q8.gguf", "default")
    assert options == {} and sd.keys() == bfl.keys()
    assert all(torch.equal(sd[k], want[k].bfloat16() if k in quantized else want[k]) for k in bfl)
    sd, options = load("q8.gguf", "fp32")
    assert options == {"dtype": torch.float32} and all(torch.equal(sd[k], want[k]) for k in bfl)


def test_native_loader_refuses_what_is_not_a_whole_flux_transformer(comfy_stubs, comfy_models):
    from fluxbridge.nodes.native import LoadNativeModel
    bfl = bfl_state(11)
    del bfl["single_blocks.0.linear2.weight"]
    save_file(bfl, str(comfy_models / "diffusion_models" / "broken.safetensors"))
    with pytest.raises(BadInput, match="missing: single_transformer_blocks.0.proj_out.weight"):
        LoadNativeModel.execute(model_name="broken.safetensors")
    sd = write_keys(make_entries("kohya", torch.Generator().manual_seed(1), skip=lambda n: n != "img_in"), "kohya")[0]
    save_file(sd, str(comfy_models / "diffusion_models" / "lora.safetensors"))
    with pytest.raises(BadInput, match="this is a LoRA"):
        LoadNativeModel.execute(model_name="lora.safetensors")
