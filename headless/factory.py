"""Small random models with a fixed seed, for tests, benchmarks and `fluxbridge demo`.

Every builder returns a diffusers / transformers module with the *structure* of the real model (FLUX.1
transformer, FLUX VAE, CLIP-L text tower, T5 v1.1 encoder, SD1.5 UNet) at a tiny width, in eval mode, on
the CPU in float32. Building never touches the global RNG (the seed is used inside `torch.random.fork_rng`).

The text encoders keep the real vocabulary sizes, so they go with the real CLIP-L and T5 tokenizers that
the pack carries (`tokenizers/`, loaded offline).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..convert.families.vae import FLUX_FACTORS

FLUX_VAE_SCALING = FLUX_FACTORS["scaling_factor"]  # the published FLUX.1 VAE's latent factors
FLUX_VAE_SHIFT = FLUX_FACTORS["shift_factor"]

# FlowMatchEulerDiscreteScheduler configs as published with FLUX.1-dev / FLUX.1-schnell.
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                         max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)

# Per variant: transformer in_channels and whether the transformer has guidance embeddings.
VARIANTS = {
    "dev": dict(in_channels=64, guidance=True),
    "schnell": dict(in_channels=64, guidance=False),
    "fill": dict(in_channels=384, guidance=True),
    "depth": dict(in_channels=128, guidance=True),
    "kontext": dict(in_channels=64, guidance=True),  # dev's shapes (only the weights differ)
}


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _finish(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    if dtype != torch.float32:  # built in float32; diffusers warns on every .to(dtype), so only when needed
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def _not_full_size(width: int, what: str) -> None:
    # The factory exists to catch code that hard-codes FLUX.1's sizes; a full-size width would hide that.
    if width == 3072:
        raise ValueError(f"{what}: width 3072 is FLUX.1's real width; tiny models must use another width")


def _block_groups(block_out_channels, norm_num_groups: int | None, what: str) -> int:
    """GroupNorm groups for a VAE / UNet with these block widths: the given count, else the loader's rule
    (`families.vae.norm_groups`: checkpoints do not store it); each width must be tiny and divisible by it."""
    from ..convert.families.vae import norm_groups

    norm_num_groups = norm_num_groups or norm_groups(block_out_channels)
    for ch in block_out_channels:
        _not_full_size(ch, what)
        if ch % norm_num_groups:
            raise ValueError(f"norm_num_groups {norm_num_groups} does not divide block width {ch}")
    return norm_num_groups


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes for a head size (FLUX.1: 128 -> (16, 56, 56)): the loader's rule, since checkpoints
    do not store them."""
    from ..convert.families.flux import default_axes
    return default_axes(head_dim)


# --------------------------------------------------------------------------------------------- models

def tiny_flux_transformer(width: int = 32, heads: int = 2, double: int = 1, single: int = 2,
                          in_channels: int = 64, out_channels: int = 64, guidance: bool = True,
                          joint_attention_dim: int = 32, pooled_projection_dim: int = 32,
                          axes_dims_rope: tuple[int, int, int] | None = None, seed: int = 0,
                          init_std: float | None = None, dtype: torch.dtype = torch.float32):
    """A random `FluxTransformer2DModel` (FLUX.1 structure). in_channels 64 base, 384 Fill, 128 Depth/Canny.

    `joint_attention_dim` must equal the T5 d_model and `pooled_projection_dim` the CLIP hidden size of the
    text encoders it is used with. `init_std` re-draws every parameter from N(0, init_std) (stronger signal).
    """
    from diffusers import FluxTransformer2DModel

    _not_full_size(width, "tiny_flux_transformer")
    if width % heads:
        raise ValueError(f"width {width} is not a multiple of heads {heads}")
    head_dim = width // heads
    axes = tuple(axes_dims_rope) if axes_dims_rope is not None else rope_axes(head_dim)
    if sum(axes) != head_dim:
        raise ValueError(f"axes_dims_rope {axes} must sum to the head size {head_dim}")
    with _seeded(seed):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=in_channels, out_channels=out_channels, num_layers=double,
            num_single_layers=single, attention_head_dim=head_dim, num_attention_heads=heads,
            joint_attention_dim=joint_attention_dim, pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance, axes_dims_rope=axes)
        if init_std is not None:
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0.0, init_std)
    return _finish(model, dtype)


