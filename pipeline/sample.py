"""The FLUX.1 sampling loop (flow-matching Euler), shared by the nodes and the headless runner.

native LATENT (raw VAE space) -> process_in -> noise at the first sigma (sigma*noise + (1-sigma)*x0; pure
noise at sigma 1) -> pack -> per step: transformer(hidden_states, timestep=sigma, guidance, pooled_projections,
encoder_hidden_states, txt_ids, img_ids) [-> true CFG: neg + scale*(pos - neg)] -> Euler step -> unpack ->
process_out -> native LATENT.

The arithmetic follows diffusers FluxPipeline / FluxImg2ImgPipeline / FluxFillPipeline / FluxInpaintPipeline /
FluxControlPipeline / FluxKontextPipeline step for step (same operations, same order, same dtypes), so the
images match them in float32 and in bf16: the latents live in the model's compute dtype (normalised, noised
and blended there, like the pipelines' latents, which are in the prompt embeddings' dtype), each timestep is
cast to that dtype before it is divided by 1000, and each Euler step works in float32 and rounds the new
sample back to that dtype. Everything the loop needs (ids, guidance, timesteps, the input buffer holding the
Fill / control channels and the Kontext reference tokens) is built once; a step allocates two latent-sized
tensors (dt * v and the next sample) beyond what the transformer does.
"""
from __future__ import annotations

import torch

from ..common.errors import BadInput
from ._notes import note
from .device import execution_device, execution_dtype
from .fill import _batch, from_native_conditioning
from .kontext import METHOD_KEY, REFERENCE_KEY, check_references, reference_tokens
from .latents import LatentFormat, image_ids, latent_samples, noise as make_noise, pack, text_ids, unpack
from .schedule import add_noise, as_sigmas, euler_step

FROM_CONDITIONING = "conditioning"  # default for `guidance`: take it from the CONDITIONING (3.5 if absent)
DEFAULT_GUIDANCE = 3.5


def working_memory(transformer, latent_shape, conditioning=None) -> int:
    """Bytes the transformer's activations need beside its weights for a step on raw latents of this shape
    ([B, C, H, W]) and the conditioning's Kontext references: ComfyUI's estimate for its own FLUX.1 model
    (`memory_usage_factor` 3.1: 0.031 MiB per latent pixel and byte of the compute dtype; references counted
    as more latent pixels, as ComfyUI counts them), so its memory manager leaves ours the same room. True CFG
    runs its two calls one after the other, so the batch is not doubled."""
    b = int(latent_shape[0])
    refs = (conditioning[0][1].get(REFERENCE_KEY) or []) if conditioning else []
    pixels = sum(int(s[-2]) * int(s[-1]) for s in [latent_shape, *(ref.shape for ref in refs)])
    return int(b * pixels * execution_dtype(transformer).itemsize * 0.01 * 3.1 * (1 << 20))


