"""Against the oracle: diffusers 0.42.1 `FluxPipeline.load_lora_weights` + `fuse_lora` on the same tiny
pipeline. Where diffusers is right, our fused weights equal its; where it is wrong (documented in
flux-lora-formats.md), the test asserts diffusers' wrong result AND ours right.
"""
import contextlib
import json
import logging
import warnings

import pytest
import torch

from fluxbridge.convert.lora import apply_loras, convert_lora, load_lora
from fluxbridge.convert.lora.synth import Entry, merge_metadata, write_keys
from fluxbridge.convert.lora.write import render_lora
from fluxbridge.headless.factory import tiny_clip_l, tiny_flux_transformer, tiny_scheduler

FLUX, CLIP = "flux-transformer", "clip-l"


pytestmark = pytest.mark.usefixtures("one_thread")


def pipe(double=1, single=1):
    from diffusers import FluxPipeline
    return FluxPipeline(scheduler=tiny_scheduler(), vae=None, text_encoder=tiny_clip_l(seed=2), tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None,
                        transformer=tiny_flux_transformer(width=32, heads=2, double=double, single=single, seed=1))


@contextlib.contextmanager
def captured_warnings():
    """Warnings from diffusers / peft / transformers loggers and Python warnings."""
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(f"{record.name}: {record.getMessage()}")

    handler = Grab(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield records
    records += [str(w.message) for w in caught if "torchvision" not in str(w.message)]
    for lg in loggers:
        lg.removeHandler(handler)
    # diffusers says this for every transformer-only LoRA, its own included ("safe to ignore")
    records[:] = [r for r in records if "No LoRA keys associated to CLIPTextModel" not in r
                  and "torchvision" not in r]


def diffusers_fused(state_dict, path=None, double=1, single=1):
    p = pipe(double, single)
    # clones: diffusers' kohya text-encoder path scales the caller's tensors in place (`*=`)
    source = path if path is not None else {k: v.clone() for k, v in state_dict.items()}
    p.load_lora_weights(source)
    p.fuse_lora(components=["transformer", "text_encoder"])
    p.unload_lora_weights()
    return p


def ours(lora, double=1, single=1, text=True):
    p = pipe(double, single)
    apply_loras(p.transformer, FLUX, [(lora, 1.0)])
    if text:
        apply_loras(p.text_encoder, CLIP, [(lora, 1.0)])
    return p


def compare(a, b, skip=(), what=""):
    """Every parameter of transformer and text encoder equal (fp32 rounding), except `skip`."""
    for comp in ("transformer", "text_encoder"):
        sa, sb = getattr(a, comp).state_dict(), getattr(b, comp).state_dict()
        for k in sa:
            if k in skip:
                continue
            torch.testing.assert_close(sb[k], sa[k], rtol=2e-6, atol=2e-6, msg=lambda m: f"{what} {comp}.{k}: {m}")


def rand_lora(name, out, inp, rank, gen, alpha=None, std=0.2):
    return Entry(name, "lora", {"down": torch.randn(rank, inp, generator=gen) * std,
                                "up": torch.randn(out, rank, generator=gen) * std}, alpha)


KOHYA_BLOCKS = [("double_blocks.0.img_attn.qkv", 96, 32), ("double_blocks.0.txt_attn.qkv", 96, 32),
                ("double_blocks.0.img_attn.proj", 32, 32), ("double_blocks.0.txt_mlp.0", 128, 32),
                ("double_blocks.0.img_mod.lin", 192, 32), ("single_blocks.0.linear2", 32, 160),
                ("single_blocks.0.modulation.lin", 96, 32)]
OUTSIDE_BLOCKS = [("final_layer.adaLN_modulation.1", 64, 32), ("final_layer.linear", 64, 32), ("img_in", 32, 64),
                  ("txt_in", 32, 32), ("time_in.in_layer", 32, 256)]
TEXT = [("text_model.encoder.layers.0.self_attn.q_proj", 32, 32),
        ("text_model.encoder.layers.0.self_attn.out_proj", 32, 32),
        ("text_model.encoder.layers.1.mlp.fc1", 64, 32)]


def test_kohya_blocks_equal_diffusers_which_drops_final_layer_and_embedders():
    gen = torch.Generator().manual_seed(0)
    unet = [rand_lora(n, o, i, 4, gen, alpha=a) for (n, o, i), a in zip(KOHYA_BLOCKS + OUTSIDE_BLOCKS,
                                                                         [2.0, 8.0, 4.0, 1.0] * 4)]
    te = [rand_lora(n, o, i, 4, gen, alpha=2.0) for n, o, i in TEXT]
    sd, _ = write_keys(unet, "kohya")
    sd.update(write_keys(te, "kohya-te1")[0])
    sd.update(write_keys([rand_lora("encoder.block.0.layer.0.SelfAttention.q", 32, 32, 2, gen)], "kohya-te3")[0])
    theirs = diffusers_fused(sd)
    lora = load_lora(sd, name="kohya")
    mine = ours(lora)
    outside = {"norm_out.linear.weight", "proj_out.weight", "x_embedder.weight", "context_embedder.weight",
               "time_text_embed.timestep_embedder.linear_1.weight"}
    compare(theirs, mine, skip=outside, what="kohya")
    base = pipe()
    for k in outside:  # diffusers: converted without the `transformer.` prefix, then silently dropped
        assert torch.equal(theirs.transformer.state_dict()[k], base.transformer.state_dict()[k]), k
        assert not torch.equal(mine.transformer.state_dict()[k], base.transformer.state_dict()[k]), k
    # ours is the reference delta, final-layer halves swapped
    e = unet[len(KOHYA_BLOCKS)]
    d = (e.alpha / 4) * e.tensors["up"] @ e.tensors["down"]
    got = mine.transformer.norm_out.linear.weight - base.transformer.norm_out.linear.weight
    torch.testing.assert_close(got, torch.cat([d[32:], d[:32]]), rtol=1e-5, atol=1e-6)
    # diffusers also drops the T5 part silently; we keep it for a T5 model
    assert lora.report["text_encoder_parts"] == {"clip-l": 3, "t5-xxl": 1}
    from diffusers import FluxPipeline
    assert not any("encoder.block" in k for k in FluxPipeline.lora_state_dict(dict(sd)))


def test_peft_format_equals_diffusers_mixed_ranks_alphas_and_partial_qkv(tmp_path):
    """diffusers / PEFT keys with per-module ranks and alphas in `lora_adapter_metadata`; the double
    block has q and k only and the single block no proj_mlp: diffusers patches the present parts (no
    word about the rest), we do the same and report the missing parts as zero-filled."""
    gen = torch.Generator().manual_seed(1)
    mods = [("transformer_blocks.0.attn.to_q", 32, 32, 2, 4.0), ("transformer_blocks.0.attn.to_k", 32, 32, 4, 1.0),
            ("transformer_blocks.0.ff.net.2", 32, 128, 3, 3.0), ("single_transformer_blocks.0.attn.to_q", 32, 32, 2, 2.0),
            ("single_transformer_blocks.0.attn.to_k", 32, 32, 2, 2.0),
            ("single_transformer_blocks.0.attn.to_v", 32, 32, 2, 2.0), ("proj_out", 64, 32, 5, 5.0),
            ("norm_out.linear", 64, 32, 2, 8.0), ("single_transformer_blocks.0.proj_out", 32, 160, 2, 2.0)]
    entries = [rand_lora(n, o, i, r, gen, alpha=a) for n, o, i, r, a in mods]
    sd, meta = write_keys(entries, "diffusers")
    te = [rand_lora(n, o, i, 3, gen) for n, o, i in TEXT]
    te_sd, te_meta = write_keys(te, "diffusers-clip")
    sd.update(te_sd)
    meta = merge_metadata(meta, te_meta)
    lora = load_lora(sd, meta, name="peft")
    from safetensors.torch import save_file
    path = tmp_path / "peft.safetensors"  # diffusers reads `lora_adapter_metadata` from a file only
    save_file(sd, path, metadata=meta)
    with captured_warnings() as seen:
        theirs = diffusers_fused(None, path=str(path))
    assert not seen, seen
    compare(theirs, ours(lora), what="peft")
    zero = {z["module"]: z["missing"] for z in lora.report["zero_filled"]}
    assert zero == {"double_blocks.0.img_attn.qkv": ["transformer_blocks.0.attn.to_v"],
                    "single_blocks.0.linear1": ["single_transformer_blocks.0.proj_mlp"]}


def test_comfy_lora_down_up_equals_diffusers():
    gen = torch.Generator().manual_seed(2)
    unet = [rand_lora(n, o, i, 3, gen, alpha=6.0) for n, o, i in KOHYA_BLOCKS]
    sd, _ = write_keys(unet, "comfy")
    sd.update(write_keys([rand_lora(n, o, i, 2, gen, alpha=1.0) for n, o, i in TEXT], "comfy-clip")[0])
    lora = load_lora(sd, name="comfy")
    assert lora.format == "comfy"
    compare(diffusers_fused(sd), ours(lora), what="comfy")


def test_xlabs_equals_diffusers():
    gen = torch.Generator().manual_seed(3)
    names = [("double_blocks.0.processor.qkv_lora1", 96, 32), ("double_blocks.0.processor.qkv_lora2", 96, 32),
             ("double_blocks.0.processor.proj_lora1", 32, 32), ("double_blocks.0.processor.proj_lora2", 32, 32),
             ("single_blocks.0.processor.qkv_lora", 96, 32), ("single_blocks.0.processor.proj_lora", 32, 160)]
    sd, _ = write_keys([rand_lora(n, o, i, 4, gen) for n, o, i in names], "xlabs")
    lora = load_lora(sd, name="xlabs")
    assert lora.format == "xlabs"
    compare(diffusers_fused(sd), ours(lora, text=False), what="xlabs")


def test_onetrainer_legacy_equals_diffusers():
    gen = torch.Generator().manual_seed(4)
    mods = [("transformer_blocks.0.attn.to_q", 32, 32), ("transformer_blocks.0.attn.add_v_proj", 32, 32),
            ("transformer_blocks.0.attn.to_out.0", 32, 32), ("single_transformer_blocks.0.attn.to_k", 32, 32),
            ("x_embedder", 32, 64), ("norm_out.linear", 64, 32), ("proj_out", 64, 32), ("context_embedder", 32, 32)]
    sd, _ = write_keys([rand_lora(n, o, i, 4, gen, alpha=2.0) for n, o, i in mods], "onetrainer")
    lora = load_lora(sd, name="onetrainer")
    assert lora.format == "onetrainer"
    # PEFT matches a list of target modules by suffix: the final `proj_out` also catches every
    # single block's `proj_out` (injected, no weights: harmless here, but a warning)
    with pytest.warns(RuntimeWarning, match=r"additional target modules: \['single_transformer_blocks.0.proj_out'\]"):
        theirs = diffusers_fused(sd)
    compare(theirs, ours(lora, text=False), what="onetrainer")


def test_onetrainer_legacy_block_mlp_and_norm_break_diffusers():
    """diffusers' OneTrainer converter maps only `attn_*` inside blocks: `proj_mlp`, `norm1.linear`,
    `ff.net.*` and a single block's `proj_out` lose their sub-module name (KeyError); we place them."""
    gen = torch.Generator().manual_seed(4)
    mods = [("single_transformer_blocks.0.proj_mlp", 128, 32), ("transformer_blocks.0.norm1.linear", 192, 32),
            ("transformer_blocks.0.ff.net.2", 32, 128)]
    entries = [rand_lora(n, o, i, 4, gen, alpha=2.0) for n, o, i in mods]
    sd, _ = write_keys(entries, "onetrainer")
    with pytest.raises(KeyError):
        diffusers_fused(sd)
    base, mine = pipe(), ours(load_lora(sd, name="onetrainer"), text=False)
    for e in entries:
        got = mine.transformer.state_dict()[e.name + ".weight"] - base.transformer.state_dict()[e.name + ".weight"]
        torch.testing.assert_close(got, 0.5 * e.tensors["up"] @ e.tensors["down"], rtol=1e-5, atol=1e-6)


def test_bfl_peft_is_not_loaded_by_diffusers():
    """F3 `diffusion_model.*.lora_A/B`: diffusers warns and loads nothing; we apply it."""
    gen = torch.Generator().manual_seed(5)
    unet = [rand_lora(n, o, i, 3, gen) for n, o, i in KOHYA_BLOCKS]
    sd, _ = write_keys(unet, "bfl-peft")
    with captured_warnings() as seen:
        theirs = diffusers_fused(sd)
    base = pipe()
    assert any("No LoRA keys associated" in w for w in seen), seen
    for k, v in theirs.transformer.state_dict().items():
        assert torch.equal(v, base.transformer.state_dict()[k]), k
    lora = load_lora(sd, name="bfl-peft")
    assert lora.format == "bfl-peft"
    mine = ours(lora, text=False)
    # the same file spelled as diffusers keys is loaded by diffusers, and equals ours
    converted, meta, _ = render_lora(lora, "diffusers")
    compare(diffusers_fused(converted), mine, what="bfl-peft via diffusers keys")


def test_fp8_kohya_lora_crashes_diffusers_not_us():
    gen = torch.Generator().manual_seed(6)
    unet = [rand_lora(n, o, i, 4, gen, alpha=2.0) for n, o, i in KOHYA_BLOCKS[:3]]
    for e in unet:
        e.tensors = {k: v.to(torch.float8_e4m3fn) for k, v in e.tensors.items()}
    sd, _ = write_keys(unet, "kohya")
    with pytest.raises(NotImplementedError, match="Float8_e4m3fn"):
        diffusers_fused(sd)
    mine = ours(load_lora(sd, name="fp8"), text=False)
    upcast = {k: v.float() for k, v in sd.items()}  # what the fp8 file means, for diffusers
    compare(diffusers_fused(upcast), mine, what="fp8 kohya")


def test_our_diffusers_output_loads_cleanly_and_equals_ours(tmp_path):
    """kohya with final layer, embedders, different ranks and alphas and CLIP parts → our diffusers file:
    diffusers loads it without a warning or a dropped key, and its fused weights equal ours (which
    diffusers' own kohya loader gets wrong for the final layer and the embedders)."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(7)
    ranks = [2, 3, 4, 5, 6, 2, 3, 4, 5, 6, 2, 3]
    unet = [rand_lora(n, o, i, r, gen, alpha=float(r + k % 3)) for k, ((n, o, i), r) in
            enumerate(zip(KOHYA_BLOCKS + OUTSIDE_BLOCKS, ranks))]
    sd, _ = write_keys(unet, "kohya")
    sd.update(write_keys([rand_lora(n, o, i, 3, gen, alpha=6.0) for n, o, i in TEXT], "kohya-te1")[0])
    src, dst = tmp_path / "k.safetensors", tmp_path / "d.safetensors"
    save_file(sd, src)
    report = convert_lora(src, dst, "diffusers")
    assert not report["not_written"] and report["swapped"] == ["final_layer.adaLN_modulation.1"]
    with captured_warnings() as seen:
        theirs = diffusers_fused(None, path=str(dst))
    assert not seen, seen
    compare(theirs, ours(load_lora(src)), what="our diffusers file")


def test_bias_lora_written_for_diffusers_loads_cleanly(tmp_path):
    """`lora_B.bias` (BFL-PEFT / control style) → diffusers with lora_bias=True (zero biases where a
    module had none, so PEFT finds every key)."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(8)
    entries = []
    for n, o, i in KOHYA_BLOCKS[:4]:
        e = rand_lora(n, o, i, 2, gen)
        if "qkv" in n:
            e.tensors["up_bias"] = torch.randn(o, generator=gen) * 0.2
        entries.append(e)
    sd, _ = write_keys(entries, "bfl-peft")
    src, dst = tmp_path / "b.safetensors", tmp_path / "d.safetensors"
    save_file(sd, src)
    convert_lora(src, dst, "diffusers")
    with captured_warnings() as seen:
        theirs = diffusers_fused(None, path=str(dst))
    assert not seen, seen
    compare(theirs, ours(load_lora(src), text=False), what="bias")


# ------------------------------------------------------------- full width, converter level (no model)

def _project(down, up, scale, probe):
    return (up.double() @ (down.double() @ probe)) * scale


def _our_split(lora):
    """Our diffusers-side pairs: name -> (down, up, scale, bias)."""
    tensors, meta, _ = render_lora(lora, "diffusers")
    cfg = json.loads(meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in meta else {}
    back = load_lora(tensors, meta, name="ours")
    return {p.module: p for p in back.parts if p.kind == "lora"}, cfg


def _check_against(theirs: dict, mine: dict, gen, skip=()):
    """theirs: diffusers state dict `transformer.<name>.lora_A/B.weight` with scales baked in."""
    names = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in theirs
                    if k.startswith("transformer.") and ".lora_A." in k})
    assert set(names) == set(mine), (set(names) ^ set(mine))
    for n in names:
        if n in skip:
            continue
        a, b = theirs[f"transformer.{n}.lora_A.weight"], theirs[f"transformer.{n}.lora_B.weight"]
        p = mine[n]
        probe = torch.randn(a.shape[1], 2, generator=gen, dtype=torch.float64)
        want = _project(a, b, 1.0, probe)
        got = _project(p.tensors["down"], p.tensors["up"], p.scale, probe)
        assert float((got - want).norm() / want.norm()) < 1e-6, n
        if f"transformer.{n}.lora_B.bias" in theirs:
            torch.testing.assert_close(p.tensors["up_bias"].double() * p.scale,
                                       theirs[f"transformer.{n}.lora_B.bias"].double(), rtol=1e-6, atol=1e-8)


