"""VAE decode/encode between native IMAGE (`[B, H, W, 3]` float 0..1, CPU) and native LATENT samples (raw VAE
space, no scale/shift).

decode: diffusers does `vae.decode(latents / scale + shift)` then `(x * 0.5 + 0.5).clamp(0, 1)`; our LATENT is
already raw VAE space, so it goes to `vae.decode` as is and the numbers equal diffusers' image.
encode: `2x - 1`, the posterior's mean by default (as ComfyUI's VAEEncode); `sample_mode="sample"` with a
generator draws from the posterior like diffusers' `retrieve_latents` in FluxImg2ImgPipeline / FluxFillPipeline.
Large images: a tiled decode (overlapping tiles, linear blending); a decode that runs out of memory falls
back to it automatically, with a note.
"""
from __future__ import annotations

import torch

from ..common.errors import BadInput
from ._notes import note
from .device import execution_device, execution_dtype
from .images import crop_to_multiple, image_batch
from .latents import vae_downscale

TILE = 64  # latent pixels per side of a tile of the tiled decode


def decode_memory(vae, samples_shape) -> int:
    """Bytes a whole (untiled) decode of raw latents [B, C, h, w] needs beside the VAE's weights: ComfyUI's
    estimate for the FLUX VAE (2178 x 64 bytes per latent pixel and byte of the VAE's dtype), per image."""
    b, _, h, w = (int(n) for n in samples_shape)
    return b * h * w * 2178 * 64 * execution_dtype(vae).itemsize


def encode_memory(vae, image_shape) -> int:
    """Bytes an encode of an IMAGE [B, H, W, C] needs beside the VAE's weights: ComfyUI's estimate for the
    FLUX VAE (1767 bytes per pixel and byte of the VAE's dtype), per image."""
    b, h, w = (int(n) for n in image_shape[:3])
    return b * h * w * 1767 * execution_dtype(vae).itemsize


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_memory(device) -> None:
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_latent(vae, samples: torch.Tensor) -> None:
    if samples.ndim != 4:
        raise BadInput("latent", f"expected samples [B, C, H, W], got shape {tuple(samples.shape)}")
    want = int(vae.config.latent_channels)
    if samples.shape[1] != want:
        raise BadInput("latent", f"{samples.shape[1]} latent channels, but the VAE has {want} "
                                 f"(a Flux VAE has 16; an SD1 VAE has 4)")


def _to_image(pixels: torch.Tensor) -> torch.Tensor:
    """VAE output [B, 3, H, W] in -1..1 -> IMAGE [B, H, W, 3] float32 0..1 on the CPU."""
    img = (pixels * 0.5 + 0.5).clamp(0, 1)
    return img.permute(0, 2, 3, 1).to(device="cpu", dtype=torch.float32).contiguous()


@torch.no_grad()
def _decode_full(vae, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z, return_dict=False)[0]


@torch.no_grad()
def decode(vae, samples: torch.Tensor, tiled: bool | None = None, tile_size: int = TILE, overlap: int = 16,
           notes: list | None = None) -> torch.Tensor:
    """Raw LATENT samples [B, C, h, w] -> IMAGE [B, h*8, w*8, 3] float32 0..1 on the CPU.

    `tiled=None`: whole-image decode, falling back to tiles (with a note) when it runs out of memory;
    True: always tiled; False: never. `tile_size`/`overlap` are in latent pixels.
    """
    _check_latent(vae, samples)
    device, dtype = execution_device(vae), execution_dtype(vae)
    z = samples.to(device=device, dtype=dtype)
    if tiled:
        return _to_image(_decode_tiled(vae, z, tile_size, overlap))
    try:
        return _to_image(_decode_full(vae, z))
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
        if tiled is False or not is_oom(exc):
            raise
    _free_memory(device)
    note(f"VAE decode of {tuple(samples.shape)} ran out of memory; decoding in tiles of {tile_size} latent "
         f"pixels instead", notes)
    return _to_image(_decode_tiled(vae, z, tile_size, overlap))


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def _axis_weights(n: int, lead: int, trail: int, device) -> torch.Tensor:
    """1-D blend weights of a tile: linear ramps over the pixels it shares with the previous (`lead`) and the
    next (`trail`) tile, 1 elsewhere. Two neighbours' ramps sum to 1 over their overlap."""
    w = torch.ones(n, device=device)
    if lead:
        w[:lead] = (torch.arange(lead, device=device, dtype=torch.float32) + 0.5) / lead
    if trail:
        down = ((torch.arange(trail, device=device, dtype=torch.float32) + 0.5) / trail).flip(0)
        w[n - trail:] = torch.minimum(w[n - trail:], down)
    return w


