"""Canonical LoRA parts → patches on ComfyUI's native models, as plain data (no ComfyUI in here).

ComfyUI's native Flux MODEL holds the transformer in the BFL layout under `diffusion_model.`; its Flux CLIP holds
CLIP-L under `clip_l.transformer.` and T5-XXL under `t5xxl.transformer.`, with the original HF names. Those are
the side-a names of our layout tables, so every part lands on native tensors through the same table that
serves the diffusers models:

* a side-a part (kohya, ComfyUI, BFL names) patches its own weight;
* a side-b part (diffusers names) patches its rows of the fused weight: `to_q` rows 0:D of `img_attn.qkv`,
  `proj_mlp` rows 3D:7D of `linear1` (the table's `Split.row_slices`); ComfyUI's `(key, (0, start, length))`;
* `norm_out.linear` patches `final_layer.adaLN_modulation.1` with the row halves of its delta swapped (the
  function slot of ComfyUI's patch key; a `set` value is swapped here instead, since ComfyUI ignores the slot
  for `set`);
* the missing parts of a fused module patch nothing: their rows stay as they are (a zero block).

`NativePatch.weights` is the tuple ComfyUI's patch takes, chosen so that ComfyUI's arithmetic is ours:

* LoRA / LoHa / LoKr: ComfyUI's own adapters, `(up, down, alpha, ...)` with the alpha that makes ComfyUI's
  `alpha / rank` our scale (the file's alpha itself where the scale is alpha/rank: then it is the very
  computation of ComfyUI's LoraLoader, bitwise);
* full differences and bias deltas (`lora_B.bias`, `diff_b`, norm differences): `("diff", (Δ,))`, added times
  the strength; `set`: `("set", (value,))`; an input expansion (control LoRA): a zero `diff` that pads the
  weight (`{"pad_weight": True}`), placed before the patches it makes room for;
* DoRA: `dora_update` (ours), through an adapter object the host makes. ComfyUI's `weight_decompose`
  normalises the output axis (PEFT `lora_magnitude_vector`, `dora_scale` [out, 1]) by the unpatched weight
  where PEFT and LyCORIS use the patched one, so it is not used.

ComfyUI's ModelPatcher keeps the patches, backs up and restores the weights, and applies the patches when it
loads the model (also in low-VRAM mode), LoRA after LoRA in the order they were added.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..table import A, B, SWAP_HALVES, Split, swap_halves
from .formats import CLIP, FLUX, T5, Lora, Part, family_module
from .layers import bias_delta, dora_weight
from .patch import may_widen

F32 = torch.float32
NAMES = {FLUX: "transformer", CLIP: "CLIP-L", T5: "T5-XXL"}


@dataclass(frozen=True)
class NativePatch:
    """One patch on one tensor of a native model, in ComfyUI's terms (see the module docstring)."""

    key: str                          # the native state-dict key, e.g. "diffusion_model.single_blocks.0.linear1.weight"
    rows: tuple[int, int] | None      # (start, length): the rows of a fused weight it patches; None = all
    swap: bool                        # ComfyUI's function slot swaps the delta's row halves (final layer)
    kind: str                         # lora | loha | lokr | diff | set | dora
    weights: tuple                    # what ComfyUI's patch holds (for dora: (part, swap))

    @property
    def module(self) -> str:
        """The patched tensor without `.weight` / `.bias`, with its rows when it is a slice (for reports)."""
        name = self.key.rsplit(".", 1)[0] if self.key.endswith((".weight", ".bias")) else self.key
        return f"{name}[{self.rows[0]}:{self.rows[0] + self.rows[1]}]" if self.rows else name


@dataclass
class NativePlan:
    """The patches one LoRA makes on one native model (all its families), in the order ComfyUI must add them,
    and the report."""

    patches: list[NativePatch] = field(default_factory=list)
    report: dict = field(default_factory=dict)

    def batches(self) -> list[list[NativePatch]]:
        """The patches split into `add_patches` calls: ComfyUI takes one dict per call, so a tensor appears at
        most once per call; the calls keep the order of the patches on each tensor."""
        out: list[list[NativePatch]] = []
        count: dict[str, int] = {}
        for p in self.patches:
            n = count.get(p.key, 0)
            count[p.key] = n + 1
            if n == len(out):
                out.append([])
            out[n].append(p)
        return out


