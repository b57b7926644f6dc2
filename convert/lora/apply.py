"""Applying LoRAs to a loaded model, and removing them again.

`apply_loras(model, family, [(lora, strength), ...], text_strength=..., origins=...)` patches a diffusers
`FluxTransformer2DModel` or a transformers CLIP-L / T5 encoder and returns a `LoraHandle`; `.remove()`
restores every patched tensor bitwise, wherever the parameter lives by then (its current device).

Dense weights (fp32 / bf16 / fp16): each patched tensor is computed (`Plan.compute`, float32, cast back to the
weight's dtype) on the weight's own device and swapped in (`param.data`), one closure at a time, so apply
allocates only the patched tensors; a failure anywhere puts back what was already swapped, so the model is as
before. What happens to the original of each patched tensor (the report's `originals` says which, per path):

* a view of the model file's mapping (CPU, loaded without a cast): kept; it costs nothing (the page cache);
* made from the file by the load (a cast, a GPU copy) and the file is unchanged since (`origins`, see
  `convert.origins`): not kept at all. The patched values are computed into the parameter's own storage
  (no memory added, and the weights stay where they were: a fresh allocation can be slower to read), and
  removal reads the original again from the file, cast as the load cast it, and writes it back there;
* otherwise (no `origins`, GGUF blocks dequantized, the file changed on disk, a parameter that another
  handle not yet removed has patched): kept, where it is or on `originals_device`.

Quantized weights (float8 storage with upcast compute, or a GGUF-like tensor with `.dequantize`): the
weight stays quantized; a forward hook adds the patch to the layer's output on the fly in the compute
dtype (the input's dtype): `out += (x @ Aᵀ) @ (s·B)ᵀ` for LoRA parts, `out += x @ ΔWᵀ` for the other kinds,
`+ Δb`. DoRA and `set` parts need the dense weight and are not applied there (the report says so).
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping

import torch
import torch.nn.functional as F

from ..table import swap_halves
from .formats import CLIP, FLUX, T5, TEXT_FAMILIES, Lora, load_lora
from .patch import Patch, Plan, expanded_config

DENSE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def guess_family(model) -> str:
    name = type(model).__name__
    if "Flux" in name and "Transformer" in name:
        return FLUX
    if name.startswith("CLIPText"):
        return CLIP
    if name.startswith("T5"):
        return T5
    raise ValueError(f"which family is a {name}? pass family=")


def normalize(loras) -> list[tuple[Lora, float, float | None]]:
    """Accept Lora / path / (lora, strength) / (lora, strength, text_strength) items."""
    if isinstance(loras, (Lora, str)) or hasattr(loras, "__fspath__"):
        loras = [loras]
    out = []
    for item in loras:
        text = None
        if isinstance(item, tuple):
            lora, strength, *rest = item
            text = rest[0] if rest else None
        else:
            lora, strength = item, 1.0
        out.append((load_lora(lora), float(strength), None if text is None else float(text)))
    return out


def is_quantized(t) -> bool:
    return t.dtype not in DENSE or (type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "dequantize"))


def logical_shapes(model) -> dict[str, tuple]:
    """Parameter name -> shape as the layer sees it (a quantized weight's unpacked shape)."""
    shapes = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if is_quantized(p):
            mod = modules.get(name.rpartition(".")[0])
            if name.endswith(".weight") and hasattr(mod, "out_features") and hasattr(mod, "in_features"):
                shape = (mod.out_features, mod.in_features)
            elif hasattr(p, "tensor_shape"):
                shape = tuple(p.tensor_shape)
        shapes[name] = shape
    return shapes


class LoraHandle:
    """Applied LoRAs: `.reports` (one per LoRA) and `.remove()` (bitwise restore; idempotent).

    `.originals` counts how the originals of the patched tensors are held: `file_views` (the file's own
    bytes), `reread` (read again from the model file on removal), `kept` (a copy held until removal)."""

    def __init__(self, model, family: str, reports: list[dict]):
        self.model, self.family, self.reports = model, family, reports
        self._originals: list[tuple[str, torch.nn.Parameter, object]] = []  # (name, param, original | READ)
        self._reader = None  # origins.Reread while some original is to be read again
        self._hooks: list = []
        self._undo: list = []
        self.original_shapes: dict[str, tuple] = {}  # parameters a control LoRA widened: their own shapes

    @property
    def originals(self) -> dict[str, int]:
        counts = {"file_views": 0, "reread": 0, "kept": 0}
        for _, _, original in self._originals:
            counts["reread" if original is READ else "file_views" if isinstance(original, _View) else "kept"] += 1
        return counts

    def _hold(self, name: str, param: torch.nn.Parameter, original) -> None:
        """Record how a parameter's original comes back; until then the model counts it as patched."""
        self._originals.append((name, param, original))
        _patched_by_handles(self.model)[name] += 1

    def remove(self) -> None:
        """Put every original back on its parameter's current device (a parameter may have moved since).
        Handles on one model come off in the reverse order of their application.

        An original that cannot be put back (the model file changed on disk, so it cannot be read again) is
        left patched and stays listed here; the others are restored, then the first failure is raised."""
        failed, left = None, []
        for entry in reversed(self._originals):
            name, param, original = entry
            try:
                # The device its parameter is on now: a host may have moved the layer while the LoRA was
                # applied (ComfyUI's partial loading and unloading move layers one by one).
                t = self._reader.read(name, param.device) if original is READ else original.tensor
                if original is READ and t.shape == param.shape and t.dtype == param.dtype:
                    param.data.copy_(t)  # back into the parameter's own storage, as apply patched it
                else:
                    param.data = t if t.device == param.device else t.to(param.device)
            except Exception as exc:  # restore the others, then report the first failure
                failed = failed or exc
                left.append(entry)
                continue
            _patched_by_handles(self.model)[name] -= 1
        for h in self._hooks:
            h.remove()
        for undo in reversed(self._undo):
            undo()
        if self._reader is not None and not left:
            self._reader.close()
            self._reader = None
        self._originals, self._hooks, self._undo = left[::-1], [], []
        self.original_shapes = {}
        if failed is not None:
            raise failed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


READ = object()  # marks an original that is read again from the model file on removal
_PATCHED = "_fluxbridge_lora_patched"


def _patched_by_handles(model) -> Counter:
    """Parameter name -> how many LoRA handles not yet removed have patched it (kept on the model itself).
    Such a parameter no longer holds what the model file gives: another handle must keep its value, not read
    the file again on removal, or it would take the first handle's patch off with its own."""
    return model.__dict__.setdefault(_PATCHED, Counter())


class _Held:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class _View(_Held):
    """An original that is a view of the model file's mapping: kept as it is, at no cost."""


class _Kept(_Held):
    """An original kept where it is (a copy: it costs its size until removal)."""


class MultiHandle:
    """Handles of several models (transformer + text encoders), removed together."""

    def __init__(self, handles: Mapping[str, LoraHandle]):
        self.handles = dict(handles)

    @property
    def reports(self) -> dict[str, list[dict]]:
        return {f: h.reports for f, h in self.handles.items()}

    def remove(self) -> None:
        for h in self.handles.values():
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def apply_to_models(models: Mapping[str, torch.nn.Module], loras, strength_text: float | None = None):
    """Apply to each model of a {family: model} mapping (None models skipped); one handle for all."""
    items = normalize(loras)
    handles = {}
    try:
        for family, model in models.items():
            if model is not None:
                handles[family] = apply_loras(model, family, items, text_strength=strength_text)
    except BaseException:
        for h in handles.values():
            h.remove()
        raise
    return MultiHandle(handles)


def apply_loras(model: torch.nn.Module, family: str | None = None, loras=(),
                text_strength: float | None = None, originals_device=None, origins=None) -> LoraHandle:
    """Patch `model` with LoRAs in order; the parts for other families are ignored.

    On a text encoder the strength of an item is its own text strength (3-tuples), else `text_strength`,
    else the item's strength. `origins` (`convert.origins.Origins`, from the load) says where each parameter
    came from: originals that are views of the file are kept for free, those the file can give again are
    not kept at all (read again on removal). `originals_device` is where the other originals wait for
    `remove()`: None (where they are), a device (e.g. "cpu" for a big model on a GPU), or a callable given the
    bytes of the originals to keep and returning one of those. Raises `BadInput` when a LoRA has parts for
    this family and none fits it.
    """
    family = family or guess_family(model)
    items = normalize(loras)
    weighted = []
    for lora, strength, text in items:
        if family in TEXT_FAMILIES:
            strength = text if text is not None else (text_strength if text_strength is not None else strength)
        weighted.append((lora, strength))
    shapes = logical_shapes(model)
    plan = Plan(family, weighted, shapes)
    plan.refuse_if_nothing_fits()
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())

    dense, hooked = [], []
    for patch in plan.patches:
        if any(is_quantized(params[p]) for p in patch.params):
            problem = _hook_problem(patch)
            if problem:
                plan.reports[patch.lora]["not_placed"].append({"key": patch.part.key, "reason": problem})
                continue
            hooked.append(patch)
        else:
            dense.append(patch)
    for report in plan.reports:
        report["mode"] = {"dense": 0, "hook": 0}
    for patch in dense:
        plan.reports[patch.lora]["mode"]["dense"] += 1
    for patch in hooked:
        plan.reports[patch.lora]["mode"]["hook"] += 1

    dense_plan = plan.subset(dense)
    handle = LoraHandle(model, family, [
        dict(lora.report, applied=report, not_placed=plan.report(i)["not_placed"])
        for i, ((lora, _), report) in enumerate(zip(weighted, plan.reports))])
    holding, kept_why = _holding(dense_plan.params, params, origins, handle)
    if callable(originals_device):
        originals_device = originals_device(sum(params[n].nbytes for n, how in holding.items() if how == "kept"))
    try:  # any failure puts back what was swapped in so far
        # Closures are disjoint and a closure's result depends only on its own parameters' current values
        # (a fused patch also works out its other targets, but those values are dropped), so the tensors
        # already swapped in never feed another closure's result.
        for group in dense_plan.closures():
            if all(holding[n] == "reread" and n not in plan.expand for n in group):
                # The file gives the originals again: patch the parameters' own storage, adding no memory
                # and leaving the weights where they were. Recorded first: a failure half-way through is
                # undone by reading the file again.
                for n in group:
                    handle._hold(n, params[n], READ)
                dense_plan.compute(group, lambda n: params[n].data, into={n: params[n].data for n in group})
                continue
            for name, tensor in dense_plan.compute(group, lambda n: params[n].data).items():
                _assign(handle, name, params[name], tensor, holding[name], originals_device)
        for name, width in plan.expand.items():
            if name in dense_plan.params:
                handle.original_shapes[name] = tuple(shapes[name])
                _expand_module(handle, model, modules, family, name, width)
        sidecars: dict[str, _Sidecar] = {}
        for patch in hooked:
            for mod, terms in _sidecar_terms(patch).items():
                sidecars.setdefault(mod, _Sidecar()).terms.extend(terms)
        for mod, sidecar in sidecars.items():
            handle._hooks.append(modules[mod].register_forward_hook(sidecar, with_kwargs=True))
    except BaseException:
        handle.remove()
        raise
    counts = handle.originals
    for report in plan.reports:
        report["originals"] = dict(counts, kept_why=kept_why if counts["kept"] else None)
    return handle


