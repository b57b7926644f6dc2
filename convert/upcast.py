"""Linear weights kept in fp8 as the file stores them, upcast layer by layer as the model runs.

An fp8 FLUX.1-dev file is ~12 GB; cast to bf16 on load it would be 24 GB (48 GB in fp32). Instead the loader
leaves each fp8 Linear weight as it is (a view of the memory-mapped file, or a cast of a wider one to fp8) and
`keep_fp8` wraps the layer's forward: the weight is upcast to the compute dtype (and multiplied by its scale,
for ComfyUI's scaled fp8) just before the layer runs and dropped after, so one layer at a time exists in full
precision. The stored parameter is never replaced, so its bytes stay the file's and a LoRA goes on as a forward
hook (`convert.lora.apply`: fp8 storage counts as quantized).

The values are those of loading the file in the compute dtype: `(w.float() * scale).to(dtype)` for a scaled
layer (what `quant.QuantView` gives, then cast), `w.to(dtype)` for plain fp8 (exact).

The wrapper is a diffusers hook registered under diffusers' own name for "stored in one dtype, computed in
another" (`layerwise_casting`), so `model.dtype` reports the compute dtype as it does for diffusers' layerwise
casting, which the sampler reads.
"""
from __future__ import annotations

import torch

HOOK_NAME = "layerwise_casting"  # diffusers' ModelMixin.dtype reads `compute_dtype` from a hook of this name


def _hook_class():
    from diffusers.hooks import ModelHook

    class UpcastHook(ModelHook):
        """Upcast (and scale) the stored weight for one forward; the stored parameter goes back after it."""

        _is_stateful = False

        def __init__(self, compute_dtype: torch.dtype):
            super().__init__()
            self.compute_dtype = compute_dtype

        def new_forward(self, module, *args, **kwargs):
            stored = module.weight
            scale = getattr(module, "weight_scale", None)
            w = stored
            if scale is not None:  # the same product as the dequantizing load, in one temporary
                w = stored.to(torch.float32).mul_(scale)
            module.weight = torch.nn.Parameter(w.to(self.compute_dtype), requires_grad=False)
            try:
                return self.fn_ref.original_forward(*args, **kwargs)
            finally:
                module.weight = stored

    return UpcastHook


def keep_fp8(model: torch.nn.Module, scales: dict[str, torch.Tensor | None], compute_dtype: torch.dtype) -> None:
    """Make the Linear layers whose weights (`<layer>.weight`, fp8) are named in `scales` upcast on compute;
    a scale (0-dim, or one per output row shaped [out, 1]) multiplies the weight in float32 first."""
    from diffusers.hooks import HookRegistry

    hook = _hook_class()
    modules = dict(model.named_modules())
    for name, scale in scales.items():
        layer = modules[name.rpartition(".")[0]]
        if scale is not None:  # moves with the layer, not saved with it
            layer.register_buffer("weight_scale", scale.to(torch.float32), persistent=False)
        HookRegistry.check_if_exists_or_initialize(layer).register_hook(hook(compute_dtype), HOOK_NAME)
