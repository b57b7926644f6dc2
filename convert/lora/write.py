"""`fluxbridge lora convert`: rewrite a LoRA in another format, with the same weight deltas.

Targets:
  diffusers  `transformer.<diffusers>.lora_A/B.weight` (+ `lora_B.bias`), `text_encoder.<CLIP>.lora_A/B`;
             per-module ranks and alphas in the safetensors metadata `lora_adapter_metadata` (diffusers'
             own format), so `FluxPipeline.load_lora_weights` gives the same scales.
  bfl        BFL-PEFT: `diffusion_model.<bfl>.lora_A/B.weight` (+ `lora_B.bias`); no alpha in the format,
             so each scale is folded into B (in float32).
  kohya      `lora_unet_<bfl with _>.lora_down/up.weight` + `.alpha`; CLIP `lora_te1_`, T5 `lora_te3_`.
  comfy      `diffusion_model.<bfl>.lora_down/up.weight` + `.alpha`, `.diff`, `.diff_b` (bias deltas too),
             `.set_weight`, `.reshape_weight`, LoKr/LoHa keys and input-axis `.dora_scale` DoRA where ComfyUI
             reads them (an output-axis magnitude is not written: ComfyUI normalises that axis otherwise);
             `text_encoders.clip_l.transformer.` / `text_encoders.t5xxl.transformer.`.

Split → fused (bfl/kohya/comfy from diffusers-named parts): A stacked and B block-diagonal (ranks may
differ), or A shared and B stacked when all A are identical; a missing part is a zero block (reported as
zero-filled). Fused → split (diffusers from BFL-named parts): each part keeps the columns of B that are
non-zero in it (block-diagonal files split without rank growth), A shared otherwise. The final layer's
B rows (and bias) are swapped. Parts a format cannot express are listed under `not_written`.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ...common.errors import BadInput
from ..table import A, B, SWAP_HALVES, Split, swap_halves
from .formats import CLIP, FLUX, T5, Lora, Part, _split_key, family_module, load_lora, rule_name
from .layers import F32, bias_delta, dora_on_rows, fuse_lora, split_lora, weight_delta
from .native import comfy_alpha

TARGETS = ("diffusers", "bfl", "kohya", "comfy")
# ComfyUI's `weight_decompose` divides an output-axis DoRA magnitude by the row norms of the weight *before*
# the patch; PEFT (`lora_magnitude_vector`) and LyCORIS (`dora_scale` [out, 1]) divide by those of the patched
# weight. No magnitude written without the base weights gives those weights there, so such a part is not
# written for ComfyUI (baking it with `convert --lora` is exact). The input axis ([1, in]) agrees: written.
OUTPUT_AXIS_DORA_FOR_COMFY = (
    "an output-axis DoRA magnitude (PEFT lora_magnitude_vector, LyCORIS dora_scale [out, 1]) has no ComfyUI form: "
    "ComfyUI divides it by the norm of the unpatched weight, PEFT and LyCORIS by that of the patched one, so "
    "ComfyUI would apply other weights; bake it into the model with `convert --lora` instead")
_TEXT_PREFIX = {
    "diffusers": {CLIP: "text_encoder."},
    "bfl": {CLIP: "text_encoders.clip_l.transformer.", T5: "text_encoders.t5xxl.transformer."},
    "comfy": {CLIP: "text_encoders.clip_l.transformer.", T5: "text_encoders.t5xxl.transformer."},
    "kohya": {CLIP: "lora_te1_", T5: "lora_te3_"},
}


@dataclass
class _Lo:
    """One low-rank pair to write: ΔW = scale·up@down (+ scale·bias)."""

    module: str
    down: torch.Tensor
    up: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    dtype: torch.dtype
    alpha: float | None = None   # the original alpha, when rank and scale are unchanged

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def alpha_out(self) -> float:
        if self.alpha is not None and abs(self.alpha / self.rank - self.scale) <= 1e-12 * max(1.0, abs(self.scale)):
            return self.alpha
        return self.scale * self.rank


def convert_lora(src, dst, to: str) -> dict:
    """Read `src` (any format), write `dst` in format `to`; returns the JSON-able report."""
    if to not in TARGETS:
        raise BadInput(dst, f"unknown LoRA format {to!r}: choose one of {', '.join(TARGETS)}")
    dst = Path(dst)
    if isinstance(src, (str, Path)) and Path(src).resolve() == dst.resolve():
        raise BadInput(dst, "the destination is the source file")
    lora = load_lora(src)
    tensors, metadata, report = render_lora(lora, to)
    if not tensors:
        raise BadInput(lora.path, f"nothing of this LoRA can be written as {to}: "
                                  + "; ".join(f"{d['module']}: {d['reason']}" for d in report["not_written"][:3]))
    from ..safetensors_io import make_folder, write_safetensors
    make_folder(dst.parent)
    write_safetensors(dst, {k: v.contiguous() for k, v in tensors.items()}, metadata)
    report["destination"] = str(dst)
    return report


def render_lora(lora: Lora, to: str) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """(tensors, metadata, report) of `lora` in format `to`; nothing is written."""
    report = {"source": lora.path, "from": lora.format, "to": to, "tensors": 0, "modules": 0,
              "fused": [], "split": [], "swapped": [], "zero_filled": [], "not_written": [],
              "not_placed": list(lora.not_placed), "warnings": []}
    out: dict[str, torch.Tensor] = {}
    configs: dict[str, list[_Lo]] = {}
    if to == "diffusers":
        los = _flux_side_b(lora, report)
        configs["transformer"] = los
        for lo in los:
            _peft_pair(out, "transformer." + lo.module, lo, fold=False)
    else:
        for item in _flux_side_a(lora, report, to):
            _write_side_a(out, item, to, report, lora)
    for family in (CLIP, T5):
        parts = lora.family_parts(family)
        if not parts:
            continue
        prefix = _TEXT_PREFIX[to].get(family)
        if prefix is None:
            for p in parts:
                _not_written(report, p, "diffusers' Flux loader does not load T5 LoRAs")
            continue
        los = []
        for p in parts:
            lo = _text_lo(p, report, to)
            if lo is None:
                continue
            los.append(lo)
            name = _text_name(family, lo.module, to)
            if to == "kohya" and lo.bias is not None:
                _not_written(report, p, "kohya has no bias delta (lora_B.bias)")
                lo.bias = None
            if to in ("diffusers", "bfl"):
                _peft_pair(out, prefix + name, lo, fold=(to == "bfl"))
            else:
                _emit_lo(out, prefix + name, lo, to)
        if to == "diffusers" and los:
            configs["text_encoder"] = los
    metadata = {}
    if to == "diffusers":
        packed = {}
        for comp, los in configs.items():
            if los:
                packed.update({f"{comp}.{k}": v for k, v in _peft_config(los, comp).items()})
        if packed:
            metadata["lora_adapter_metadata"] = json.dumps(packed, indent=2, sort_keys=True)
        for comp, los in configs.items():  # lora_bias applies to every module of a component
            if any(lo.bias is not None for lo in los):
                for lo in los:
                    out.setdefault(f"{comp}.{lo.module}.lora_B.bias", torch.zeros(lo.up.shape[0], dtype=lo.dtype))
    metadata["fluxbridge"] = json.dumps({"converted_from": lora.format})
    seen: set[int] = set()
    for k, v in out.items():  # one storage per tensor (A shared by split parts is written once each)
        v = v.contiguous()
        if v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    report["tensors"] = len(out)
    report["modules"] = len({(_split_key(k) or (k,))[0] for k in out})
    return out, metadata, report


def _not_written(report, part: Part, reason: str) -> None:
    report["not_written"].append({"module": part.module, "family": part.family, "kind": part.kind,
                                  "reason": reason})


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if t.dtype.itemsize == 1 else t.dtype


# ------------------------------------------------------------------------------- transformer → side b

def _flux_side_b(lora: Lora, report) -> list[_Lo]:
    table = family_module(FLUX).TABLE
    out = []
    for p in lora.family_parts(FLUX):
        reason = _lowrank_problem(p, "diffusers")
        if reason:
            _not_written(report, p, reason)
            continue
        t = p.tensors
        dtype = _out_dtype(t["up"])
        if p.side == B:
            out.append(_Lo(p.module, t["down"], t["up"], t.get("up_bias"), p.scale, dtype, p.alpha))
            continue
        m = table.match(p.module, A)
        rule = m.rule
        names = [rule_name(rule, B, k, m.values) for k in range(len(rule.b))]
        if isinstance(rule.op, Split):
            slices = rule.op.row_slices(t["up"].shape[0], t["down"].shape[1], len(names))
            pieces = split_lora(t["down"], t["up"], slices)
            bias = t.get("up_bias")
            for name, (start, n), piece in zip(names, slices, pieces):
                b = None if bias is None else bias[start:start + n]
                if piece is None and (b is None or not bool(b.ne(0).any())):
                    continue  # an all-zero part: nothing to write
                down, up = piece if piece is not None else (t["down"][:1], t["up"][start:start + n, :1] * 0)
                same = down.shape[0] == t["down"].shape[0]
                out.append(_Lo(name, down, up, b, p.scale, dtype, p.alpha if same else None))
            report["split"].append(p.module)
        elif rule.op is SWAP_HALVES:
            b = t.get("up_bias")
            out.append(_Lo(names[0], t["down"], swap_halves(t["up"]), None if b is None else swap_halves(b),
                           p.scale, dtype, p.alpha))
            report["swapped"].append(p.module)
        else:
            out.append(_Lo(names[0], t["down"], t["up"], t.get("up_bias"), p.scale, dtype, p.alpha))
    return out


def _lowrank_problem(p: Part, to: str) -> str | None:
    if p.kind == "set":
        return f"a set value (control norm) cannot be written as {to}"
    if p.kind == "reshape":
        return f"an input reshape cannot be written as {to}"
    if p.kind != "lora":
        return f"{p.kind} cannot be written as {to} (LoRA pairs only)"
    if p.dora is not None:
        return f"DoRA cannot be written as {to}"
    return None


def _peft_pair(out, name: str, lo: _Lo, fold: bool) -> None:
    up, bias = lo.up, lo.bias
    if fold and lo.scale != 1.0:
        up = up.to(F32) * lo.scale
        bias = None if bias is None else bias.to(F32) * lo.scale
    out[f"{name}.lora_A.weight"] = lo.down.to(lo.dtype)
    out[f"{name}.lora_B.weight"] = up.to(lo.dtype)
    if bias is not None:
        out[f"{name}.lora_B.bias"] = bias.to(lo.dtype)


def _kohya_pair(out, name: str, lo: _Lo, suffix=(".lora_down.weight", ".lora_up.weight")) -> None:
    out[name + suffix[0]] = lo.down.to(lo.dtype)
    out[name + suffix[1]] = lo.up.to(lo.dtype)
    out[name + ".alpha"] = torch.tensor(lo.alpha_out(), dtype=F32)


def _peft_config(los: list[_Lo], comp: str) -> dict:
    """diffusers' LoraConfig dict: most common rank/alpha, `^`-anchored patterns for the others, and the
    exact module list as one regex (a plain list would also match `single_…proj_out` for `proj_out`)."""
    def pattern(name):
        if comp == "transformer":
            return "^" + re.escape(name)
        return "^(?:text_model\\.)?" + re.escape(name.removeprefix("text_model."))

    ranks = Counter(lo.rank for lo in los)
    alphas = Counter(lo.alpha_out() for lo in los)
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {pattern(lo.module): lo.rank for lo in los if lo.rank != r},
        "alpha_pattern": {pattern(lo.module): lo.alpha_out() for lo in los if lo.alpha_out() != alpha},
        "target_modules": "|".join(pattern(lo.module) + "$" for lo in los),
        "lora_bias": any(lo.bias is not None for lo in los),
        "use_dora": False,
        "use_rslora": False,
    }


# ------------------------------------------------------------------------------- transformer → side a

def _flux_side_a(lora: Lora, report, to: str) -> list:
    """Items on BFL modules: `_Lo`, `("full", module, diff, diff_b, dtype)`, or a renamed `Part`."""
    table = family_module(FLUX).TABLE
    items: list = []
    groups: dict[tuple, dict] = {}
    for p in lora.family_parts(FLUX):
        if p.side == A:
            items.append(p)
            continue
        m = table.match(p.module, B)
        rule = m.rule
        name_a = rule_name(rule, A, 0, m.values)
        if isinstance(rule.op, Split):
            g = groups.setdefault((id(rule), tuple(sorted(m.values.items()))),
                                  {"rule": rule, "values": m.values, "module": name_a, "parts": {}})
            if m.part in g["parts"]:
                _not_written(report, p, f"a second {p.kind} part on {p.module}")
                continue
            if p.kind in ("set", "reshape"):
                items.append(_renamed(p, name_a))
                continue
            g["parts"][m.part] = p
        elif rule.op is SWAP_HALVES:
            items.append(_swapped(p, name_a, report))
        else:
            items.append(_renamed(p, name_a))
    for g in groups.values():
        if g["parts"]:  # (a group of set / reshape parts only has none)
            items += _fuse_group(g, lora, report, to)
    return items


def _renamed(p: Part, module_a: str) -> Part:
    from dataclasses import replace
    return replace(p, side=A, module=module_a)


def _swapped(p: Part, module_a: str, report) -> Part:
    from dataclasses import replace
    t = dict(p.tensors)
    report["swapped"].append(p.module)
    if p.kind == "lora":
        t["up"] = swap_halves(t["up"])
        if "up_bias" in t:
            t["up_bias"] = swap_halves(t["up_bias"])
        if "magnitude" in t:
            t["magnitude"] = swap_halves(t["magnitude"])
        if "dora_scale" in t and t["dora_scale"].shape[0] == t["up"].shape[0]:
            t["dora_scale"] = swap_halves(t["dora_scale"])
        return replace(p, side=A, module=module_a, tensors=t)
    if p.kind == "full":
        t = {k: swap_halves(v) for k, v in t.items()}
        return replace(p, side=A, module=module_a, tensors=t)
    if p.kind in ("set", "reshape"):  # a value (rows in diffusers order) or a shape: nothing to materialize
        if p.kind == "set" and t["value"].dim():
            t["value"] = swap_halves(t["value"])
        return replace(p, side=A, module=module_a, tensors=t)
    # LoHa / LoKr rows cannot be swapped in factor space: materialize
    d = swap_halves(weight_delta(p))
    return replace(p, side=A, module=module_a, kind="full", tensors={"diff": d.to(_out_dtype(
        next(iter(p.tensors.values()))))}, alpha=None, rank=None, scale=1.0)


def _rows_of(rule, k: int, present: dict[int, Part], width: int, lora: Lora, report, module: str) -> int:
    """Row count of part k of a fused module: from the part, else from the split sizes ("in" = width),
    else ("rest") from another block's same part in this LoRA, else from the MLP of a double block."""
    if k in present:
        return present[k].out_features
    sizes = rule.op.sizes
    if len(sizes) == 1 and isinstance(sizes[0], int):  # equal parts (qkv)
        return next(iter(present.values())).out_features
    if sizes[k] == "in":
        return width
    table = family_module(FLUX).TABLE
    for p in lora.family_parts(FLUX):
        if p.out_features is None:
            continue
        m = table.match(p.module, p.side)
        if m is None or m.rule is not rule:
            continue
        if p.side == B and m.part == k:
            return p.out_features
        if p.side == A:
            return p.out_features - sum(width for s in sizes if s == "in")
    for p in lora.family_parts(FLUX):  # double-block MLP hidden width (FLUX: the same as proj_mlp)
        if p.side == B and p.module.endswith("ff.net.0.proj") and p.out_features is not None:
            return p.out_features
        if p.side == A and p.module.endswith("img_mlp.0") and p.out_features is not None:
            return p.out_features
    report["warnings"].append(f"{module}: no tensor tells the MLP width; assumed 4 x {width}")
    return 4 * width


