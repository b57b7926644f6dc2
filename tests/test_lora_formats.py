"""Every Flux LoRA format, applied to a tiny FluxTransformer2DModel, gives exactly the delta computed in the
file's own naming; conversions between the writable formats keep the deltas.

The oracle here is independent of the layout table: `bfl_map` below is written out by hand from the
reference (flux-lora-formats.md §1), and reference deltas are computed directly from the random factors.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxbridge.convert.lora import apply_loras, load_lora, patch_tensors
from fluxbridge.convert.lora.synth import Entry, write_keys
from fluxbridge.convert.lora.write import render_lora
from fluxbridge.headless.factory import tiny_flux_transformer
from lora_reference import BIAS, NAMING, lora_entries, ref_delta  # tests/helpers
from model_state import snapshot  # tests/helpers

FLUX = "flux-transformer"


pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {"small": dict(width=32, heads=2, double=1, single=1), "wide": dict(width=48, heads=3, double=2, single=2)}
_MODELS = {}


def tiny(shape="small"):
    if shape not in _MODELS:
        _MODELS[shape] = tiny_flux_transformer(**SHAPES[shape], seed=3)
    model = _MODELS[shape]
    return model


def bfl_map(double: int, single: int) -> dict:
    """BFL module -> (diffusers modules stacked by rows, rows swapped in halves). By hand, from §1."""
    m = {
        "img_in": (["x_embedder"], False),
        "txt_in": (["context_embedder"], False),
        "time_in.in_layer": (["time_text_embed.timestep_embedder.linear_1"], False),
        "time_in.out_layer": (["time_text_embed.timestep_embedder.linear_2"], False),
        "vector_in.in_layer": (["time_text_embed.text_embedder.linear_1"], False),
        "vector_in.out_layer": (["time_text_embed.text_embedder.linear_2"], False),
        "guidance_in.in_layer": (["time_text_embed.guidance_embedder.linear_1"], False),
        "guidance_in.out_layer": (["time_text_embed.guidance_embedder.linear_2"], False),
        "final_layer.linear": (["proj_out"], False),
        "final_layer.adaLN_modulation.1": (["norm_out.linear"], True),
    }
    for i in range(double):
        d, s = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        m[d + "img_mod.lin"] = ([s + "norm1.linear"], False)
        m[d + "txt_mod.lin"] = ([s + "norm1_context.linear"], False)
        m[d + "img_attn.qkv"] = ([s + "attn.to_q", s + "attn.to_k", s + "attn.to_v"], False)
        m[d + "txt_attn.qkv"] = ([s + "attn.add_q_proj", s + "attn.add_k_proj", s + "attn.add_v_proj"], False)
        m[d + "img_attn.proj"] = ([s + "attn.to_out.0"], False)
        m[d + "txt_attn.proj"] = ([s + "attn.to_add_out"], False)
        m[d + "img_mlp.0"] = ([s + "ff.net.0.proj"], False)
        m[d + "img_mlp.2"] = ([s + "ff.net.2"], False)
        m[d + "txt_mlp.0"] = ([s + "ff_context.net.0.proj"], False)
        m[d + "txt_mlp.2"] = ([s + "ff_context.net.2"], False)
    for i in range(single):
        d, s = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        m[d + "linear1"] = ([s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"], False)
        m[d + "linear2"] = ([s + "proj_out"], False)
        m[d + "modulation.lin"] = ([s + "norm.linear"], False)
    return m


def norm_map(double: int, single: int) -> dict:
    m = {}
    for i in range(double):
        d, s = f"double_blocks.{i}.", f"transformer_blocks.{i}.attn."
        m[d + "img_attn.norm.query_norm.scale"] = s + "norm_q.weight"
        m[d + "img_attn.norm.key_norm.scale"] = s + "norm_k.weight"
        m[d + "txt_attn.norm.query_norm.scale"] = s + "norm_added_q.weight"
        m[d + "txt_attn.norm.key_norm.scale"] = s + "norm_added_k.weight"
    for i in range(single):
        m[f"single_blocks.{i}.norm.query_norm.scale"] = f"single_transformer_blocks.{i}.attn.norm_q.weight"
        m[f"single_blocks.{i}.norm.key_norm.scale"] = f"single_transformer_blocks.{i}.attn.norm_k.weight"
    return m


XLABS = {"processor.qkv_lora1": "img_attn.qkv", "processor.qkv_lora2": "txt_attn.qkv",
         "processor.proj_lora1": "img_attn.proj", "processor.proj_lora2": "txt_attn.proj",
         "processor.proj_lora": "linear2"}


def targets_of(name: str, naming: str, bmap: dict):
    """Diffusers modules holding a source module's rows (in order) and whether halves swap."""
    if naming == "diffusers":
        return [name], False
    if naming == "xlabs":
        block, _, rest = name.partition(".processor.")
        block_i = block  # "double_blocks.0" / "single_blocks.0"
        if rest == "qkv_lora":
            return bmap[block_i + ".linear1"][0][:3], False
        return bmap[block_i + "." + XLABS["processor." + rest]]
    base, _, idx = name.rpartition(".")
    if naming == "omi" and idx.isdigit() and base in bmap and len(bmap[base][0]) > 1:
        return [bmap[base][0][int(idx)]], False
    return bmap[name]


