"""Stub of `comfy.ops`: the cast-and-move protocol of ComfyUI's layers (ComfyUI 0.3.64 behaviour).

A layer class of `disable_weight_init` is the torch layer plus `comfy_cast_weights` (False by default) and the
`weight_function` / `bias_function` lists. While the flag is off and the lists are empty it runs torch's own
forward; otherwise it takes its weight and bias through `cast_bias_weight` (onto the input's device, in the
input's dtype, each function applied) and computes the same operation with them. ComfyUI sets the flag on
the layers it leaves on the offload device when it loads a model partly.
"""
import torch
import torch.nn.functional as F

from . import model_management


def cast_bias_weight(s, input=None, dtype=None, device=None, bias_dtype=None):
    """(weight, bias) of layer `s` on `device` in `dtype` (by default the input's), with the layer's weight and
    bias functions applied (on a copy)."""
    if input is not None:
        dtype = input.dtype if dtype is None else dtype
        device = input.device if device is None else device
        bias_dtype = dtype if bias_dtype is None else bias_dtype
    bias = None
    if s.bias is not None:
        bias = model_management.cast_to(s.bias, bias_dtype, device, copy=len(s.bias_function) > 0)
        for f in s.bias_function:
            bias = f(bias)
    weight = model_management.cast_to(s.weight, dtype, device, copy=len(s.weight_function) > 0)
    for f in s.weight_function:
        weight = f(weight)
    return weight, bias


class CastWeightBiasOp:
    comfy_cast_weights = False
    weight_function = []
    bias_function = []


class _Switch(CastWeightBiasOp):
    """Torch's forward unless the layer is to cast its weights in (`forward_comfy_cast_weights`)."""

    def forward(self, *args, **kwargs):
        if self.comfy_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0:
            return self.forward_comfy_cast_weights(*args, **kwargs)
        kwargs.pop("out_dtype", None)  # Embedding's extra argument
        return super().forward(*args, **kwargs)


class disable_weight_init:
    class Linear(_Switch, torch.nn.Linear):
        def forward_comfy_cast_weights(self, input):
            weight, bias = cast_bias_weight(self, input)
            return F.linear(input, weight, bias)

    class Conv2d(_Switch, torch.nn.Conv2d):
        def forward_comfy_cast_weights(self, input):
            weight, bias = cast_bias_weight(self, input)
            return self._conv_forward(input, weight, bias)

    class GroupNorm(_Switch, torch.nn.GroupNorm):
        def forward_comfy_cast_weights(self, input):
            weight, bias = cast_bias_weight(self, input)
            return F.group_norm(input, self.num_groups, weight, bias, self.eps)

    class LayerNorm(_Switch, torch.nn.LayerNorm):
        def forward_comfy_cast_weights(self, input):
            weight, bias = cast_bias_weight(self, input) if self.weight is not None else (None, None)
            return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)

    class RMSNorm(_Switch, torch.nn.RMSNorm):
        def forward_comfy_cast_weights(self, input):
            weight = cast_bias_weight(self, input)[0] if self.weight is not None else None
            return F.rms_norm(input, self.normalized_shape, weight, self.eps)

    class Embedding(_Switch, torch.nn.Embedding):
        def forward_comfy_cast_weights(self, input, out_dtype=None):
            cast_dtype = None if self.weight.dtype in (torch.float16, torch.bfloat16) else out_dtype
            weight, _ = cast_bias_weight(self, device=input.device, dtype=cast_dtype)
            return F.embedding(input, weight, self.padding_idx, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.sparse).to(dtype=out_dtype)
