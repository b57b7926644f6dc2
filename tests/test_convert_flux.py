"""Flux transformer conversion: exact round trips, agreement with diffusers, tolerant loading."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxbridge.convert.families import flux
from fluxbridge.convert.load import load_model
from fluxbridge.convert.table import A, B, materialize
from fluxbridge.convert.write import convert_file
from fluxbridge.common.errors import BadInput
from model_state import as_bfl  # tests/helpers

SHAPES = [  # (width, head_dim, double, single, in_channels, guidance)
    (32, 16, 1, 2, 64, True),
    (48, 16, 2, 1, 64, False),
    (64, 32, 1, 1, 384, True),
]


def tiny_model(width, head, double, single, in_ch, guidance, seed=0):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        in_channels=in_ch, out_channels=64, num_layers=double, num_single_layers=single,
        attention_head_dim=head, num_attention_heads=width // head, joint_attention_dim=24,
        pooled_projection_dim=20, guidance_embeds=guidance, axes_dims_rope=flux.default_axes(head))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def forward(model, seed=1):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    img, txt = 16, 5
    kwargs = dict(
        hidden_states=torch.randn(1, img, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, txt, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.7]), img_ids=torch.zeros(img, 3), txt_ids=torch.zeros(txt, 3),
        guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None)
    kwargs["img_ids"][:, 1] = torch.arange(img) // 4
    kwargs["img_ids"][:, 2] = torch.arange(img) % 4
    with torch.no_grad():
        return model(**kwargs).sample


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trips_are_bitwise(tmp_path, shape):
    sd = tiny_model(*shape).state_dict()
    bfl = tmp_path / "bfl.safetensors"
    save_file(as_bfl(sd), bfl)
    for start, via in (("bfl", "diffusers"), ("comfy", "diffusers"), ("bfl", "comfy")):
        first = tmp_path / f"{start}.safetensors"
        if start == "comfy":
            convert_file(bfl, first, "comfy")
        mid, back = tmp_path / f"{start}-{via}.safetensors", tmp_path / f"{start}-{via}-back.safetensors"
        convert_file(first, mid, via)
        convert_file(mid, back, start)
        a, b = load_file(first), load_file(back)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    comfy = load_file(tmp_path / "comfy.safetensors")
    assert all(k.startswith("model.diffusion_model.") for k in comfy)
    diffusers_keys = set(load_file(tmp_path / "bfl-diffusers.safetensors"))
    assert diffusers_keys == set(sd)


def test_bfl_to_diffusers_equals_diffusers_converter_at_full_width():
    """D = 3072 (the only width diffusers' converter accepts), one double and one single block."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    torch.manual_seed(0)
    D, M = 3072, 4 * 3072
    shapes = {  # BFL names and shapes of a 1+1-block FLUX.1-dev, small text dims to stay light
        "img_in.weight": (D, 64), "img_in.bias": (D,), "txt_in.weight": (D, 64), "txt_in.bias": (D,),
        "time_in.in_layer.weight": (D, 256), "time_in.in_layer.bias": (D,),
        "time_in.out_layer.weight": (D, 8), "time_in.out_layer.bias": (D,),
        "vector_in.in_layer.weight": (D, 32), "vector_in.in_layer.bias": (D,),
        "vector_in.out_layer.weight": (D, 8), "vector_in.out_layer.bias": (D,),
        "guidance_in.in_layer.weight": (D, 256), "guidance_in.in_layer.bias": (D,),
        "guidance_in.out_layer.weight": (D, 8), "guidance_in.out_layer.bias": (D,),
        "final_layer.linear.weight": (64, D), "final_layer.linear.bias": (64,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, 8), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for s in ("img", "txt"):
        shapes.update({f"double_blocks.0.{s}_mod.lin.weight": (6 * D, 8), f"double_blocks.0.{s}_mod.lin.bias": (6 * D,),
                       f"double_blocks.0.{s}_attn.qkv.weight": (3 * D, 8), f"double_blocks.0.{s}_attn.qkv.bias": (3 * D,),
                       f"double_blocks.0.{s}_attn.norm.query_norm.scale": (128,),
                       f"double_blocks.0.{s}_attn.norm.key_norm.scale": (128,),
                       f"double_blocks.0.{s}_attn.proj.weight": (D, 8), f"double_blocks.0.{s}_attn.proj.bias": (D,),
                       f"double_blocks.0.{s}_mlp.0.weight": (M, 8), f"double_blocks.0.{s}_mlp.0.bias": (M,),
                       f"double_blocks.0.{s}_mlp.2.weight": (D, 8), f"double_blocks.0.{s}_mlp.2.bias": (D,)})
    # linear1 splits by its input width, so it keeps D columns
    shapes.update({"single_blocks.0.linear1.weight": (3 * D + M, D), "single_blocks.0.linear1.bias": (3 * D + M,),
                   "single_blocks.0.linear2.weight": (D, 8), "single_blocks.0.linear2.bias": (D,),
                   "single_blocks.0.norm.query_norm.scale": (128,), "single_blocks.0.norm.key_norm.scale": (128,),
                   "single_blocks.0.modulation.lin.weight": (3 * D, 8), "single_blocks.0.modulation.lin.bias": (3 * D,)})
    # Narrow input columns elsewhere keep this light: every transform the converters apply acts on rows.
    bfl = {k: torch.randn(s, dtype=torch.bfloat16) for k, s in shapes.items()}
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    plan, report = flux.TABLE.convert(shapes, A, B)
    ours = {k: materialize(s, bfl.__getitem__) for k, s in plan.items()}
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert report["swapped"] == ["final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"]


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_loaded_model_matches_diffusers_from_pretrained(tmp_path, shape):
    from diffusers import FluxTransformer2DModel
    model = tiny_model(*shape)
    model.save_pretrained(tmp_path / "folder")
    theirs = FluxTransformer2DModel.from_pretrained(tmp_path / "folder").eval()
    # diffusers leaves its weights as views of the file at safetensors' 8-byte-aligned offsets, where CPU
    # kernels may round differently than on aligned memory; home every model's weights alike first.
    with torch.no_grad():
        for p in theirs.parameters():
            p.data = p.data.clone()
    ours_folder = load_model(tmp_path / "folder", dtype=torch.float32)
    save_file(as_bfl(model.state_dict()), tmp_path / "flux1-dev.safetensors")
    ours_bfl = load_model(tmp_path / "flux1-dev.safetensors", dtype=torch.float32)
    assert ours_bfl.layout == "bfl" and ours_folder.layout == "diffusers"
    for ours in (ours_folder, ours_bfl):  # ours are views of the files too: same treatment
        assert ours.model.state_dict().keys() == model.state_dict().keys()
        for k, v in ours.model.state_dict().items():
            assert torch.equal(v, model.state_dict()[k]), k
        with torch.no_grad():
            for p in ours.model.parameters():
                p.data = p.data.clone()
    reference = forward(theirs)
    assert torch.equal(forward(model), reference)
    assert torch.equal(forward(ours_folder.model), reference)
    assert torch.equal(forward(ours_bfl.model), reference)
    assert ours_bfl.variant == ("dev" if shape[-1] else "schnell")


def test_loading_names_missing_unexpected_and_misshapen_tensors(tmp_path):
    bfl = as_bfl(tiny_model(*SHAPES[0]).state_dict())
    broken = dict(bfl)
    del broken["double_blocks.0.img_mlp.2.weight"]
    save_file(broken, tmp_path / "missing.safetensors")
    with pytest.raises(BadInput, match="img_mlp.2.weight|ff.net.2.weight"):
        load_model(tmp_path / "missing.safetensors")

    extra = dict(bfl, **{"double_blocks.0.img_attn.extra.weight": torch.zeros(2)})
    save_file(extra, tmp_path / "extra.safetensors")
    loaded = load_model(tmp_path / "extra.safetensors")
    assert loaded.report["unplaced"] == ["double_blocks.0.img_attn.extra.weight"]

    bad = dict(bfl)
    bad["double_blocks.0.img_attn.proj.weight"] = torch.zeros(32, 31)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(BadInput, match=r"attn.to_out.0.weight.*\[32, 31\].*\[32, 32\]"):
        load_model(tmp_path / "bad.safetensors")


def test_variants_from_shapes_and_names():
    base = dict(in_channels=64, out_channels=64, guidance_embeds=True)
    assert flux.variant(base) == "dev"
    assert flux.variant(dict(base, guidance_embeds=False)) == "schnell"
    assert flux.variant(dict(base, in_channels=384)) == "fill"
    assert flux.variant(dict(base, in_channels=128)) == "depth"
    assert flux.variant(dict(base, in_channels=128), "flux1-canny-dev.safetensors") == "canny"
    assert flux.variant(base, "flux1-kontext-dev.safetensors") == "kontext"
