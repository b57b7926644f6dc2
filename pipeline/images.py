"""Resizing native IMAGEs ([B, H, W, C] float 0..1) as ComfyUI's `comfy.utils.common_upscale` does, so that a
node of ours and the native node it stands for (FluxKontextImageScale, ImageScaleBy) give the same pixels.

"center" crop first cuts the image (centred) to the target's aspect ratio; "lanczos" goes through 8-bit PIL
images (values truncated to 0..255, as ComfyUI does); the other methods are `torch.nn.functional.interpolate`
with its defaults.
"""
from __future__ import annotations

import torch

from ..common.errors import BadInput
from ._notes import note

METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROPS = ("disabled", "center")


def _lanczos(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    out = []
    for frame in x:  # [C, H, W]
        arr = np.clip(255.0 * frame.movedim(0, -1).float().cpu().numpy(), 0, 255).astype(np.uint8)
        pil = Image.fromarray(arr).resize((width, height), resample=Image.Resampling.LANCZOS)
        out.append(torch.from_numpy(np.array(pil).astype(np.float32) / 255.0).movedim(-1, 0))
    return torch.stack(out).to(x.device, x.dtype)


def center_crop_box(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int]:
    """(x, y): how many pixels a centred crop to the target's aspect ratio removes on each side."""
    old, new = width / height, target_width / target_height
    if old > new:
        return round((width - width * (new / old)) / 2), 0
    if old < new:
        return 0, round((height - height * (old / new)) / 2)
    return 0, 0


def scale(image: torch.Tensor, width: int, height: int, method: str = "lanczos", crop: str = "disabled") -> torch.Tensor:
    """IMAGE [B, H, W, C] -> [B, height, width, C] (float32)."""
    if method not in METHODS:
        raise BadInput("upscale_method", f"{method!r}: expected one of {', '.join(METHODS)}")
    if crop not in CROPS:
        raise BadInput("crop", f"{crop!r}: expected one of {', '.join(CROPS)}")
    if image.ndim != 4:
        raise BadInput("image", f"expected IMAGE [B, H, W, C], got shape {list(image.shape)}")
    x = image.movedim(-1, 1).float()
    if crop == "center":
        cx, cy = center_crop_box(x.shape[-1], x.shape[-2], width, height)
        x = x[..., cy:x.shape[-2] - cy, cx:x.shape[-1] - cx]
    if method == "lanczos":
        y = _lanczos(x, width, height)
    else:
        y = torch.nn.functional.interpolate(x, size=(height, width), mode=method)
    return y.movedim(1, -1).contiguous()


def image_batch(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """A native IMAGE as [B, H, W, C] with at least 3 channels (one image [H, W, C] gets a batch axis)."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] < 3:
        raise BadInput(what, f"expected IMAGE [B, H, W, 3], got shape {list(image.shape)}")
    return image


def crop_to_multiple(image: torch.Tensor, multiple: int, *aligned: torch.Tensor, notes: list | None = None) -> tuple:
    """(image, *aligned) cropped, centred, to a multiple of `multiple` pixels on each side, as ComfyUI's
    VAEEncode crops (with a note when anything is cut). `image` is [B, H, W, ...]; each of `aligned` (masks
    [B, H, W]) is cut at the same pixels."""
    _, h, w = image.shape[:3]
    h2, w2 = h // multiple * multiple, w // multiple * multiple
    if h2 == 0 or w2 == 0:
        raise BadInput("image", f"{w}x{h} is smaller than {multiple}x{multiple} pixels, the least it can be "
                                f"cropped to")
    if (h2, w2) != (h, w):
        note(f"image {w}x{h} is not a multiple of {multiple}; cropped to {w2}x{h2} (centred)", notes)
        oy, ox = (h - h2) // 2, (w - w2) // 2
        image, aligned = image[:, oy:oy + h2, ox:ox + w2], [t[:, oy:oy + h2, ox:ox + w2] for t in aligned]
    return (image, *aligned)
