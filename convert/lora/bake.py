"""Baking LoRAs into weights that are being converted (`fluxbridge convert --lora FILE[:STRENGTH]`).

`convert/write.py` streams a model's tensors in the diffusers layout; `LoraSet.patched_getter` wraps its
getter so that each patched tensor comes out with the LoRAs added. The arithmetic is `Plan.compute`, the
very function `apply_loras` uses, so a baked file equals a model patched in memory bitwise.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import torch

from .formats import Lora, load_lora
from .patch import Plan


def parse_spec(spec) -> tuple[str, float]:
    """"FILE[:STRENGTH]" (a Windows drive colon is not a strength) or (file, strength)."""
    if isinstance(spec, tuple):
        return str(spec[0]), float(spec[1])
    spec = str(spec)
    m = re.fullmatch(r"(.+):([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", spec)
    if m and not re.fullmatch(r"[A-Za-z]", m.group(1)):
        return m.group(1), float(m.group(2))
    return spec, 1.0


class LoraSet:
    """LoRAs with strengths, ready to patch tensors of any family they have parts for."""

    def __init__(self, items: Iterable[tuple[Lora, float]]):
        self.items = [(load_lora(lora), float(strength)) for lora, strength in items]

    @classmethod
    def open(cls, specs) -> "LoraSet":
        items = []
        for spec in specs:
            if isinstance(spec, Lora):
                items.append((spec, 1.0))
                continue
            path, strength = parse_spec(spec)
            items.append((load_lora(path), strength))
        return cls(items)

    def plan(self, family: str, shapes: Mapping[str, tuple]) -> Plan:
        # A control LoRA widens the input layer here as it does on a loaded model (a dev file baked with
        # FLUX.1-Depth-dev-lora becomes a 128-channel Depth model, as BFL publishes them).
        return Plan(family, self.items, shapes)

    def patched_getter(self, family: str, plan_b: Mapping, get_b: Callable[[str], torch.Tensor]):
        """(getter, report, expanded): `getter(name)` is `get_b(name)` with the LoRAs added where they patch
        it; `expanded` maps the tensors a control LoRA widens to their new shapes (the config follows:
        `patch.expanded_config`).

        `plan_b` maps each diffusers-side name to something with `.shape` (the conversion plan's steps).
        """
        shapes = {name: tuple(step.shape) for name, step in plan_b.items()}
        plan = self.plan(family, shapes)
        plan.refuse_if_nothing_fits()
        touched = plan.params
        expanded = {name: (shapes[name][0], width) for name, width in plan.expand.items() if name in touched}
        cache: dict[str, torch.Tensor] = {}

        def getter(name: str):
            if name not in touched:
                return get_b(name)
            if name not in cache:
                cache.clear()  # keep one closure (usually one tensor) at a time
                cache.update(plan.compute([name], get_b))
            return cache.pop(name)

        return getter, [plan.report(i) for i, r in enumerate(plan.reports) if r["parts"]], expanded


def patch_tensors(loras, family: str, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of `weights` (diffusers-side names) that the LoRAs patch, patched; others left out.

    `loras` is a list of `(lora or path, strength)`. Raises `BadInput` when a LoRA has parts for this
    family and none of them fits.
    """
    items = [(load_lora(x[0]), float(x[1])) if isinstance(x, tuple) else (load_lora(x), 1.0) for x in loras]
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    plan = Plan(family, items, shapes, allow_expand=False)
    plan.refuse_if_nothing_fits()
    out = {}
    for group in plan.closures():
        out.update(plan.compute(group, weights.__getitem__))
    return out

