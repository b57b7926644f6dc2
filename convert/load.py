"""Load weights of any layout into the diffusers / transformers model of their family.

file → lazy read (mmap) → detect → plan the key map to the diffusers side → build the model on meta
from the inferred config → assign the tensors (views of the file where no cast is needed). Every
expected tensor must be there: a missing one is named in an error, never left random or on meta.

With `fp8` (an fp8 dtype), Linear weights are stored in fp8 and upcast as each layer runs (`upcast.py`):
those the file holds in fp8 (scaled fp8 with its scale) stay as the file's bytes, the others are cast to
`fp8` (except where diffusers' layerwise casting would not cast, e.g. norms). No full-precision copy of
an fp8 file is ever made.

`Loaded.origins` records where each parameter came from (`origins.py`), so a patched weight can be read
again exactly as loaded instead of being kept in memory.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..common.errors import BadInput
from .detect import Component, components, pick, what_it_holds
from .lora.formats import looks_like_lora
from .table import A, B, materialize
from .safetensors_io import open_weights
from .origins import Origins, as_loaded, signature
from .quant import FP8_DTYPES, logical_weights


@dataclass
class Loaded:
    model: torch.nn.Module
    family: str
    layout: str
    config: dict
    variant: str | None
    report: dict
    origins: Origins | None = None


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
    """(plan to the diffusers side, config, report) for one component of an opened file.

    The config and the plan come from the file's shapes alone, so whatever they cannot make of them (a
    file cut down to a few tensors, a fused tensor that does not split) is the file's fault: `BadInput`."""
    family = comp.module
    shapes = {n: tuple(source.shape(k)) for n, k in comp.names.items()}
    try:
        config = _with_hint(source, comp, shapes, config_hint) if config_hint else \
            family.infer_config(shapes, comp.side)
        plan, report = family.TABLE.convert(shapes, comp.side, B, config)
    except ValueError as exc:
        raise BadInput(_path_of(source), f"{comp.family} ({len(shapes)} tensors): {exc}") from None
    report["unplaced"] = list(comp.unplaced) + [comp.names[n] for n in report["unplaced"]]
    return plan, config, report


def _with_hint(source, comp: Component, shapes, hint: Mapping) -> dict:
    """A folder's config.json over what the shapes tell, once checked against them (`_check_config_hint`):
    its values win, and what it leaves out or sets to null (diffusers writes `"out_channels": null` for "as
    in_channels"; FLUX.1-dev's own config has no out_channels at all) comes from the shapes."""
    try:
        inferred = comp.module.infer_config(shapes, comp.side)
    except (ValueError, KeyError, TypeError, IndexError):
        return dict(hint)  # the tensors say too little: the plan and the build say what is wrong
    _check_config_hint(source, comp, inferred, hint)
    return {**inferred, **{k: v for k, v in hint.items() if v is not None}}


def _path_of(source):
    """The file or folder an opened (possibly dequantizing) source reads."""
    return getattr(getattr(source, "source", source), "path", "<weights>")


