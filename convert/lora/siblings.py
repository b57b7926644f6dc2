"""The parts of a LoRA that must have one shape do: checked before anything converts, fuses or applies them.

Flux, CLIP-L and T5 are built of identical blocks, so a module template (`transformer_blocks.{i}.attn.to_q`)
has the same weight shape in every block; and the parts a fused module splits into by equal rows (q, k, v of
`qkv`) have one shape, as have the parts sized by the fused weight's input width (q, k, v of `linear1`), whose
row count is that width. These are the family's widths as its layout table states them. A part whose ΔW shape
differs from what its siblings agree on fits no model of the family; it is taken out of the LoRA and listed as
not placed, named with its shape and the one its siblings have. Where the siblings are split evenly between
two shapes, none of them can be trusted and all are taken out, both shapes named.
"""
from __future__ import annotations

from collections import Counter

from ..families import FAMILIES
from ..table import B, Split
from .groups import Groups


def check_siblings(parts: list) -> tuple[list, list[dict]]:
    """(the parts (`formats.Part`) that agree with their siblings, not-placed entries for those that do not)."""
    slots = {id(p): _slot(p) for p in parts}
    groups = Groups()  # a part, its template and its equal-rows group: one class of siblings
    for p in parts:
        if slots[id(p)] is not None:
            groups.join(id(p), *(key for key in slots[id(p)] if key is not None))
    classes: dict = {}
    for p in parts:
        if slots[id(p)] is not None:
            classes.setdefault(groups.find(id(p)), []).append(p)

    refused: dict[int, str] = {}
    for members in classes.values():
        shapes = Counter(tuple(p.shape) for p in members)
        (common, n), *rest = shapes.most_common()
        if rest and rest[0][1] == n:  # a tie: no shape has the majority
            tied = [s for s, c in shapes.items() if c == n]
            for p in members:
                others = [s for s in tied if s != tuple(p.shape)]
                refused[id(p)] = (f"shape mismatch: {p.module} gives ΔW {list(p.shape)}, its sibling "
                                  f"{_with_shape(members, others[0], p)} gives {list(others[0])}; "
                                  "no shape has a majority, so neither is used")
            continue
        for p in members:
            if tuple(p.shape) != common:
                refused[id(p)] = (f"shape mismatch: {p.module} gives ΔW {list(p.shape)}, its {n} sibling(s) "
                                  f"({_with_shape(members, common, p)}, ...) give {list(common)}")
        for p in members:
            width_problem = _width_problem(p)
            if width_problem and id(p) not in refused:
                refused[id(p)] = width_problem
    kept = [p for p in parts if id(p) not in refused]
    not_placed = [{"key": p.key, "reason": refused[id(p)]}
                  for p in parts if id(p) in refused]
    return kept, not_placed


def _with_shape(members, shape, other_than) -> str:
    return next(p.module for p in members if tuple(p.shape) == shape and p is not other_than)


def _slot(p):
    """(template key, equal-rows group key or None) of a part with a 2-D ΔW; None for the others."""
    if p.shape is None or p.kind in ("set", "reshape"):
        return None
    m = FAMILIES[p.family].TABLE.match(p.module, p.side)
    if m is None:
        return None
    template = ("template", p.family, p.side, id(m.rule), m.part, m.rest)
    group = None
    if p.side == B and isinstance(m.rule.op, Split) and not m.rest:
        size = m.rule.op.sizes[m.part] if len(m.rule.op.sizes) > 1 else "equal"
        if size in ("in", "equal"):
            group = ("group", p.family, id(m.rule), tuple(sorted(m.values.items())), size)
    return template, group


def _width_problem(p) -> str | None:
    """The table's own widths: an "in" part of a split module has as many rows as inputs; a fused part has
    rows that split the way its module does."""
    m = FAMILIES[p.family].TABLE.match(p.module, p.side)
    op = m.rule.op
    if not isinstance(op, Split) or m.rest:
        return None
    rows, inputs = p.shape
    if p.side == B:
        if len(op.sizes) > 1 and op.sizes[m.part] == "in" and rows != inputs:
            return (f"shape mismatch: {p.module} gives ΔW {list(p.shape)}, but as part of the fused "
                    f"{m.rule.a.format(**m.values)} it must have as many rows as inputs ({inputs})")
        return None
    try:
        op.row_slices(rows, inputs, len(m.rule.b))
    except ValueError as exc:
        return f"shape mismatch: {p.module} gives ΔW {list(p.shape)}: {exc}"
    return None
