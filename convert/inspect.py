"""`fluxbridge inspect`: what a weights file or diffusers folder is."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..common.errors import BadInput
from .detect import components, what_it_holds
from .gguf_io import GGUFFile
from .load import diffusers_plan
from .lora import inspect_lora, looks_like_lora
from .quant import logical_weights
from .safetensors_io import open_weights


def inspect_path(path) -> dict:
    path = Path(path)
    raw = open_weights(path)
    source = logical_weights(raw)
    found = components(source.keys())
    if not found and not looks_like_lora(source.keys()) and components(source.keys(), min_keys=1):
        raise BadInput(path, what_it_holds(source.keys()))  # model weights, cut down below detection
    if not found or looks_like_lora(source.keys()):
        return inspect_lora(path)  # a LoRA, or nothing we know (inspect_lora says what it holds then)
    parts = []
    for comp in found:
        plan, config, report = diffusers_plan(source, comp, getattr(source, "config", None))
        module = comp.module
        warnings = []
        if report["unplaced"]:
            warnings.append(f"{len(report['unplaced'])} tensor(s) not placed: "
                            + ", ".join(report["unplaced"][:5]))
        if report["missing_parts"]:
            warnings.append("incomplete fused tensors: " + ", ".join(p["target"] for p in report["missing_parts"][:5]))
        parts.append({
            "family": comp.family,
            "layout": comp.layout,
            "prefix": comp.prefix,
            "variant": module.variant(config, path.name) if hasattr(module, "variant") else None,
            "dtypes": stored_types(raw, comp.names.values()),
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            "tensor_count": len(comp.names),
            "warnings": warnings,
        })
    main = parts[0] if parts[0]["family"] == "flux-transformer" else max(parts, key=lambda p: p["tensor_count"])
    result = dict(main, path=str(path), total_tensors=len(raw))
    quant = getattr(source, "report", None)
    if quant:
        result["quantization"] = quant
    if len(parts) > 1:
        result["components"] = parts
    return result


def stored_types(raw, names) -> dict[str, int]:
    """Tensor count per storage type: torch dtype names (bfloat16, float8_e4m3fn, ...) for safetensors; the
    ggml type names for GGUF (Q8_0, Q4_K, F16, BF16, F32, ...), which say how each tensor is quantized
    rather than the dtype it would dequantize to."""
    if isinstance(raw, GGUFFile):
        return dict(Counter(raw.dtype_name(k) for k in names))
    return dict(Counter(str(raw.dtype(k)).replace("torch.", "") for k in names))