def source_modules(naming: str, shape="small", model=None) -> dict[str, tuple[int, int]]:
    """Source module names of a naming convention -> (out, in) on the tiny model."""
    cfg = SHAPES[shape]
    sd = dict((model or tiny(shape)).state_dict())
    bmap = bfl_map(cfg["double"], cfg["single"])
    out = {}
    if naming == "bfl":
        for name, (targets, _) in bmap.items():
            out[name] = (sum(sd[t + ".weight"].shape[0] for t in targets), sd[targets[0] + ".weight"].shape[1])
    elif naming == "diffusers":
        for targets, _ in bmap.values():
            for t in targets:
                out[t] = tuple(sd[t + ".weight"].shape)
    elif naming == "omi":
        for name, (targets, _) in bmap.items():
            if len(targets) > 1:
                for k, t in enumerate(targets):
                    out[f"{name}.{k}"] = tuple(sd[t + ".weight"].shape)
            else:
                out[name] = tuple(sd[targets[0] + ".weight"].shape)
    elif naming == "xlabs":
        for i in range(cfg["double"]):
            for rest in ("qkv_lora1", "qkv_lora2", "proj_lora1", "proj_lora2"):
                name = f"double_blocks.{i}.processor.{rest}"
                ts, _ = targets_of(name, "xlabs", bmap)
                out[name] = (sum(sd[t + ".weight"].shape[0] for t in ts), sd[ts[0] + ".weight"].shape[1])
        for i in range(cfg["single"]):
            for rest in ("qkv_lora", "proj_lora"):
                name = f"single_blocks.{i}.processor.{rest}"
                ts, _ = targets_of(name, "xlabs", bmap)
                out[name] = (sum(sd[t + ".weight"].shape[0] for t in ts), sd[ts[0] + ".weight"].shape[1])
    return out


LOWRANK_FORMATS = list(NAMING)


def make_entries(fmt: str, gen: torch.Generator, shape="small", ranks=(2, 8), alphas=(None, 1.0, 4.0, 16.0),
                 skip=lambda name: False, bias=False):
    return lora_entries(source_modules(NAMING[fmt], shape), gen, ranks, alphas, skip, bias, std=0.5)


def model_delta(before, after, name, naming, bmap, param="weight"):
    """The observed delta of a source module, assembled in the source layout."""
    targets, swap = targets_of(name, naming, bmap)
    d = torch.cat([after[f"{t}.{param}"].double() - before[f"{t}.{param}"].double() for t in targets], 0)
    if swap:
        h = d.shape[0] // 2
        d = torch.cat([d[h:], d[:h]], 0)
    return d


def assert_rel(obs, ref, what, tol=1e-6):
    err = (obs - ref).norm() / ref.norm().clamp_min(1e-30)
    assert err <= tol, f"{what}: relative error {float(err):.3g}"


