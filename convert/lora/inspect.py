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
    report["text_encoder"] = report["text_encoder_parts"]
    warnings = []
    if report["not_placed"]:
        warnings.append(f"{len(report['not_placed'])} key(s) not placed: "
                        + "; ".join(f"{d['key']} ({d['reason']})" for d in report["not_placed"][:3]))
    if report["zero_filled"]:
        warnings.append(f"{len(report['zero_filled'])} fused module(s) only partly covered (the rest is zero): "
                        + ", ".join(z["module"] for z in report["zero_filled"][:3]))
    if len(report["formats"]) > 1:
        warnings.append("keys of several formats: " + ", ".join(report["formats"]))
    report["warnings"] = warnings
    return report