def tiny_flux_vae(block_out_channels: tuple[int, ...] = (16, 32, 32, 32), layers_per_block: int = 1,
                  norm_num_groups: int | None = None, latent_channels: int = 16,
                  scaling_factor: float = FLUX_VAE_SCALING,
                  shift_factor: float = FLUX_VAE_SHIFT, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random `AutoencoderKL` with the FLUX VAE structure: 16 latent channels, no quant_conv /
    post_quant_conv, mid-block attention, scaling 0.3611 and shift 0.1159. Four blocks give the usual 8x
    downscale (the real one is (128, 256, 512, 512), 2 layers per block, 32 groups). GroupNorm groups
    default to the loader's rule (they are not stored in a checkpoint)."""
    from diffusers import AutoencoderKL

    norm_num_groups = _block_groups(block_out_channels, norm_num_groups, "tiny_flux_vae")
    n = len(block_out_channels)
    with _seeded(seed):
        model = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, act_fn="silu", latent_channels=latent_channels,
            norm_num_groups=norm_num_groups, sample_size=64, scaling_factor=scaling_factor,
            shift_factor=shift_factor, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
            mid_block_add_attention=True)
        with torch.no_grad():
            # A default-initialised decoder gives a nearly flat image (std ~0.15 after postprocessing);
            # doubling its output spreads values over 0..1 (std ~0.25, ~10% clamped) so that image
            # comparisons are sensitive.
            model.decoder.conv_out.weight.mul_(2.0)
    return _finish(model, dtype)


def tiny_clip_l(hidden_size: int = 32, layers: int = 2, heads: int | None = None, intermediate_size: int = 64,
                vocab_size: int = 49408, max_position_embeddings: int = 77, eos_token_id: int = 2,
                seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random transformers `CLIPTextModel` with the CLIP-L text tower structure (quick_gelu, causal,
    77 positions, vocab 49408 so the real token ids work). `eos_token_id=2` is the value in the released
    CLIP-L config: the pooled output is taken at the highest token id (the first EOS). Heads default to
    the loader's rule (they are not stored in a checkpoint)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    from ..convert.families.clip import default_heads

    heads = heads or default_heads(hidden_size)
    _not_full_size(hidden_size, "tiny_clip_l")
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        projection_dim=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=max_position_embeddings, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        attention_dropout=0.0, bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1)
    with _seeded(seed):
        model = CLIPTextModel(config)
    return _finish(model, dtype)


