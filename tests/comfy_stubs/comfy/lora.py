"""Stub of `comfy.lora`: `calculate_weight`, how a ModelPatcher turns a tensor's patch list into the patched
tensor (0.3.64 signature and patch forms; the arithmetic written for the tests).

A patch is `(strength, value, strength_model, offset, function)`: `offset` (dim, start, length) narrows the
tensor to a slice that the value patches in place; `function` maps the delta (the key's function slot);
`value` is a weight adapter, `(tensor,)` or `("diff", (tensor[, {"pad_weight": bool}]))` (added times the
strength; `pad_weight` first zero-pads the tensor to the delta's shape) or `("set", (tensor,))`.
"""
import torch

from .weight_adapter import WeightAdapterBase


def _pad(weight, shape):
    out = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
    out[tuple(slice(0, n) for n in weight.shape)] = weight
    return out


def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
    for strength, value, strength_model, offset, function in patches:
        function = function or (lambda delta: delta)
        whole = weight
        if offset is not None:
            weight = weight.narrow(*offset)
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(value, WeightAdapterBase):
            out = value.calculate_weight(weight, key, strength, strength_model, offset, function,
                                         intermediate_dtype, original_weights)
            weight = whole if offset is not None else out
            continue
        kind, args = ("diff", value) if len(value) == 1 else value
        if kind == "diff":
            diff = args[0]
            if len(args) > 1 and args[1].get("pad_weight") and tuple(diff.shape) != tuple(weight.shape):
                weight = _pad(weight, diff.shape)
            if strength != 0.0:
                weight += function(strength * diff.to(weight.device, weight.dtype))
        elif kind == "set":
            weight.copy_(args[0])
        else:
            raise NotImplementedError(f"stub: patch type {kind}")
        if offset is not None:
            weight = whole
    return weight