def _holding(names, params, origins, handle: LoraHandle) -> tuple[dict[str, str], str | None]:
    """How each patched parameter's original is held until removal: "view", "reread" or "kept"; and why
    any is kept (for the report)."""
    how, why = {}, None
    reader = None
    patched = _patched_by_handles(handle.model)
    for name in sorted(names):
        t = params[name].data
        if patched[name]:
            how[name], why = "kept", f"{name} carries another LoRA handle's patch (applied before, not removed)"
            continue
        if origins is None:
            how[name], why = "kept", "the model's origins are unknown (not loaded from a file by FluxBridge)"
            continue
        if origins.is_view(name, t):
            how[name] = "view"
            continue
        if not origins.rereadable(name):
            how[name], why = "kept", origins.why_not.get(name, f"{name} was not made from the file")
            continue
        if t.dtype != origins.dtype:
            how[name], why = "kept", f"{name} is {t.dtype} now, not the {origins.dtype} it was loaded as"
            continue
        if reader is None:
            reader = origins.reader()
        if isinstance(reader, str):
            how[name], why = "kept", reader
            continue
        how[name] = "reread"
    if reader is not None and not isinstance(reader, str):
        if "reread" in how.values():
            handle._reader = reader  # held open (the mapping of the file as it is now) until removal
        else:
            reader.close()
    return how, why


