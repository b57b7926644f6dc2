"""FLUX / SD VAE family: exact round trips, agreement with diffusers' converter, output parity."""
import pytest
import torch

from fluxbridge.convert.families import vae
from fluxbridge.convert.table import A, B
from model_state import assert_same_tensors as assert_bitwise, convert_state, shapes_of  # tests/helpers

SHAPES = [  # (block_out_channels, layers_per_block, latent_channels, quant_conv)
    ((32, 64), 1, 16, False),  # FLUX-like: 16 latent channels, no quant_conv, 32 groups
    ((16, 32, 48), 2, 4, True),  # SD-like: quant_conv / post_quant_conv, 16 groups (norm_groups rule)
]


def tiny_vae(channels, layers, latent, quant, seed=0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    model = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels,
        layers_per_block=layers, latent_channels=latent, norm_num_groups=vae.norm_groups(channels),
        use_quant_conv=quant, use_post_quant_conv=quant)
    with torch.no_grad():  # every tensor distinct (norms and biases too), so a mix-up shows
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def run(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        moments = model.encode(image).latent_dist.parameters
        latent = torch.randn(1, model.config.latent_channels, 8, 8, generator=g)
        return moments, model.decode(latent).sample


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trips_are_bitwise_and_config_is_inferred_on_both_sides(shape):
    """diffusers → LDM → diffusers and LDM → diffusers → LDM give the same keys and bit-identical tensors;
    both sides infer the config the model was built with (widths, depth, latent size, quant convs)."""
    model = tiny_vae(*shape)
    sd = model.state_dict()
    config = vae.infer_config(shapes_of(sd), B)
    channels, layers, latent, quant = shape
    assert config["block_out_channels"] == channels and config["layers_per_block"] == layers
    assert config["latent_channels"] == latent and config["use_quant_conv"] is quant
    assert config["norm_num_groups"] == model.config.norm_num_groups
    assert (config["scaling_factor"], config["shift_factor"]) == ((0.18215, None) if quant else (0.3611, 0.1159))

    ldm, report = convert_state(vae.TABLE, sd, B, A, config)
    assert report["unplaced"] == [] and len(report["reshaped"]) == 8  # q, k, v, proj_out weights × 2
    assert vae.infer_config(shapes_of(ldm), A) == config
    # LDM naming: attention as 1x1 convs, decoder levels counted from the top (up.0 = widest)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (channels[-1], channels[-1], 1, 1)
    assert ldm["decoder.up.0.block.0.conv2.weight"].shape[0] == channels[0]
    assert ldm[f"decoder.up.{len(channels) - 1}.block.0.conv2.weight"].shape[0] == channels[-1]
    assert "decoder.up.0.upsample.conv.weight" not in ldm and "decoder.up.1.upsample.conv.weight" in ldm
    assert ("quant_conv.weight" in ldm) is quant

    back, _ = convert_state(vae.TABLE, ldm, A, B, config)
    assert_bitwise(back, sd)
    again, _ = convert_state(vae.TABLE, back, B, A, config)
    assert_bitwise(again, ldm)


@pytest.mark.parametrize("shape", SHAPES)
def test_ldm_to_diffusers_equals_diffusers_converter(shape):
    """Our LDM → diffusers plan equals diffusers' `convert_ldm_vae_checkpoint`, tensor for tensor."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    sd = tiny_vae(*shape).state_dict()
    config = vae.infer_config(shapes_of(sd), B)
    ldm, _ = convert_state(vae.TABLE, sd, B, A, config)
    theirs = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()}, dict(config))
    ours, _ = convert_state(vae.TABLE, ldm, A, B, config)
    assert_bitwise(ours, {k: v.contiguous() for k, v in theirs.items()})


@pytest.mark.parametrize("shape", SHAPES)
def test_model_built_from_ldm_weights_gives_the_same_outputs(shape):
    """build(infer_config(LDM shapes)) + assigning the converted tensors: nothing left on meta, and the
    encoder moments and decoder output are bit-identical to the original diffusers model (CPU fp32)."""
    model = tiny_vae(*shape)
    sd = model.state_dict()
    ldm, _ = convert_state(vae.TABLE, sd, B, A, vae.infer_config(shapes_of(sd), B))
    config = vae.infer_config(shapes_of(ldm), A)
    ours = vae.build(config)
    assert all(p.is_meta for p in ours.parameters())
    converted, _ = convert_state(vae.TABLE, ldm, A, B, config)
    ours.load_state_dict(converted, strict=True, assign=True)
    assert not any(p.is_meta for p in ours.parameters())
    assert tuple(ours.config.block_out_channels) == tuple(model.config.block_out_channels)
    reference, result = run(model), run(ours.eval())
    assert all(torch.isfinite(t).all() for t in reference)
    for x, y in zip(result, reference):
        assert torch.equal(x, y)


def test_legacy_diffusers_attention_names_are_read_and_written_modern():
    """diffusers < 0.14 names (query/key/value/proj_attn) convert to the same LDM tensors as the modern
    names; LDM → diffusers always writes the modern names."""
    sd = tiny_vae(*SHAPES[0]).state_dict()
    config = vae.infer_config(shapes_of(sd), B)
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in sd.items():
        for new, old in legacy_names.items():
            if ".mid_block.attentions.0." + new + "." in k:
                k = k.replace(".attentions.0." + new + ".", ".attentions.0." + old + ".")
        legacy[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert vae.infer_config(shapes_of(legacy), B) == config
    from_legacy, report = convert_state(vae.TABLE, legacy, B, A, config)
    from_modern, _ = convert_state(vae.TABLE, sd, B, A, config)
    assert report["unplaced"] == []
    assert_bitwise(from_legacy, from_modern)
    back, _ = convert_state(vae.TABLE, from_legacy, A, B, config)
    assert_bitwise(back, sd)


def test_full_size_flux_vae_layout_from_shapes_alone():
    """The released FLUX VAE (ae.safetensors): 244 LDM keys, no quant_conv, nin_shortcut where the width
    changes, 1x1-conv attention; its config comes back from the LDM shapes (meta tensors, no data)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    flux = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16)
    with init_empty_weights():
        model = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                              use_quant_conv=False, use_post_quant_conv=False, **flux)
    shapes = shapes_of(model.state_dict())
    plan, report = vae.TABLE.convert(shapes, B, A, vae.infer_config(shapes, B))
    ldm = {k: s.shape for k, s in plan.items()}
    assert len(ldm) == 244 and report["unplaced"] == []
    shortcuts = sorted(k.rsplit(".", 2)[0] for k in ldm if ".nin_shortcut.weight" in k)
    assert shortcuts == ["decoder.up.0.block.0", "decoder.up.1.block.0", "encoder.down.1.block.0", "encoder.down.2.block.0"]
    assert ldm["decoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert ldm["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert not any("quant_conv" in k for k in ldm)
    config = vae.infer_config(ldm, A)
    assert {k: config[k] for k in flux} == flux
    assert config["norm_num_groups"] == 32 and config["use_quant_conv"] is False
    assert (config["scaling_factor"], config["shift_factor"]) == (0.3611, 0.1159)


def test_decoder_renumbering_needs_the_config():
    sd = tiny_vae(*SHAPES[0]).state_dict()
    with pytest.raises(ValueError, match="block_out_channels"):
        vae.TABLE.convert(shapes_of(sd), B, A, {})
    with pytest.raises(ValueError, match="not a complete VAE"):
        vae.infer_config({"encoder.conv_in.weight": (32, 3, 3, 3)}, A)
