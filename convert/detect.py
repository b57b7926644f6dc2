"""What a set of tensor names is: which families, in which layout, under which prefix.

Detection is table-driven: every family's table is asked how many names it places on each side under
each known prefix; the best-covered combinations are the file's components. A bundle (ComfyUI
all-in-one checkpoint) has several components under different prefixes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .families import FAMILIES, layout_name
from .table import A, B

MIN_KEYS = 4  # fewer placed names than this is a coincidence, not a component


@dataclass
class Component:
    family: str
    side: str
    prefix: str
    names: dict[str, str]  # stripped name -> key in the file
    unplaced: list[str] = field(default_factory=list)  # keys under the prefix that no rule places

    @property
    def module(self):
        return FAMILIES[self.family]

    @property
    def layout(self) -> str:
        return layout_name(self.module, self.side, self.prefix)


def components(keys: Iterable[str], min_keys: int = MIN_KEYS) -> list[Component]:
    """Every component found, most keys first. Keys no component claims are not returned here.
    (`min_keys=1` finds the family of a file cut down below MIN_KEYS tensors, to name it in an error.)"""
    keys = list(keys)
    candidates = []
    for family in FAMILIES.values():
        prefixes = sorted({*family.PREFIXES, family.COMFY_PREFIX}, key=len, reverse=True)
        for prefix in prefixes:
            under = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
            if len(under) < min_keys:
                continue
            for side in (A, B):
                placed = {n: k for n, k in under.items() if family.TABLE.match(n, side)}
                if len(placed) >= min_keys:
                    unplaced = sorted(k for n, k in under.items() if n not in placed)
                    candidates.append(Component(family.FAMILY, side, prefix, placed, unplaced))
    # Each key belongs to one component: take the best-covered first, drop overlapping weaker ones.
    candidates.sort(key=lambda c: (-len(c.names), len(c.prefix), c.side))
    chosen, claimed = [], set()
    for c in candidates:
        own = set(c.names.values())
        if len(own & claimed) > len(own) // 2:
            continue
        chosen.append(c)
        claimed |= own
    for c in chosen:  # a key another component claims is not "unplaced" for this one
        c.unplaced = [k for k in c.unplaced if k not in claimed]
    return chosen


def pick(found: list[Component], family: str | None = None) -> Component | None:
    """The component a loader wants: the named family, else the transformer, else the largest."""
    if family is not None:
        return next((c for c in found if c.family == family), None)
    return next((c for c in found if c.family == "flux-transformer"), found[0] if found else None)


def what_it_holds(keys: Iterable[str], metadata: Mapping | None = None) -> str:
    """For an error about a file that is not what was asked for: the model weights in it (family, layout,
    tensor count), a family too few of whose tensors are there, or the GGUF architecture it declares."""
    keys = list(keys)
    found = components(keys)
    if found:
        return ", ".join(f"{c.family} weights ({c.layout} layout, {len(c.names)} tensors)" for c in found)
    few = components(keys, min_keys=1)
    if few:
        return (f"only {len(few[0].names)} tensor(s) of {few[0].family} weights, too few for a whole model "
                f"(a cut-down or partly downloaded file?)")
    arch = (metadata or {}).get("general.architecture")
    if arch:
        return f"a GGUF file for the {arch!r} architecture"
    return f"no tensors of a model FluxBridge knows (sample keys: {', '.join(sorted(keys)[:3]) or 'none'})"
