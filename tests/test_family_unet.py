"""SD1.5 UNet family: exact round trips, agreement with diffusers' converter, the LCM cond_proj, parity."""
import pytest
import torch

from fluxbridge.convert.families import sd15_unet as unet
from fluxbridge.convert.table import A, B
from model_state import assert_same_tensors as assert_bitwise, convert_state, shapes_of  # tests/helpers

PREFIX = "model.diffusion_model."
SHAPES = [  # (block_out_channels, layers_per_block, attention per level, cross_attention_dim, time_cond_proj_dim)
    ((32, 64), 1, (True, False), 24, None),
    ((16, 32, 48), 2, (True, True, False), 40, 12),  # LCM-style: time_embedding.cond_proj (12 → 16)
]


def tiny_unet(channels, layers, attention, context, cond_proj, seed=0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=layers, cross_attention_dim=context,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=8, norm_num_groups=next(g for g in range(32, 0, -1) if all(c % g == 0 for c in channels)),
        time_cond_proj_dim=cond_proj)
    with torch.no_grad():  # every tensor distinct (norms and biases too), so a mix-up shows
        for p in model.parameters():
            p.normal_(0, 0.15)
    return model.eval()


def run(model, seed=1):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(sample=torch.randn(1, cfg.in_channels, 16, 16, generator=g), timestep=torch.tensor([321]),
                  encoder_hidden_states=torch.randn(1, 7, cfg.cross_attention_dim, generator=g))
    if cfg.time_cond_proj_dim:
        kwargs["timestep_cond"] = torch.randn(1, cfg.time_cond_proj_dim, generator=g)
    with torch.no_grad():
        return model(**kwargs).sample


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trips_are_bitwise_and_config_is_inferred_on_both_sides(shape):
    """diffusers → LDM → diffusers and LDM → diffusers → LDM: same keys, bit-identical tensors; both
    sides infer the config the model was built with, cond_proj included."""
    model = tiny_unet(*shape)
    sd = model.state_dict()
    config = unet.infer_config(shapes_of(sd), B)
    channels, layers, attention, context, cond_proj = shape
    expected = {k: model.config[k] for k in ("block_out_channels", "layers_per_block", "down_block_types",
                                             "up_block_types", "cross_attention_dim", "time_cond_proj_dim",
                                             "norm_num_groups", "attention_head_dim", "in_channels", "out_channels")}
    assert {k: config[k] for k in expected} == {k: tuple(v) if isinstance(v, list) else v for k, v in expected.items()}

    ldm, report = convert_state(unet.TABLE, sd, B, A, config)
    assert report["unplaced"] == []
    assert unet.infer_config(shapes_of(ldm), A) == config
    assert ("time_embedding.cond_proj.weight" in ldm) is (cond_proj is not None)
    # upsampler slots: `.1.conv` in up blocks without attention, `.2.conv` in those with
    ups = sorted(k[:-len(".conv.weight")] for k in ldm if k.endswith(".conv.weight") and k.startswith("output_blocks."))
    step = layers + 1
    assert ups == sorted(f"output_blocks.{b * step + layers}.{2 if a else 1}"
                         for b, a in enumerate(reversed(attention)) if b < len(channels) - 1)

    back, _ = convert_state(unet.TABLE, ldm, A, B, config)
    assert_bitwise(back, sd)
    again, _ = convert_state(unet.TABLE, back, B, A, config)
    assert_bitwise(again, ldm)


@pytest.mark.parametrize("shape", SHAPES)
def test_ldm_to_diffusers_equals_diffusers_converter_except_its_lcm_failure(shape):
    """Our LDM → diffusers plan equals `convert_ldm_unet_checkpoint` tensor for tensor.

    diffusers' known failure: it has no rule for the LCM `time_embedding.cond_proj.weight` and drops it
    (then `from_single_file` leaves the parameter on meta, or random); ours keeps it verbatim.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    sd = tiny_unet(*shape).state_dict()
    config = unet.infer_config(shapes_of(sd), B)
    ldm, _ = convert_state(unet.TABLE, sd, B, A, config)
    checkpoint = {PREFIX + k: v for k, v in ldm.items()}
    checkpoint.update(betas=torch.zeros(3), alphas_cumprod=torch.ones(3))  # schedule buffers: not UNet
    theirs = convert_ldm_unet_checkpoint(checkpoint, dict(config))
    ours, _ = convert_state(unet.TABLE, ldm, A, B, config)
    lcm = "time_embedding.cond_proj.weight"
    if shape[4] is not None:
        assert lcm in ours and lcm in ldm and lcm not in theirs  # diffusers drops it
        assert torch.equal(ours[lcm], sd[lcm])
        ours = {k: v for k, v in ours.items() if k != lcm}
    assert_bitwise(ours, {k: v.contiguous() for k, v in theirs.items()})


@pytest.mark.parametrize("shape", SHAPES)
def test_model_built_from_ldm_weights_gives_the_same_outputs(shape):
    """build(infer_config(LDM shapes)) + assigning our converted tensors: nothing left on meta, the
    trained cond_proj in place, and the output bit-identical to the original model (CPU fp32)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    model = tiny_unet(*shape)
    sd = model.state_dict()
    ldm, _ = convert_state(unet.TABLE, sd, B, A, unet.infer_config(shapes_of(sd), B))
    config = unet.infer_config(shapes_of(ldm), A)
    ours = unet.build(config)
    assert all(p.is_meta for p in ours.parameters())
    converted, _ = convert_state(unet.TABLE, ldm, A, B, config)
    ours.load_state_dict(converted, strict=True, assign=True)
    assert not any(p.is_meta for p in ours.parameters())
    reference = run(model)
    assert torch.isfinite(reference).all()
    assert torch.equal(run(ours.eval()), reference)
    if shape[4] is not None:
        assert torch.equal(ours.time_embedding.cond_proj.weight, sd["time_embedding.cond_proj.weight"])
        # the same model filled from diffusers' conversion keeps cond_proj on meta
        theirs = unet.build(config)
        result = theirs.load_state_dict(convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in ldm.items()},
                                                                     dict(config)), strict=False, assign=True)
        assert result.missing_keys == ["time_embedding.cond_proj.weight"]
        assert theirs.time_embedding.cond_proj.weight.is_meta


