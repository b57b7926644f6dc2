"""Standalone (no ComfyUI): run a model that does not fit the GPU with diffusers' group offloading.

The weights stay in CPU memory; diffusers moves one block at a time to the GPU as the forward pass reaches
it, and with a CUDA stream it copies the next block while the current one computes (block level, one block
per group: what diffusers recommends with streams). Inside ComfyUI this module is not used: ComfyUI's own
partial loading does the job there (`host.py`).

When: `should_offload` decides from the model's size and the device's free memory, or always when the user
asked for it (`fluxbridge run --lowvram`); never on the CPU (nowhere to offload to) or on Apple's unified
memory.

LoRAs: with a stream, diffusers keeps its own pinned CPU copy of every weight and onloads from that copy,
so a weight changed in place (our LoRA apply and remove swap `param.data`) would be ignored. `refresh`
re-applies the offloading after such a change, as diffusers' own LoRA loader does.
"""
from __future__ import annotations

import torch

# Models whose repeated blocks are not direct children: the child modules (by name, at any depth) that
# group offloading should descend into to find the ModuleList of blocks (diffusers' `block_modules`).
_BLOCK_MODULES = {
    "T5EncoderModel": ["encoder"],  # encoder.block
    "CLIPTextModel": ["text_model", "encoder"],  # text_model.encoder.layers
}


def model_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers (tied tensors once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.nelement() * t.element_size()
    return total


def should_offload(device, nbytes: int, free: int, headroom: int, forced: bool = False) -> bool:
    """Whether a model of `nbytes` must be group-offloaded to run on `device` with `free` bytes free and
    `headroom` bytes left beside it for the work (activations).

    Only CUDA devices offload (group offloading streams need them; the CPU has nowhere to offload to and
    Apple's GPU shares the CPU's memory). `forced` (the user's --lowvram) offloads whenever it can."""
    if torch.device(device).type != "cuda":
        return False
    return forced or nbytes + headroom > free


def is_offloaded(module: torch.nn.Module) -> bool:
    """Whether diffusers' group offloading manages `module`."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled
    return _is_group_offload_enabled(module)


def enable(module: torch.nn.Module, onload_device, offload_device) -> None:
    """Block-level group offloading of `module` between `offload_device` (where the weights stay) and
    `onload_device` (where each block computes), one block per group; with a CUDA stream for prefetching
    when the onload device is a CUDA device."""
    from diffusers.hooks import apply_group_offloading

    onload, offload = torch.device(onload_device), torch.device(offload_device)
    module.to(offload)
    kwargs = dict(onload_device=onload, offload_device=offload, offload_type="block_level", num_blocks_per_group=1,
                  use_stream=onload.type == "cuda")
    blocks = _BLOCK_MODULES.get(type(module).__name__)
    if blocks:
        kwargs["block_modules"] = blocks
    apply_group_offloading(module, **kwargs)


def refresh(module: torch.nn.Module) -> None:
    """After weights of a group-offloaded module were changed in place: let the offloading pick up the new
    values (diffusers re-applies it; with a stream this re-copies the weights into pinned memory)."""
    if not is_offloaded(module):
        return
    from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading
    _maybe_remove_and_reapply_group_offloading(module)


def disable(module: torch.nn.Module) -> None:
    """Stop diffusers' group offloading of `module` (as `refresh` does before it re-applies it); the weights
    stay on the offload device."""
    if not is_offloaded(module):
        return
    from diffusers.hooks import HookRegistry
    from diffusers.hooks import group_offloading as go
    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in (go._GROUP_OFFLOADING, go._LAYER_EXECUTION_TRACKER, go._LAZY_PREFETCH_GROUP_OFFLOADING):
        registry.remove_hook(name, recurse=True)