def _decode_tiled(vae, z: torch.Tensor, tile_size: int = TILE, overlap: int = 16) -> torch.Tensor:
    """Decode overlapping latent tiles and blend them with linear ramps (normalised by the weight sum)."""
    if not 0 <= overlap < tile_size:
        raise BadInput("tile_size", f"overlap {overlap} must be between 0 and the tile size {tile_size}")
    ds = vae_downscale(vae)
    b, _, h, w = z.shape
    ys, xs = _starts(h, tile_size, overlap), _starts(w, tile_size, overlap)
    out = None
    weight = torch.zeros(1, 1, h * ds, w * ds, device=z.device, dtype=torch.float32)
    for yi, y in enumerate(ys):
        th = min(tile_size, h - y)
        lead_y = (ys[yi - 1] + tile_size - y) * ds if yi > 0 else 0
        trail_y = (y + th - ys[yi + 1]) * ds if yi + 1 < len(ys) else 0
        wy = _axis_weights(th * ds, lead_y, trail_y, z.device)
        for xi, x in enumerate(xs):
            tw = min(tile_size, w - x)
            lead_x = (xs[xi - 1] + tile_size - x) * ds if xi > 0 else 0
            trail_x = (x + tw - xs[xi + 1]) * ds if xi + 1 < len(xs) else 0
            wx = _axis_weights(tw * ds, lead_x, trail_x, z.device)
            tile = _decode_full(vae, z[:, :, y:y + th, x:x + tw]).float()
            if out is None:
                out = torch.zeros(b, tile.shape[1], h * ds, w * ds, device=z.device, dtype=torch.float32)
            wt = (wy[:, None] * wx[None, :])[None, None]
            region = (slice(None), slice(None), slice(y * ds, (y + th) * ds), slice(x * ds, (x + tw) * ds))
            out[region] += tile * wt
            weight[region] += wt
    return (out / weight).to(z.dtype)


def _pixels(image: torch.Tensor, ds: int, notes) -> torch.Tensor:
    """IMAGE [B, H, W, C] 0..1 -> VAE input [B, 3, H', W'] in -1..1, H'/W' cropped (centred) to a
    multiple of the VAE downscale, like ComfyUI's VAEEncode."""
    (image,) = crop_to_multiple(image_batch(image), ds, notes=notes)
    # contiguous: the same pixels must give the same latents whatever the IMAGE's memory layout (a BHWC view
    # of a BCHW tensor, as native nodes return, would otherwise reach the convolutions channels-last)
    return (2.0 * image[..., :3].permute(0, 3, 1, 2) - 1.0).contiguous()


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor, sample_mode: str = "argmax",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """VAE input [B, 3, H, W] in -1..1 -> raw latents [B, C, H/8, W/8] (posterior mean, or a sample)."""
    device, dtype = execution_device(vae), execution_dtype(vae)
    dist = vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist
    if sample_mode == "argmax":
        return dist.mode()
    if sample_mode == "sample":
        return dist.sample(generator)
    raise BadInput("sample_mode", f"{sample_mode!r}: expected 'argmax' (posterior mean) or 'sample'")


@torch.no_grad()
def encode(vae, image: torch.Tensor, sample_mode: str = "argmax", generator: torch.Generator | None = None,
           notes: list | None = None) -> torch.Tensor:
    """IMAGE [B, H, W, C] 0..1 -> raw LATENT samples [B, C, H/8, W/8], float32 on the CPU.

    `argmax` (default) is the posterior mean, as ComfyUI's VAEEncode; `sample` with a `generator` draws like
    diffusers' `retrieve_latents(vae.encode(x), generator)`. Out of memory: one image at a time, with a note.
    """
    pixels = _pixels(image, vae_downscale(vae), notes)
    try:
        z = encode_pixels(vae, pixels, sample_mode, generator)
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc) or pixels.shape[0] == 1:
            raise
        _free_memory(execution_device(vae))
        note(f"VAE encode of {pixels.shape[0]} images ran out of memory; encoding one at a time", notes)
        z = torch.cat([encode_pixels(vae, p[None], sample_mode, generator) for p in pixels])
    return z.to(device="cpu", dtype=torch.float32)