def native_prefix(family: str, keys) -> str | None:
    """The prefix under which a native state dict holds this family's tensors (the family's `NATIVE_PREFIX`;
    None: it holds none)."""
    family = family_module(family)
    prefix = family.NATIVE_PREFIX
    return prefix if any(k.startswith(prefix) and family.TABLE.match(k[len(prefix):], A) for k in keys) else None


def native_plan(lora: Lora, families, shapes: Mapping[str, tuple]) -> NativePlan:
    """The patches `lora` makes on a native model whose state dict has these shapes (key -> logical shape),
    for the parts of `families` (the transformer; CLIP-L and T5 for a Flux CLIP).

    report: {"format", "parts", "patched" (native modules, rows of fused ones), "zero_filled" (fused modules
    the LoRA covers only in part), "not_placed" [{key, reason}] (the parts that fit no tensor here; the keys
    the file itself could not place are `lora.not_placed`)}.
    """
    plan = NativePlan(report={"name": lora.name, "format": lora.format, "parts": 0, "patched": [],
                              "zero_filled": [], "not_placed": []})
    pads: list[NativePatch] = []
    body: list[NativePatch] = []
    for family in families:
        parts = lora.family_parts(family)
        if not parts:
            continue
        plan.report["parts"] += len(parts)
        prefix = native_prefix(family, shapes)
        if prefix is None:
            for part in parts:
                plan.report["not_placed"].append({"key": part.key, "reason": f"this model has no {NAMES[family]}"})
            continue
        plan.report["zero_filled"] += lora.zero_filled(family)
        widths: dict[str, int] = {}
        for part in parts:
            made = _part_patches(part, prefix, shapes, widths)
            if isinstance(made, str):
                plan.report["not_placed"].append({"key": part.key, "reason": made})
            else:
                body += made
        for key, width in widths.items():
            out = shapes[key][0]
            pads.append(NativePatch(key, None, False, "diff", (torch.zeros(out, width), {"pad_weight": True})))
    plan.patches = pads + body
    plan.report["patched"] = sorted({p.module for p in body})
    return plan


# ----------------------------------------------------------------------------------------- one part

def _targets(part: Part, prefix: str, shapes) -> tuple[str, tuple[int, int] | None, bool] | str:
    """(native module or tensor name, rows, swap) of a part, or why it has none."""
    table = family_module(part.family).TABLE
    if part.side == A:
        return prefix + part.module, None, False
    m = table.match(part.module, B)
    if m is None:
        return f"no rule places {part.module}"
    name = prefix + table.render(m, A, 0)
    if isinstance(m.rule.op, Split):
        have = shapes.get(name + ".weight")
        if have is None:
            return f"not in this model: {name}"
        try:
            rows = m.rule.op.row_slices(have[0], have[1], len(m.rule.b))[m.part]
        except ValueError:
            return f"shape mismatch: {name} has {have[0]} rows, which do not split into the parts of {part.module}"
        return name, rows, False
    return name, None, m.rule.op is SWAP_HALVES


def _part_patches(part: Part, prefix: str, shapes, widths: dict) -> list[NativePatch] | str:
    """The patches of one part (weight, then bias), or why it cannot be placed. `widths` collects the input
    widths that control LoRAs give their layer (key -> width)."""
    found = _targets(part, prefix, shapes)
    if isinstance(found, str):
        return found
    name, rows, swap = found
    weight_key = name if name in shapes else name + ".weight"  # a tensor-level rule (norm scale) names the tensor
    have = shapes.get(weight_key)
    if have is None:
        return f"not in this model: {weight_key}"
    n_rows = rows[1] if rows else have[0]

    if part.kind == "set":
        value = part.tensors["value"]
        if tuple(value.shape) != tuple(have):
            return f"shape mismatch: {part.module} gives {list(value.shape)}, the model's {weight_key} is {list(have)}"
        return [NativePatch(weight_key, None, False, "set", (swap_halves(value) if swap else value,))]
    if part.kind == "reshape":
        want = tuple(int(x) for x in part.tensors["shape"].flatten().tolist())
        if want == tuple(have):
            return []
        if not may_widen(part.family, name[len(prefix):], A, have, want):
            return f"cannot reshape {weight_key} from {list(have)} to {list(want)}"
        widths[weight_key] = max(want[1], widths.get(weight_key, 0))
        return []

    out: list[NativePatch] = []
    if part.has_weight:
        want = tuple(part.shape) if part.shape is not None else (part.out_features,)  # 1-D: a norm difference
        target = (n_rows,) + tuple(have[1:])
        if want != target:
            if want[0] == n_rows and may_widen(part.family, name[len(prefix):], A, have, want):
                widths[weight_key] = max(want[1], widths.get(weight_key, 0))
            else:
                return f"shape mismatch: {part.module} gives {list(want)}, the model's " \
                       f"{_rows_of(weight_key, rows)} is {list(target)}"
        out.append(_weight_patch(part, weight_key, rows, swap))
    if part.has_bias:
        bias_key = name + ".bias"
        bias = shapes.get(bias_key)
        if bias is None:
            return f"the model's {name} has no bias for the LoRA's bias delta"
        if part.out_features != n_rows or tuple(bias) != (have[0],):
            return f"shape mismatch: bias delta of {part.module} has {part.out_features} rows, the model's " \
                   f"{_rows_of(bias_key, rows)} has {n_rows}"
        out.append(NativePatch(bias_key, rows, swap, "diff", (bias_delta(part),)))
    return out