def _full_keys(bias: bool, rank: int, gen):
    """Every BFL module of FLUX.1 (19 double, 38 single blocks, D = 3072) as (name, out, in) at low rank."""
    D = 3072
    mods = [("img_in", D, 64), ("txt_in", D, 4096), ("time_in.in_layer", D, 256), ("time_in.out_layer", D, D),
            ("vector_in.in_layer", D, 768), ("vector_in.out_layer", D, D), ("guidance_in.in_layer", D, 256),
            ("guidance_in.out_layer", D, D), ("final_layer.linear", 64, D), ("final_layer.adaLN_modulation.1", 2 * D, D)]
    for i in range(19):
        for s in ("img", "txt"):
            mods += [(f"double_blocks.{i}.{s}_mod.lin", 6 * D, D), (f"double_blocks.{i}.{s}_attn.qkv", 3 * D, D),
                     (f"double_blocks.{i}.{s}_attn.proj", D, D), (f"double_blocks.{i}.{s}_mlp.0", 4 * D, D),
                     (f"double_blocks.{i}.{s}_mlp.2", D, 4 * D)]
    for i in range(38):
        mods += [(f"single_blocks.{i}.linear1", 7 * D, D), (f"single_blocks.{i}.linear2", D, 5 * D),
                 (f"single_blocks.{i}.modulation.lin", 3 * D, D)]
    entries = []
    for n, o, i in mods:
        e = rand_lora(n, o, i, rank, gen)
        if bias:
            e.tensors["up_bias"] = torch.randn(o, generator=gen) * 0.2
        entries.append(e)
    return entries


