"""Layout tables: how one model family's layouts relate, used for weights and LoRAs in both directions.

A family's table is a list of `Rule`s. Each rule relates names in the family's *original* layout (side
"a": BFL for Flux, LDM for the VAE and the SD1.5 UNet, the original HF names for CLIP/T5) to names in
the diffusers/transformers layout (side "b"), and says what happens to the values on the way (`op`).

Templates are dotted names with integer placeholders (`double_blocks.{i}.img_attn.qkv`). A template
matches a key equal to it or a key that continues it with `.rest` (usually `.weight` / `.bias`); the
rest is carried across (through `inner` renames where the family needs them). The longest template wins.

Nothing here knows a model size: split sizes are resolved from the tensors themselves ("in" is the
fused weight's input width), so the same table serves any width and depth.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

A, B = "a", "b"
SIDES = (A, B)


# ----------------------------------------------------------------------------------------------- ops

class Op:
    """A value transform between one a-side tensor group and its b-side part(s). Row-wise only."""

    name = "rename"
    report_key = "renamed"

    def row_slices(self, rows: int, in_features: int | None, parts: int) -> list[tuple[int, int]]:
        """(start, length) of each b-part inside the a-side rows."""
        return [(0, rows)]


class _Rename(Op):
    pass


class _SwapHalves(Op):
    """BFL `final_layer.adaLN_modulation.1` is (shift, scale); diffusers `norm_out.linear` is (scale, shift)."""

    name = "swap_halves"
    report_key = "swapped"


class _Conv1x1(Op):
    """LDM VAE attention uses 1x1 convs `(o, i, 1, 1)`; diffusers uses Linear `(o, i)`. Weights only."""

    name = "conv1x1"
    report_key = "reshaped"


@dataclass(frozen=True)
class Split(Op):
    """One fused a-side tensor is several b-side tensors stacked by rows.

    `Split(3)`: equal parts (qkv). Otherwise sizes are symbols resolved from the tensors: "in" is the
    fused weight's input width (D for Flux linear1), "rest" takes what is left (its MLP rows).
    """

    sizes: tuple
    name = "split"
    report_key = "split"

    def __init__(self, *sizes):
        object.__setattr__(self, "sizes", sizes)

    def row_slices(self, rows, in_features, parts):
        if len(self.sizes) == 1 and isinstance(self.sizes[0], int):
            n = self.sizes[0]
            if rows % n:
                raise ValueError(f"{rows} rows do not split into {n} equal parts")
            return [(k * rows // n, rows // n) for k in range(n)]
        if in_features is None:
            raise ValueError("split sizes need the fused weight's input width")
        sizes = [in_features if s == "in" else None for s in self.sizes]
        rest = rows - sum(s for s in sizes if s is not None)
        if rest < 0 or (None not in sizes and rest != 0):
            raise ValueError(f"{rows} rows do not split as {self.sizes} with in={in_features}")
        out, start = [], 0
        for s in sizes:
            n = rest if s is None else s
            out.append((start, n))
            start += n
        return out


RENAME, SWAP_HALVES, CONV1x1 = _Rename(), _SwapHalves(), _Conv1x1()


def narrow_rows(t, start: int, length: int):
    """Rows of a tensor as a view (or of a GGUF quantized tensor, on its raw rows)."""
    if hasattr(t, "narrow_rows"):
        return t.narrow_rows(start, length)
    return t.narrow(0, start, length)


def cat_rows(parts: list):
    if hasattr(parts[0], "cat_rows"):
        return type(parts[0]).cat_rows(parts)
    return torch.cat(parts, 0)


def swap_halves(t):
    """BFL (shift, scale) ⇄ diffusers (scale, shift) rows; its own inverse."""
    half = t.shape[0] // 2
    return cat_rows([narrow_rows(t, half, t.shape[0] - half), narrow_rows(t, 0, half)])


# --------------------------------------------------------------------------------------------- rules

@dataclass(frozen=True)
class Index:
    """Placeholder values differ between the sides (renumbering). Functions take (values, config)."""

    to_b: Callable[[dict, Mapping], dict]
    to_a: Callable[[dict, Mapping], dict]


@dataclass(frozen=True)
class Rule:
    a: str
    b: tuple[str, ...] | str
    op: Op = RENAME
    index: Index | None = None
    inner: tuple[tuple[str, str], ...] = ()  # renames of the carried rest: (a prefix, b prefix)

    def __post_init__(self):
        if isinstance(self.b, str):
            object.__setattr__(self, "b", (self.b,))

    def templates(self, side: str) -> tuple[str, ...]:
        return (self.a,) if side == A else self.b


@dataclass(frozen=True)
class Match:
    rule: Rule
    side: str
    values: dict
    part: int  # which of the side's templates matched (always 0 on side a)
    rest: str  # carried remainder without the leading dot ("" when the key is the template itself)

    @property
    def module_key(self) -> tuple:
        return (id(self.rule), tuple(sorted(self.values.items())))


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(template: str) -> re.Pattern:
    pattern, pos = "", 0
    for m in _PLACEHOLDER.finditer(template):
        pattern += re.escape(template[pos:m.start()]) + rf"(?P<{m.group(1)}>\d+)"
        pos = m.end()
    pattern += re.escape(template[pos:]) + r"(?:\.(?P<_rest>.+))?"
    return re.compile(pattern)


class Table:
    """A family's rules, compiled for matching in both directions."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = tuple(rules)
        self._patterns = {side: [] for side in SIDES}
        for rule in self.rules:
            for side in SIDES:
                for part, template in enumerate(rule.templates(side)):
                    literal = len(_PLACEHOLDER.sub("", template))
                    self._patterns[side].append((literal, _compile(template), rule, part))
        for side in SIDES:  # longest (most specific) template first
            self._patterns[side].sort(key=lambda p: -p[0])

    def match(self, key: str, side: str) -> Match | None:
        for _, pattern, rule, part in self._patterns[side]:
            m = pattern.fullmatch(key)
            if m:
                values = {k: int(v) for k, v in m.groupdict().items() if k != "_rest"}
                return Match(rule, side, values, part, m.group("_rest") or "")
        return None

    @staticmethod
    def render(match: Match, side: str, part: int, config: Mapping = {}) -> str:
        """The name `match` has on `side` (part k of a split), rest included."""
        rule, values, rest = match.rule, match.values, match.rest
        if side != match.side:
            if rule.index is not None:
                values = (rule.index.to_b if side == B else rule.index.to_a)(values, config)
            rest = _rename_prefix(rest, rule.inner, to_b=(side == B))
        name = rule.templates(side)[part].format(**values)
        return f"{name}.{rest}" if rest else name

    # ------------------------------------------------------------------------- whole state dicts

    def convert(self, shapes: Mapping[str, tuple], src_side: str, dst_side: str, config: Mapping = {}):
        """Plan the conversion of a state dict from one side to the other.

        `shapes` maps every source key to its (logical) shape. Returns `(plan, report)`: `plan` maps each
        destination key to `Step(sources, op, shape)`, which `materialize` turns into a tensor. Keys no
        rule places are listed in `report["unplaced"]`; they are not in the plan.
        """
        if src_side == dst_side:
            return {k: Step((k,), "copy", tuple(s)) for k, s in shapes.items()}, new_report()
        report = new_report()
        groups: dict[tuple, list[tuple[str, Match]]] = {}  # one group per module instance
        for key in shapes:
            m = self.match(key, src_side)
            if m is None:
                report["unplaced"].append(key)
            else:
                groups.setdefault(m.module_key, []).append((key, m))

        plan: dict[str, Step] = {}
        for matches in groups.values():
            rule = matches[0][1].rule
            op = rule.op
            n_parts = len(rule.b)
            if not isinstance(op, Split):
                for src, m in matches:
                    dst = self.render(m, dst_side, 0, config)
                    shape = tuple(shapes[src])
                    kind = op.name
                    if op is CONV1x1 and m.rest.endswith("weight"):
                        shape = shape[:2] if dst_side == B else shape + (1, 1)
                        kind = "reshape"
                    elif op is CONV1x1:
                        kind = "rename"
                    plan[dst] = Step((src,), kind, shape)
                    if kind == "rename":
                        report["renamed_count"] += 1
                    else:
                        report[op.report_key].append(src)
                continue
            if src_side == A:  # split one fused tensor into parts
                weight = next((src for src, m in matches if m.rest == "weight"), None)
                in_features = tuple(shapes[weight])[1] if weight is not None else None
                for src, m in matches:
                    shape = tuple(shapes[src])
                    for part, (start, length) in enumerate(op.row_slices(shape[0], in_features, n_parts)):
                        dst = self.render(m, dst_side, part, config)
                        plan[dst] = Step((src,), ("rows", start, length), (length,) + shape[1:])
                    report["split"].append(src)
            else:  # fuse parts into one tensor, part order; every part must be there
                by_rest: dict[str, dict[int, tuple[str, Match]]] = {}
                for src, m in matches:
                    by_rest.setdefault(m.rest, {})[m.part] = (src, m)
                for parts in by_rest.values():
                    first = next(iter(parts.values()))[1]
                    dst = self.render(first, dst_side, 0, config)
                    missing = [p for p in range(n_parts) if p not in parts]
                    if missing:
                        names = [Table.render(first, src_side, p, config) for p in missing]
                        report["missing_parts"].append({"target": dst, "missing": names})
                        continue
                    srcs = tuple(parts[p][0] for p in range(n_parts))
                    shape0 = tuple(shapes[srcs[0]])
                    rows = sum(tuple(shapes[s])[0] for s in srcs)
                    plan[dst] = Step(srcs, "cat", (rows,) + shape0[1:])
                    report["fused"].append(dst)
        return plan, report