def check_applied(fmt, entries, shape="small", strength=1.0, sd_meta=None, model=None):
    model = model or tiny(shape)
    sd, meta = sd_meta or write_keys(entries, fmt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = load_lora(sd, meta, name=f"{fmt}.safetensors")
    assert not lora.not_placed, lora.not_placed
    handle = apply_loras(model, FLUX, [(lora, strength)])
    after = {k: v.clone() for k, v in model.state_dict().items()}
    check_deltas(fmt, entries, before, after, shape, strength)
    handle.remove()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{fmt}: {k} not restored bitwise"
    return lora, handle


def check_deltas(fmt, entries, before, after, shape="small", strength=1.0):
    """`after - before` is the reference delta of every entry on its targets; nothing else changed."""
    cfg = SHAPES[shape]
    bmap = bfl_map(cfg["double"], cfg["single"])
    touched = set()
    for e in entries:
        dw, db = ref_delta(e, fmt)
        targets, _ = targets_of(e.name, NAMING[fmt], bmap)
        touched.update(f"{t}.weight" for t in targets)
        if dw is not None:
            assert_rel(model_delta(before, after, e.name, NAMING[fmt], bmap), strength * dw, f"{fmt} {e.name}")
        if db is not None:
            touched.update(f"{t}.bias" for t in targets)
            assert_rel(model_delta(before, after, e.name, NAMING[fmt], bmap, "bias"), strength * db,
                       f"{fmt} {e.name} bias")
    for k in before:
        if k not in touched:
            assert torch.equal(before[k], after[k]), f"{fmt}: untargeted {k} changed"


# ------------------------------------------------------------------------------------ every format

@pytest.mark.parametrize("fmt", LOWRANK_FORMATS)
def test_format_applies_its_own_delta(fmt):
    gen = torch.Generator().manual_seed(hash(fmt) % 1000)
    entries = make_entries(fmt, gen, bias=fmt in BIAS)
    lora, _ = check_applied(fmt, entries)
    assert lora.format == fmt.replace("peft-named", "diffusers"), lora.format
    from fluxbridge.convert.lora import looks_like_lora
    assert looks_like_lora(write_keys(entries, fmt)[0])
    assert not looks_like_lora(tiny().state_dict())


@pytest.mark.parametrize("fmt", LOWRANK_FORMATS)
def test_baking_with_convert_changes_exactly_the_targets(fmt, tmp_path):
    """`fluxbridge convert BASE OUT --to diffusers --lora FILE:0.8`: the written tensors differ from the
    base by the reference delta exactly where the LoRA targets, and are bitwise the base elsewhere."""
    from safetensors.torch import load_file, save_file

    from fluxbridge.convert.write import convert_file
    from fluxbridge.headless.factory import save_layout

    gen = torch.Generator().manual_seed(hash(fmt) % 1000)
    entries = make_entries(fmt, gen, bias=fmt in BIAS)
    sd, meta = write_keys(entries, fmt)
    base = save_layout(tiny(), tmp_path / "base.safetensors", "bfl")
    lora_file = tmp_path / "lora.safetensors"
    save_file(sd, str(lora_file), metadata=meta)
    convert_file(base, tmp_path / "baked.safetensors", "diffusers", loras=[(str(lora_file), 0.8)])
    before = {k: v.clone() for k, v in tiny().state_dict().items()}
    check_deltas(fmt, entries, before, load_file(tmp_path / "baked.safetensors"), strength=0.8)


def test_wider_model_two_blocks_each():
    gen = torch.Generator().manual_seed(5)
    check_applied("kohya", make_entries("kohya", gen, shape="wide"), shape="wide")
    check_applied("diffusers", make_entries("diffusers", gen, shape="wide"), shape="wide")


def test_strength_scales_the_delta():
    gen = torch.Generator().manual_seed(6)
    check_applied("kohya", make_entries("kohya", gen), strength=-0.7)


def test_final_layer_swaps_rows_of_b_only():
    """norm_out.linear holds (scale, shift); the BFL LoRA's B rows are (shift, scale)."""
    gen = torch.Generator().manual_seed(7)
    entries = make_entries("kohya", gen, skip=lambda n: n != "final_layer.adaLN_modulation.1")
    check_applied("kohya", entries)
    e = entries[0]
    model = tiny()
    before = model.norm_out.linear.weight.clone()
    with apply_loras(model, FLUX, [load_lora(write_keys(entries, "kohya")[0], name="f")]):
        got = model.norm_out.linear.weight - before
    dw, _ = ref_delta(e, "kohya")
    half = dw.shape[0] // 2
    assert_rel(got[:half].double(), dw[half:], "scale half")
    assert_rel(got[half:].double(), dw[:half], "shift half")


def test_missing_parts_are_zero_filled_and_reported():
    """diffusers-named LoRA without to_v and proj_mlp: those rows stay bitwise, the report names them."""
    gen = torch.Generator().manual_seed(8)
    entries = make_entries("diffusers", gen, skip=lambda n: n.endswith(("attn.to_v", "proj_mlp")))
    lora, handle = check_applied("diffusers", entries)
    zero = {z["module"]: z["missing"] for z in lora.report["zero_filled"]}
    assert zero["double_blocks.0.img_attn.qkv"] == ["transformer_blocks.0.attn.to_v"]
    assert zero["single_blocks.0.linear1"] == ["single_transformer_blocks.0.attn.to_v",
                                              "single_transformer_blocks.0.proj_mlp"]
    kohya, _, rep = render_lora(lora, "kohya")
    assert {"module": "single_blocks.0.linear1", "missing": ["single_transformer_blocks.0.attn.to_v",
            "single_transformer_blocks.0.proj_mlp"]} in rep["zero_filled"]
    up = kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert up.shape[0] == 32 * 3 + 128 and torch.count_nonzero(up[64:]) == 0


def test_xlabs_single_qkv_lora_is_q_k_v_only():
    gen = torch.Generator().manual_seed(9)
    entries = make_entries("xlabs", gen)
    lora, _ = check_applied("xlabs", entries)
    assert {"module": "single_blocks.0.linear1", "missing": ["single_transformer_blocks.0.proj_mlp"]} \
        in lora.report["zero_filled"]


def test_bfl_control_bias_norm_set_and_input_expansion():
    """img_in lora_A has twice the model's input channels: the layer is zero-padded (as diffusers does),
    `lora_B.bias` is an additive bias delta, `*_norm.scale` overwrites; remove() restores all."""
    gen = torch.Generator().manual_seed(10)
    model = tiny_flux_transformer(**SHAPES["small"], seed=4)
    cfg = SHAPES["small"]
    entries = make_entries("bfl-control", gen, bias=True)
    for e in entries:
        if e.name == "img_in":
            e.tensors["down"] = torch.randn(e.tensors["down"].shape[0], 128, generator=gen)
    norms = {n: torch.rand(16, generator=gen) + 0.5 for n in norm_map(cfg["double"], cfg["single"])}
    entries += [Entry(n, "set", {"value": v}) for n, v in norms.items()]
    sd, meta = write_keys(entries, "bfl-control")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = load_lora(sd, meta, name="control")
    assert lora.format == "bfl-control" and lora.report["kinds"]["set"] == len(norms)
    handle = apply_loras(model, FLUX, [(lora, 1.0)])
    after = model.state_dict()
    assert model.x_embedder.weight.shape == (32, 128) and model.config.in_channels == 128
    e = next(e for e in entries if e.name == "img_in")
    dw, db = ref_delta(e, "bfl-control")
    padded = torch.cat([before["x_embedder.weight"], torch.zeros(32, 64)], 1).double()
    assert_rel(after["x_embedder.weight"].double() - padded, dw, "expanded img_in")
    assert_rel(after["x_embedder.bias"].double() - before["x_embedder.bias"].double(), db, "img_in bias")
    for n, v in norms.items():
        assert torch.equal(after[norm_map(cfg["double"], cfg["single"])[n]], v)
    out = model(hidden_states=torch.randn(1, 4, 128), encoder_hidden_states=torch.randn(1, 3, 32),
                pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 3),
                txt_ids=torch.zeros(3, 3), guidance=torch.tensor([3.5])).sample
    assert out.shape == (1, 4, 64)
    handle.remove()
    assert model.x_embedder.weight.shape == (32, 64) and model.config.in_channels == 64
    assert model.x_embedder.in_features == 64
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_lycoris_loha_lokr_full_and_dora():
    gen = torch.Generator().manual_seed(11)
    model = tiny()
    cfg = SHAPES["small"]
    bmap = bfl_map(cfg["double"], cfg["single"])
    r = 3
    loha = Entry("double_blocks.0.img_attn.proj", "loha", {
        "hada_w1_a": torch.randn(32, r, generator=gen) * .5, "hada_w1_b": torch.randn(r, 32, generator=gen) * .5,
        "hada_w2_a": torch.randn(32, r, generator=gen) * .5, "hada_w2_b": torch.randn(r, 32, generator=gen) * .5},
        alpha=2.0)
    lokr = Entry("double_blocks.0.img_attn.qkv", "lokr", {
        "lokr_w1": torch.randn(4, 4, generator=gen), "lokr_w2_a": torch.randn(24, 2, generator=gen) * .5,
        "lokr_w2_b": torch.randn(2, 8, generator=gen) * .5}, alpha=4.0)
    full = Entry("single_blocks.0.linear1", "full", {"diff": torch.randn(224, 32, generator=gen) * .1,
                                                     "diff_b": torch.randn(224, generator=gen) * .1})
    entries = [loha, lokr, full]
    sd, meta = write_keys(entries, "kohya")
    # kohya-named LyCORIS, including the fused qkv split exactly in the full ΔW
    check_applied("kohya", entries, sd_meta=(sd, meta))
    # DoRA, LyCORIS axis ([1, in], norm over output rows) on a fused module and PEFT axis on a split one
    dora_e = Entry("double_blocks.0.txt_attn.qkv", "lora", {
        "down": torch.randn(4, 32, generator=gen) * .5, "up": torch.randn(96, 4, generator=gen) * .5,
        "dora_scale": torch.rand(1, 32, generator=gen) + 0.5}, alpha=8.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd, meta = write_keys([dora_e], "kohya")
    with apply_loras(model, FLUX, [(load_lora(sd, meta, name="dora"), 0.8)]):
        after = model.state_dict()
        targets = bmap["double_blocks.0.txt_attn.qkv"][0]
        w = torch.cat([before[t + ".weight"] for t in targets]).double()
        dw, _ = ref_delta(dora_e, "kohya")
        merged = w + dw
        dora = merged * (dora_e.tensors["dora_scale"].double() / merged.norm(dim=0, keepdim=True))
        want = w + 0.8 * (dora - w)
        got = torch.cat([after[t + ".weight"] for t in targets]).double()
        assert_rel(got - w, want - w, "lycoris dora")
    peft_e = Entry("transformer_blocks.0.attn.to_q", "lora", {
        "down": torch.randn(4, 32, generator=gen) * .5, "up": torch.randn(32, 4, generator=gen) * .5,
        "magnitude": torch.rand(32, generator=gen) + 0.5})
    sd, meta = write_keys([peft_e], "diffusers")
    with apply_loras(model, FLUX, [load_lora(sd, meta, name="peft-dora")]):
        w = before["transformer_blocks.0.attn.to_q.weight"].double()
        merged = w + ref_delta(peft_e, "diffusers")[0]
        want = merged * (peft_e.tensors["magnitude"].double()[:, None] / merged.norm(dim=1, keepdim=True))
        assert_rel(model.transformer_blocks[0].attn.to_q.weight.double() - w, want - w, "peft dora")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_lycoris_prefix_and_trailing_underscore():
    """`lycoris_<diffusers>` (SimpleTuner LoKr) and `lora_unet_<diffusers>_` (F14) are placed."""
    gen = torch.Generator().manual_seed(12)
    lokr = Entry("transformer_blocks.0.attn.to_k", "lokr", {
        "lokr_w1": torch.randn(4, 4, generator=gen), "lokr_w2_a": torch.randn(8, 2, generator=gen),
        "lokr_w2_b": torch.randn(2, 8, generator=gen)}, alpha=1.0)
    sd, meta = write_keys([lokr], "lycoris")
    check_applied("lycoris", [lokr], sd_meta=(sd, meta))
    e = make_entries("diffusers", gen, skip=lambda n: n != "single_transformer_blocks.0.attn.to_k", alphas=(2.0,))[0]
    sd = {"lora_unet_single_transformer_blocks_0_attn_to_k_.lora_down.weight": e.tensors["down"],
          "lora_unet_single_transformer_blocks_0_attn_to_k_.lora_up.weight": e.tensors["up"],
          "lora_unet_single_transformer_blocks_0_attn_to_k_.alpha": torch.tensor(2.0)}
    lora = load_lora(sd, name="f14")
    assert lora.format == "kohya-diffusers-names" and not lora.not_placed
    check_applied("onetrainer", [e], sd_meta=(sd, {}))


def test_fp8_lora_file():
    gen = torch.Generator().manual_seed(13)
    entries = make_entries("kohya", gen, alphas=(4.0,))
    for e in entries:  # quantize the factors; the reference uses the same quantized values
        e.tensors = {k: v.to(torch.float8_e4m3fn) for k, v in e.tensors.items()}
    lora, _ = check_applied("kohya", entries)
    assert lora.report["dtypes"].get("float8_e4m3fn")


def test_peft_adapter_config_alpha(tmp_path):
    """PEFT save_pretrained: alphas come from adapter_config.json beside adapter_model.safetensors."""
    import json
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(14)
    entries = make_entries("peft", gen, alphas=(None,), ranks=(4, 4))
    sd, _ = write_keys(entries, "peft")
    save_file(sd, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "alpha_pattern": {
        "^proj_out": 2}}))
    lora = load_lora(tmp_path / "adapter_model.safetensors")
    scales = {p.module: p.scale for p in lora.parts}
    assert scales["transformer_blocks.0.attn.to_q"] == 2.0 and scales["proj_out"] == 0.5
    assert scales["single_transformer_blocks.0.proj_out"] == 2.0


