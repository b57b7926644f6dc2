"""The arithmetic of each adapter kind, in float32: ΔW and Δb of a part, DoRA, fusing and splitting.

Everything a LoRA does to a weight goes through `weight_delta` / `bias_delta` / `dora_weight`, for applying
to a model, for baking into a converted file and for the on-the-fly hooks on quantized bases alike.
"""
from __future__ import annotations

import torch

from .formats import Part, lokr_factor

F32 = torch.float32


def _f(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=F32)


def weight_delta(part: Part, rows: tuple[int, int] | None = None, device="cpu") -> torch.Tensor | None:
    """scale·ΔW of the part (rows `start, length` of it only), float32; None if it has no weight delta."""
    t = part.tensors
    sl = slice(None) if rows is None else slice(rows[0], rows[0] + rows[1])
    if part.kind == "lora":
        return (_f(t["up"][sl], device) @ _f(t["down"], device)) * part.scale
    if part.kind == "loha":
        w = (_f(t["hada_w1_a"], device) @ _f(t["hada_w1_b"], device)) * (
            _f(t["hada_w2_a"], device) @ _f(t["hada_w2_b"], device))
        return w[sl] * part.scale
    if part.kind == "lokr":
        w = torch.kron(_lokr(t, "1", device), _lokr(t, "2", device))
        return w[sl] * part.scale
    if part.kind == "full" and "diff" in t:
        return _f(t["diff"][sl], device)
    return None


def _lokr(t, i: str, device) -> torch.Tensor:
    factor = [_f(x, device) for x in lokr_factor(t, i)]
    return factor[0] if len(factor) == 1 else factor[0] @ factor[1]


def bias_delta(part: Part, rows: tuple[int, int] | None = None, device="cpu") -> torch.Tensor | None:
    t = part.tensors
    sl = slice(None) if rows is None else slice(rows[0], rows[0] + rows[1])
    if "up_bias" in t:
        return _f(t["up_bias"][sl], device) * part.scale
    if "diff_b" in t:
        return _f(t["diff_b"][sl], device)
    return None


def fit_inputs(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A delta narrower than a widened weight (control LoRA) is zero-padded on the input side."""
    if delta.dim() == 2 and delta.shape[1] < weight.shape[1]:
        return torch.cat([delta, delta.new_zeros(delta.shape[0], weight.shape[1] - delta.shape[1])], 1)
    return delta


def dora_weight(part: Part, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """`weight` (float32, in the part's own layout: a fused module whole, BFL row halves) with a DoRA part
    applied: m·(W+ΔW)/‖W+ΔW‖ (ΔW = scale·ΔW of the part), interpolated from W by `strength` as ComfyUI and
    InvokeAI do. The norm is taken on the magnitude's axis as the trainers that write it take it: PEFT's
    `lora_magnitude_vector` [out] and LyCORIS' `dora_scale` [out, 1] (`wd_on_output`) scale the rows, the norm
    runs over each row's inputs; a `dora_scale` [1, in] (LyCORIS, kohya, OneTrainer) scales the columns.

    ComfyUI's `weight_decompose` agrees on the input axis; on the output axis it divides by the norm of the
    unpatched weight instead, so such a file means other weights there (`write.py` does not write one for
    ComfyUI). Every norm gets float32's epsilon added (as ComfyUI adds its weight dtype's), so an all-zero
    row or column gives zeros, not NaN (PEFT adds none: a zero row is NaN there); elsewhere they agree.
    """
    eps = torch.finfo(F32).eps
    merged = weight + fit_inputs(weight_delta(part, None, weight.device), weight)
    m = part.dora.to(device=weight.device, dtype=F32)
    if dora_on_rows(part, merged.shape[0]):
        new = merged * (m.reshape(-1, 1) / (merged.norm(p=2, dim=1, keepdim=True) + eps))
    else:
        new = merged * (m.reshape(1, -1) / (merged.norm(p=2, dim=0, keepdim=True) + eps))
    return new if strength == 1 else weight + strength * (new - weight)


def dora_on_rows(part: Part, rows: int) -> bool:
    """Whether a part's DoRA magnitude scales output rows (PEFT [out], `dora_scale` [out, 1]), as ComfyUI
    tells the axes apart (the leading dimension); else it scales input columns (`dora_scale` [1, in])."""
    return "magnitude" in part.tensors or part.tensors["dora_scale"].shape[0] == rows


# ------------------------------------------------------------------------------- fusing / splitting

def fuse_lora(parts: list[Part | None], rows: list[int], fold_all: bool = False):
    """Split LoRA parts (one per row block, None = missing) → one fused (down, up, up_bias|None, scale).

    * all present A bitwise equal: A is shared and B's row blocks are stacked (no rank growth);
    * otherwise A = cat(A_i), B block-diagonal (rank Σr_i; ranks may differ).
    Missing parts are zero rows. If all present parts have the same scale it is kept, else (or with
    `fold_all`) each scale is folded into its B block in float32 and the fused scale is 1.
    """
    present = [p for p in parts if p is not None]
    scales = {p.scale for p in present}
    keep = len(scales) == 1 and not fold_all
    scale = scales.pop() if keep else 1.0
    downs = [p.tensors["down"] for p in present]
    shared = all(d.shape == downs[0].shape and torch.equal(d, downs[0]) for d in downs[1:])
    dtype = present[0].tensors["up"].dtype
    ranks = [p.tensors["down"].shape[0] for p in present]
    total_rows = sum(rows)
    rank = ranks[0] if shared else sum(ranks)
    up = torch.zeros(total_rows, rank, dtype=F32)
    bias = torch.zeros(total_rows, dtype=F32) if any(p.has_bias for p in present) else None
    start, col = 0, 0
    for p, n in zip(parts, rows):
        if p is not None:
            factor = 1.0 if keep else p.scale
            b = p.tensors["up"].to(F32)
            if factor != 1.0:
                b = b * factor
            r = b.shape[1]
            c = 0 if shared else col
            up[start:start + n, c:c + r] = b
            if bias is not None and "up_bias" in p.tensors:
                bias[start:start + n] = p.tensors["up_bias"].to(F32) * factor
            col += r
        start += n
    down = downs[0].to(F32) if shared else torch.cat([d.to(F32) for d in downs], 0)
    return down, up, bias, scale, dtype


def split_lora(down: torch.Tensor, up: torch.Tensor, slices: list[tuple[int, int]]):
    """A fused LoRA → per row block (down_i, up_i), or None for an all-zero block (nothing to write).

    Each block keeps only the columns of B that are non-zero in it (and those rows of A). That is exact
    (the dropped terms are exact zeros) and gives the no-rank-growth split of a block-diagonal B (kohya
    `split_qkv`, or our own fusion of parts with different ranks); a dense B keeps its whole A per block.
    """
    out = []
    for start, n in slices:
        block = up[start:start + n]
        cols = torch.nonzero(block.ne(0).any(0), as_tuple=False).flatten()
        if cols.numel() == 0:
            out.append(None)
        elif cols.numel() == up.shape[1]:
            out.append((down, block))
        else:
            out.append((down[cols], block[:, cols]))
    return out