def tiny_t5(d_model: int = 32, d_kv: int = 8, heads: int = 4, d_ff: int = 64, layers: int = 2,
            vocab_size: int = 32128, relative_attention_num_buckets: int = 32,
            relative_attention_max_distance: int = 128, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random transformers `T5EncoderModel` shaped like T5 v1.1 (gated-gelu, no biases, relative
    attention bias in block 0 only, vocab 32128)."""
    from transformers import T5Config, T5EncoderModel

    _not_full_size(d_model, "tiny_t5")
    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_heads=heads,
        relative_attention_num_buckets=relative_attention_num_buckets,
        relative_attention_max_distance=relative_attention_max_distance, dropout_rate=0.0,
        layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with _seeded(seed):
        model = T5EncoderModel(config)
    return _finish(model, dtype)


def tiny_sd15_unet(block_out_channels: tuple[int, ...] = (32, 32, 64, 64), layers_per_block: int = 2,
                   cross_attention_dim: int = 32, attention_head_dim: int = 8, norm_num_groups: int | None = None,
                   sample_size: int = 8, time_cond_proj_dim: int | None = None, seed: int = 0,
                   dtype: torch.dtype = torch.float32):
    """A random `UNet2DConditionModel` with the SD1.5 block structure (3 cross-attention down blocks + 1
    plain, mirrored up blocks, 2 layers per block, 4 latent channels). `time_cond_proj_dim` (LCM: 256)
    adds `time_embedding.cond_proj`."""
    from diffusers import UNet2DConditionModel

    norm_num_groups = _block_groups(block_out_channels, norm_num_groups, "tiny_sd15_unet")
    n = len(block_out_channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    with _seeded(seed):
        model = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, down_block_types=down,
            up_block_types=up, block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups, time_cond_proj_dim=time_cond_proj_dim)
    return _finish(model, dtype)


def tiny_siglip(hidden_size: int = 48, layers: int = 2, intermediate_size: int = 96, image_size: int = 32,
                patch_size: int = 8, heads: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random transformers `SiglipVisionModel` with the SigLIP tower's structure (the so400m one Redux reads
    is 1152 wide, 27 layers, 384 pixels in 14-pixel patches), with its pooling head. Heads default to the
    loader's rule (they are not stored in a checkpoint)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from ..convert.families.siglip import HIDDEN_ACT, LAYER_NORM_EPS, default_heads

    _not_full_size(hidden_size, "tiny_siglip")
    config = SiglipVisionConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers,
        num_attention_heads=heads or default_heads(hidden_size), image_size=image_size, patch_size=patch_size,
        hidden_act=HIDDEN_ACT, layer_norm_eps=LAYER_NORM_EPS)
    with _seeded(seed):
        model = SiglipVisionModel(config)
    return _finish(model, dtype)


def tiny_redux(redux_dim: int = 48, text_width: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random diffusers `ReduxImageEncoder`: SigLIP features (`redux_dim` wide) -> tokens as wide as the
    transformer's text input (`text_width`, its `joint_attention_dim`)."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    with _seeded(seed):
        model = ReduxImageEncoder(redux_dim=redux_dim, txt_in_features=text_width)
    return _finish(model, dtype)


def tiny_scheduler(variant: str = "dev"):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**(SCHNELL_SCHEDULER if variant == "schnell" else DEV_SCHEDULER))


def tiny_variant_transformer(variant: str = "dev", width: int = 32, heads: int = 2, double: int = 1,
                             single: int = 2, text_width: int = 32, seed: int = 0,
                             dtype: torch.dtype = torch.float32):
    """The transformer of `tiny_pipeline_components(variant, ...)` alone (the same weights for the same
    arguments), for callers that need several variants' transformers and one set of the other parts."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    return tiny_flux_transformer(width=width, heads=heads, double=double, single=single,
                                 in_channels=v["in_channels"], out_channels=64, guidance=v["guidance"],
                                 joint_attention_dim=text_width, pooled_projection_dim=text_width, seed=seed,
                                 dtype=dtype)