def _assign(handle: LoraHandle, name: str, param: torch.nn.Parameter, tensor: torch.Tensor, how: str,
            keep_on=None) -> None:
    original = param.data
    if how == "reread":
        original = READ  # a widened layer (control LoRA) swaps in its new tensor; removal reads the old one
    elif how == "view":
        original = _View(original)
    elif keep_on is not None and torch.device(keep_on) != original.device:
        original = _Kept(original.to(keep_on))  # `remove()` copies it back to the parameter's device
    else:
        original = _Kept(original)
    handle._hold(name, param, original)
    param.data = tensor


def _expand_module(handle, model, modules, family: str, name: str, width: int) -> None:
    """A widened input layer (control LoRA): its `in_features` and the model's input-width config follow."""
    mod = modules[name.rpartition(".")[0]]
    if hasattr(mod, "in_features"):
        old = mod.in_features
        mod.in_features = width
        handle._undo.append(lambda: setattr(mod, "in_features", old))
    config = getattr(model, "config", None)
    if config is not None and hasattr(model, "register_to_config"):
        old_config = dict(config)
        changed = {k: v for k, v in expanded_config(family, old_config, {name: width}).items()
                   if old_config.get(k) != v}
        if changed:
            model.register_to_config(**changed)
            handle._undo.append(lambda: model.register_to_config(**{k: old_config[k] for k in changed}))