def _fuse_group(g, lora: Lora, report, to: str) -> list:
    rule, present, module = g["rule"], g["parts"], g["module"]
    n = len(rule.b)
    any_part = next(iter(present.values()))
    shape = any_part.shape
    width = shape[1] if shape else None
    if width is None:  # bias-only parts: the width does not matter for the rows of "in" parts
        width = any_part.out_features
    rows = [_rows_of(rule, k, present, width, lora, report, module) for k in range(n)]
    missing = [rule_name(rule, B, k, g["values"]) for k in range(n) if k not in present]
    if missing:
        report["zero_filled"].append({"module": module, "missing": missing})
    report["fused"].append(module)
    kinds = {p.kind for p in present.values()}
    if kinds == {"lora"} and not any(p.dora is not None for p in present.values()):
        down, up, bias, scale, dtype = fuse_lora([present.get(k) for k in range(n)], rows,
                                                 fold_all=(to == "bfl"))
        lo = _Lo(module, down, up, bias, scale, _out_dtype(torch.empty((), dtype=dtype)))
        if len(present) == 1 or all(p.rank == lo.rank for p in present.values()):
            alphas = {p.alpha for p in present.values()}
            if len(alphas) == 1 and lo.rank == any_part.rank:
                lo.alpha = alphas.pop()
        return [lo]
    if to != "comfy" or any(p.dora is not None for p in present.values()):
        for p in present.values():
            _not_written(report, p, f"{p.kind}{' with DoRA' if p.dora is not None else ''} on a split part "
                                    f"cannot be fused into {module} as {to}")
        report["fused"].pop()
        if missing:
            report["zero_filled"].pop()
        return []
    # ComfyUI: the fused module as one full difference (exact), zero rows for missing parts
    diff = torch.zeros(sum(rows), width, dtype=F32) if any(p.has_weight for p in present.values()) else None
    diff_b = torch.zeros(sum(rows), dtype=F32) if any(p.has_bias for p in present.values()) else None
    start = 0
    for k in range(n):
        p = present.get(k)
        if p is not None:
            if diff is not None and p.has_weight:
                diff[start:start + rows[k]] = weight_delta(p)
            if diff_b is not None and p.has_bias:
                diff_b[start:start + rows[k]] = bias_delta(p)
        start += rows[k]
    dtype = _out_dtype(next(iter(any_part.tensors.values())))
    return [("full", module, diff, diff_b, dtype)]