def _check_config_hint(source, comp: Component, seen: Mapping, hint: Mapping) -> None:
    """A folder's config.json is read, not trusted: where it gives a hyper-parameter that the shapes also
    tell (`seen`: the config inferred from them), it must be of the same kind and not absurdly larger (a
    layer count of a million would make the model build for hours before the missing tensors are noticed).
    Values the shapes cannot tell are left to the model's own checks."""
    for key, told in hint.items():
        if key in seen and _absurd(told, seen[key]):
            raise BadInput(_path_of(source), f"{comp.family}: config.json says {key} is {str(told)[:60]}, "
                                  f"the tensors say {seen[key]}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _absurd(told, seen) -> bool:
    if told is None:  # "the default"
        return False
    if _is_int(seen):
        if isinstance(told, (list, tuple)):  # one value per block where the tensors tell one
            return len(told) > 4 * 64 or any(_absurd(t, seen) for t in told)
        return not _is_int(told) or told < 0 or told > 4 * seen + 64
    if isinstance(seen, (list, tuple)):
        if _is_int(told):
            return _absurd(told, max((s for s in seen if _is_int(s)), default=0))
        if not isinstance(told, (list, tuple)) or len(told) != len(seen):  # one entry per block / axis
            return True
        return any(_absurd(t, s) for t, s in zip(told, seen))
    return False


def _open_component(path: Path, family: str | None, **view):
    """(logical weights of the file, the component a loader wants, its plan to the diffusers side, config,
    report); BadInput for a LoRA, a file without that family, or a configuration that does not fit."""
    source = logical_weights(open_weights(path), **view)
    if looks_like_lora(source.keys()):
        raise BadInput(path, "this is a LoRA, not model weights: load it with the LoRA loader")
    found = components(source.keys())
    comp = pick(found, family)
    if comp is None:
        raise BadInput(path, f"not {family or 'a model FluxBridge knows'}: found "
                             f"{what_it_holds(source.keys(), source.metadata)}")
    module = comp.module
    foreign = getattr(module, "foreign", None)  # keys beside the family's that show it is another model
    why = foreign(comp.unplaced) if foreign is not None else None
    if why:
        raise BadInput(path, why)
    plan, config, report = diffusers_plan(source, comp, getattr(source, "config", None))
    return source, comp, plan, config, report


def _build_checked(path: Path, comp: Component, plan, config, report):
    """The model on meta and the shapes it expects, after checking that the plan gives every tensor it
    needs in its shape (BadInput naming what is missing or misshapen)."""
    module = comp.module
    try:
        model = module.build(config)
    except (TypeError, ValueError) as exc:  # a config.json the model class does not take
        raise BadInput(path, f"{comp.family}: the configuration does not make a model: {exc}") from None
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
    return model, expected


def load_model(path, family: str | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", fp8: torch.dtype | None = None) -> Loaded:
    """Load a weights file (or diffusers folder) into its diffusers/transformers model.

    `dtype`: the compute dtype (default: the file's dominant one). `fp8`: store Linear weights in fp8 and
    upcast them to `dtype` as each layer runs (see the module notes)."""
    path = Path(path)
    if fp8 is not None and fp8 not in FP8_DTYPES:
        raise ValueError(f"fp8 storage must be an fp8 dtype, not {fp8}")
    file_signature = signature(path)
    source, comp, plan, config, report = _open_component(path, family, keep_fp8=fp8 is not None)
    module = comp.module
    if dtype is None:
        dtype = storage_dtype(source, comp.names.values())
    model, expected = _build_checked(path, comp, plan, config, report)
    tied = getattr(module, "TIED", {})
    unexpected = sorted(k for k in plan if k not in expected)

    get = lambda name: source[comp.names[name]]
    kept_fp8 = _fp8_weights(model, plan, source, comp, fp8)
    origins = Origins(path, file_signature, dict(comp.names), dtype, keep_fp8=fp8 is not None)
    state, scales = {}, {}
    for k, step in plan.items():
        if k not in expected:
            continue
        if k in kept_fp8:  # fp8 as stored (a view) or cast to fp8; upcast per layer as it runs
            state[k], scales[k] = _as_fp8(step, source, comp, fp8)
            origins.why_not[k] = "kept in fp8 storage"
            continue
        # Views of the memory-mapped file wherever no cast is needed (row splits included): loading
        # costs no copy, pages come in as the model first uses them (or as it moves to the GPU), and
        # the page cache holds one copy of the weights. CPU kernels may round differently on such
        # views than on a copy (safetensors offsets are only 8-byte aligned); the values are the file's.
        t = as_loaded(step, get, dtype)
        state[k] = t
        if any(_quantized(source, comp.names[n]) for n in step.sources):
            origins.why_not[k] = "dequantized from GGUF blocks"
        else:
            origins.steps[k] = step
            if source.maps(t):
                origins.views[k] = t.data_ptr()
    model.load_state_dict(state, strict=False, assign=True)
    for alias, owner in tied.items():  # tied parameters share the owner's tensor
        if alias in expected and alias not in state:
            _set_tensor(model, alias, _get_tensor(model, owner))
    left_on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if left_on_meta:
        raise BadInput(path, f"{comp.family}: no tensor for {', '.join(left_on_meta[:8])}")
    model.eval().requires_grad_(False)
    if scales:
        from .upcast import keep_fp8
        keep_fp8(model, scales, dtype)
    if str(device) != "cpu":
        model.to(device)
        origins.views.clear()

    report.update(dtype=str(dtype).replace("torch.", ""), unexpected=unexpected,
                  tensor_count=len(comp.names), quant=getattr(source, "report", {}))
    if scales:
        report["fp8_storage"] = {str(dt).replace("torch.", ""): n for dt, n in
                                 Counter(state[k].dtype for k in scales).items()}
    variant = module.variant(config, path.name) if hasattr(module, "variant") else None
    return Loaded(model, comp.family, comp.layout, config, variant, report, origins)


def _quantized(source, key: str) -> bool:
    """A GGUF block type (dequantized on load; BF16 rows count too), as opposed to a plain tensor."""
    return not source.is_scaled(key) and not isinstance(source[key], torch.Tensor)


def _fp8_weights(model, plan, source, comp, fp8) -> set[str]:
    """The Linear weights to store in fp8: those the file holds in fp8 (plain or scaled), and the others
    where diffusers' layerwise casting would cast them (not in modules it skips, e.g. norms)."""
    if fp8 is None:
        return set()
    import re
    skip = getattr(model, "_skip_layerwise_casting_patterns", None) or ()
    out = set()
    for name, mod in model.named_modules():
        key = f"{name}.weight"
        if not isinstance(mod, torch.nn.Linear) or key not in plan:
            continue
        if _held_in_fp8(source, comp, plan[key]) or not any(re.search(p, name) for p in skip):
            out.add(key)
    return out


def _held_in_fp8(source, comp, step) -> bool:
    """Whether the file holds every source tensor of a plan step in fp8 (plain, or scaled with its scale)."""
    return all(source.is_scaled(f) or source.dtype(f) in FP8_DTYPES for f in (comp.names[n] for n in step.sources))


def _as_fp8(step, source, comp, fp8):
    """(weight in fp8, scale or None) of a plan step: the file's fp8 bytes (with their scale) where it holds
    fp8, else the logical weight cast to `fp8`."""
    if not _held_in_fp8(source, comp, step):
        t = materialize(step, lambda n: source[comp.names[n]])
        if not isinstance(t, torch.Tensor):
            t = t.dequantize(torch.float32)
        return t.to(fp8), None
    pairs = {n: source.scaled(comp.names[n]) for n in step.sources}
    weight = materialize(step, lambda n: pairs[n][0])
    scales = {n: s for n, (_, s) in pairs.items()}
    if all(s is None for s in scales.values()):
        return weight, None
    rows = {n: tuple(source.shape(comp.names[n]))[0] for n in step.sources}
    one = {s.item() for s in scales.values() if s is not None and s.dim() == 0}
    if all(s is not None and s.dim() == 0 for s in scales.values()) and len(one) == 1:
        return weight, next(iter(scales.values()))  # one scalar for the whole (part of the) tensor
    # per-row scales (or several scalars fused): one scale per output row, made like the weight's rows
    per_row = {n: (torch.ones(rows[n], 1) if s is None else s.reshape(-1, 1).expand(rows[n], 1).contiguous())
               for n, s in scales.items()}
    return weight, materialize(step, per_row.__getitem__).reshape(-1, 1)


def _get_tensor(model, name):
    mod, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod), attr)