# ------------------------------------------------------------------------- properties and round trips

WRITABLE = {"diffusers": "diffusers", "bfl": "bfl-peft", "kohya": "kohya", "comfy": "comfy"}
_ZEROS = {}


def deltas(lora) -> dict[str, torch.Tensor]:
    """ΔW/Δb of every patched tensor of the tiny model, through the same arithmetic as apply_loras."""
    if "small" not in _ZEROS:
        _ZEROS["small"] = {k: torch.zeros_like(v) for k, v in tiny().state_dict().items()}
    return patch_tensors([(lora, 1.0)], FLUX, _ZEROS["small"])


def assert_same_deltas(a: dict, b: dict, what: str):
    for k in set(a) | set(b):
        x = a.get(k)
        y = b.get(k)
        x = torch.zeros_like(y) if x is None else x
        y = torch.zeros_like(x) if y is None else y
        if x.abs().max() == 0 and y.abs().max() == 0:
            continue
        assert_rel(y.double(), x.double(), f"{what} {k}")


SPLIT_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "add_q_proj", "add_k_proj", "add_v_proj")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(LOWRANK_FORMATS), seed=st.integers(0, 10_000),
       lo=st.integers(1, 4), hi=st.integers(4, 8),
       alphas=st.lists(st.sampled_from([None, 0.5, 1.0, 3.0, 16.0]), min_size=1, max_size=3),
       missing=st.sets(st.sampled_from(SPLIT_PARTS), max_size=4))