def _write_side_a(out, item, to: str, report, lora: Lora) -> None:
    prefix = "lora_unet_" if to == "kohya" else "diffusion_model."

    def key(module):
        return prefix + (module.replace(".", "_") if to == "kohya" else module)

    if isinstance(item, tuple):  # ("full", module, diff, diff_b, dtype): comfy only
        _, module, diff, diff_b, dtype = item
        if diff is not None:
            out[key(module) + ".diff"] = diff.to(dtype)
        if diff_b is not None:
            out[key(module) + ".diff_b"] = diff_b.to(dtype)
        return
    if isinstance(item, _Lo):
        if to == "kohya" and item.bias is not None:
            report["not_written"].append({"module": item.module, "family": FLUX, "kind": "lora",
                                          "reason": "kohya has no bias delta (lora_B.bias)"})
            item.bias = None
        _emit_lo(out, key(item.module), item, to)
        return
    p: Part = item
    if p.kind == "lora" and p.dora is None:
        t = p.tensors
        lo = _Lo(p.module, t["down"], t["up"], t.get("up_bias"), p.scale, _out_dtype(t["up"]), p.alpha)
        if to == "kohya" and lo.bias is not None:
            _not_written(report, p, "kohya has no bias delta (lora_B.bias)")
            lo.bias = None
        _emit_lo(out, key(p.module), lo, to)
        if to == "comfy" and lora.format == "bfl-control" and p.module == "img_in":
            out.setdefault(key("img_in") + ".reshape_weight",
                           torch.tensor([t["up"].shape[0], t["down"].shape[1]], dtype=torch.int64))
        return
    if to != "comfy":
        _not_written(report, p, _lowrank_problem(p, to) or f"cannot be written as {to}")
        return
    if p.dora is not None and p.shape is not None and dora_on_rows(p, p.shape[0]):
        _not_written(report, p, OUTPUT_AXIS_DORA_FOR_COMFY)
        return
    # ComfyUI reads these natively
    base = key(p.module)
    t = p.tensors
    if p.kind == "set":
        out[base.removesuffix(".scale").removesuffix(".weight") + ".set_weight"] = t["value"]
    elif p.kind == "reshape":
        out[base + ".reshape_weight"] = t["shape"]
    elif p.kind == "full":
        for r in ("diff", "diff_b"):
            if r in t:
                out[f"{base}.{r}"] = t[r]
    else:  # lora with DoRA, loha, lokr: ComfyUI's own tensors, with the alpha its rank rule needs
        names = {"down": "lora_down.weight", "up": "lora_up.weight"}
        for r, v in t.items():
            if r == "up_bias":
                out[base + ".diff_b"] = (v.to(F32) * p.scale).to(_out_dtype(v))
            else:
                out[f"{base}.{names.get(r, r)}"] = v
        alpha = comfy_alpha(p)
        if alpha is not None:
            out[base + ".alpha"] = torch.tensor(alpha, dtype=F32)


def _emit_lo(out, base: str, lo: _Lo, to: str) -> None:
    if to == "bfl":
        _peft_pair(out, base, lo, fold=True)
        return
    _kohya_pair(out, base, lo)
    if lo.bias is not None:  # comfy: a bias delta is a full difference
        out[base + ".diff_b"] = (lo.bias.to(F32) * lo.scale).to(lo.dtype)


# ------------------------------------------------------------------------------------ text encoders

def _text_lo(p: Part, report, to: str) -> _Lo | None:
    reason = _lowrank_problem(p, to)
    if reason:
        _not_written(report, p, reason)
        return None
    module = p.module
    if p.side == B:  # written in the original (HF) names, which every loader reads
        table = family_module(p.family).TABLE
        m = table.match(module, B)
        module = table.render(m, A, 0)
    t = p.tensors
    return _Lo(module, t["down"], t["up"], t.get("up_bias"), p.scale, _out_dtype(t["up"]), p.alpha)


def _text_name(family: str, module_a: str, to: str) -> str:
    return module_a.replace(".", "_") if to == "kohya" else module_a
