"""Extra input channels for FLUX.1 Fill (inpaint/outpaint) and Depth/Canny models.

Fill (in_channels 384 = 64 + 320): diffusers FluxFillPipeline.prepare_mask_latents. The masked image
(`(2x - 1) * (1 - mask)`, the mask binarised at 0.5) is VAE-encoded, normalised and packed (4*16 = 64
features); the pixel mask is folded into 8x8 = 64 channels per latent pixel (`view(B, h, 8, w, 8)
.permute(0, 2, 4, 1, 3)`) and packed (4*64 = 256 features). The two are concatenated on the feature axis
and `sample()` appends them to the packed latents at every step: `cat((x, fill), dim=2)`.
Depth/Canny (in_channels 128 = 64 + 64): the control image's normalised, packed latents.
This is also what ComfyUI's Flux `concat_cond` builds from native `concat_latent_image`/`concat_mask`, so
`from_native_conditioning` accepts those keys (InpaintModelConditioning) too.
"""
from __future__ import annotations

import torch

from ..common.errors import BadInput
from .images import crop_to_multiple, image_batch
from .latents import LatentFormat, pack
from .vae import _pixels, encode, encode_pixels


def _mask_bhw(mask: torch.Tensor) -> torch.Tensor:
    """MASK [H, W] / [B, H, W] / [B, 1, H, W] -> [B, H, W] float."""
    if mask.ndim == 2:
        mask = mask[None]
    elif mask.ndim == 4:
        if mask.shape[1] != 1:
            raise BadInput("mask", f"expected MASK [B, H, W], got shape {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise BadInput("mask", f"expected MASK [B, H, W], got shape {tuple(mask.shape)}")
    return mask.float()


def pack_mask(mask: torch.Tensor, downscale: int = 8) -> torch.Tensor:
    """Pixel MASK [B, H, W] (H, W multiples of 2*downscale) -> packed [B, (h/2)(w/2), 4*downscale^2]."""
    mask = _mask_bhw(mask)
    b, hp, wp = mask.shape
    if hp % (2 * downscale) or wp % (2 * downscale):
        raise BadInput("mask", f"{wp}x{hp} is not a multiple of {2 * downscale} pixels")
    h, w = hp // downscale, wp // downscale
    m = mask.view(b, h, downscale, w, downscale).permute(0, 2, 4, 1, 3).reshape(b, downscale * downscale, h, w)
    return pack(m)


def _batch(t: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if t.shape[0] == n:
        return t
    if n % t.shape[0]:
        raise BadInput(what, f"batch of {t.shape[0]} does not divide the requested batch of {n}")
    return t.repeat(n // t.shape[0], *([1] * (t.ndim - 1)))


def fill_from_latent(masked_latent_raw: torch.Tensor, mask: torch.Tensor, fmt: LatentFormat | None = None,
                     binarize: bool = True, batch: int | None = None) -> torch.Tensor:
    """Fill conditioning from the *raw* latents of the masked image [B, 16, h, w] and the pixel mask
    [B, 8h, 8w] (1 = repaint): packed [B, (h/2)(w/2), 64 + 256]."""
    fmt = fmt or LatentFormat()
    mask = _mask_bhw(mask)
    if binarize:
        mask = (mask >= 0.5).float()
    b, c, h, w = masked_latent_raw.shape
    if c != fmt.channels:
        raise BadInput("fill", f"masked image latents have {c} channels, the latent format {fmt.channels}")
    if tuple(mask.shape[-2:]) != (h * fmt.downscale, w * fmt.downscale):
        raise BadInput("fill", f"mask is {mask.shape[-1]}x{mask.shape[-2]} pixels but the masked image latents "
                               f"are {w}x{h} (= {w * fmt.downscale}x{h * fmt.downscale} pixels)")
    n = batch or max(b, mask.shape[0])
    lat = pack(fmt.process_in(_batch(masked_latent_raw.float(), n, "fill image")))
    return torch.cat((lat, pack_mask(_batch(mask, n, "fill mask"), fmt.downscale)), dim=-1)


@torch.no_grad()
def fill_conditioning(vae, image: torch.Tensor, mask: torch.Tensor, binarize: bool = True,
                      sample_mode: str = "argmax", generator: torch.Generator | None = None,
                      batch: int | None = None) -> torch.Tensor:
    """FluxFillPipeline's masked-image + mask input for IMAGE [B, H, W, 3] (0..1) and MASK [B, H, W]
    (1 = repaint): packed [B, (H/16)(W/16), 320] float32 on the CPU. H and W must be multiples of 16.

    The masked image is `(2*image - 1) * (1 - mask)` (mask binarised at 0.5 as diffusers' mask processor
    does); it is encoded with the posterior mean, or `sample_mode="sample"` + `generator` as diffusers.
    """
    fmt = LatentFormat.from_vae(vae)
    ds = fmt.downscale
    mask = _mask_bhw(mask).to(image.device)
    if binarize:
        mask = (mask >= 0.5).float()
    if image.ndim == 3:
        image = image[None]
    if tuple(image.shape[1:3]) != tuple(mask.shape[-2:]):
        raise BadInput("fill", f"image is {image.shape[2]}x{image.shape[1]} but the mask is "
                               f"{mask.shape[-1]}x{mask.shape[-2]}")
    if image.shape[1] % (2 * ds) or image.shape[2] % (2 * ds):
        raise BadInput("fill", f"image {image.shape[2]}x{image.shape[1]} is not a multiple of {2 * ds} pixels")
    pixels = _pixels(image, ds, None)
    n = batch or max(pixels.shape[0], mask.shape[0])
    pixels, mask = _batch(pixels, n, "fill image"), _batch(mask, n, "fill mask")
    masked = pixels * (1 - mask[:, None])
    raw = encode_pixels(vae, masked, sample_mode, generator).float().cpu()
    return fill_from_latent(raw, mask.cpu(), fmt, binarize=False, batch=n)


@torch.no_grad()
def control_conditioning(vae, image: torch.Tensor, sample_mode: str = "argmax",
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Depth/Canny models: the control IMAGE's normalised, packed latents [B, L, 64] (float32, CPU)."""
    fmt = LatentFormat.from_vae(vae)
    raw = encode(vae, image, sample_mode, generator)
    return pack(fmt.process_in(raw))


def from_native_conditioning(cond_dict: dict, latent_shape, extra_channels: int,
                             fmt: LatentFormat | None = None) -> torch.Tensor | None:
    """Build the extra channels from native keys set by ComfyUI nodes: `concat_latent_image` (raw latents)
    and, for Fill, `concat_mask` (pixel mask, not binarised, as ComfyUI uses it). None if absent."""
    image = cond_dict.get("concat_latent_image")
    if image is None:
        return None
    fmt = fmt or LatentFormat()
    b, _, h, w = latent_shape
    if tuple(image.shape[-2:]) != (h, w):
        raise BadInput("conditioning", f"concat_latent_image is {image.shape[-1]}x{image.shape[-2]} latent "
                                       f"pixels but the latent is {w}x{h}")
    lat = pack(fmt.process_in(_batch(image.float().cpu(), b, "concat_latent_image")))
    if extra_channels == lat.shape[-1]:
        return lat
    mask = cond_dict.get("concat_mask")
    if mask is None:
        mask = torch.ones(b, h * fmt.downscale, w * fmt.downscale)
    mask = mask_like(mask.float().cpu(), h * fmt.downscale, w * fmt.downscale)
    return torch.cat((lat, pack_mask(_batch(mask, b, "concat_mask"), fmt.downscale)), dim=-1)


def mask_like(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """MASK [H, W] / [B, H, W] / [B, 1, H, W] at `height` x `width` pixels, float [B, H, W] (bilinear, as
    ComfyUI's InpaintModelConditioning resizes it)."""
    m = _mask_bhw(mask)
    if tuple(m.shape[-2:]) != (height, width):
        m = torch.nn.functional.interpolate(m[:, None], size=(height, width), mode="bilinear")[:, 0]
    return m


def masked_image(image: torch.Tensor, mask: torch.Tensor, multiple: int, notes: list | None = None):
    """The Fill inputs in native form, from IMAGE [B, H, W, C] (0..1) and MASK (1 = repaint; any size, resized
    to the image): (pixels [B, H', W', 3], masked pixels, binary mask [B, H', W']), cropped (centred) to a
    multiple of `multiple` pixels, one mask for every image or one image for every mask. The mask is binarised
    at 0.5 and the masked image is mid grey where it is 1, as FluxFillPipeline's `(2x - 1) * (1 - mask)` is
    in pixel space."""
    image = image_batch(image)
    image, m = crop_to_multiple(image, multiple, mask_like(mask, image.shape[1], image.shape[2]), notes=notes)
    m = (m >= 0.5).float()
    if image.shape[0] != m.shape[0]:
        if m.shape[0] == 1:
            m = m.expand(image.shape[0], -1, -1)
        elif image.shape[0] == 1:
            image = image.expand(m.shape[0], -1, -1, -1)
        else:
            raise BadInput("mask", f"{m.shape[0]} masks for {image.shape[0]} images")
    pixels = image[..., :3].float()
    return pixels, pixels * (1 - m[..., None]) + 0.5 * m[..., None], m


def with_fill(conditioning, latent_image: torch.Tensor, mask: torch.Tensor) -> list:
    """A copy of a CONDITIONING carrying Fill inputs as ComfyUI's InpaintModelConditioning sets them: the
    masked image's raw latents (`concat_latent_image`) and the pixel mask (`concat_mask`)."""
    return [[c, dict(d, concat_latent_image=latent_image, concat_mask=mask)] for c, d in conditioning]


def with_control(conditioning, latent_image: torch.Tensor) -> list:
    """A copy of a CONDITIONING carrying a Depth/Canny control image's raw latents (`concat_latent_image`)."""
    return [[c, dict(d, concat_latent_image=latent_image)] for c, d in conditioning]


__all__ = ["fill_conditioning", "fill_from_latent", "pack_mask", "control_conditioning",
           "from_native_conditioning", "mask_like", "masked_image", "with_fill",
           "with_control"]
