"""Small random models with a fixed seed, for tests, benchmarks and `fluxbridge demo`.

Every builder returns a diffusers / transformers module with the *structure* of the real model (FLUX.1
transformer, FLUX VAE, CLIP-L text tower, T5 v1.1 encoder, SD1.5 UNet) at a tiny width, in eval mode, on
the CPU in float32. Building never touches the global RNG (the seed is used inside `torch.random.fork_rng`).

`small_tokenizers(dir)` writes a CLIP byte-level BPE tokenizer and a T5-style unigram tokenizer of our own
(the real tokenizer files are not part of the pack) in the models-folder layout `tokenizers/clip_l/` and
`tokenizers/t5xxl/`; both load offline with `CLIPTokenizer.from_pretrained` / `T5TokenizerFast.from_pretrained`.
"""
from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path

import torch

FLUX_VAE_SCALING = 0.3611
FLUX_VAE_SHIFT = 0.1159

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
    from ..convert.families.vae import norm_groups

    norm_num_groups = norm_num_groups or norm_groups(block_out_channels)
    for ch in block_out_channels:
        _not_full_size(ch, "tiny_flux_vae")
        if ch % norm_num_groups:
            raise ValueError(f"norm_num_groups {norm_num_groups} does not divide block width {ch}")
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
    from ..convert.families.vae import norm_groups

    norm_num_groups = norm_num_groups or norm_groups(block_out_channels)
    for ch in block_out_channels:
        _not_full_size(ch, "tiny_sd15_unet")
        if ch % norm_num_groups:
            raise ValueError(f"norm_num_groups {norm_num_groups} does not divide block width {ch}")
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


def tiny_pipeline_components(variant: str = "dev", width: int = 32, heads: int = 2, double: int = 1,
                             single: int = 2, text_width: int = 32, tokenizers=None, seed: int = 0,
                             dtype: torch.dtype = torch.float32) -> dict:
    """All parts of a FLUX.1 pipeline, keyed like `FluxPipeline(**components)` (also Img2Img / Fill):
    transformer, vae, text_encoder (CLIP-L), text_encoder_2 (T5), tokenizer, tokenizer_2, scheduler.

    `tokenizers`: a (clip_tokenizer, t5_tokenizer) pair, a folder holding `clip-l/`+`t5-xxl/` (the shared
    test files) or `tokenizers/clip_l/`+`tokenizers/t5xxl/` (models-folder layout), or None to build our
    own small tokenizers in a temporary folder. Each part gets its own seed derived from `seed`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    clip_tok, t5_tok = _resolve_tokenizers(tokenizers)
    # The released CLIP-L config says eos_token_id 2: pool at the highest id, which is EOS for the real
    # and for our small tokenizer; any other tokenizer gets its own EOS id.
    clip_eos = clip_tok.eos_token_id
    clip_eos = 2 if clip_eos == max(clip_tok.get_vocab().values()) else clip_eos
    return dict(
        transformer=tiny_flux_transformer(
            width=width, heads=heads, double=double, single=single, in_channels=v["in_channels"],
            out_channels=64, guidance=v["guidance"], joint_attention_dim=text_width,
            pooled_projection_dim=text_width, seed=seed, dtype=dtype),
        vae=tiny_flux_vae(seed=seed + 1, dtype=dtype),
        text_encoder=tiny_clip_l(hidden_size=text_width, seed=seed + 2, dtype=dtype,
                                 eos_token_id=clip_eos),
        text_encoder_2=tiny_t5(d_model=text_width, seed=seed + 3, dtype=dtype),
        tokenizer=clip_tok,
        tokenizer_2=t5_tok,
        scheduler=tiny_scheduler(variant),
    )


_SMALL_TOKENIZERS_DIR = None


def _resolve_tokenizers(tokenizers):
    from transformers import CLIPTokenizer, T5TokenizerFast

    if isinstance(tokenizers, (tuple, list)):
        return tokenizers[0], tokenizers[1]
    if tokenizers is None:
        global _SMALL_TOKENIZERS_DIR
        if _SMALL_TOKENIZERS_DIR is None:  # built once per process
            import tempfile
            _SMALL_TOKENIZERS_DIR = tempfile.mkdtemp(prefix="fluxbridge-tok-")
            small_tokenizers(_SMALL_TOKENIZERS_DIR)
        tokenizers = _SMALL_TOKENIZERS_DIR
    root = Path(tokenizers)
    for clip_dir, t5_dir in (("clip-l", "t5-xxl"), ("tokenizers/clip_l", "tokenizers/t5xxl"),
                             ("clip_l", "t5xxl")):
        if (root / clip_dir).is_dir() and (root / t5_dir).is_dir():
            return (CLIPTokenizer.from_pretrained(str(root / clip_dir)),
                    T5TokenizerFast.from_pretrained(str(root / t5_dir)))
    raise FileNotFoundError(f"{root}: no clip-l/ + t5-xxl/ or tokenizers/clip_l/ + tokenizers/t5xxl/ found")


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


# ----------------------------------------------------------------------------------------- tokenizers

# Text the small tokenizers learn their merges / pieces from (prompt-like English).
_CORPUS = """
a photo of a cat sitting on a chair in the sun, highly detailed, sharp focus, soft light
a painting of a dog running through a field of flowers at sunset, oil on canvas, warm colors
portrait of a woman with red hair, studio lighting, bokeh background, 85mm lens, film grain
a red fox in the snow, winter forest, morning mist, national geographic, award winning
a futuristic city at night with neon lights and flying cars, cyberpunk, rain, reflections
an astronaut riding a horse on the moon, digital art, trending, vivid, dramatic clouds
a bowl of fruit on a wooden table, still life, apples, oranges, grapes, natural light
a small house by the lake with mountains in the background, blue sky, green trees, river
close up of a flower with water drops, macro photography, shallow depth of field
the quick brown fox jumps over the lazy dog; hello world! simple test prompt 0123456789
"""


def _bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character map used by byte-level BPE (GPT-2 / CLIP): printable Latin-1 bytes map
    to themselves, the rest to code points from 256 upwards, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _learn_bpe_merges(words: list[str], count: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair itself)."""
    freq = Counter(words)
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in freq}
    merges = []
    for _ in range(count):
        pairs = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[a, b] += freq[w]
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


