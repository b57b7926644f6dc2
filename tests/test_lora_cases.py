"""Three LoRA cases found on files no one here wrote, built in the key layouts the real files have:
a ComfyUI `.diff` on a norm scale, a BFL control LoRA baked into a dev checkpoint (a full Depth/Canny model
comes out), and a LoRA with one module whose shape fits no Flux (named, never fused or applied)."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxbridge.convert.inspect import inspect_path
from fluxbridge.convert.load import load_model
from fluxbridge.convert.lora import apply_loras, convert_lora, inspect_lora, load_lora
from fluxbridge.convert.write import convert_file
from fluxbridge.headless.factory import save_layout, tiny_flux_transformer
from model_state import snapshot as state  # tests/helpers

FLUX = "flux-transformer"
pytestmark = pytest.mark.usefixtures("one_thread")


def dev_model(in_channels=64, seed=5, width=32):
    return tiny_flux_transformer(width=width, heads=2, double=1, single=1, in_channels=in_channels, seed=seed)


# -------------------------------------------------------------------------------- .diff on a norm scale

def test_comfy_diff_on_a_norm_scale_is_placed(tmp_path, on_host):
    """`diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff` (ComfyUI's full difference on
    an RMSNorm scale) goes to `transformer_blocks.0.attn.norm_q.weight`: applied, reported by the LoRA
    node, baked by `convert --lora`, and written back under the same key by `lora convert --to comfy`."""
    from fluxbridge.runtime import models
    g = torch.Generator().manual_seed(1)
    diff_q, diff_k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    sd = {"diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff": diff_q,
          "diffusion_model.single_blocks.0.norm.key_norm.scale.diff": diff_k,
          "diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight": torch.randn(2, 32, generator=g),
          "diffusion_model.double_blocks.0.img_attn.proj.lora_up.weight": torch.randn(32, 2, generator=g)}
    save_file(sd, tmp_path / "norm_diff.safetensors")
    lora = load_lora(tmp_path / "norm_diff.safetensors")
    assert lora.not_placed == [] and lora.format == "comfy"
    m = dev_model()
    before = state(m)
    with apply_loras(m, FLUX, [(lora, 0.5)]) as h:
        assert h.reports[0]["not_placed"] == []
        assert {"transformer_blocks.0.attn.norm_q", "single_transformer_blocks.0.attn.norm_k"} <= set(
            h.reports[0]["applied"]["patched"])
        # ComfyUI's "diff" patch: weight += strength * diff
        assert torch.equal(m.transformer_blocks[0].attn.norm_q.weight,
                           before["transformer_blocks.0.attn.norm_q.weight"] + 0.5 * diff_q)
        assert torch.equal(m.single_transformer_blocks[0].attn.norm_k.weight,
                           before["single_transformer_blocks.0.attn.norm_k.weight"] + 0.5 * diff_k)
        applied = state(m)
    report = models.lora_report(m, FLUX, lora, 1.0)  # what the LoRA node shows
    assert report["not_placed"] == [] and "transformer_blocks.0.attn.norm_q" in report["patched"]
    # convert --lora: the baked file equals the model patched in memory
    save_layout(m, tmp_path / "dev.safetensors", "bfl")
    convert_file(tmp_path / "dev.safetensors", tmp_path / "baked.safetensors", "diffusers",
                 loras=[(str(tmp_path / "norm_diff.safetensors"), 0.5)])
    baked = load_file(tmp_path / "baked.safetensors")
    for k, v in applied.items():
        assert torch.equal(baked[k], v), k
    convert_lora(tmp_path / "norm_diff.safetensors", tmp_path / "back.safetensors", "comfy")
    back = load_file(tmp_path / "back.safetensors")
    assert torch.equal(back["diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff"], diff_q)


# ------------------------------------------------------------------------------- control LoRA baked in

def control_lora(width=32, rank=4, seed=2):
    """FLUX.1-Depth-dev-lora's layout: BFL names without a prefix, lora_A/lora_B (+ lora_B.bias) on the
    linears, `img_in.lora_A` with twice the model's input channels, the RMSNorm scales as plain tensors."""
    g = torch.Generator().manual_seed(seed)
    linears = {"img_in": (width, 128), "txt_in": (width, 32), "double_blocks.0.img_attn.qkv": (3 * width, width),
               "double_blocks.0.txt_mlp.2": (width, 4 * width), "single_blocks.0.linear1": (7 * width, width),
               "final_layer.adaLN_modulation.1": (2 * width, width), "final_layer.linear": (64, width)}
    sd = {}
    for name, (out, inp) in linears.items():
        sd[f"{name}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.2
        sd[f"{name}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.2
        sd[f"{name}.lora_B.bias"] = torch.randn(out, generator=g) * 0.1
    for norm in ("double_blocks.0.img_attn.norm.query_norm.scale", "double_blocks.0.txt_attn.norm.key_norm.scale",
                 "single_blocks.0.norm.query_norm.scale"):
        sd[norm] = torch.rand(16, generator=g) + 0.5
    return sd


def test_control_lora_baked_into_dev_is_a_full_depth_model(tmp_path, on_host):
    from fluxbridge.runtime import models
    dev = tmp_path / "flux1-dev.safetensors"
    save_layout(dev_model(), dev, "bfl")
    save_file(control_lora(), tmp_path / "flux1-depth-dev-lora.safetensors")
    lora_path = tmp_path / "flux1-depth-dev-lora.safetensors"
    assert load_lora(lora_path).format == "bfl-control"

    out = tmp_path / "flux1-dev-depth.safetensors"
    report = convert_file(dev, out, "bfl", loras=[(str(lora_path), 1.0)])
    comp = report["components"][0]
    assert comp["expanded"] == {"x_embedder.weight": [32, 128]}
    assert comp["loras"][0]["not_placed"] == [] and "x_embedder" in comp["loras"][0]["patched"]
    info = inspect_path(out)
    assert info["variant"] == "depth" and info["config"]["in_channels"] == 128

    # laid out like BFL's own full Depth checkpoint: same keys, shapes and dtypes; loads to the same config
    bfl_depth = save_layout(dev_model(in_channels=128, seed=9), tmp_path / "flux1-depth-dev.safetensors", "bfl")
    ours, theirs = load_file(out), load_file(bfl_depth)
    assert ours["img_in.weight"].shape == (32, 128)
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    loaded, reference = load_model(out), load_model(bfl_depth)
    assert loaded.config == reference.config and loaded.variant == reference.variant == "depth"

    # equal, tensor by tensor, to the node path's expanded model (loader + LoRA stack applied in memory)
    tr, _ = models.load_transformer(dev, "fp32")
    tr = tr.with_lora("depth", models.open_lora(lora_path), 1.0)
    with tr.patched() as module:
        expanded = module.state_dict()
        assert module.config.in_channels == 128
        got = loaded.model.state_dict()
        assert got.keys() == expanded.keys()
        for k, v in expanded.items():
            assert torch.equal(got[k], v), k
    # Canny has the same shapes: only the name tells, as for BFL's files
    convert_file(dev, tmp_path / "flux1-canny-dev-baked.safetensors", "bfl", loras=[(str(lora_path), 1.0)])
    assert inspect_path(tmp_path / "flux1-canny-dev-baked.safetensors")["variant"] == "canny"


# ---------------------------------------------------------------------------- a module of the wrong shape

def mismatched_lora(tmp_path, width=64, rank=4, bad_rows=60):
    """A diffusers/PEFT-layout LoRA (two double blocks) in which transformer_blocks.0.attn.to_q's lora_B
    has `bad_rows` rows where the family and every other module of the file have `width`."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    for i in range(2):
        for mod in ("to_q", "to_k", "to_v", "add_q_proj", "to_out.0"):
            rows = bad_rows if (i, mod) == (0, "to_q") else width
            sd[f"transformer.transformer_blocks.{i}.attn.{mod}.lora_A.weight"] = torch.randn(rank, width, generator=g)
            sd[f"transformer.transformer_blocks.{i}.attn.{mod}.lora_B.weight"] = torch.randn(rows, rank, generator=g)
    path = tmp_path / "mismatched.safetensors"
    save_file(sd, path)
    return path


def test_a_module_of_the_wrong_shape_is_named_and_never_used(tmp_path):
    path = mismatched_lora(tmp_path)
    info = inspect_lora(path)
    bad = [d for d in info["not_placed"] if "transformer_blocks.0.attn.to_q" in d["key"]]
    assert len(bad) == 1
    assert "[60, 64]" in bad[0]["reason"] and "[64, 64]" in bad[0]["reason"]
    assert any("transformer_blocks.0.attn.to_q" in w and "[60, 64]" in w for w in info["warnings"])
    assert "transformer_blocks.0.attn.to_q" not in info["target_modules"][FLUX]

    # kohya: the fused qkv of block 0 is never made of mismatched parts; q is left out (zero rows), said so
    report = convert_lora(path, tmp_path / "kohya.safetensors", "kohya")
    assert any("[60, 64]" in d["reason"] for d in report["not_placed"])
    assert {"module": "double_blocks.0.img_attn.qkv", "missing": ["transformer_blocks.0.attn.to_q"]} \
        in report["zero_filled"]
    kohya = load_file(tmp_path / "kohya.safetensors")
    up = kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.shape[0] == 3 * 64 and torch.count_nonzero(up[:64]) == 0
    assert kohya["lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight"].shape[0] == 3 * 64

    # on a model: not applied, named in the report
    m = dev_model(width=64)
    with apply_loras(m, FLUX, [load_lora(path)]) as h:
        assert any("[60, 64]" in d["reason"] for d in h.reports[0]["not_placed"])

    # baked by `convert --lora`: q keeps the base's values, and the report names it with both shapes
    dev = save_layout(m, tmp_path / "dev.safetensors", "bfl")
    report = convert_file(dev, tmp_path / "baked.safetensors", "diffusers", loras=[(str(path), 1.0)])
    [lora_report] = report["components"][0]["loras"]
    assert any("to_q" in d["key"] and "[60, 64]" in d["reason"] and "[64, 64]" in d["reason"]
               for d in lora_report["not_placed"])
    baked = load_file(tmp_path / "baked.safetensors")
    assert torch.equal(baked["transformer_blocks.0.attn.to_q.weight"], m.transformer_blocks[0].attn.to_q.weight)
    assert not torch.equal(baked["transformer_blocks.0.attn.to_k.weight"], m.transformer_blocks[0].attn.to_k.weight)


def test_siblings_of_one_fused_module_and_even_splits(tmp_path):
    """linear1's q, k, v have as many rows as inputs (the table's "in" sizes); with no majority (one to_k
    against one to_v) neither shape is used, both named."""
    g = torch.Generator().manual_seed(4)
    sd = {}
    for mod, rows in (("attn.to_q", 62), ("attn.to_k", 62), ("attn.to_v", 62), ("proj_mlp", 256)):
        sd[f"transformer.single_transformer_blocks.0.{mod}.lora_A.weight"] = torch.randn(2, 64, generator=g)
        sd[f"transformer.single_transformer_blocks.0.{mod}.lora_B.weight"] = torch.randn(rows, 2, generator=g)
    lora = load_lora(sd, name="rows")
    reasons = {d["key"].split(".lora_")[0]: d["reason"] for d in lora.not_placed}
    assert set(reasons) == {f"transformer.single_transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")}
    assert "as many rows as inputs (64)" in reasons["transformer.single_transformer_blocks.0.attn.to_q"]
    assert [p.module for p in lora.parts] == ["single_transformer_blocks.0.proj_mlp"]

    tie = {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(2, 64, generator=g),
           "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.randn(64, 2, generator=g),
           "transformer.transformer_blocks.0.attn.to_v.lora_A.weight": torch.randn(2, 64, generator=g),
           "transformer.transformer_blocks.0.attn.to_v.lora_B.weight": torch.randn(60, 2, generator=g),
           "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": torch.randn(2, 64, generator=g),
           "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": torch.randn(64, 2, generator=g)}
    lora = load_lora(tie, name="tie")
    assert sorted(d["key"].split(".lora_")[0] for d in lora.not_placed) == [
        "transformer.transformer_blocks.0.attn.to_k", "transformer.transformer_blocks.0.attn.to_v"]
    assert all("[60, 64]" in d["reason"] and "[64, 64]" in d["reason"] for d in lora.not_placed)
    assert [p.module for p in lora.parts] == ["transformer_blocks.0.attn.to_out.0"]
