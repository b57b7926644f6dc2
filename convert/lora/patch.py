"""Canonical parts → patches on the tensors of one loaded model (diffusers / transformers names).

`resolve` maps a part through its family's layout table onto the model's parameters: a side-b part is its
own target; a fused BFL part (`qkv`, `linear1`) targets every split module, each with its rows of the
fused delta (`Split.row_slices`: A shared, B sliced, exact); `final_layer.adaLN_modulation.1` targets
`norm_out.linear` with the row halves swapped (B's rows and bias, never A).

`Plan.compute` is THE arithmetic: the patched value of some parameters from their current values, in
float32, LoRA after LoRA in list order, cast back to each parameter's dtype. `apply_loras` and the
baking path of `convert --lora` both call it, so they give identical tensors.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from ...common.errors import BadInput
from ..table import A, B, SWAP_HALVES, Split, swap_halves
from .formats import Lora, Part, family_module, rule_name
from .groups import Groups
from .layers import bias_delta, dora_weight, fit_inputs, weight_delta

F32 = torch.float32
# How much wider a control LoRA may make that input (FLUX.1 Fill: 64 -> 384, Depth/Canny: 64 -> 128). A reshape
# is a few integers in the file, so a hostile one could otherwise ask for terabytes of zero padding.
MAX_EXPAND = 16


@dataclass(frozen=True)
class Target:
    param: str                       # parameter name in the model, e.g. "transformer_blocks.0.attn.to_q.weight"
    rows: tuple[int, int] | None     # (start, length) of the part's rows it takes; None = all
    swap: bool = False               # row halves swapped (final layer)

    def delta(self, part: Part, device="cpu", bias: bool = False) -> torch.Tensor:
        """The part's scale·ΔW (or Δb) on this target: its rows, the row halves swapped where the target's
        are (float32)."""
        d = (bias_delta if bias else weight_delta)(part, self.rows, device)
        return swap_halves(d) if self.swap else d


@dataclass
class Patch:
    part: Part
    strength: float
    lora: int                        # index of the LoRA in the list
    weight: list[Target] = field(default_factory=list)
    bias: list[Target] = field(default_factory=list)
    value: Target | None = None      # kind "set"
    expand: dict[str, int] = field(default_factory=dict)  # param -> new input width

    @property
    def params(self) -> set[str]:
        out = {t.param for t in self.weight + self.bias}
        if self.value is not None:
            out.add(self.value.param)
        return out | set(self.expand)

    @property
    def modules(self) -> list[str]:
        return sorted({p.rsplit(".", 1)[0] for p in self.params})


def _shape(shapes, name):
    s = shapes.get(name)
    return tuple(s) if s is not None else None


def resolve(part: Part, shapes: Mapping[str, tuple], allow_expand: bool = True) -> Patch | str:
    """The patch a part makes on a model with these parameter shapes, or why it cannot be placed."""
    table = family_module(part.family).TABLE
    patch = Patch(part, 1.0, 0)
    if part.kind == "set":
        name = part.module if part.side == B else _render(table, part.module)
        have = _shape(shapes, name)
        if have is None:
            return f"not in this model: {name}"
        if tuple(part.tensors["value"].shape) != have:
            return (f"shape mismatch: {part.module} gives {list(part.tensors['value'].shape)}, "
                    f"the model's {name} is {list(have)}")
        patch.value = Target(name, None)
        return patch

    if part.side == B:
        mods = [(part.module, None, False)]
    else:
        m = table.match(part.module, A)
        rule = m.rule
        names = [rule_name(rule, B, k, m.values) for k in range(len(rule.b))]
        if isinstance(rule.op, Split):
            w = _shape(shapes, names[0] + ".weight")
            if w is None:
                return f"not in this model: {names[0]}"
            rows = part.out_features
            have = [_shape(shapes, n + ".weight") for n in names]
            if None in have:
                return f"not in this model: {names[have.index(None)]}"
            total = sum(h[0] for h in have)
            src = part.shape
            if rows != total or (src is not None and src[1] != w[1]):
                got = f"[{rows}, {src[1]}]" if src is not None else f"[{rows}]"
                return (f"shape mismatch: {part.module} gives {got}, the model's "
                        f"{' + '.join(names)} need [{total}, {w[1]}]")
            try:
                slices = rule.op.row_slices(rows, w[1], len(names))
            except ValueError:
                return (f"shape mismatch: {part.module} has {rows} rows, which do not split into "
                        f"{', '.join(names)} of this model")
            mods = [(n, s, False) for n, s in zip(names, slices)]
        else:
            mods = [(names[0], None, rule.op is SWAP_HALVES)]

    if part.kind == "reshape":
        name = mods[0][0] + ".weight"
        have = _shape(shapes, name)
        want = tuple(int(x) for x in part.tensors["shape"].flatten().tolist())
        if have is None:
            return f"not in this model: {mods[0][0]}"
        if want == have:
            return patch  # nothing to do
        if not (allow_expand and may_widen(part.family, mods[0][0], B, have, want)):
            return f"cannot reshape {mods[0][0]} from {list(have)} to {list(want)}"
        patch.expand[name] = want[1]
        return patch

    src = part.shape  # (out, in) of ΔW, None for bias-only parts
    for mod, rows, swap in mods:
        n_rows = rows[1] if rows else (src[0] if src else part.out_features)
        if part.has_weight:
            # A norm's scale is a tensor of its own in the table (`...query_norm.scale` -> `...norm_q.weight`):
            # a full difference on it (ComfyUI `.scale.diff`) targets that tensor, not `<it>.weight`.
            name = mod if mod in shapes else mod + ".weight"
            have = _shape(shapes, name)
            if have is None:
                return f"not in this model: {mod}"
            want = (n_rows, src[1]) if src is not None else (n_rows,)
            if have != want:
                if allow_expand and may_widen(part.family, mod, B, have, want):
                    patch.expand[name] = want[1]
                else:
                    return (f"shape mismatch: {part.module} gives {list(src or want)}, "
                            f"the model's {mod} is {list(have)}")
            patch.weight.append(Target(name, rows, swap))
        if part.has_bias:
            name = mod + ".bias"
            have = _shape(shapes, name)
            if have is None:
                return f"the model's {mod} has no bias for the LoRA's bias delta"
            if have != (n_rows,):
                return f"shape mismatch: bias delta of {part.module} has {n_rows} rows, the model's {name} is {list(have)}"
            patch.bias.append(Target(name, rows, swap))
    return patch


def _render(table, name_a: str) -> str:
    m = table.match(name_a, A)
    return table.render(m, B, 0)


def _expandable(family: str) -> tuple[str, str] | None:
    """(the input layer a control LoRA may widen, side-a name; the config key that follows its width): the
    family's `EXPANDABLE`, None where it has none."""
    return getattr(family_module(family), "EXPANDABLE", None)