def test_property_apply_and_round_trip(fmt, seed, lo, hi, alphas, missing):
    gen = torch.Generator().manual_seed(seed)
    naming = NAMING[fmt]
    if naming in ("diffusers", "omi"):
        bmap = bfl_map(1, 1)
        names = {f"{base}.{k}": t for base, (ts, _) in bmap.items() if len(ts) > 1 for k, t in enumerate(ts)}

        def skip(name):
            target = names.get(name, name)
            return target.endswith(tuple(missing))
    else:
        def skip(name):
            return False
    entries = make_entries(fmt, gen, ranks=(lo, hi), alphas=tuple(alphas), skip=skip)
    if not entries:
        return
    sd, meta = write_keys(entries, fmt)
    lora = check_applied(fmt, entries, sd_meta=(sd, meta))[0]
    want = deltas(lora)
    for to, as_fmt in WRITABLE.items():
        tensors, metadata, report = render_lora(lora, to)
        assert not report["not_written"], report["not_written"]
        back = load_lora(tensors, metadata, name=f"{fmt}->{to}")
        assert back.format == as_fmt and not back.not_placed
        assert_same_deltas(want, deltas(back), f"{fmt} -> {to}")
        # and back into the source's own format when it is writable: X -> canonical -> X
        again, meta2, _ = render_lora(back, to)
        assert_same_deltas(want, deltas(load_lora(again, meta2, name="again")), f"{fmt} -> {to} -> {to}")


