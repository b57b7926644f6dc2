"""`fluxbridge lora inspect PATH`: what a LoRA file is, and where each of its parts would go."""
from __future__ import annotations

from collections import Counter

from ..table import A, Split
from .formats import load_lora, family_module


def inspect_lora(path) -> dict:
    """JSON-able report: format, families, kinds, ranks, alphas, scale convention, target modules per family
    (diffusers/transformers names), text-encoder parts, zero-filled parts, keys not placed with reasons."""
    lora = load_lora(path)
    report = lora.report
    targets: dict[str, set] = {}
    fused = Counter()
    for p in lora.parts:
        names = {p.module}
        if p.side == A:
            table = family_module(p.family).TABLE
            m = table.match(p.module, A)
            names = {t.format(**m.values) for t in m.rule.b}
            if isinstance(m.rule.op, Split):
                fused[p.family] += 1
        targets.setdefault(p.family, set()).update(names)
    report["targets"] = {f: len(v) for f, v in targets.items()}
    report["target_modules"] = {f: sorted(v) for f, v in targets.items()}
    report["fused_sources"] = dict(fused)
    report["family"] = "flux-lora"
    return report