def tiny_pipeline_components(variant: str = "dev", width: int = 32, heads: int = 2, double: int = 1,
                             single: int = 2, text_width: int = 32, tokenizers=None, seed: int = 0,
                             dtype: torch.dtype = torch.float32) -> dict:
    """All parts of a FLUX.1 pipeline, keyed like `FluxPipeline(**components)` (also Img2Img / Fill):
    transformer, vae, text_encoder (CLIP-L), text_encoder_2 (T5), tokenizer, tokenizer_2, scheduler.

    `tokenizers`: a (clip_tokenizer, t5_tokenizer) pair, a folder holding `clip_l/`+`t5xxl/` or
    `tokenizers/clip_l/`+`tokenizers/t5xxl/` (models-folder layout), or None for the real tokenizers the
    pack carries. Each part gets its own seed derived from `seed`.
    """
    transformer = tiny_variant_transformer(variant, width=width, heads=heads, double=double, single=single,
                                           text_width=text_width, seed=seed, dtype=dtype)
    clip_tok, t5_tok = _resolve_tokenizers(tokenizers)
    # The released CLIP-L config says eos_token_id 2: pool at the highest id, which is EOS for the real
    # tokenizer; any other tokenizer gets its own EOS id.
    clip_eos = clip_tok.eos_token_id
    clip_eos = 2 if clip_eos == max(clip_tok.get_vocab().values()) else clip_eos
    return dict(
        transformer=transformer,
        vae=tiny_flux_vae(seed=seed + 1, dtype=dtype),
        text_encoder=tiny_clip_l(hidden_size=text_width, seed=seed + 2, dtype=dtype,
                                 eos_token_id=clip_eos),
        text_encoder_2=tiny_t5(d_model=text_width, seed=seed + 3, dtype=dtype),
        tokenizer=clip_tok,
        tokenizer_2=t5_tok,
        scheduler=tiny_scheduler(variant),
    )


def _resolve_tokenizers(tokenizers):
    from transformers import CLIPTokenizer, T5TokenizerFast
    from ..runtime.models import PACK_TOKENIZERS

    if isinstance(tokenizers, (tuple, list)):
        return tokenizers[0], tokenizers[1]
    root = Path(PACK_TOKENIZERS if tokenizers is None else tokenizers)
    for base in (root, root / "tokenizers"):
        if (base / "clip_l").is_dir() and (base / "t5xxl").is_dir():
            return (CLIPTokenizer.from_pretrained(str(base / "clip_l")),
                    T5TokenizerFast.from_pretrained(str(base / "t5xxl")))
    raise FileNotFoundError(f"{root}: no clip_l/ + t5xxl/ or tokenizers/clip_l/ + tokenizers/t5xxl/ found")


def save_layout(model, path, layout: str = "bfl") -> Path:
    """Write a tiny model's weights the way the real ones are published: `layout` "bfl" (the original
    names: BFL / LDM / HF), "comfy" (ComfyUI's prefixed names) or "diffusers" — a single file when `path`
    ends in .safetensors, else a diffusers folder (`save_pretrained`). Tied weights are stored once."""
    import tempfile

    from safetensors.torch import save_file

    from ..convert.write import convert_file

    path = Path(path)
    if layout == "diffusers" and path.suffix != ".safetensors":
        model.save_pretrained(str(path))
        return path
    state, seen = {}, set()
    tied = getattr(model, "_tied_weights_keys", None) or ()
    for k, v in sorted(model.state_dict().items(), key=lambda kv: kv[0] in tied):  # aliases last
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            state[k] = v.detach().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fluxbridge-factory-") as tmp:
        src = Path(tmp) / "diffusers.safetensors"
        save_file(state, str(src))
        convert_file(src, path, to=layout)
    return path


def save_diffusers(component, directory) -> Path:
    """Save one model (`save_pretrained`) or a components dict (as a diffusers FluxPipeline folder)."""
    directory = Path(directory)
    if isinstance(component, dict):
        from diffusers import FluxControlPipeline, FluxFillPipeline, FluxPipeline
        in_ch = component["transformer"].config.in_channels
        cls = {384: FluxFillPipeline, 128: FluxControlPipeline}.get(in_ch, FluxPipeline)
        cls(**component).save_pretrained(str(directory))
    else:
        component.save_pretrained(str(directory))
    return directory


__all__ = [
    "tiny_flux_transformer", "tiny_flux_vae", "tiny_clip_l", "tiny_t5", "tiny_sd15_unet", "tiny_scheduler",
    "tiny_siglip", "tiny_redux",
    "tiny_variant_transformer", "tiny_pipeline_components", "save_diffusers", "rope_axes",
    "FLUX_VAE_SCALING", "FLUX_VAE_SHIFT", "DEV_SCHEDULER", "SCHNELL_SCHEDULER", "VARIANTS",
]
