"""`fluxbridge convert`: rewrite full weights in another layout, streaming one tensor at a time.

Source tensors are memory-mapped views; each destination tensor is made (split rows are views, fused
tensors are one concatenation), optionally patched with LoRAs on the diffusers side, cast, written and
dropped before the next, so memory stays near one tensor. The report lists every operation.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..common.errors import BadInput, cannot_write
from ..common.jsonable import jsonable
from .detect import components, what_it_holds
from .extents import step_extents
from .lora.formats import looks_like_lora
from .lora.patch import expanded_config
from .families import target
from .load import diffusers_plan
from .quant import logical_weights
from .safetensors_io import make_folder, open_weights, write_safetensors
from .table import B, materialize

DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = ("bfl", "comfy", "diffusers")
# diffusers folder names of each family's component, and its weights file name
DIFFUSERS_FOLDERS = {"flux-transformer": ("transformer", "diffusion_pytorch_model.safetensors"),
                     "flux-vae": ("vae", "diffusion_pytorch_model.safetensors"),
                     "clip-l": ("text_encoder", "model.safetensors"),
                     "t5-xxl": ("text_encoder_2", "model.safetensors"),
                     "sd15-unet": ("unet", "diffusion_pytorch_model.safetensors")}
# metadata that describes the source's quantization no longer applies once dequantized
_STALE_METADATA = ("_quantization_metadata",)
_GGUF_METADATA = ("general.", "gguf.", "comfy.gguf.")  # describe the GGUF container, not the weights


def convert_file(src, dst, to: str, dtype: str = "keep", loras=()) -> dict:
    src, dst = Path(src), Path(dst)
    if to not in LAYOUTS:
        raise BadInput(dst, f"unknown layout {to!r}: choose one of {', '.join(LAYOUTS)}")
    if dtype not in DTYPES:
        raise BadInput(dst, f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dst.resolve() == src.resolve():
        raise BadInput(dst, "the destination is the source file")
    source = logical_weights(open_weights(src))
    if looks_like_lora(source.keys()):
        raise BadInput(src, "this is a LoRA, not model weights: convert it with `fluxbridge lora convert`")
    found = components(source.keys())
    if not found:
        raise BadInput(src, f"no model weights FluxBridge can convert: {what_it_holds(source.keys(), source.metadata)}")
    lora_set = _open_loras(loras)
    as_folder = to == "diffusers" and (len(found) > 1 or dst.suffix not in (".safetensors", ".sft"))

    report = {"source": str(src), "destination": str(dst), "to": to, "dtype": dtype, "components": []}
    entries, folders = [], {}
    for comp in found:
        plan_b, config, comp_report = diffusers_plan(source, comp, getattr(source, "config", None))
        get_src = lambda name, comp=comp: source[comp.names[name]]
        get_b = lambda name, plan_b=plan_b, get_src=get_src: materialize(plan_b[name], get_src)
        applied, expanded = {}, {}
        if lora_set:
            get_b, applied, expanded = lora_set.patched_getter(comp.family, plan_b, get_b)
        side, prefix = target(comp.module, to)
        b_shapes = {n: expanded.get(n, s.shape) for n, s in plan_b.items()}
        if expanded:  # a control LoRA widened the input layer: the file is a control model (in_channels 128)
            config = expanded_config(comp.family, config, {n: s[1] for n, s in expanded.items()})
        plan_out, out_report = comp.module.TABLE.convert(b_shapes, B, side, config)
        if side != B:
            for key in ("split", "fused", "swapped", "reshaped"):
                comp_report[key] += out_report[key]
        out_prefix = prefix if not comp.prefix or to != "comfy" else comp.prefix
        locate = (lambda name, comp=comp, plan_b=plan_b: step_extents(
            plan_b[name], lambda n: source.extent(comp.names[n]) if hasattr(source, "extent") else None))
        comp_entries = []
        for name, step in plan_out.items():
            stored = _stored_dtype(step, plan_b, source, comp)
            out_dtype = DTYPES[dtype] or stored
            ext = None if lora_set or out_dtype != stored else step_extents(step, locate)
            if ext is not None:
                make = lambda ext=ext: ext  # unchanged bytes: copied file to file
            else:
                make = lambda step=step, get_b=get_b, out_dtype=out_dtype: finish(materialize(step, get_b), out_dtype)
            comp_entries.append((out_prefix + name, step.shape, out_dtype, make))
        if as_folder:
            folders[comp.family] = (comp_entries, config)
        else:
            entries += comp_entries
        comp_report.update(family=comp.family, from_layout=comp.layout, to_layout=to,
                           tensors_written=len(comp_entries), loras=applied,
                           expanded={n: list(s) for n, s in expanded.items()})
        comp_report["dropped"] = comp_report.pop("unplaced")
        report["components"].append(comp_report)

    metadata = {k: v for k, v in (source.metadata or {}).items()
                if isinstance(v, str) and k not in _STALE_METADATA and not k.startswith(_GGUF_METADATA)}
    if as_folder:
        made: list[Path] = []  # what this call creates: removed again if it fails part-way
        try:
            for family, (comp_entries, config) in folders.items():
                folder, filename = DIFFUSERS_FOLDERS[family]
                out_dir = dst / folder if len(folders) > 1 else dst
                made += _make_dirs(out_dir)
                made += [p for p in (out_dir / filename, out_dir / "config.json") if not p.exists()]
                write_safetensors(out_dir / filename, comp_entries, metadata)
                try:
                    (out_dir / "config.json").write_text(json.dumps(jsonable(config), indent=2))
                except OSError as exc:
                    raise cannot_write(out_dir / "config.json", exc) from None
        except BaseException:
            _remove(made)
            raise
    else:
        make_folder(dst.parent)
        write_safetensors(dst, entries, metadata)
    return report


def _make_dirs(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns the ones created, outermost first."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    make_folder(folder)
    return missing[::-1]


def _remove(made: list[Path]) -> None:
    """Undo a failed folder write: the files this call wrote, then the folders it made (if left empty)."""
    for p in reversed(made):
        try:
            p.rmdir() if p.is_dir() else p.unlink(missing_ok=True)
        except OSError:
            pass


def finish(t, dtype: torch.dtype) -> torch.Tensor:
    """A plain tensor of `dtype`: GGUF rows dequantized, others cast (a view when already right)."""
    if hasattr(t, "dequantize") and not isinstance(t, torch.Tensor):
        return t.dequantize(dtype)
    return t if t.dtype == dtype else t.to(dtype)


def _stored_dtype(step, plan_b, source, comp) -> torch.dtype:
    """The dtype a destination tensor has when kept as stored (`--dtype keep`)."""
    first = step.sources[0]
    origin = comp.names[plan_b[first].sources[0] if first in plan_b else first]
    if source.dtype_name(origin).startswith(("Q", "IQ")):
        return torch.bfloat16  # a GGUF block type: bf16, not its exact-but-doubled float32
    return source.dtype(origin)


def _open_loras(loras):
    if not loras:
        return None
    from .lora import LoraSet
    return LoraSet.open(loras)