def _set_tensor(model, name, value):
    mod, _, attr = name.rpartition(".")
    setattr(model.get_submodule(mod), attr, value)


def load_original(path, family: str = "flux-transformer", dtype: torch.dtype | None = None) -> Loaded:
    """A file's (or diffusers folder's) weights as a state dict in the family's original layout (BFL for Flux,
    no prefix): what ComfyUI's own model builders take. `Loaded.model` is that dict.

    The weights are checked as `load_model` checks them (every tensor the model needs, in its shape); tensors
    are views of the file where nothing changes (a BFL or ComfyUI file passes through as it is). `dtype` None
    keeps the stored dtypes, fp8 included, and dequantizes scaled fp8 and GGUF weights to bf16 (the class of
    dtype such weights compute in); a dtype casts every floating tensor to it.
    """
    path = Path(path)
    target = dtype or torch.bfloat16
    source, comp, plan_b, config, report = _open_component(path, family, dtype=target, keep_fp8=dtype is None)
    _build_checked(path, comp, plan_b, config, report)  # the meta model is only the checklist
    module = comp.module
    shapes = {n: tuple(source.shape(k)) for n, k in comp.names.items()}
    plan, _ = module.TABLE.convert(shapes, comp.side, A, config)
    get = lambda name: source[comp.names[name]]
    state = {k: as_loaded(step, get, dtype, dequantize_to=target) for k, step in plan.items()}
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values() if t.is_floating_point()})
    report.update(dtype=", ".join(dtypes), tensor_count=len(comp.names), quant=getattr(source, "report", {}))
    variant = module.variant(config, path.name) if hasattr(module, "variant") else None
    return Loaded(state, comp.family, comp.layout, config, variant, report)
