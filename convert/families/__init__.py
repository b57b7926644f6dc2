"""The model families: one module each, with its layout table, config inference and builder."""
from __future__ import annotations

from . import clip, flux, redux, sd15_unet, siglip, t5, vae

FAMILIES = {m.FAMILY: m for m in (flux, vae, clip, t5, sd15_unet, redux, siglip)}


def layout_name(family, side: str, prefix: str) -> str:
    """What users call a (side, prefix) pair: bfl / comfy / diffusers (and ldm for the UNet)."""
    if side == "b":
        return "diffusers"
    if prefix and prefix == family.COMFY_PREFIX:
        return "comfy"
    if prefix:
        return "bundle"
    return getattr(family, "ORIGINAL_LAYOUT", "bfl")


def target(family, layout: str) -> tuple[str, str]:
    """(side, prefix) for a layout name given to `convert --to`."""
    if layout == "diffusers":
        return "b", ""
    if layout == "comfy":
        return "a", family.COMFY_PREFIX
    return "a", ""