def test_full_width_bfl_control_and_fal_kontext_match_diffusers_converters():
    """diffusers' BFL-control and fal-Kontext converters only take complete FLUX.1 files (19/38 blocks,
    D = 3072): compared at that size with rank-2 factors, without building a model.

    Two diffusers faults show up: the control converter swaps the halves of the final layer's lora_A
    too (A's rows are rank components, not shift/scale: the delta is wrong; with an odd rank it
    crashes), and the Kontext converter has no rule for `final_layer.adaLN_modulation.1` nor for the
    embedders (ValueError)."""
    from diffusers import FluxPipeline
    gen = torch.Generator().manual_seed(9)
    entries = _full_keys(bias=True, rank=2, gen=gen)
    norms = []
    for i in range(19):
        for s in ("img", "txt"):
            for q in ("query", "key"):
                norms.append(Entry(f"double_blocks.{i}.{s}_attn.norm.{q}_norm.scale", "set",
                                   {"value": torch.rand(128, generator=gen)}))
    for i in range(38):
        for q in ("query", "key"):
            norms.append(Entry(f"single_blocks.{i}.norm.{q}_norm.scale", "set", {"value": torch.rand(128, generator=gen)}))
    sd, _ = write_keys(entries + norms, "bfl-control")
    theirs = FluxPipeline.lora_state_dict({k: v.clone() for k, v in sd.items()})
    lora = load_lora(sd, name="control")
    assert lora.format == "bfl-control" and not lora.not_placed
    mine, _ = _our_split(lora)
    _check_against(theirs, mine, gen, skip=("norm_out.linear",))
    final = next(e for e in entries if e.name == "final_layer.adaLN_modulation.1").tensors
    half = final["up"].shape[0] // 2
    right = torch.cat([final["up"][half:], final["up"][:half]]) @ final["down"]
    wrong = torch.cat([final["up"][half:], final["up"][:half]]) @ torch.cat([final["down"][1:], final["down"][:1]])
    theirs_final = theirs["transformer.norm_out.linear.lora_B.weight"] @ theirs["transformer.norm_out.linear.lora_A.weight"]
    torch.testing.assert_close(theirs_final, wrong)
    assert not torch.allclose(theirs_final, right, atol=1e-3)
    p = mine["norm_out.linear"]
    torch.testing.assert_close(p.tensors["up"] @ p.tensors["down"] * p.scale, right)
    sets = {p.module: p.tensors["value"] for p in lora.parts if p.kind == "set"}
    assert sum(1 for k in theirs if "norm_" in k and "lora" not in k) == len(sets)
    # fal Kontext: `base_model.model.<bfl>`
    outside = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer.adaLN_modulation.1")
    entries = [e for e in _full_keys(bias=False, rank=1, gen=gen) if not e.name.startswith(outside)]
    sd, _ = write_keys(entries, "fal-kontext")
    theirs = FluxPipeline.lora_state_dict({k: v.clone() for k, v in sd.items()})
    lora = load_lora(sd, name="kontext")
    assert lora.format == "fal-kontext"
    _check_against(theirs, _our_split(lora)[0], gen)
    for name, out, inp in (("final_layer.adaLN_modulation.1", 6144, 3072), ("img_in", 3072, 64)):
        more = dict(sd, **write_keys([rand_lora(name, out, inp, 1, gen)], "fal-kontext")[0])
        with pytest.raises(ValueError, match="should be empty"):
            FluxPipeline.lora_state_dict({k: v.clone() for k, v in more.items()})
        assert not load_lora(more, name="kontext").not_placed


