"""FLUX.1 Redux: an image's SigLIP features, projected by the Redux encoder to text-width tokens that are
appended to the prompt's T5 tokens.

diffusers: FluxPriorReduxPipeline (SigLIP `last_hidden_state` -> ReduxImageEncoder -> `cat([t5, tokens])`)
followed by FluxPipeline with those prompt embeddings. ComfyUI: CLIPVisionEncode + StyleModelApply, whose
"multiply" strength scales the image tokens only; so does ours. (diffusers' `prompt_embeds_scale` scales the
text tokens too; both agree at strength 1.)

Pixels are prepared as ComfyUI's CLIPVisionEncode prepares them: crop "center" (shorter side to the tower's
size, then a centred square) or "none" (squeezed to a square), bicubic with antialiasing, rounded to 8-bit
levels, then normalised with the tower's mean and std. An image already at the tower's size is only
rounded and normalised, exactly as SiglipImageProcessor does.
"""
from __future__ import annotations

import torch

from ..common.errors import BadInput
from .device import execution_device, execution_dtype
from .images import image_batch

CROPS = ("center", "none")


def preprocess(image: torch.Tensor, size: int, mean, std, crop: str = "center") -> torch.Tensor:
    """IMAGE [B, H, W, C] 0..1 -> pixel values [B, 3, size, size] for the vision tower."""
    if crop not in CROPS:
        raise BadInput("crop", f"{crop!r}: expected one of {', '.join(CROPS)}")
    x = image_batch(image)[..., :3].movedim(-1, 1).float()
    if tuple(x.shape[-2:]) != (size, size):
        if crop == "center":
            scale = size / min(x.shape[-2:])
            target = (round(scale * x.shape[-2]), round(scale * x.shape[-1]))
        else:
            target = (size, size)
        x = torch.nn.functional.interpolate(x, size=target, mode="bicubic", antialias=True)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    x = torch.clip(255.0 * x, 0, 255).round() / 255.0
    mean = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def image_tokens(vision, encoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """Redux tokens [B, N, text width] (float32, CPU) of prepared pixels: the tower's per-patch features
    (`last_hidden_state`, after its final layer norm) through the Redux encoder."""
    features = vision(pixel_values=pixel_values.to(device=execution_device(vision),
                                                   dtype=execution_dtype(vision))).last_hidden_state
    tokens = encoder(features.to(device=execution_device(encoder), dtype=execution_dtype(encoder)))
    tokens = getattr(tokens, "image_embeds", tokens)
    return tokens.to(device="cpu", dtype=torch.float32)


def check_width(conditioning, width: int, which: str = "conditioning", source: str = "the Redux encoder") -> None:
    """Tokens `width` wide can follow every entry's text tokens: the Redux encoder's output width is the T5
    width, which the transformer's text input (`joint_attention_dim`) also has."""
    for cond, _ in conditioning:
        if cond.shape[-1] != width:
            raise BadInput(which, f"{source} makes {width}-wide tokens, but the {which}'s text states are "
                                  f"{cond.shape[-1]} wide (the T5 width the transformer reads)")


def append_tokens(conditioning, tokens: torch.Tensor, strength: float = 1.0, which: str = "conditioning",
                  source: str = "the Redux encoder") -> list:
    """A copy of a CONDITIONING with the image tokens (times `strength`) after every entry's text tokens.
    Several images' tokens go one after another (as ComfyUI's StyleModelApply does)."""
    check_width(conditioning, tokens.shape[-1], which, source)
    tokens = (tokens * float(strength)).reshape(1, -1, tokens.shape[-1])
    out = []
    for cond, extra in conditioning:
        tok = tokens.to(device=cond.device, dtype=cond.dtype).expand(cond.shape[0], -1, -1)
        out.append([torch.cat([cond, tok], dim=1), dict(extra)])
    return out
