"""Flux latents: the native LATENT convention, normalisation, 2x2 packing, position ids, noise.

A native LATENT holds *raw* VAE latents `[B, 16, H/8, W/8]` (no scale, no shift). The transformer works on
normalised latents, `(raw - shift) * scale`, packed into 2x2 patches `[B, (h/2)(w/2), 4C]` with the feature
order (c, ph, pw): this equals diffusers `FluxPipeline._pack_latents` and ComfyUI's patchify, so latents move
between the two without loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common.errors import BadInput
from ._notes import note

FLUX_SCALE = 0.3611
FLUX_SHIFT = 0.1159
FLUX_CHANNELS = 16
FLUX_DOWNSCALE = 8
SIZE_MULTIPLE = 16  # VAE downscale 8 x patch 2


@dataclass(frozen=True)
class LatentFormat:
    """Scale/shift/channels/downscale of a VAE latent space (FLUX.1 values by default)."""

    scale: float = FLUX_SCALE
    shift: float = FLUX_SHIFT
    channels: int = FLUX_CHANNELS
    downscale: int = FLUX_DOWNSCALE

    @classmethod
    def from_vae(cls, vae=None) -> "LatentFormat":
        """Read the values from a diffusers `AutoencoderKL` config; None gives the FLUX.1 constants."""
        if vae is None:
            return cls()
        if isinstance(vae, LatentFormat):
            return vae
        cfg = vae.config
        shift = getattr(cfg, "shift_factor", None)
        return cls(scale=float(cfg.scaling_factor), shift=float(shift) if shift is not None else 0.0,
                   channels=int(cfg.latent_channels), downscale=vae_downscale(vae))

    def process_in(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the model's normalised space: (raw - shift) * scale."""
        return (raw - self.shift) * self.scale

    def process_out(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> raw VAE latents: x / scale + shift (the order diffusers uses)."""
        return x / self.scale + self.shift


def vae_downscale(vae) -> int:
    """Pixels per latent pixel (per side) of a diffusers `AutoencoderKL`: 2 for each down block after the
    first (FLUX.1's 8 when its config does not say)."""
    blocks = getattr(vae.config, "block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else FLUX_DOWNSCALE


def latent_format(vae=None) -> LatentFormat:
    return LatentFormat.from_vae(vae)


def process_in(raw: torch.Tensor, vae=None) -> torch.Tensor:
    """(raw - shift) * scale with the VAE's config values (FLUX.1's when `vae` is None)."""
    return LatentFormat.from_vae(vae).process_in(raw)


def process_out(x: torch.Tensor, vae=None) -> torch.Tensor:
    """x / scale + shift with the VAE's config values (FLUX.1's when `vae` is None)."""
    return LatentFormat.from_vae(vae).process_out(x)


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], features ordered (c, ph, pw); H and W must be even."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W]; `height`/`width` are the *latent* sizes (even)."""
    b, _, d = x.shape
    x = x.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(rows: int, cols: int, index: float = 0.0, device=None, dtype=torch.float32, row_offset: int = 0,
              col_offset: int = 0) -> torch.Tensor:
    """Position ids `[rows*cols, 3]` of the packed image tokens: (index, row, col), row-major.
    `rows`/`cols` are the packed grid, i.e. latent H/2 and W/2. `index` is 0 (Kontext references: see
    `pipeline.kontext`, which also places them at a row and column offset)."""
    ids = torch.zeros(rows, cols, 3, dtype=dtype)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(rows, dtype=dtype)[:, None] + row_offset
    ids[..., 2] = torch.arange(cols, dtype=dtype)[None, :] + col_offset
    return ids.reshape(rows * cols, 3).to(device)


def text_ids(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids of the text tokens: zeros `[n, 3]`."""
    return torch.zeros(n, 3, dtype=dtype, device=device)


def latent_samples(latent, channels: int = FLUX_CHANNELS, notes: list | None = None, what: str = "latent",
                   model: str = "the transformer") -> torch.Tensor:
    """The `[B, C, H, W]` samples of a native LATENT, with `channels` channels. An all-zero latent of another
    count (a 4-channel EmptyLatentImage) becomes zeros of the right count, with a note, as ComfyUI's
    `fix_empty_latent_channels` does; any other count is refused, naming `model`."""
    if not isinstance(latent, dict) or not torch.is_tensor(latent.get("samples")):
        raise BadInput(what, "expected a LATENT (a dict with 'samples')")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise BadInput(what, f"samples must be [B, C, H, W], got shape {list(samples.shape)}")
    if samples.shape[1] == channels:
        return samples
    if not bool((samples == 0).all()):
        raise BadInput(what, f"the {what} has {samples.shape[1]} channels, {model} works on {channels}-channel "
                             f"latents (encode images with a VAE that has {channels} latent channels)")
    note(f"empty latent with {samples.shape[1]} channels replaced by {channels}-channel zeros", notes)
    return torch.zeros(samples.shape[0], channels, *samples.shape[2:], dtype=samples.dtype)


def snap_size(width: int, height: int, multiple: int = SIZE_MULTIPLE, notes: list | None = None):
    """Round a pixel size down to a multiple of 16 (the VAE's 8 x the 2x2 patch). Returns (w, h, note|None);
    the note is also logged and appended to `notes`."""
    w, h = int(width) // multiple * multiple, int(height) // multiple * multiple
    if w < multiple or h < multiple:
        raise BadInput("size", f"{width}x{height} is smaller than {multiple}x{multiple} pixels")
    msg = None
    if (w, h) != (int(width), int(height)):
        msg = note(f"size {width}x{height} is not a multiple of {multiple}; using {w}x{h}", notes)
    return w, h, msg


def empty_latent(width: int, height: int, batch: int = 1, channels: int = FLUX_CHANNELS,
                 downscale: int = FLUX_DOWNSCALE, notes: list | None = None) -> dict:
    """Native LATENT `{"samples": zeros[B, C, H/8, W/8]}` (like EmptySD3LatentImage). A size that is not a
    multiple of 16 is rounded down, with a note (logged and appended to `notes`)."""
    w, h, _ = snap_size(width, height, downscale * 2, notes)
    return {"samples": torch.zeros(int(batch), channels, h // downscale, w // downscale)}


def noise(seed: int, shape, generator_device: str = "cpu", dtype: torch.dtype = torch.float32,
          device=None) -> torch.Tensor:
    """Gaussian noise for a seed, drawn on `generator_device` then moved to `device`.

    Equals diffusers `randn_tensor(shape, generator=torch.Generator(generator_device).manual_seed(seed))`
    (FluxPipeline draws `(B, 16, 2*(H//16), 2*(W//16))` before packing) and ComfyUI's `prepare_noise` for a
    batch without `batch_index`.
    """
    gen = torch.Generator(generator_device).manual_seed(int(seed))
    out = torch.randn(tuple(shape), generator=gen, device=generator_device, dtype=dtype)
    return out if device is None else out.to(device)
