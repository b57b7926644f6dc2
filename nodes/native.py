"""Our conversion for ComfyUI's native models: a LoRA node on the native MODEL / CLIP, and a loader that builds a
native MODEL from any Flux layout we read. Both leave the model itself to ComfyUI (its ModelPatcher patches,
backs up and restores; its own builder makes the model), so they mix with native LoRA nodes and samplers."""
from __future__ import annotations

from ..runtime import host, models
from ._common import CATEGORY, checked, io, lora_summary, name_errors, refuse_if_nothing_fits, ui
from .loaders import _warnings

NATIVE = CATEGORY + "/native"


class NativeLoRA(io.ComfyNode):
    NEEDS_COMFY = True  # works on ComfyUI's own MODEL / CLIP: the headless runner refuses it

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeNativeLoRA",
            display_name="FluxBridge LoRA (native MODEL)",
            category=NATIVE,
            description="Applies a Flux LoRA in any format FluxBridge reads to ComfyUI's native MODEL (and the "
                        "CLIP-L / T5 parts to a native Flux CLIP), exactly, zero-filling missing parts of "
                        "fused layers, and shows what it placed. ComfyUI's ModelPatcher applies the patches, "
                        "so it stacks with native LoRA nodes and samplers.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("lora_name", options=host.model_choices("loras")),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01),
                io.Clip.Input("clip", optional=True),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP")],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None):
        return name_errors(lora_name=("loras", lora_name))

    @classmethod
    def execute(cls, model, lora_name, strength_model=1.0, strength_clip=1.0, clip=None):
        from ..convert.lora.formats import FLUX, TEXT_FAMILIES
        from ..convert.lora.native import native_plan

        strength_model, strength_clip = checked(cls, strength_model=strength_model, strength_clip=strength_clip)
        lora = models.open_lora(host.model_path("loras", lora_name))
        plan = native_plan(lora, [FLUX], host.native_state_shapes(model))
        report = plan.report
        refuse_if_nothing_fits(lora_name, report, plan.patches, "transformer part(s) fits this MODEL")
        lines, taken = [], 0
        if plan.patches and strength_model != 0:
            model, taken = host.patched_clone(model, plan.batches(), strength_model)
        text = None
        has_text = any(lora.family_parts(f) for f in TEXT_FAMILIES)
        if clip is not None and has_text:
            text = native_plan(lora, TEXT_FAMILIES, host.native_state_shapes(clip))
            if text.patches and strength_clip != 0:
                clip, n = host.patched_clone(clip, text.batches(), strength_clip)
                taken += n
        elif has_text:
            lines.append("this LoRA has text-encoder parts; connect a CLIP to apply them")
        wanted = (len(plan.patches) if strength_model != 0 else 0) + (
            len(text.patches) if text is not None and strength_clip != 0 else 0)
        if taken != wanted:
            lines.append(f"ComfyUI took {taken} of {wanted} patches")

        patched = report["patched"] + (text.report["patched"] if text else [])
        zero = report["zero_filled"] + (text.report["zero_filled"] if text else [])
        not_placed = report["not_placed"] + (text.report["not_placed"] if text else [])
        summary, payload = lora_summary(lora_name, lora, patched, zero, not_placed, strength_model=strength_model,
                                        strength_clip=strength_clip)
        return io.NodeOutput(model, clip, ui=ui(summary + lines, payload))


class LoadNativeModel(io.ComfyNode):
    NEEDS_COMFY = True

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeLoadNativeModel",
            display_name="FluxBridge Load Transformer (native MODEL)",
            category=NATIVE,
            description="Reads a FLUX.1 transformer in any layout FluxBridge reads (BFL, ComfyUI, diffusers file "
                        "or folder, fp8 / scaled fp8, GGUF dequantized) and has ComfyUI build its own native "
                        "MODEL from it, for native samplers and nodes. Shows what it detected.",
            inputs=[
                io.Combo.Input("model_name", options=host.model_choices("diffusion_models"),
                               tooltip="A file or diffusers folder in models/diffusion_models (or unet)."),
                io.Combo.Input("weight_dtype", options=list(models.NATIVE_DTYPES), default="default",
                               tooltip="default: the file's dtypes (scaled fp8 and GGUF dequantized to bf16), "
                                       "ComfyUI chooses how to compute. The others as UNETLoader's weight_dtype "
                                       "(bf16 / fp16 / fp32: dequantized and stored so)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def validate_inputs(cls, model_name=None):
        return name_errors(model_name=("diffusion_models", model_name))

    @classmethod
    def execute(cls, model_name, weight_dtype="default"):
        path = host.model_path("diffusion_models", model_name)
        model, loaded = models.load_native_transformer(path, weight_dtype, name=model_name)
        info = {"family": loaded.family, "layout": loaded.layout, "variant": loaded.variant,
                "dtype": loaded.report["dtype"], "config": loaded.config, "warnings": _warnings(loaded.report)}
        line = (f"{model_name}: {loaded.family}, layout {loaded.layout}, variant {loaded.variant}, "
                f"{loaded.report['dtype']} → native MODEL")
        return io.NodeOutput(model, ui=ui([line] + info["warnings"], info))