def _corpus_words() -> list[str]:
    import re
    return [w for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", _CORPUS.lower())]


def _write_clip_tokenizer(directory: Path, merges_count: int = 300) -> None:
    byte_chars = list(_bytes_to_unicode().values())
    enc = _bytes_to_unicode()
    words = ["".join(enc[b] for b in w.encode("utf-8")) for w in _corpus_words()]
    merges = _learn_bpe_merges(words, merges_count)
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]  # specials last: EOS has the highest id
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"content": None, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    sot, eot = dict(special, content="<|startoftext|>"), dict(special, content="<|endoftext|>")
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": sot, "eos_token": eot, "unk_token": eot, "pad_token": "<|endoftext|>"}, indent=2))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
         "add_prefix_space": False, "errors": "replace", "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, indent=2))


def _write_t5_tokenizer(directory: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&%+*=#@_"))
    words = sorted(set(w for w in _corpus_words() if w.isalpha()))
    # Scores are log-probabilities: a whole word beats its letters, so common words stay one piece.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -6.0 - 0.05 * len(w)) for w in words]
    pieces += [(w, -8.0 - 0.05 * len(w)) for w in words if len(w) > 1]
    pieces += [("▁" + c, -10.0) for c in chars] + [(c, -10.5) for c in chars]
    seen, vocab = set(), []
    for p, s in pieces:
        if p not in seen:
            seen.add(p)
            vocab.append((p, s))
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))


def small_tokenizers(directory) -> dict[str, Path]:
    """Build our own small CLIP (byte-level BPE, specials last so EOS is the highest id) and T5-style
    (unigram, pad 0 / eos 1 / unk 2) tokenizers under `directory/tokenizers/{clip_l,t5xxl}/`.

    Returns {"clip_l": path, "t5xxl": path}. Deterministic; loads offline with
    `CLIPTokenizer.from_pretrained` and `T5TokenizerFast.from_pretrained`.
    """
    root = Path(directory) / "tokenizers"
    paths = {"clip_l": root / "clip_l", "t5xxl": root / "t5xxl"}
    _write_clip_tokenizer(paths["clip_l"])
    _write_t5_tokenizer(paths["t5xxl"])
    return paths


__all__ = [
    "tiny_flux_transformer", "tiny_flux_vae", "tiny_clip_l", "tiny_t5", "tiny_sd15_unet", "tiny_scheduler",
    "tiny_siglip", "tiny_redux",
    "tiny_pipeline_components", "small_tokenizers", "save_diffusers", "rope_axes",
    "FLUX_VAE_SCALING", "FLUX_VAE_SHIFT", "DEV_SCHEDULER", "SCHNELL_SCHEDULER", "VARIANTS",
]