# ------------------------------------------------------------------------------------ quantized bases

def _hook_problem(patch: Patch) -> str | None:
    if patch.value is not None:
        return "a set value on a quantized tensor is not applied (the weight stays quantized)"
    if patch.part.dora is not None:
        return "DoRA on a quantized base is not applied: it needs the dense weight"
    if patch.expand:
        return "input expansion of a quantized layer is not supported"
    return None


def _sidecar_terms(patch: Patch) -> dict[str, list]:
    """Per module: ("lowrank", A, s·B) / ("dense", s·ΔW) / ("bias", s·Δb) terms, float32 on CPU."""
    part, s = patch.part, patch.strength
    out: dict[str, list] = {}
    if s == 0:
        return out
    for t in patch.weight:
        mod = t.param.rpartition(".")[0]
        if part.kind == "lora":
            sl = slice(None) if t.rows is None else slice(t.rows[0], t.rows[0] + t.rows[1])
            up = part.tensors["up"][sl].float() * (part.scale * s)
            if t.swap:
                up = swap_halves(up)
            out.setdefault(mod, []).append(("lowrank", part.tensors["down"].float(), up))
        else:
            out.setdefault(mod, []).append(("dense", t.delta(part) * s))
    for t in patch.bias:
        out.setdefault(t.param.rpartition(".")[0], []).append(("bias", t.delta(part, bias=True) * s))
    return out


class _Sidecar:
    """Forward hook adding the patch terms of one layer to its output, in the input's dtype."""

    def __init__(self):
        self.terms: list = []
        self._cast: dict = {}

    def _terms(self, dtype, device):
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = [(kind, *(t.to(device=device, dtype=dtype) for t in ts))
                               for kind, *ts in self.terms]
        return self._cast[key]

    def __call__(self, module, args, kwargs, output):
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        extra = None
        for kind, *ts in self._terms(x.dtype, x.device):
            if kind == "lowrank":
                y = F.linear(F.linear(x, ts[0]), ts[1])
            elif kind == "dense":
                y = F.linear(x, ts[0])
            else:
                y = ts[0]
            extra = y if extra is None else extra + y
        return output if extra is None else output + extra.to(output.dtype)

