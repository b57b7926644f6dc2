"""Conditioning: prompt encoding (CLIP-L + T5 → native Flux CONDITIONING) and FLUX.1 Fill inputs."""
from __future__ import annotations

import torch

from ..runtime import host
from ..common.errors import BadInput
from ..pipeline import text as text_lib
from ..pipeline import vae as vae_lib
from ._common import CATEGORY, TEXT_ENCODERS, VAE, checked, io, ui

CONDITIONING = CATEGORY + "/conditioning"


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeTextEncode",
            display_name="FluxBridge Text Encode",
            category=CONDITIONING,
            description="Encodes a prompt with CLIP-L (pooled) and T5 (sequence) as FLUX.1 does, into native "
                        "Flux CONDITIONING.",
            inputs=[
                TEXT_ENCODERS.Input("text_encoders"),
                io.String.Input("clip_text", multiline=True, default="", dynamic_prompts=True),
                io.String.Input("t5_text", multiline=True, default="", dynamic_prompts=True,
                                tooltip="Empty: the CLIP text is used for T5 too."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1),
                io.Int.Input("max_sequence_length", default=512, min=1, max=512,
                             tooltip="T5 tokens (FLUX.1-dev 512, schnell 256)."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, text_encoders, clip_text, t5_text="", guidance=3.5, max_sequence_length=512):
        guidance, max_sequence_length = checked(cls, guidance=guidance, max_sequence_length=max_sequence_length)
        enc, notes = text_encoders, []
        host.load_to_device(enc.handles)
        with enc.patched():
            cond = text_lib.encode_prompt(
                enc.tokenizers.clip, enc.clip.module, enc.tokenizers.t5, enc.t5.module, clip_text,
                t5_text if t5_text.strip() else clip_text, max_sequence_length=int(max_sequence_length),
                guidance=float(guidance), device=host.intermediate_device(), dtype=torch.float32, notes=notes)
        applied = [e for e in enc.loras
                   if e.strength and (e.lora.family_parts("clip-l") or e.lora.family_parts("t5-xxl"))]
        if applied:
            notes.append("text-encoder LoRA: " + ", ".join(f"{e.name} x{e.strength:g}" for e in applied))
        return io.NodeOutput(cond, ui=ui(notes))


def _mask_like(mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """MASK [B?, H, W] at the image's size (bilinear, as ComfyUI's InpaintModelConditioning does)."""
    m = mask.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise BadInput("mask", f"expected MASK [B, H, W], got shape {list(mask.shape)}")
    if tuple(m.shape[-2:]) != tuple(image.shape[1:3]):
        m = torch.nn.functional.interpolate(m[:, None], size=tuple(image.shape[1:3]), mode="bilinear")[:, 0]
    return m


def _with_fill(conditioning, latent_image: torch.Tensor, mask: torch.Tensor):
    return [[c, dict(d, concat_latent_image=latent_image, concat_mask=mask)] for c, d in conditioning]


class FillConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeFillConditioning",
            display_name="FluxBridge Fill Conditioning",
            category=CONDITIONING,
            description="FLUX.1 Fill (inpaint / outpaint): the masked image's latents and the mask, set on the "
                        "conditioning as native concat_latent_image / concat_mask, and the image's latent.",
            inputs=[
                VAE.Input("vae"),
                io.Conditioning.Input("positive"),
                io.Image.Input("image"),
                io.Mask.Input("mask", tooltip="1 = repaint (binarised at 0.5, as diffusers does)."),
                io.Conditioning.Input("negative", optional=True),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative"),
                     io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, vae, positive, image, mask, negative=None):
        notes = []
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[-1] < 3:
            raise BadInput("image", f"expected IMAGE [B, H, W, 3], got shape {list(image.shape)}")
        m = _mask_like(mask, image)
        # crop (centred) to a multiple of 16: the VAE's 8 x the transformer's 2x2 patches
        step = vae.downscale * 2
        _, h, w, _ = image.shape
        h2, w2 = h // step * step, w // step * step
        if h2 == 0 or w2 == 0:
            raise BadInput("image", f"{w}x{h} is smaller than {step}x{step} pixels")
        if (h2, w2) != (h, w):
            notes.append(f"image {w}x{h} is not a multiple of {step}; cropped to {w2}x{h2} (centred)")
            oy, ox = (h - h2) // 2, (w - w2) // 2
            image, m = image[:, oy:oy + h2, ox:ox + w2], m[:, oy:oy + h2, ox:ox + w2]
        m = (m >= 0.5).float()
        if image.shape[0] != m.shape[0]:
            if m.shape[0] == 1:
                m = m.expand(image.shape[0], -1, -1)
            elif image.shape[0] == 1:
                image = image.expand(m.shape[0], -1, -1, -1)
            else:
                raise BadInput("mask", f"{m.shape[0]} masks for {image.shape[0]} images")
        pixels = image[..., :3].float()
        # masked image (2x - 1) * (1 - mask): the repainted area is mid grey, as FluxFillPipeline makes it
        masked = pixels * (1 - m[..., None]) + 0.5 * m[..., None]
        host.load_to_device([vae.handle], memory_required=vae_lib.encode_memory(vae.module, pixels.shape))
        masked_latent = vae_lib.encode(vae.module, masked, notes=notes)
        latent = vae_lib.encode(vae.module, pixels, notes=notes)
        positive = _with_fill(positive, masked_latent, m)
        negative = _with_fill(negative, masked_latent, m) if negative is not None else None
        return io.NodeOutput(positive, negative, {"samples": latent}, ui=ui(notes))


NODES = [TextEncode, FillConditioning]
