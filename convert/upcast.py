"""Linear weights kept in fp8 as the file stores them, upcast layer by layer as the model runs.

An fp8 FLUX.1-dev file is ~12 GB; cast to bf16 on load it would be 24 GB (48 GB in fp32). Instead the loader
leaves each fp8 Linear weight as it is (a view of the memory-mapped file, or a cast of a wider one to fp8) and
`keep_fp8` wraps the layer's forward: the weight is brought to the input's device, upcast to the compute dtype
(and multiplied by its scale, for ComfyUI's scaled fp8) just before the layer runs and dropped after, so one
layer at a time exists in full precision. The stored parameter is never replaced, so its bytes stay the
file's, and a LoRA goes on as a forward hook (`convert.lora.apply`: fp8 storage counts as quantized).

The values are those of loading the file in the compute dtype: `(w.float() * scale).to(dtype)` for a scaled
layer (what `quant.QuantView` gives, then cast), `w.to(dtype)` for plain fp8 (exact).

The wrapper calls the layer's class `forward` when it runs, so a host may still change the layer's class
afterwards (ComfyUI's cast-and-move layers, `runtime.host.make_castable`). The model reports the compute dtype
as its `dtype` the way diffusers' own layerwise casting makes it: a hook of that name on the model carries it.
"""
from __future__ import annotations

import torch

HOOK_NAME = "layerwise_casting"  # diffusers' ModelMixin.dtype reads `compute_dtype` from a hook of this name


class Upcast:
    """A layer's forward with its stored fp8 weight upcast (and scaled) for the call, put back after it."""

    follows_class = True  # calls `type(layer).forward` each time: a later change of the layer's class holds

    def __init__(self, layer: torch.nn.Module, compute_dtype: torch.dtype):
        self.layer, self.compute_dtype = layer, compute_dtype

    def __call__(self, x, *args, **kwargs):
        layer = self.layer
        stored = layer.weight
        w = stored.to(x.device) if isinstance(x, torch.Tensor) else stored
        scale = getattr(layer, "weight_scale", None)
        if scale is not None:  # the same product as the dequantizing load, in one temporary
            w = w.to(torch.float32).mul_(scale.to(w.device))
        layer.weight = torch.nn.Parameter(w.to(self.compute_dtype), requires_grad=False)
        try:
            return type(layer).forward(layer, x, *args, **kwargs)
        finally:
            layer.weight = stored


def keep_fp8(model: torch.nn.Module, scales: dict[str, torch.Tensor | None], compute_dtype: torch.dtype) -> None:
    """Make the Linear layers whose weights (`<layer>.weight`, fp8) are named in `scales` upcast on compute;
    a scale (0-dim, or one per output row shaped [out, 1]) multiplies the weight in float32 first."""
    from diffusers.hooks import HookRegistry, ModelHook

    modules = dict(model.named_modules())
    for name, scale in scales.items():
        layer = modules[name.rpartition(".")[0]]
        if scale is not None:  # moves with the layer, not saved with it
            layer.register_buffer("weight_scale", scale.to(torch.float32), persistent=False)
        layer.forward = Upcast(layer, compute_dtype)

    class ComputeDtype(ModelHook):
        """Nothing but the compute dtype, where diffusers' `ModelMixin.dtype` looks for it."""
        _is_stateful = False

        def __init__(self):
            super().__init__()
            self.compute_dtype = compute_dtype

    HookRegistry.check_if_exists_or_initialize(model).register_hook(ComputeDtype(), HOOK_NAME)