def test_full_width_kohya_linear1_matches_diffusers_converter():
    """diffusers splits kohya `linear1` with fixed sizes [3072, 3072, 3072, 12288]: at D = 3072 it
    agrees with our table split; at any other width it fails (AssertionError), we do not."""
    from diffusers import FluxPipeline
    gen = torch.Generator().manual_seed(10)
    entries = [rand_lora("single_blocks.3.linear1", 21504, 3072, 4, gen, alpha=2.0),
               rand_lora("double_blocks.2.img_attn.qkv", 9216, 3072, 4, gen, alpha=8.0)]
    # a block-diagonal (sd-scripts split_qkv) qkv: both converters split it without rank growth
    e = rand_lora("double_blocks.5.txt_attn.qkv", 9216, 3072, 6, gen, alpha=3.0)
    for j in range(3):
        for k in range(3):
            if j != k:
                e.tensors["up"][j * 3072:(j + 1) * 3072, k * 2:(k + 1) * 2] = 0
    entries.append(e)
    sd, _ = write_keys(entries, "kohya")
    theirs = FluxPipeline.lora_state_dict({k: v.clone() for k, v in sd.items()})
    mine, _ = _our_split(load_lora(sd, name="k"))
    _check_against(theirs, mine, gen)
    assert mine["transformer_blocks.5.attn.add_k_proj"].rank == 2
    small, _ = write_keys([rand_lora("single_blocks.0.linear1", 224, 32, 4, gen)], "kohya")
    with pytest.raises(AssertionError):
        FluxPipeline.lora_state_dict(dict(small))
    assert load_lora(small, name="small").parts[0].module == "single_blocks.0.linear1"
