"""The tiny-model factory: real structures at small widths, seeded, with the real tokenizers the pack carries."""
import shutil

import pytest
import torch

from fluxbridge.headless import factory



def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("in_channels,guidance", [(64, True), (64, False), (384, True), (128, True)])
def test_flux_transformer_structure(in_channels, guidance):
    m = factory.tiny_flux_transformer(width=48, heads=3, double=2, single=1, in_channels=in_channels,
                                      guidance=guidance)
    c = m.config
    assert (c.in_channels, c.out_channels, c.num_layers, c.num_single_layers) == (in_channels, 64, 2, 1)
    assert c.num_attention_heads * c.attention_head_dim == 48 and sum(c.axes_dims_rope) == 16
    assert c.guidance_embeds == guidance
    assert any(k.startswith("time_text_embed.guidance_embedder") for k in m.state_dict()) == guidance
    assert m.x_embedder.weight.shape == (48, in_channels)
    assert not m.training and not any(p.requires_grad for p in m.parameters())


def test_rope_axes_sum_to_the_head_size():
    for head in (6, 8, 16, 24, 64, 128):
        axes = factory.rope_axes(head)
        assert sum(axes) == head and all(a % 2 == 0 and a > 0 for a in axes)
    assert factory.rope_axes(128) == (16, 56, 56)
    with pytest.raises(ValueError):
        factory.rope_axes(7)


def test_full_width_is_refused():
    with pytest.raises(ValueError, match="3072"):
        factory.tiny_flux_transformer(width=3072, heads=24)
    with pytest.raises(ValueError, match="heads"):
        factory.tiny_flux_transformer(width=30, heads=4)


def test_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = factory.tiny_flux_transformer(seed=1), factory.tiny_flux_transformer(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _same_weights(a, b)
    assert not _same_weights(a, factory.tiny_flux_transformer(seed=2))
    assert _same_weights(factory.tiny_t5(seed=4), factory.tiny_t5(seed=4))
    assert _same_weights(factory.tiny_flux_vae(seed=4), factory.tiny_flux_vae(seed=4))


def test_flux_vae_structure():
    vae = factory.tiny_flux_vae()
    c = vae.config
    assert c.latent_channels == 16 and c.scaling_factor == 0.3611 and c.shift_factor == 0.1159
    assert not c.use_quant_conv and not c.use_post_quant_conv and vae.quant_conv is None
    assert vae.post_quant_conv is None and c.mid_block_add_attention
    assert vae.encoder.conv_out.out_channels == 32  # mean + logvar
    assert vae.decode(torch.zeros(1, 16, 4, 6)).sample.shape == (1, 3, 32, 48)  # 8x
    small = factory.tiny_flux_vae(block_out_channels=(32, 32), norm_num_groups=16)
    assert small.decode(torch.zeros(1, 16, 4, 4)).sample.shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="divide"):
        factory.tiny_flux_vae(block_out_channels=(24, 32), norm_num_groups=16)


def test_text_encoders_structure():
    clip = factory.tiny_clip_l()
    assert clip.config.vocab_size == 49408 and clip.config.max_position_embeddings == 77
    assert clip.config.hidden_act == "quick_gelu" and clip.config.hidden_size != 768
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    out = clip(ids)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 6])  # pooled at the first EOS
    t5 = factory.tiny_t5()
    c = t5.config
    assert c.vocab_size == 32128 and c.is_gated_act and c.dense_act_fn == "gelu_new"
    keys = t5.state_dict().keys()
    assert "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in keys
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in keys
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in keys
    assert not any(k.endswith(".bias") for k in keys)
    assert t5(torch.tensor([[3, 9, 1202, 1]]))[0].shape == (1, 4, 32)


@pytest.mark.parametrize("lcm", [None, 256])
def test_sd15_unet_structure(lcm):
    unet = factory.tiny_sd15_unet(time_cond_proj_dim=lcm)
    c = unet.config
    assert c.down_block_types == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert c.up_block_types == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert c.layers_per_block == 2 and c.in_channels == 4 and c.out_channels == 4
    assert ("time_embedding.cond_proj.weight" in unet.state_dict()) == (lcm is not None)
    kw = {"timestep_cond": torch.zeros(1, lcm)} if lcm else {}
    out = unet(torch.zeros(1, 4, 16, 16), 10, encoder_hidden_states=torch.zeros(1, 5, 32), **kw).sample
    assert out.shape == (1, 4, 16, 16)


def test_the_pack_carries_the_real_tokenizers(tmp_path):
    """tokenizers/clip_l and tokenizers/t5xxl (with their licence notes) load offline and give the released
    ids; the factory takes them by default, from a folder in either layout, or as a pair."""
    from transformers import CLIPTokenizer, T5TokenizerFast
    from fluxbridge.runtime.models import PACK_TOKENIZERS
    assert {p.name for p in PACK_TOKENIZERS.iterdir()} >= {"README.md", "LICENSE-clip_l.txt", "LICENSE-t5xxl.txt"}
    clip = CLIPTokenizer.from_pretrained(str(PACK_TOKENIZERS / "clip_l"), local_files_only=True)
    t5 = T5TokenizerFast.from_pretrained(str(PACK_TOKENIZERS / "t5xxl"), local_files_only=True)
    assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert t5("a photo of a cat").input_ids == [3, 9, 1202, 13, 3, 9, 1712, 1]
    assert len(clip) == 49408 and clip.model_max_length == 77 and t5.model_max_length == 512
    assert clip.eos_token_id == max(clip.get_vocab().values())  # CLIP pools at the highest id
    models_layout = tmp_path / "models" / "tokenizers"
    shutil.copytree(PACK_TOKENIZERS, models_layout)
    for source in (None, PACK_TOKENIZERS, models_layout.parent, (clip, t5)):
        comps = factory.tiny_pipeline_components("schnell", tokenizers=source)
        assert comps["tokenizer"].get_vocab() == clip.get_vocab()
        assert comps["tokenizer_2"]("a photo of a cat").input_ids == t5("a photo of a cat").input_ids
    with pytest.raises(FileNotFoundError, match="no clip_l/"):
        factory.tiny_pipeline_components("dev", tokenizers=tmp_path / "empty")