def test_round_trips_keep_ranks():
    """kohya (dense fused) -> diffusers -> kohya keeps rank and alpha bitwise (A shared, B stacked);
    diffusers with different ranks per q/k/v -> kohya (block-diagonal, rank sum) -> diffusers gives the
    original ranks back (no rank growth)."""
    gen = torch.Generator().manual_seed(15)
    entries = make_entries("kohya", gen, alphas=(4.0,))
    sd, _ = write_keys(entries, "kohya")
    lora = load_lora(sd, name="k")
    diff, meta, _ = render_lora(lora, "diffusers")
    back, _, _ = render_lora(load_lora(diff, meta, name="d"), "kohya")
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k].float(), sd[k].float()), k
    entries = make_entries("diffusers", gen, ranks=(2, 6), alphas=(1.0, 8.0))
    sd, meta = write_keys(entries, "diffusers")
    lora = load_lora(sd, meta, name="d")
    fused, _, report = render_lora(lora, "kohya")
    qkv_rank = fused["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0]
    ranks = {e.name: e.tensors["down"].shape[0] for e in entries}
    assert qkv_rank == sum(ranks[f"transformer_blocks.0.attn.to_{x}"] for x in "qkv")
    split, meta2, _ = render_lora(load_lora(fused, name="k"), "diffusers")
    for name, r in ranks.items():
        assert split[f"transformer.{name}.lora_A.weight"].shape[0] == r, name
    assert_same_deltas(deltas(lora), deltas(load_lora(split, meta2, name="s")), "diffusers->kohya->diffusers")


def test_conversion_reports_what_it_cannot_write():
    gen = torch.Generator().manual_seed(16)
    loha = Entry("double_blocks.0.img_attn.proj", "loha", {
        "hada_w1_a": torch.randn(32, 2, generator=gen), "hada_w1_b": torch.randn(2, 32, generator=gen),
        "hada_w2_a": torch.randn(32, 2, generator=gen), "hada_w2_b": torch.randn(2, 32, generator=gen)}, alpha=1.0)
    full = Entry("double_blocks.0.txt_attn.proj", "full", {"diff": torch.randn(32, 32, generator=gen)})
    plain = make_entries("kohya", gen, skip=lambda n: n != "double_blocks.0.img_mlp.0")
    lora = load_lora(write_keys([loha, full] + plain, "kohya")[0], name="mixed")
    for to in ("diffusers", "kohya", "bfl"):
        tensors, _, report = render_lora(lora, to)
        kinds = sorted(d["kind"] for d in report["not_written"])
        assert kinds == ["full", "loha"], (to, report["not_written"])
        assert len(tensors) >= 2
    tensors, meta, report = render_lora(lora, "comfy")  # ComfyUI reads LoHa and diff natively
    assert not report["not_written"]
    assert_same_deltas(deltas(lora), deltas(load_lora(tensors, meta, name="c")), "comfy lycoris")


def test_inspect_and_convert_files(tmp_path):
    from safetensors.torch import load_file, save_file

    from fluxbridge.convert.lora import convert_lora, inspect_lora
    gen = torch.Generator().manual_seed(17)
    entries = make_entries("kohya", gen)
    sd, _ = write_keys(entries, "kohya")
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(2, 32)
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(32, 2)
    sd["lora_unet_something_else.lora_down.weight"] = torch.randn(2, 2)
    src = tmp_path / "k.safetensors"
    save_file(sd, src)
    info = inspect_lora(src)
    assert info["format"] == "kohya" and info["text_encoder_parts"] == {"clip-l": 1}
    assert info["not_placed"] == [{"key": "lora_unet_something_else.lora_down.weight", "reason": "unknown module"}]
    assert info["targets"]["flux-transformer"] == sum(len(t) for t, _ in bfl_map(1, 1).values())
    assert info["scale"].startswith("alpha/rank")
    dst = tmp_path / "d.safetensors"
    report = convert_lora(src, dst, "diffusers")
    assert report["tensors"] == len(load_file(dst)) and "lora_adapter_metadata" in __import__(
        "safetensors").safe_open(dst, "pt").metadata()
    assert_same_deltas(deltas(load_lora(src)), deltas(load_lora(dst)), "file round trip")


def test_norm_differences_and_comfy_set_weight_of_a_norm():
    """`<norm>.scale.diff` (ComfyUI's key for a norm difference) adds to the norm weight; ComfyUI's BFL-control
    conversion writes `<norm>.scale.set_weight`, which sets it."""
    gen = torch.Generator().manual_seed(18)
    model = tiny()
    diff, value = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    sd = {"diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff": diff,
          "diffusion_model.single_blocks.0.norm.key_norm.scale.set_weight": value}
    lora = load_lora(sd, name="norms")
    assert not lora.not_placed and sorted(p.kind for p in lora.parts) == ["full", "set"]
    before = snapshot(model)
    with apply_loras(model, FLUX, [(lora, 0.5)]) as handle:
        assert handle.reports[0]["applied"]["not_placed"] == []
        after = model.state_dict()
        assert torch.equal(after["transformer_blocks.0.attn.norm_q.weight"],
                           before["transformer_blocks.0.attn.norm_q.weight"] + 0.5 * diff)
        assert torch.equal(after["single_transformer_blocks.0.attn.norm_k.weight"], value)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == {"transformer_blocks.0.attn.norm_q.weight", "single_transformer_blocks.0.attn.norm_k.weight"}


def comfy_lokr_delta(sd: dict, key: str, shape) -> torch.Tensor:
    """What ComfyUI's LoKr adapter (the stubs' copy of its rule, comfy/weight_adapter/lokr.py in 0.3.64) adds at
    strength 1 from the file's tensors under `key`."""
    from comfy.weight_adapter import LoKrAdapter
    names = ("lokr_w1", "lokr_w2", "alpha", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")
    v = [sd.get(f"{key}.{n}") for n in names]
    v[2] = None if v[2] is None else float(v[2])
    adapter = LoKrAdapter(set(), (*v, None, None))
    return adapter.calculate_weight(torch.zeros(shape), key, 1.0, 1.0, None, lambda d: d)


def test_lokr_written_for_comfy_gives_comfyui_our_reading(comfy_stubs):
    """A LoKr written with `--to comfy` gives, through ComfyUI's alpha rule, the delta we read from the source,
    also where that rule divides by another rank than the one we read the scale by (factor ranks that differ),
    and where both factors are whole (no rank: scale 1, the file's alpha ignored, as there)."""
    from fluxbridge.convert.lora.layers import weight_delta
    g = torch.Generator().manual_seed(31)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    sd = {  # [32, 32] = kron([4, 4], [8, 8]); LyCORIS key spelling (kohya names)
        "lora_unet_double_blocks_0_img_attn_proj.lokr_w1_a": r(4, 2), "lora_unet_double_blocks_0_img_attn_proj.lokr_w1_b": r(2, 4),
        "lora_unet_double_blocks_0_img_attn_proj.lokr_w2_a": r(8, 4), "lora_unet_double_blocks_0_img_attn_proj.lokr_w2_b": r(4, 8),
        "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(8.0),
        "lora_unet_double_blocks_0_txt_attn_proj.lokr_w1": r(4, 4),
        "lora_unet_double_blocks_0_txt_attn_proj.lokr_w2_a": r(8, 4), "lora_unet_double_blocks_0_txt_attn_proj.lokr_w2_b": r(4, 8),
        "lora_unet_double_blocks_0_txt_attn_proj.alpha": torch.tensor(2.0),
        "lora_unet_double_blocks_0_img_mlp_0.lokr_w1": r(8, 4), "lora_unet_double_blocks_0_img_mlp_0.lokr_w2": r(16, 8),
        "lora_unet_double_blocks_0_img_mlp_0.alpha": torch.tensor(3.0)}
    lora = load_lora(sd, name="lokr")
    ours = {p.module: weight_delta(p) for p in lora.parts}
    assert len(ours) == 3
    tensors, _, report = render_lora(lora, "comfy")
    assert report["not_written"] == []
    for module, delta in ours.items():
        torch.testing.assert_close(comfy_lokr_delta(tensors, "diffusion_model." + module, delta.shape), delta,
                                   rtol=1e-6, atol=1e-7)
