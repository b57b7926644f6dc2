"""Convert and save: a loaded transformer or VAE in another layout (LoRAs baked in), a LoRA in another format.

They write only through `host.safe_output_path` (inside the output folder) and rewrite from the source
file, streaming, so a model loaded in fp8 or quantized is saved from its full weights.
"""
from __future__ import annotations

import os

from ..runtime import host
from ..convert.lora.write import TARGETS as LORA_TARGETS
from ..convert.lora.write import convert_lora
from ..convert.write import DTYPES, LAYOUTS, convert_file
from ._common import CATEGORY, TRANSFORMER, VAE, io, name_errors, ui

CONVERT = CATEGORY + "/convert"
VAE_LAYOUTS = ("bfl", "diffusers")


def _destination(prefix: str, layout: str) -> str:
    """A new file (bfl, comfy, kohya, ...) or folder (diffusers: weights + config.json) in the output folder."""
    return host.safe_output_path(prefix, "" if layout == "diffusers" else ".safetensors")


def _written(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(os.path.join(path, f) for f in os.listdir(path))
    return [path]


def _summary(report: dict) -> list[str]:
    lines = []
    for comp in report.get("components", []):
        counts = ", ".join(f"{k} {len(comp.get(k) or [])}" for k in ("renamed", "split", "fused", "swapped",
                                                                        "reshaped", "dropped")
                           if comp.get(k))
        lines.append(f"{comp.get('family')}: {comp.get('from_layout')} → {comp.get('to_layout')}, "
                     f"{comp.get('tensors_written')} tensors" + (f" ({counts})" if counts else ""))
        for lora in comp.get("loras") or []:
            lines.append(f"  LoRA {lora.get('name')} x{lora.get('strength')}: patched "
                         f"{len(lora.get('patched') or [])}, not placed {len(lora.get('not_placed') or [])}")
    return lines


class SaveTransformer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeSaveTransformer",
            display_name="FluxBridge Save Transformer",
            category=CONVERT,
            description="Writes the transformer's weights in another layout (bfl, comfy, diffusers folder), "
                        "with its LoRA stack baked in, to the output folder.",
            inputs=[
                TRANSFORMER.Input("transformer"),
                io.Combo.Input("layout", options=list(LAYOUTS), default="bfl"),
                io.Combo.Input("dtype", options=list(DTYPES), default="keep"),
                io.String.Input("filename_prefix", default="fluxbridge/transformer"),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None):
        return name_errors(filename_prefix=("output", filename_prefix))

    @classmethod
    def execute(cls, transformer, layout="bfl", dtype="keep", filename_prefix="fluxbridge/transformer"):
        dst = _destination(filename_prefix, layout)
        loras = [(e.lora.path, e.strength) for e in transformer.loras if e.strength != 0]
        report = convert_file(transformer.path, dst, to=layout, dtype=dtype, loras=loras)
        paths = _written(dst)
        lines = [f"wrote {p}" for p in paths] + _summary(report)
        return io.NodeOutput(ui=ui(lines, {"written": paths, "layout": layout, "dtype": dtype}))


class SaveVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeSaveVAE",
            display_name="FluxBridge Save VAE",
            category=CONVERT,
            description="Writes the VAE's weights in another layout (bfl = ae.safetensors, diffusers folder).",
            inputs=[
                VAE.Input("vae"),
                io.Combo.Input("layout", options=list(VAE_LAYOUTS), default="bfl"),
                io.String.Input("filename_prefix", default="fluxbridge/vae"),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None):
        return name_errors(filename_prefix=("output", filename_prefix))

    @classmethod
    def execute(cls, vae, layout="bfl", filename_prefix="fluxbridge/vae"):
        dst = _destination(filename_prefix, layout)
        report = convert_file(vae.path, dst, to=layout, dtype="keep")
        paths = _written(dst)
        lines = [f"wrote {p}" for p in paths] + _summary(report)
        return io.NodeOutput(ui=ui(lines, {"written": paths, "layout": layout}))


class ConvertLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeConvertLoRA",
            display_name="FluxBridge Convert LoRA",
            category=CONVERT,
            description="Rewrites a LoRA in another format (diffusers, bfl, kohya, comfy) with the same weight "
                        "deltas, to the output folder.",
            inputs=[
                io.Combo.Input("lora_name", options=host.model_choices("loras")),
                io.Combo.Input("to", options=list(LORA_TARGETS), default="diffusers"),
                io.String.Input("filename_prefix", default="fluxbridge/lora"),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, lora_name=None):
        # only the LoRA name: ComfyUI would report a refusal against every input taken here (see name_errors);
        # the prefix is checked by safe_output_path when the node runs, before anything is written
        return name_errors(lora_name=("loras", lora_name))

    @classmethod
    def execute(cls, lora_name, to="diffusers", filename_prefix="fluxbridge/lora"):
        src = host.model_path("loras", lora_name)
        dst = host.safe_output_path(filename_prefix, ".safetensors")
        report = convert_lora(src, dst, to)
        not_written = report.get("not_written") or []
        lines = [f"wrote {dst}", f"{lora_name}: {report.get('from', report.get('format', '?'))} → {to}"]
        lines += [f"not written: {d.get('module')}: {d.get('reason')}" for d in not_written[:5]]
        return io.NodeOutput(ui=ui(lines, {"written": [dst], "to": to, "not_written": not_written}))
