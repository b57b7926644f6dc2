"""Load weights of any layout into the diffusers / transformers model of their family.

file → lazy read (mmap) → detect → plan the key map to the diffusers side → build the model on meta
from the inferred config → assign the tensors (views of the file where no cast is needed). Every
expected tensor must be there: a missing one is named in an error, never left random or on meta.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..errors import BadInput
from .detect import Component, components, pick
from .extents import read_extents, step_extents
from .lora.formats import looks_like_lora
from .families import FAMILIES
from .table import B, materialize
from .safetensors_io import open_weights
from .quant import logical_weights


@dataclass
class Loaded:
    model: torch.nn.Module
    family: str
    layout: str
    config: dict
    variant: str | None
    report: dict


def storage_dtype(source, names) -> torch.dtype:
    """The dominant floating dtype among `names`; fp8 storage counts as bf16 for compute."""
    counts: dict[torch.dtype, int] = {}
    for n in names:
        # GGUF block types dequantize exactly to float32, but like fp8 they are bf16-class weights
        dt = torch.bfloat16 if source.dtype_name(n).startswith(("Q", "IQ")) else source.dtype(n)
        if dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + 1
    dt = max(counts, key=counts.get) if counts else torch.float32
    return torch.bfloat16 if dt.itemsize == 1 else dt


def diffusers_plan(source, comp: Component, config_hint: Mapping | None = None):
    """(plan to the diffusers side, config, report) for one component of an opened file."""
    family = comp.module
    shapes = {n: tuple(source.shape(k)) for n, k in comp.names.items()}
    if comp.side == B:
        config = dict(config_hint) if config_hint else family.infer_config(shapes, B)
        plan, report = family.TABLE.convert(shapes, B, B, config)
    else:
        config = dict(config_hint) if config_hint else None
        if config is None:
            config = family.infer_config(shapes, comp.side)
        plan, report = family.TABLE.convert(shapes, comp.side, B, config)
    report["unplaced"] = list(comp.unplaced) + [comp.names[n] for n in report["unplaced"]]
    return plan, config, report


def load_model(path, family: str | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", keep_fp8: bool = False) -> Loaded:
    """Load a weights file (or diffusers folder) into its diffusers/transformers model."""
    path = Path(path)
    source = logical_weights(open_weights(path), keep_fp8=keep_fp8)
    if looks_like_lora(source.keys()):
        raise BadInput(path, "this is a LoRA, not model weights: load it with the LoRA loader")
    found = components(source.keys())
    comp = pick(found, family)
    if comp is None:
        what = family or "a model FluxBridge knows"
        seen = ", ".join(f"{c.family} ({len(c.names)} tensors)" for c in found) or "no known tensors"
        raise BadInput(path, f"not {what}: found {seen}; sample keys: {sample(source.keys())}")
    module = comp.module
    try:
        plan, config, report = diffusers_plan(source, comp, getattr(source, "config", None))
    except ValueError as exc:
        raise BadInput(path, f"{comp.family}: {exc}") from None
    if dtype is None:
        dtype = storage_dtype(source, comp.names.values())

    model = module.build(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = getattr(module, "TIED", {})
    missing = sorted(k for k in expected if k not in plan and k not in tied)
    if missing or report["missing_parts"]:
        names = missing + [m for p in report["missing_parts"] for m in p["missing"]]
        raise BadInput(path, f"{comp.family}: {len(names)} tensor(s) missing: {', '.join(names[:8])}"
                       + (" ..." if len(names) > 8 else ""))
    for k, step in plan.items():
        if k in expected and tuple(step.shape) != expected[k]:
            raise BadInput(path, f"{comp.family}: tensor {k} has shape {list(step.shape)}, "
                                 f"the model expects {list(expected[k])}")
    unexpected = sorted(k for k in plan if k not in expected)

    get = lambda name: source[comp.names[name]]
    locate = lambda name: source.extent(comp.names[name]) if hasattr(source, "extent") else None
    state = {}
    for k, step in plan.items():
        if k not in expected:
            continue
        stored = source.dtype(comp.names[step.sources[0]])
        ext = step_extents(step, locate) if stored == dtype or not stored.is_floating_point else None
        if ext is not None:  # bytes straight from the file into aligned memory: one copy, no cast
            state[k] = read_extents(ext, step.shape, stored)
            continue
        t = materialize(step, get)
        if not isinstance(t, torch.Tensor):  # a GGUF quantized tensor (rows already split)
            t = t.dequantize(dtype)
        if t.is_floating_point() and t.dtype != dtype and not (keep_fp8 and t.dtype.itemsize == 1):
            t = t.to(dtype)
        elif t.data_ptr() % 64:
            # safetensors offsets are only 8-byte aligned; CPU kernels take other paths on unaligned data
            # and round differently, so give every weight aligned memory of its own
            t = t.clone()
        state[k] = t
    model.load_state_dict(state, strict=False, assign=True)
    for alias, owner in tied.items():  # tied parameters share the owner's tensor
        if alias in expected and alias not in state:
            _set_tensor(model, alias, _get_tensor(model, owner))
    left_on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if left_on_meta:
        raise BadInput(path, f"{comp.family}: no tensor for {', '.join(left_on_meta[:8])}")
    model.eval().requires_grad_(False)
    if str(device) != "cpu":
        model.to(device)

    report.update(dtype=str(dtype).replace("torch.", ""), unexpected=unexpected,
                  tensor_count=len(comp.names), quant=getattr(source, "report", {}))
    variant = module.variant(config, path.name) if hasattr(module, "variant") else None
    return Loaded(model, comp.family, comp.layout, config, variant, report)


def sample(keys, n: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (" ..." if len(keys) > n else "")


def _get_tensor(model, name):
    mod, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod), attr)


def _set_tensor(model, name, value):
    mod, _, attr = name.rpartition(".")
    setattr(model.get_submodule(mod), attr, value)
