"""Loaders: transformer, text encoders, VAE, LoRA. They show what they detected as UI text."""
from __future__ import annotations

from ..runtime import host, models
from ._common import (CATEGORY, REDUX, TEXT_ENCODERS, TRANSFORMER, VAE, checked, io, lora_summary,
                      name_errors, refuse_if_nothing_fits, ui)

LOADERS = CATEGORY + "/loaders"


def _warnings(report: dict) -> list[str]:
    out = list(report.get("warnings") or [])
    unplaced = report.get("unplaced") or []
    if unplaced:
        out.append(f"{len(unplaced)} tensor(s) not used: {', '.join(map(str, unplaced[:4]))}"
                   + (" ..." if len(unplaced) > 4 else ""))
    unexpected = report.get("unexpected") or []
    if unexpected:
        out.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(map(str, unexpected[:4]))}"
                   + (" ..." if len(unexpected) > 4 else ""))
    return out


def _cached_note(hit: bool) -> str:
    return "(reused: already loaded)" if hit else ""


class LoadTransformer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeLoadTransformer",
            display_name="FluxBridge Load Transformer",
            category=LOADERS,
            description="Loads a FLUX.1 transformer in any layout (BFL, ComfyUI, diffusers file or folder, "
                        "GGUF, fp8) and shows what it detected.",
            inputs=[
                io.Combo.Input("model_name", options=host.model_choices("diffusion_models"),
                               tooltip="A file or diffusers folder in models/diffusion_models (or unet)."),
                io.Combo.Input("weight_dtype", options=list(models.WEIGHT_DTYPES), default="default",
                               tooltip="default: bf16 on a GPU that does it well, else fp32. fp8: weights kept "
                                       "in fp8, each layer upcast as it runs."),
                io.Combo.Input("quantize", options=list(models.QUANTIZE), default="none",
                               tooltip="Weight-only quantization of the Linear layers: int8 / fp8 through "
                                       "torchao, quanto-int8 / quanto-fp8 through optimum-quanto "
                                       "(pip install fluxbridge[quant])."),
                io.Combo.Input("variant", options=list(models.VARIANT_CHOICES), default="auto", optional=True,
                               tooltip="auto: detected from the weights and the file name. kontext: a FLUX.1 "
                                       "Kontext model whose file name does not say so (its weights look like "
                                       "dev's)."),
            ],
            outputs=[TRANSFORMER.Output(display_name="transformer")],
        )

    @classmethod
    def validate_inputs(cls, model_name=None):
        return name_errors(model_name=("diffusion_models", model_name))

    @classmethod
    def execute(cls, model_name, weight_dtype="default", quantize="none", variant="auto"):
        path = host.model_path("diffusion_models", model_name)
        model, hit = models.load_transformer(path, weight_dtype, quantize, name=model_name, variant=variant)
        info = {"family": model.family, "layout": model.layout, "variant": model.variant, "dtype": model.storage,
                "config": model.config, "warnings": _warnings(model.report), "cached": hit}
        line = (f"{model_name}: {model.family}, layout {model.layout}, variant {model.variant}, "
                f"{model.storage} {_cached_note(hit)}").strip()
        return io.NodeOutput(model, ui=ui([line] + info["warnings"], info))


class LoadTextEncoders(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        choices = host.model_choices("text_encoders")
        return io.Schema(
            node_id="FluxBridgeLoadTextEncoders",
            display_name="FluxBridge Load Text Encoders",
            category=LOADERS,
            description="Loads CLIP-L and T5-XXL (files, or a diffusers folder's text_encoder/ and "
                        "text_encoder_2/) and finds their tokenizers.",
            inputs=[
                io.Combo.Input("clip_name", options=choices,
                               tooltip="CLIP-L weights in models/text_encoders (or clip), or a diffusers folder."),
                io.Combo.Input("t5_name", options=choices,
                               tooltip="T5-XXL weights in models/text_encoders (or clip), or a diffusers folder."),
                io.Combo.Input("weight_dtype", options=list(models.TEXT_DTYPES), default="default"),
            ],
            outputs=[TEXT_ENCODERS.Output(display_name="text_encoders")],
        )

    @classmethod
    def validate_inputs(cls, clip_name=None, t5_name=None):
        return name_errors(clip_name=("text_encoders", clip_name), t5_name=("text_encoders", t5_name))

    @classmethod
    def execute(cls, clip_name, t5_name, weight_dtype="default"):
        clip_path = host.model_path("text_encoders", clip_name)
        t5_path = host.model_path("text_encoders", t5_name)
        enc, hit = models.load_text_encoders(clip_path, t5_path, weight_dtype, clip_name=clip_name,
                                             t5_name=t5_name)
        tok = enc.tokenizers
        parts, lines = [], []
        for e, source in ((enc.clip, tok.clip_source), (enc.t5, tok.t5_source)):
            parts.append({"name": e.name, "family": e.family, "layout": e.layout, "dtype": e.dtype,
                          "tokenizer": source, "warnings": _warnings(e.report)})
            lines.append(f"{e.name}: {e.family}, layout {e.layout}, {e.dtype}; tokenizer from {source}")
            lines += parts[-1]["warnings"]
        if hit:
            lines.append(_cached_note(hit))
        return io.NodeOutput(enc, ui=ui(lines, {"components": parts, "cached": hit}))


class LoadVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeLoadVAE",
            display_name="FluxBridge Load VAE",
            category=LOADERS,
            description="Loads the FLUX VAE (ae.safetensors, LDM or diffusers layout).",
            inputs=[io.Combo.Input("vae_name", options=host.model_choices("vae"),
                                   tooltip="A VAE file or diffusers folder in models/vae.")],
            outputs=[VAE.Output(display_name="vae")],
        )

    @classmethod
    def validate_inputs(cls, vae_name=None):
        return name_errors(vae_name=("vae", vae_name))

    @classmethod
    def execute(cls, vae_name):
        path = host.model_path("vae", vae_name)
        vae, hit = models.load_vae(path, name=vae_name)
        info = {"family": "flux-vae", "layout": vae.layout, "dtype": vae.dtype,
                "config": {"latent_channels": vae.latent_channels, "scaling_factor": vae.scaling_factor,
                           "shift_factor": vae.shift_factor, "downscale": vae.downscale},
                "warnings": _warnings(vae.report), "cached": hit}
        line = (f"{vae_name}: flux-vae, layout {vae.layout}, {vae.dtype}, {vae.latent_channels} latent channels "
                f"(scale {vae.scaling_factor}, shift {vae.shift_factor}) {_cached_note(hit)}").strip()
        return io.NodeOutput(vae, ui=ui([line] + info["warnings"], info))


class LoadLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeLoadLoRA",
            display_name="FluxBridge Load LoRA",
            category=LOADERS,
            description="Adds a LoRA (any Flux format) to the transformer's and the text encoders' LoRA stacks. "
                        "The weights are patched when a sampler or text encoder uses the stack, and stay patched "
                        "until a use with another stack (or none) restores them, bitwise.",
            inputs=[
                TRANSFORMER.Input("transformer"),
                io.Combo.Input("lora_name", options=host.model_choices("loras")),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01),
                io.Float.Input("strength_text", default=1.0, min=-10.0, max=10.0, step=0.01),
                TEXT_ENCODERS.Input("text_encoders", optional=True),
            ],
            outputs=[TRANSFORMER.Output(display_name="transformer"),
                     TEXT_ENCODERS.Output(display_name="text_encoders")],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None):
        return name_errors(lora_name=("loras", lora_name))

    @classmethod
    def execute(cls, transformer, lora_name, strength_model=1.0, strength_text=1.0, text_encoders=None):
        strength_model, strength_text = checked(cls, strength_model=strength_model, strength_text=strength_text)
        path = host.model_path("loras", lora_name)
        lora = models.open_lora(path)
        notes = []
        report = models.lora_report(transformer.module, transformer.family, lora, strength_model)
        refuse_if_nothing_fits(lora_name, report, report["patched"],
                               f"transformer part(s) fits the transformer {transformer.name!r}")
        text_reports = {}
        if text_encoders is not None:
            for enc in (text_encoders.clip, text_encoders.t5):
                if lora.family_parts(enc.family):
                    r = models.lora_report(enc.module, enc.family, lora, strength_text)
                    refuse_if_nothing_fits(lora_name, r, r["patched"],
                                           f"{enc.family} part(s) fits the text encoder {enc.name!r}")
                    text_reports[enc.family] = r
            text_encoders = text_encoders.with_lora(lora_name, lora, strength_text)
        elif any(lora.family_parts(f) for f in ("clip-l", "t5-xxl")):
            notes.append("this LoRA has text-encoder parts; connect text_encoders to apply them")
        transformer = transformer.with_lora(lora_name, lora, strength_model)

        not_placed = list(report["not_placed"]) + [n for r in text_reports.values() for n in r["not_placed"]]
        patched = list(report["patched"]) + [f"{fam}: {m}" for fam, r in text_reports.items() for m in r["patched"]]
        lines, payload = lora_summary(lora_name, lora, patched, report["zero_filled"], not_placed,
                                      strength_model=strength_model, strength_text=strength_text)
        payload["stack"] = [e.name for e in transformer.loras]
        return io.NodeOutput(transformer, text_encoders, ui=ui(lines + notes, payload))


class LoadRedux(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeLoadRedux",
            display_name="FluxBridge Load Redux",
            category=LOADERS,
            description="Loads FLUX.1 Redux: its image encoder (models/style_models) and the SigLIP vision tower "
                        "it reads (models/clip_vision: a single file, or a transformers folder).",
            inputs=[
                io.Combo.Input("redux_name", options=host.model_choices("style_models"),
                               tooltip="The Redux encoder, e.g. flux1-redux-dev.safetensors in models/style_models."),
                io.Combo.Input("clip_vision_name", options=host.model_choices("clip_vision"),
                               tooltip="SigLIP (so400m, patch 14, 384), e.g. sigclip_vision_patch14_384.safetensors "
                                       "in models/clip_vision."),
            ],
            outputs=[REDUX.Output(display_name="redux")],
        )

    @classmethod
    def validate_inputs(cls, redux_name=None, clip_vision_name=None):
        return name_errors(redux_name=("style_models", redux_name), clip_vision_name=("clip_vision", clip_vision_name))

    @classmethod
    def execute(cls, redux_name, clip_vision_name):
        redux, hit = models.load_redux(host.model_path("style_models", redux_name),
                                       host.model_path("clip_vision", clip_vision_name),
                                       redux_name=redux_name, vision_name=clip_vision_name)
        parts, lines = [], []
        for enc in (redux.encoder, redux.vision):
            parts.append({"name": enc.name, "family": enc.family, "layout": enc.layout, "dtype": enc.dtype,
                          "warnings": _warnings(enc.report)})
            lines.append(f"{enc.name}: {enc.family}, layout {enc.layout}, {enc.dtype}")
            lines += parts[-1]["warnings"]
        lines.append(f"{redux.image_size}x{redux.image_size} pixels in, {redux.text_width}-wide tokens out "
                     f"{_cached_note(hit)}".strip())
        return io.NodeOutput(redux, ui=ui(lines, {"components": parts, "image_size": redux.image_size,
                                                  "text_width": redux.text_width, "cached": hit}))
