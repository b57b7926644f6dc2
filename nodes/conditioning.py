"""Conditioning: prompt encoding (CLIP-L + T5 → native Flux CONDITIONING) and the image inputs of the FLUX.1
family, each set on the CONDITIONING in ComfyUI's native form: Fill (`concat_latent_image` + `concat_mask`),
Depth/Canny (`concat_latent_image`), Kontext (`reference_latents`), Redux (tokens after the text tokens)."""
from __future__ import annotations

import torch

from ..runtime import host
from ..pipeline import fill as fill_lib
from ..pipeline import images as images_lib
from ..pipeline import kontext as kontext_lib
from ..pipeline import latents as latents_lib
from ..pipeline import redux as redux_lib
from ..pipeline import text as text_lib
from ..pipeline import vae as vae_lib
from ._common import CATEGORY, REDUX, TEXT_ENCODERS, VAE, checked, io, ui

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
        # the transformer's 2x2 patches of the VAE's latent pixels: the extra input channels need whole ones
        pixels, masked, m = fill_lib.masked_image(image, mask, vae.downscale * 2, notes)
        host.load_to_device([vae.handle], memory_required=vae_lib.encode_memory(vae.module, pixels.shape))
        masked_latent = vae_lib.encode(vae.module, masked, notes=notes)
        latent = vae_lib.encode(vae.module, pixels, notes=notes)
        positive = fill_lib.with_fill(positive, masked_latent, m)
        negative = fill_lib.with_fill(negative, masked_latent, m) if negative is not None else None
        return io.NodeOutput(positive, negative, {"samples": latent}, ui=ui(notes))


class ControlConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeControlConditioning",
            display_name="FluxBridge Control Conditioning",
            category=CONDITIONING,
            description="FLUX.1 Depth / Canny: the control image (a depth map, an edge map: any IMAGE, e.g. from a "
                        "preprocessor node) encoded with the VAE and set on the conditioning as native "
                        "concat_latent_image, and an empty latent of its size. For the full Depth/Canny models and "
                        "for dev with a Depth/Canny control LoRA.",
            inputs=[
                VAE.Input("vae"),
                io.Conditioning.Input("positive"),
                io.Image.Input("control_image"),
                io.Conditioning.Input("negative", optional=True),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative"),
                     io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, vae, positive, control_image, negative=None):
        notes = []
        (image,) = images_lib.crop_to_multiple(images_lib.image_batch(control_image), vae.downscale * 2, notes=notes)
        host.load_to_device([vae.handle], memory_required=vae_lib.encode_memory(vae.module, image.shape))
        latent = vae_lib.encode(vae.module, image, notes=notes)  # the posterior mean, as ComfyUI's VAEEncode
        positive = fill_lib.with_control(positive, latent)
        negative = fill_lib.with_control(negative, latent) if negative is not None else None
        empty = {"samples": torch.zeros_like(latent, device=host.intermediate_device())}
        return io.NodeOutput(positive, negative, empty, ui=ui(notes))


class KontextReference(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeKontextReference",
            display_name="FluxBridge Kontext Reference",
            category=CONDITIONING,
            description="FLUX.1 Kontext: adds a reference image to the conditioning (native reference_latents, as "
                        "ComfyUI's ReferenceLatent does; chain the node for several references). Also gives an "
                        "empty latent of the reference's size, to generate the edited image at that size.",
            inputs=[
                VAE.Input("vae"),
                io.Conditioning.Input("conditioning"),
                io.Image.Input("image", tooltip="Best at a preferred Kontext size: see FluxBridge Kontext Image Scale."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning"), io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, vae, conditioning, image):
        notes = []
        image = images_lib.image_batch(image)
        host.load_to_device([vae.handle], memory_required=vae_lib.encode_memory(vae.module, image.shape))
        latent = vae_lib.encode(vae.module, image, notes=notes)  # cropped to the VAE's 8-pixel grid, like VAEEncode
        conditioning = kontext_lib.add_reference(conditioning, latent)
        refs = len(conditioning[0][1][kontext_lib.REFERENCE_KEY]) if conditioning else 0
        h, w = latent.shape[-2] * vae.downscale, latent.shape[-1] * vae.downscale
        empty = latents_lib.empty_latent(w, h, batch=latent.shape[0], channels=vae.latent_channels,
                                         downscale=vae.downscale, notes=notes)
        empty["samples"] = empty["samples"].to(host.intermediate_device())
        notes.insert(0, f"reference {refs}: {w}x{h} pixels")
        return io.NodeOutput(conditioning, empty, ui=ui(notes))


class ReduxConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeReduxConditioning",
            display_name="FluxBridge Redux Conditioning",
            category=CONDITIONING,
            description="FLUX.1 Redux: the image's Redux tokens (SigLIP features through the Redux encoder), times "
                        "strength, appended to the conditioning's text tokens (as diffusers' FluxPriorReduxPipeline "
                        "and ComfyUI's StyleModelApply with strength_type multiply).",
            inputs=[
                io.Conditioning.Input("conditioning"),
                REDUX.Input("redux"),
                io.Image.Input("image"),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01),
                io.Combo.Input("crop", options=list(redux_lib.CROPS), default="center",
                               tooltip="center: the shorter side to the tower's size and a centred square, as "
                                       "CLIPVisionEncode crops; none: the whole image squeezed to a square."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, conditioning, redux, image, strength=1.0, crop="center"):
        strength = checked(cls, strength=strength)
        source = f"the Redux encoder {redux.encoder.name!r}"
        redux_lib.check_width(conditioning, redux.text_width, source=source)  # before any work
        pixels = redux_lib.preprocess(image, redux.image_size, redux.mean, redux.std, crop)
        host.load_to_device(redux.handles)
        tokens = redux_lib.image_tokens(redux.vision.module, redux.encoder.module, pixels)
        out = redux_lib.append_tokens(conditioning, tokens, strength, source=source)
        return io.NodeOutput(out, ui=ui([f"{tokens.shape[0] * tokens.shape[1]} Redux token(s) x {strength:g} "
                                         f"after {conditioning[0][0].shape[1]} text token(s)"]))