def test_full_size_sd15_layout_from_shapes_alone():
    """SD1.5 (meta tensors, no data): 686 keys on both sides, LDM block numbering as in the released
    checkpoints, and the config back from the LDM shapes."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    with init_empty_weights():
        model = UNet2DConditionModel(cross_attention_dim=768)  # the defaults are SD1.x's
    shapes = shapes_of(model.state_dict())
    plan, report = unet.TABLE.convert(shapes, B, A, unet.infer_config(shapes, B))
    ldm = {k: s.shape for k, s in plan.items()}
    assert len(ldm) == 686 and report["unplaced"] == []

    def blocks(what, part):
        return sorted({int(k.split(".")[1]) for k in ldm if k.startswith(what + ".") and f".{part}." in k})

    assert blocks("input_blocks", "0.in_layers") == [1, 2, 4, 5, 7, 8, 10, 11]
    assert blocks("input_blocks", "1.transformer_blocks") == [1, 2, 4, 5, 7, 8]
    assert blocks("input_blocks", "0.op") == [3, 6, 9]
    assert blocks("input_blocks", "0.skip_connection") == [4, 7]
    assert blocks("output_blocks", "0.skip_connection") == list(range(12))
    assert sorted(k for k in ldm if k.endswith(".conv.weight") and k.startswith("output_blocks")) == [
        "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight"]
    assert ldm["input_blocks.0.0.weight"] == (320, 4, 3, 3) and ldm["time_embed.0.weight"] == (1280, 320)
    assert ldm["input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    config = unet.infer_config(ldm, A)
    assert config["block_out_channels"] == (320, 640, 1280, 1280) and config["layers_per_block"] == 2
    assert config["cross_attention_dim"] == 768 and config["attention_head_dim"] == 8
    assert config["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert config["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert config["use_linear_projection"] is False and config["time_cond_proj_dim"] is None


def test_full_checkpoint_parts_are_separate_components():
    """A full SD checkpoint: UNet under model.diffusion_model. (the ComfyUI layout), VAE under
    first_stage_model., CLIP under cond_stage_model.transformer.; schedule buffers and model_ema.* belong
    to none of them."""
    from fluxbridge.convert.detect import components
    from fluxbridge.convert.families import clip, vae
    sd = tiny_unet(*SHAPES[0]).state_dict()
    ldm, _ = convert_state(unet.TABLE, sd, B, A, unet.infer_config(shapes_of(sd), B))
    keys = [PREFIX + k for k in ldm]
    keys += ["first_stage_model." + k for k in ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight",
                                                "decoder.up.0.block.0.conv1.weight", "decoder.mid.attn_1.q.weight")]
    keys += ["cond_stage_model.transformer.text_model." + k for k in (
        "embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
        "encoder.layers.0.mlp.fc1.weight", "final_layer_norm.weight")]
    extras = ["betas", "alphas_cumprod", "posterior_mean_coef1", "model_ema.decay", "model_ema.num_updates"]
    found = {c.family: c for c in components(keys + extras)}
    assert set(found) == {unet.FAMILY, vae.FAMILY, clip.FAMILY}
    assert found[unet.FAMILY].prefix == PREFIX and found[unet.FAMILY].side == A
    assert found[unet.FAMILY].layout == "comfy" and len(found[unet.FAMILY].names) == len(ldm)
    assert found[vae.FAMILY].prefix == "first_stage_model." and found[clip.FAMILY].prefix == "cond_stage_model.transformer."
    claimed = {k for c in found.values() for k in c.names.values()}
    assert not claimed & set(extras)


def test_block_numbering_needs_the_config():
    sd = tiny_unet(*SHAPES[0]).state_dict()
    with pytest.raises(ValueError, match="layers_per_block"):
        unet.TABLE.convert(shapes_of(sd), B, A, {})
    with pytest.raises(ValueError, match="up_block_types"):
        unet.TABLE.convert(shapes_of(sd), B, A, {"layers_per_block": 1})
    with pytest.raises(ValueError, match="not a complete UNet"):
        unet.infer_config({"conv_in.weight": (32, 4, 3, 3)}, B)