def may_widen(family: str, module: str, side: str, have, want) -> bool:
    """Whether a control LoRA may widen `module` (named on `side` of the table) from shape `have` to `want`:
    only the family's expandable input layer, the same rows, more inputs but at most MAX_EXPAND times as
    many."""
    expandable = _expandable(family)
    if expandable is None:
        return False
    name = expandable[0]
    if side == B:
        name = _render(family_module(family).TABLE, name)
    return (module == name and len(have) == len(want) == 2 and want[0] == have[0]
            and have[1] < want[1] <= MAX_EXPAND * have[1])


def expanded_config(family: str, config: Mapping, expand: Mapping[str, int]) -> dict:
    """The model config after input expansion (`Plan.expand`): the input-width key follows the widened layer
    (a control LoRA makes a FLUX.1 dev config one with `in_channels` 128, as BFL's Depth/Canny models have)."""
    config = dict(config)
    expandable = _expandable(family)
    if expandable is not None and expand:
        key = expandable[1]
        if key in config:
            config[key] = max(expand.values())
    return config


# --------------------------------------------------------------------------------------------- plan

class Plan:
    """Every patch a list of LoRAs makes on one model (given by its parameter shapes), in order."""

    def __init__(self, family: str, loras: Iterable[tuple[Lora, float]], shapes: Mapping[str, tuple],
                 allow_expand: bool = True):
        loras = list(loras)
        self.family = family
        self.loras = [lora for lora, _ in loras]
        self.patches: list[Patch] = []
        self.reports: list[dict] = []
        self.expand: dict[str, int] = {}
        for i, (lora, strength) in enumerate(loras):
            report = {"name": lora.name, "format": lora.format, "strength": strength, "patched": [],
                      "not_placed": [], "zero_filled": lora.zero_filled(family), "parts": 0}
            modules: set[str] = set()
            for part in lora.family_parts(family):
                report["parts"] += 1
                patch = resolve(part, shapes, allow_expand)
                if isinstance(patch, str):
                    report["not_placed"].append({"key": part.key, "reason": patch})
                    continue
                if not patch.params:
                    continue
                patch.strength, patch.lora = float(strength), i
                self.patches.append(patch)
                modules.update(patch.modules)
                for name, width in patch.expand.items():
                    self.expand[name] = max(width, self.expand.get(name, 0))
            report["patched"] = sorted(modules)
            self.reports.append(report)

    def report(self, i: int) -> dict:
        """LoRA `i`'s report, its `not_placed` led by the keys its file itself could not place (unknown
        modules, broken adapters, shapes its siblings disagree with), then those that fit no tensor here."""
        report = self.reports[i]
        return dict(report, not_placed=list(self.loras[i].not_placed) + report["not_placed"])

    def refuse_if_nothing_fits(self) -> None:
        """BadInput for a LoRA that has parts for this family, none of which fits this model (another width,
        another model): applying or baking it would change nothing."""
        for lora, report in zip(self.loras, self.reports):
            if report["parts"] and not report["patched"] and report["not_placed"]:
                first = report["not_placed"][0]
                raise BadInput(lora.path, f"none of its {self.family} parts fits this model ({report['parts']} "
                                          f"part(s)): {first['key']}: {first['reason']}")

    def subset(self, patches: list[Patch]) -> "Plan":
        """The same plan restricted to some of its patches (order kept)."""
        other = copy.copy(self)
        other.patches = list(patches)
        other.__dict__.pop("_closure", None)
        return other

    @property
    def params(self) -> set[str]:
        return set().union(*(p.params for p in self.patches)) if self.patches else set()

    def closures(self) -> list[list[str]]:
        """The parameters in groups that must be computed together (a DoRA part over a fused module reads all
        of its targets); every other parameter is a group of its own."""
        return list({id(c): c for c in self._closure.values()}.values())

    def closure_of(self, name: str) -> list[str]:
        return list(self._closure.get(name, [name]))

    @functools.cached_property
    def _closure(self) -> dict[str, list[str]]:
        """Parameter -> its group (sorted), one list object per group."""
        groups = Groups()
        for p in self.patches:
            names = sorted(p.params)
            if p.part.dora is not None:
                groups.join(*names)
            else:
                for q in names:
                    groups.find(q)
        members: dict = {}
        for q in sorted(groups):
            members.setdefault(groups.find(q), []).append(q)
        return {q: members[groups.find(q)] for q in sorted(groups)}

    def compute(self, params: Iterable[str], read: Callable[[str], torch.Tensor],
                device=None, into: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The patched values of `params` (whole closures), each in its original dtype.

        `read(name)` gives the current tensor (a model parameter, or a tensor streamed from a file). `into`:
        tensors of the same shape and dtype the results are written into (the parameters themselves, patched
        in place: row by row, each row block read before it is written), instead of new tensors.
        """
        wanted = set()
        for name in params:
            wanted.update(self.closure_of(name))
        patches = [p for p in self.patches if p.params & wanted]
        if len(wanted) == 1 and all(p.part.dora is None and p.value is None for p in patches):
            name = next(iter(wanted))
            return {name: self._by_rows(name, patches, read, device, out=(into or {}).get(name))}
        work: dict[str, torch.Tensor] = {}
        dtypes: dict[str, torch.dtype] = {}

        def get(name: str) -> torch.Tensor:
            if name not in work:
                t = read(name)
                if not isinstance(t, torch.Tensor) and hasattr(t, "dequantize"):
                    t = t.dequantize(F32)
                dtypes[name] = t.dtype
                w = t.to(device=device or t.device, dtype=F32, copy=True)
                width = self.expand.get(name)
                if width is not None and w.dim() == 2 and w.shape[1] < width:
                    w = torch.cat([w, w.new_zeros(w.shape[0], width - w.shape[1])], 1)
                work[name] = w
            return work[name]

        for name in sorted(wanted):
            get(name)
        for patch in patches:
            _apply(patch, get)
        if into:
            return {name: into[name].copy_(work[name]) for name in sorted(wanted)}
        return {name: work[name].to(dtypes[name]) for name in sorted(wanted)}

    def _by_rows(self, name: str, patches: list[Patch], read, device=None, out=None) -> torch.Tensor:
        """One tensor whose patches all act row by row (no DoRA, no set): float32 work in a reused
        buffer of `CHUNK` elements, written straight into the new tensor, or into `out` (which may be the
        tensor read: each row block is read before it is written; no full-size temporaries)."""
        t = read(name)
        if not isinstance(t, torch.Tensor) and hasattr(t, "dequantize"):
            t = t.dequantize(F32)
        dev = device or t.device
        width = self.expand.get(name)
        shape = (t.shape[0], width) if width is not None and t.dim() == 2 else tuple(t.shape)
        if out is None:
            out = torch.empty(shape, dtype=t.dtype, device=dev)
        terms = []
        for patch in patches:
            for tgt in patch.weight:
                if tgt.param == name:
                    terms.append(_RowTerm(patch, tgt, dev))
            for tgt in patch.bias:
                if tgt.param == name:
                    terms.append(_RowTerm(patch, tgt, dev, bias=True))
        rows = shape[0]
        cols = shape[1] if len(shape) == 2 else 1
        step = max(1, min(rows, CHUNK // max(cols, 1)))
        buf = torch.empty((step,) + tuple(shape[1:]), dtype=F32, device=dev)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            w = buf[:n]
            src = t[r0:r0 + n]
            if len(shape) == 2 and src.shape[1] < cols:
                w[:, :src.shape[1]].copy_(src)
                w[:, src.shape[1]:].zero_()
            else:
                w.copy_(src)
            for term in terms:
                term.add(w, r0, n)
            out[r0:r0 + n].copy_(w)
        return out


CHUNK = 1 << 21  # float32 elements per row block of `_by_rows` (8 MiB)


class _RowTerm:
    """One patch's contribution to one tensor, added row block by row block."""

    def __init__(self, patch: Patch, target: Target, device, bias: bool = False):
        part, s = patch.part, patch.strength
        self.start, length = target.rows if target.rows else (0, None)
        self.swap = target.swap
        self.dense = None
        self.length = length if length is not None else part.out_features
        if s == 0:
            self.alpha = 0.0
            return
        if part.kind == "lora" and not bias:
            self.up = part.tensors["up"]
            self.down = part.tensors["down"].to(device=device, dtype=F32)
            self.alpha = part.scale * s
            self.device = device
        else:
            self.dense = target.delta(part, device, bias) * s

    def _segments(self, r0: int, n: int):
        """(offset in the block, first source row, rows) of target rows r0:r0+n."""
        if not self.swap:
            return [(0, self.start + r0, n)]
        half = self.length // 2
        segs = []
        lo, hi = r0, min(r0 + n, self.length - half)  # target rows holding the source's second half
        if lo < hi:
            segs.append((0, self.start + lo + half, hi - lo))
        lo, hi = max(r0, self.length - half), r0 + n
        if lo < hi:
            segs.append((lo - r0, self.start + lo - (self.length - half), hi - lo))
        return segs

    def add(self, w: torch.Tensor, r0: int, n: int) -> None:
        if self.dense is not None:
            d = self.dense[r0:r0 + n]
            if w.dim() == 2 and d.shape[1] < w.shape[1]:
                w[:, :d.shape[1]].add_(d)
            else:
                w.add_(d)
            return
        if getattr(self, "alpha", 0.0) == 0.0:
            return
        cols = self.down.shape[1]
        for off, src, ln in self._segments(r0, n):
            up = self.up[src:src + ln].to(device=self.device, dtype=F32)
            w[off:off + ln, :cols].addmm_(up, self.down, alpha=self.alpha)


def _apply(patch: Patch, get: Callable[[str], torch.Tensor]) -> None:
    """One patch on the float32 working tensors (in place)."""
    part, s = patch.part, patch.strength
    if s == 0:
        return
    if patch.value is not None:
        w = get(patch.value.param)
        w.copy_(part.tensors["value"].to(F32))
        return
    if part.dora is None:
        for t in patch.weight:
            w = get(t.param)
            w.add_(fit_inputs(t.delta(part, w.device), w), alpha=s)
    elif patch.weight:
        # DoRA normalises over the whole source module: assemble it (rows in source order, halves back in
        # BFL order), compute, scatter back.
        parts = [get(t.param) for t in patch.weight]
        src = torch.cat([swap_halves(w) if t.swap else w for w, t in zip(parts, patch.weight)], 0)
        new = dora_weight(part, src, s)
        start = 0
        for w, t in zip(parts, patch.weight):
            n = w.shape[0]
            block = new[start:start + n]
            w.copy_(swap_halves(block) if t.swap else block)
            start += n
    for t in patch.bias:
        b = get(t.param)
        b.add_(t.delta(part, b.device, bias=True), alpha=s)