def check_conditioning(conditioning, config, which: str = "positive",
                       model: str = "the transformer") -> tuple[torch.Tensor, dict]:
    """(text states, extra dict) of a native CONDITIONING's first entry, checked against a transformer's
    config (its T5 width `joint_attention_dim`, its CLIP width `pooled_projection_dim`); a problem is a
    BadInput naming `which` conditioning and `model`."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise BadInput(which, "expected a CONDITIONING list [[tensor, dict], ...]")
    first = conditioning[0]
    if not isinstance(first, (list, tuple)) or len(first) != 2 or not torch.is_tensor(first[0]) \
            or not isinstance(first[1], dict):
        raise BadInput(which, "expected a CONDITIONING entry [tensor, dict]")
    hidden, extra = first
    if hidden.ndim != 3:
        raise BadInput(which, f"text states must be [B, N, D], got shape {tuple(hidden.shape)}")
    pooled = extra.get("pooled_output")
    if pooled is None:
        raise BadInput(which, "no pooled_output (the CLIP-L pooled vector Flux needs); encode the prompt "
                              "with both CLIP-L and T5")
    if hidden.shape[-1] != config["joint_attention_dim"]:
        raise BadInput(which, f"the {which} text states are {hidden.shape[-1]} wide, {model} expects "
                              f"{config['joint_attention_dim']} (its T5 width)")
    if pooled.shape[-1] != config["pooled_projection_dim"]:
        raise BadInput(which, f"the {which} pooled output is {pooled.shape[-1]} wide, {model} expects "
                              f"{config['pooled_projection_dim']} (its CLIP width)")
    in_channels = int(config["in_channels"])
    _check_image_inputs(extra, in_channels, int(config.get("out_channels") or in_channels) // 4, which, model)
    return hidden, extra


def _check_image_inputs(extra: dict, in_channels: int, channels: int, which: str, model: str) -> None:
    """The conditioning's image inputs fit the model: Kontext references have its latent channels and
    need a model without extra input channels; a control image (`concat_latent_image` without an inpaint
    `concat_mask`) needs a model with them (a Depth/Canny model, or a control LoRA applied)."""
    base = 4 * channels
    refs = extra.get(REFERENCE_KEY)
    if refs is not None:
        check_references(refs, channels, which, model)
        if refs and in_channels != base:
            raise BadInput(which, f"{len(refs)} Kontext reference image(s), but {model} takes {in_channels} input "
                                  f"channels (a Fill or control model): reference images need a Kontext model")
    if extra.get("concat_latent_image") is not None and extra.get("concat_mask") is None and in_channels == base:
        raise BadInput(which, f"the {which} conditioning carries a control image (concat_latent_image), but {model} "
                              f"takes no control input ({in_channels} input channels: not a Depth/Canny model; "
                              f"load one, or apply a Depth/Canny control LoRA)")


def _text_inputs(transformer, conditioning, which, batch, device, dtype, notes):
    hidden, extra = check_conditioning(conditioning, transformer.config, which)
    if len(conditioning) > 1:
        note(f"{which}: {len(conditioning)} conditioning entries; only the first is used", notes)
    pooled = extra["pooled_output"]
    hidden = _batch(hidden, batch, which).to(device=device, dtype=dtype)
    pooled = _batch(pooled.reshape(pooled.shape[0], -1), batch, which).to(device=device, dtype=dtype)
    return hidden, pooled, extra, text_ids(hidden.shape[1], device=device)


def _prepare_mask(mask: torch.Tensor, batch: int, channels: int, h: int, w: int) -> torch.Tensor:
    """Native noise_mask ([H, W], [B, H, W] or [B, 1, H, W], any resolution; 1 = denoise) -> [B, C, h, w]
    at latent size (bilinear, as ComfyUI's prepare_mask)."""
    m = mask.float().cpu()
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4:
        raise BadInput("denoise_mask", f"expected a mask [B, H, W], got shape {tuple(mask.shape)}")
    m = m.mean(dim=1, keepdim=True)
    if tuple(m.shape[-2:]) != (h, w):
        m = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear")
    return _batch(m, batch, "denoise_mask").expand(batch, channels, h, w)


def _progress_bar(progress, total):
    if progress is None:
        return None
    if callable(progress) and (isinstance(progress, type) or not hasattr(progress, "update")):
        return progress(total)
    return progress


@torch.no_grad()
def sample(transformer, conditioning, latent: dict, sigmas, seed: int = 0, guidance=FROM_CONDITIONING,
           negative=None, true_cfg: float = 1.0, fill: torch.Tensor | None = None,
           denoise_mask: torch.Tensor | None = None, noise: torch.Tensor | None = None, latent_format=None,
           progress=None, check_interrupt=None, preview=None, notes: list | None = None,
           output_device="cpu", add_noise_first: bool = True) -> dict:
    """Sample a native LATENT with a diffusers `FluxTransformer2DModel`.

    conditioning / negative: native Flux CONDITIONING (`pipeline.text.encode_prompt`). `guidance`: the
        default takes the conditioning's "guidance" (3.5 if absent; None = disabled); a number overrides it.
        Used only when the transformer has guidance embeddings (dev); schnell ignores it.
    latent: native LATENT `{"samples": raw [B, 16, h, w], "noise_mask"?}`. An all-zero latent with another
        channel count (e.g. a 4-channel EmptyLatentImage) is replaced by 16-channel zeros, with a note.
    sigmas: native SIGMAS (`schedule.flux_sigmas`); the first sigma sets the noise level: 1.0 = text to
        image, lower = img2img (noise added as sigma*noise + (1-sigma)*x0, like `scheduler.scale_noise`).
    seed / noise: the noise is `latents.noise(seed, samples.shape)` unless a tensor is given.
    true_cfg: with a `negative`, > 1 runs the model twice per step: neg + true_cfg * (pos - neg).
    fill: packed extra inputs for Fill (320 features) or Depth/Canny (64) models (`pipeline.fill`); when None
        they are built from native `concat_latent_image`/`concat_mask` keys of the positive conditioning.
    Kontext reference images come from the positive conditioning's native `reference_latents` (see
        `pipeline.kontext`): their tokens follow the latent's at every step (the negative pass too).
    denoise_mask: native noise_mask (1 = denoise; default: `latent["noise_mask"]`): the rest is kept, re-noised
        to each step's sigma like FluxInpaintPipeline.
    progress: a factory `progress(total)` or an object with `.update(n)` / `.update_absolute(v, total, preview)`.
    check_interrupt: called before every step; it raises to stop (nothing is left changed).
    preview: `preview(step, x0_raw)` -> an object passed to `update_absolute(..., preview=...)`.
    latent_format: a VAE or `LatentFormat` (FLUX.1's 0.3611 / 0.1159 when None).
    add_noise_first: False when `latent` is already noised to sigmas[0] (a custom loop's step: sigmas is
        then [sigma_i, sigma_i+1] and this is one Euler step).
    Returns a copy of `latent` with new "samples" (float32, on `output_device`).
    """
    fmt = LatentFormat.from_vae(latent_format)
    sig = as_sigmas(sigmas)
    steps = sig.numel() - 1
    cfg = transformer.config
    device, dtype = execution_device(transformer), execution_dtype(transformer)
    c = fmt.channels
    base = 4 * c
    in_ch = int(cfg.in_channels)
    out_ch = int(cfg.out_channels or in_ch)
    if out_ch != base:
        raise BadInput("transformer", f"predicts {out_ch} packed channels ({out_ch // 4} latent channels) but the "
                                      f"latent format has {c} channels ({base} packed)")
    raw = latent_samples(latent, c, notes)
    b, _, h, w = raw.shape
    ph, pw = h % 2, w % 2

    # ---- extra input channels (Fill / Depth / Canny) ----
    pos_hidden, pos_pooled, pos_extra, txt_ids = _text_inputs(transformer, conditioning, "conditioning", b,
                                                              device, dtype, notes)
    extra = in_ch - base
    if extra < 0:
        raise BadInput("transformer", f"takes {in_ch} input channels, fewer than the {base} packed channels of a "
                                      f"{c}-channel latent")
    if fill is None and extra > 0:
        fill = from_native_conditioning(pos_extra, (b, c, h, w), extra, fmt)
    if extra > 0 and fill is None:
        raise BadInput("fill", f"the transformer takes {in_ch} input channels: {base} from the latent and {extra} "
                               f"from {'a masked image + mask (Fill)' if extra == 320 else 'a control image'}, "
                               f"but none was given")
    if fill is not None:
        if extra == 0:
            raise BadInput("fill", f"fill/control inputs ({fill.shape[-1]} channels) were given, but the "
                                   f"transformer takes only {in_ch} input channels (the latent's {base}): "
                                   f"not a Fill/Depth/Canny model")
        if fill.shape[-1] != extra:
            raise BadInput("fill", f"fill/control inputs have {fill.shape[-1]} channels but the transformer "
                                   f"takes {in_ch} = {base} (latent) + {extra}")
        if ph or pw:
            raise BadInput("latent", f"{w}x{h} latent pixels: Fill/control sampling needs even sizes "
                                     f"(images a multiple of 16)")
        if fill.shape[1] != (h // 2) * (w // 2):
            raise BadInput("fill", f"fill/control inputs have {fill.shape[1]} tokens but the latent "
                                   f"{w}x{h} has {(h // 2) * (w // 2)}")

    # ---- guidance ----
    if isinstance(guidance, str):
        if guidance != FROM_CONDITIONING:
            raise BadInput("guidance", f"{guidance!r}: expected a number, None or {FROM_CONDITIONING!r}")
        g = pos_extra.get("guidance", DEFAULT_GUIDANCE)
    else:
        g = guidance
    guidance_vec = None
    if cfg.guidance_embeds:
        if g is None:
            raise BadInput("guidance", "disabled (None), but this transformer has guidance embeddings "
                                       "(a dev-type model); set a guidance value")
        guidance_vec = torch.full([b], float(g), dtype=torch.float32, device=device)

    # ---- negative / true CFG ----
    do_cfg = negative is not None and float(true_cfg) > 1.0
    if negative is not None and not do_cfg:
        note(f"negative conditioning ignored: true_cfg is {true_cfg} (it needs > 1)", notes)
    if do_cfg:
        neg_hidden, neg_pooled, _, neg_txt_ids = _text_inputs(transformer, negative, "negative", b, device,
                                                              dtype, notes)

    # ---- initial state (packed, in the compute dtype, as the pipelines keep their latents) ----
    if noise is None:
        noise = make_noise(seed, raw.shape)
    elif tuple(noise.shape) != tuple(raw.shape):
        raise BadInput("noise", f"shape {tuple(noise.shape)} does not match the latent {tuple(raw.shape)}")
    x0 = fmt.process_in(raw.to(dtype))
    eps = noise.to(dtype)
    if ph or pw:  # odd latent sizes: pad circularly to the 2x2 patch (as ComfyUI does), crop at the end
        note(f"latent {w}x{h} is not a multiple of 2; padded to {w + pw}x{h + ph} for sampling", notes)
        x0 = torch.nn.functional.pad(x0, (0, pw, 0, ph), mode="circular")
        eps = torch.nn.functional.pad(eps, (0, pw, 0, ph), mode="circular")
    hh, ww = h + ph, w + pw
    x0 = pack(x0).to(device)
    eps = pack(eps).to(device)
    x = add_noise(x0, eps, sig[0]) if add_noise_first else x0.clone()

    mask = denoise_mask if denoise_mask is not None else latent.get("noise_mask")
    if mask is not None:
        mask = _prepare_mask(mask, b, c, h, w)
        if ph or pw:
            mask = torch.nn.functional.pad(mask, (0, pw, 0, ph), mode="replicate")
        mask = pack(mask.contiguous()).to(device=device, dtype=dtype)

    img_ids = image_ids(hh // 2, ww // 2, device=device)
    n = x.shape[1]  # the latent's tokens; Kontext reference tokens follow them
    refs = pos_extra.get(REFERENCE_KEY) or []
    if refs:
        ref_x, ref_ids = reference_tokens(refs, pos_extra.get(METHOD_KEY) or "offset", b, (hh // 2, ww // 2), fmt,
                                          device, dtype, notes)
        img_ids = torch.cat([img_ids, ref_ids])
    # What the pipeline passes: the scheduler's timestep (sigma * 1000, float32) cast to the latents' dtype,
    # then divided by 1000 in that dtype (in bf16 some of dev's timesteps land one bf16 step off sigma).
    t_in = (sig[:-1] * 1000).to(device).to(dtype) / 1000
    sig_list = sig.tolist()
    buf = None
    if fill is not None or refs:  # the model's input, built once: [latent | fill] tokens, then references
        buf = torch.empty(b, n + (ref_x.shape[1] if refs else 0), in_ch, device=device, dtype=dtype)
        if fill is not None:
            buf[:, :n, base:] = _batch(fill, b, "fill").to(device=device, dtype=dtype)
        if refs:
            buf[:, n:] = ref_x

    bar = _progress_bar(progress, steps)
    for i in range(steps):
        if check_interrupt is not None:
            check_interrupt()
        if buf is not None:
            buf[:, :n, :base].copy_(x)
            inp = buf
        else:
            inp = x
        t = t_in[i].expand(b)
        v = transformer(hidden_states=inp, timestep=t, guidance=guidance_vec, pooled_projections=pos_pooled,
                        encoder_hidden_states=pos_hidden, txt_ids=txt_ids, img_ids=img_ids,
                        return_dict=False)[0][:, :n]
        if do_cfg:
            v_neg = transformer(hidden_states=inp, timestep=t, guidance=guidance_vec,
                                pooled_projections=neg_pooled, encoder_hidden_states=neg_hidden,
                                txt_ids=neg_txt_ids, img_ids=img_ids, return_dict=False)[0][:, :n]
            v = v_neg + true_cfg * (v - v_neg)
        shown = None
        if preview is not None:
            x0_pred = x - sig_list[i] * v.float()
            shown = preview(i, fmt.process_out(_unpacked(x0_pred, hh, ww, h, w)))
        x = euler_step(x, v, sig[i], sig[i + 1], out_dtype=dtype)  # float32 arithmetic, rounded to dtype
        if mask is not None:
            keep = add_noise(x0, eps, sig[i + 1]) if i < steps - 1 else x0
            x = (1 - mask) * keep + mask * x
        if bar is not None:
            if shown is not None or not hasattr(bar, "update"):
                bar.update_absolute(i + 1, steps, shown)
            else:
                bar.update(1)

    out = dict(latent)
    out["samples"] = fmt.process_out(_unpacked(x, hh, ww, h, w)).to(device=output_device, dtype=torch.float32)
    return out


def _unpacked(x: torch.Tensor, hh: int, ww: int, h: int, w: int) -> torch.Tensor:
    z = unpack(x, hh, ww)
    return z if (hh, ww) == (h, w) else z[:, :, :h, :w]
