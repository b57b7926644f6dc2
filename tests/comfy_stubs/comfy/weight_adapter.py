"""Stub of `comfy.weight_adapter`: the adapter classes a LoRA patch may be, with ComfyUI's constructor
`(loaded_keys, weights)`, weights tuple layouts and `calculate_weight` signature (0.3.64).

The arithmetic is the textbook one each adapter stands for, written for the tests (not ComfyUI's code):
LoRA ΔW = (alpha / rank)·up@down, LoHa ΔW = (alpha / rank)·(w1a@w1b)⊙(w2a@w2b), LoKr ΔW = (alpha / dim)·kron(w1, w2)
(dim: w2's factor rank if w2 is factorized, else w1's; scale 1 without one), added times the strength,
through `function` (the patch key's function slot), in float32. Conv / Tucker / DoRA fields are not
supported here (the pack never sets them) and raise.
"""
import torch


class WeightAdapterBase:
    name = "base"
    loaded_keys: set
    weights: tuple

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        raise NotImplementedError


def _f(t):
    return None if t is None else t.to(torch.float32)


def _unsupported(*fields):
    if any(f is not None for f in fields):
        raise NotImplementedError("stub: conv / Tucker / DoRA fields are not supported")


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights  # (up, down, alpha, mid, dora_scale, reshape)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        up, down, alpha, mid, dora, reshape = self.weights
        _unsupported(mid, dora, reshape)
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        weight += function((strength * scale) * (_f(up) @ _f(down)).reshape(weight.shape)).to(weight.dtype)
        return weight


class LoHaAdapter(WeightAdapterBase):
    name = "loha"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights  # (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        w1a, w1b, alpha, w2a, w2b, t1, t2, dora = self.weights
        _unsupported(t1, t2, dora)
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        delta = (_f(w1a) @ _f(w1b)) * (_f(w2a) @ _f(w2b))
        weight += function((strength * scale) * delta.reshape(weight.shape)).to(weight.dtype)
        return weight


class LoKrAdapter(WeightAdapterBase):
    name = "lokr"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights  # (w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        w1, w2, alpha, w1a, w1b, w2a, w2b, t2, dora = self.weights
        _unsupported(t2, dora)
        dim = None
        if w1 is None:
            dim, w1 = w1b.shape[0], _f(w1a) @ _f(w1b)
        if w2 is None:
            dim, w2 = w2b.shape[0], _f(w2a) @ _f(w2b)
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        weight += function((strength * scale) * torch.kron(_f(w1), _f(w2)).reshape(weight.shape)).to(weight.dtype)
        return weight


adapters = [LoRAAdapter, LoHaAdapter, LoKrAdapter]