def test_components_run_in_the_diffusers_pipeline(tmp_path):
    from diffusers import FluxPipeline
    comps = factory.tiny_pipeline_components("schnell")
    assert set(comps) == {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                          "scheduler"}
    pipe = FluxPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=0.0, max_sequence_length=32,
              output_type="pt")
    image = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert image.shape == (1, 3, 32, 32)
    # saved as a diffusers folder, it loads back offline with the same weights and gives the same image
    # (to float rounding: loaded weights can take other kernel paths, ~1e-7)
    factory.save_diffusers(comps, tmp_path / "pipe")
    again = FluxPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    again.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert _same_weights(comps[name], getattr(again, name))
    reloaded = again("a photo of a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.allclose(reloaded, image, atol=1e-5)


def test_components_with_the_real_tokenizers():
    comps = factory.tiny_pipeline_components("dev")  # the real tokenizers the pack carries
    assert comps["tokenizer"]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert comps["transformer"].config.joint_attention_dim == comps["text_encoder_2"].config.d_model
    assert comps["transformer"].config.pooled_projection_dim == comps["text_encoder"].config.hidden_size
    assert comps["scheduler"].config.use_dynamic_shifting
    with pytest.raises(ValueError):
        factory.tiny_pipeline_components("kontext-pro")


# ------------------------------------------------------------------------------ files in each layout

LAYOUT_CASES = {  # family -> (builder, the names one key has in bfl / comfy / diffusers)
    "flux-transformer": (lambda: factory.tiny_flux_transformer(width=48, heads=3, double=2, single=1),
                         ("double_blocks.1.img_attn.qkv.weight", "model.diffusion_model.double_blocks.1.img_attn.qkv.weight",
                          "transformer_blocks.1.attn.to_q.weight")),
    "flux-vae": (lambda: factory.tiny_flux_vae(),
                 ("decoder.up.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight",
                  "decoder.up_blocks.3.resnets.0.conv1.weight")),
    "clip-l": (lambda: factory.tiny_clip_l(),
               ("text_model.encoder.layers.1.mlp.fc1.weight", "text_model.encoder.layers.1.mlp.fc1.weight", None)),
    "t5-xxl": (lambda: factory.tiny_t5(), ("shared.weight", "shared.weight", "shared.weight")),
    "sd15-unet": (lambda: factory.tiny_sd15_unet(),
                  ("input_blocks.1.0.in_layers.0.weight", "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
                   "down_blocks.0.resnets.0.norm1.weight")),
}


@pytest.mark.parametrize("family", sorted(LAYOUT_CASES))
def test_factory_files_load_back_in_every_layout(tmp_path, family):
    """Each tiny model written as BFL/original, ComfyUI, diffusers single file and diffusers folder is
    detected as what it is, holds the expected names and shapes, and loads back to the same weights."""
    from fluxbridge.convert.detect import components
    from fluxbridge.convert.load import load_model
    from fluxbridge.convert.safetensors_io import open_weights

    build, names = LAYOUT_CASES[family]
    model = build()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for layout, path, key in (("bfl", "bfl.safetensors", names[0]), ("comfy", "comfy.safetensors", names[1]),
                              ("diffusers", "diffusers.safetensors", names[2]), ("diffusers", "folder", None)):
        written = factory.save_layout(model, tmp_path / path, layout)
        found = components(open_weights(written).keys())
        assert [c.family for c in found] == [family], (layout, found)
        if key is not None:
            assert key in open_weights(written), (layout, key)
        loaded = load_model(written, family=family, dtype=torch.float32)
        state = loaded.model.state_dict()
        assert {k: tuple(v.shape) for k, v in state.items()} == expected, layout
        for k, v in model.state_dict().items():
            assert torch.equal(state[k], v), (layout, k)


@pytest.mark.parametrize("family", sorted(LAYOUT_CASES))
def test_every_family_round_trips_through_diffusers_bitwise(tmp_path, family):
    """BFL/original -> diffusers -> BFL and ComfyUI -> diffusers -> ComfyUI give identical bytes per tensor."""
    from safetensors.torch import load_file

    from fluxbridge.convert.write import convert_file

    model = LAYOUT_CASES[family][0]()
    for layout in ("bfl", "comfy"):
        start = factory.save_layout(model, tmp_path / f"{layout}.safetensors", layout)
        convert_file(start, tmp_path / f"{layout}-d.safetensors", "diffusers")
        convert_file(tmp_path / f"{layout}-d.safetensors", tmp_path / f"{layout}-back.safetensors", layout)
        a, b = load_file(start), load_file(tmp_path / f"{layout}-back.safetensors")
        assert a.keys() == b.keys(), (layout, sorted(set(a) ^ set(b))[:5])
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(-1).view(torch.uint8),
                                                             b[k].view(-1).view(torch.uint8)), (layout, k)