@dataclass(frozen=True)
class Step:
    """How one destination tensor is made from source tensors."""

    sources: tuple[str, ...]
    kind: object  # "copy" | "rename" | "swap_halves" | "reshape" | "cat" | ("rows", start, length)
    shape: tuple


def materialize(step: Step, get: Callable[[str], object]):
    """The tensor a plan step describes, as a view of the source wherever the storage allows."""
    kind = step.kind
    if kind == "cat":
        return cat_rows([get(s) for s in step.sources])
    t = get(step.sources[0])
    if kind in ("copy", "rename"):
        return t
    if kind == "swap_halves":
        return swap_halves(t)
    if kind == "reshape":
        return t.reshape(step.shape)
    _, start, length = kind
    return narrow_rows(t, start, length)


def new_report() -> dict:
    return {"renamed_count": 0, "split": [], "fused": [], "swapped": [], "reshaped": [],
            "unplaced": [], "missing_parts": []}


def indices(keys: Iterable[str], pattern: str) -> set[int]:
    """The numbers the first group of `pattern` (a regex matched at the start of each key) takes in `keys`:
    which blocks of a repeated module a checkpoint holds, for the families' `infer_config`."""
    rx = re.compile("^" + pattern)
    return {int(m.group(1)) for k in keys if (m := rx.match(k))}


def depth(keys: Iterable[str], pattern: str) -> int:
    """How many blocks `pattern` numbers in `keys`: the highest index + 1 (0 when there is none)."""
    found = indices(keys, pattern)
    return max(found) + 1 if found else 0


def _rename_prefix(rest: str, inner: tuple[tuple[str, str], ...], to_b: bool) -> str:
    if not rest or not inner:
        return rest
    best = None
    for a, b in inner:
        src, dst = (a, b) if to_b else (b, a)
        if (rest == src or rest.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, dst)
    return rest if best is None else best[1] + rest[len(best[0]):]