def _rows_of(key: str, rows) -> str:
    return f"{key} rows {rows[0]}:{rows[0] + rows[1]}" if rows else key


def _weight_patch(part: Part, key: str, rows, swap: bool) -> NativePatch:
    t = part.tensors
    if part.dora is not None:
        return NativePatch(key, rows, False, "dora", (part, swap))
    if part.kind == "lora":
        return NativePatch(key, rows, swap, "lora", (t["up"], t["down"], comfy_alpha(part), None, None, None))
    if part.kind == "loha":
        return NativePatch(key, rows, swap, "loha", (t["hada_w1_a"], t["hada_w1_b"], comfy_alpha(part),
                                                     t["hada_w2_a"], t["hada_w2_b"], None, None, None))
    if part.kind == "lokr":
        return NativePatch(key, rows, swap, "lokr", (t.get("lokr_w1"), t.get("lokr_w2"), comfy_alpha(part),
                                                     t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2_a"),
                                                     t.get("lokr_w2_b"), None, None))
    return NativePatch(key, rows, swap, "diff", (t["diff"],))  # full


def comfy_divisor(part: Part) -> int | None:
    """The rank ComfyUI divides a low-rank part's alpha by (None: it ignores the alpha, scale 1): a LoRA's
    down rank, LoHa's w1_b rank, LoKr's w2_b rank when w2 is factorized, else w1_b's when w1 is."""
    t = part.tensors
    if part.kind == "lora":
        return t["down"].shape[0]
    if part.kind == "loha":
        return t["hada_w1_b"].shape[0]
    return next((t[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in t), None)


def comfy_alpha(part: Part) -> float | None:
    """The alpha ComfyUI must be given so that its `alpha / divisor` is the part's scale (None: scale 1).

    Where the file's own alpha over that rank is the scale, that alpha, so the arithmetic is ComfyUI's
    LoraLoader's to the bit; else scale · divisor (rsLoRA, PEFT metadata alphas, a LoKr whose two factor
    ranks differ). A part with no such rank (LoKr with both factors whole) has scale 1 as read."""
    divisor = comfy_divisor(part)
    if part.scale == 1.0 or divisor is None:
        return None
    if part.convention == "alpha/rank" and part.alpha is not None and part.rank == divisor:
        return part.alpha
    return part.scale * divisor



# -------------------------------------------------------------------------------------------- DoRA

def dora_update(weight: torch.Tensor, part: Part, strength: float, swap: bool = False) -> torch.Tensor:
    """DoRA on a native weight (or its rows), in place: W ← W + strength·(m·(W+ΔW)/‖W+ΔW‖ − W), in float32 and
    on the magnitude's own axis, as `Plan.compute` does on diffusers models (`layers.dora_weight`). `swap`: the
    weight is BFL `final_layer.adaLN_modulation.1` and the part speaks of `norm_out.linear` (halves swapped)."""
    w = weight.to(F32)
    new = dora_weight(part, swap_halves(w) if swap else w, strength)
    weight.copy_((swap_halves(new) if swap else new).to(weight.dtype))
    return weight
