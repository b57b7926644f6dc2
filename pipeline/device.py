"""Where a model computes, which is not always where its first parameter lies.

A model that ComfyUI loaded partially (the layers that did not fit wait on the offload device and are brought
in as they run), or that diffusers' group offloading manages (blocks come in one at a time), computes on its
load device while most of its weights sit elsewhere. Whoever sets such a model up records that device on the
module (`set_execution_device`); the pipeline functions put their inputs there. A plain module computes where
its parameters are. They put their inputs in the dtype the model computes in (`execution_dtype`).
"""
from __future__ import annotations

import torch

_ATTRIBUTE = "fluxbridge_execution_device"


def set_execution_device(module: torch.nn.Module, device) -> None:
    """Record that `module` computes on `device` (None: forget it; where its parameters are again)."""
    module.__dict__[_ATTRIBUTE] = None if device is None else torch.device(device)


def execution_device(module: torch.nn.Module) -> torch.device:
    """The recorded device, else the device of the first parameter (the CPU for a module without any)."""
    device = module.__dict__.get(_ATTRIBUTE)
    if device is not None:
        return device
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def execution_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype `module` computes in, which is not always the dtype it stores: diffusers' and transformers'
    `.dtype` (a model stored in fp8 with upcast on compute reports its compute dtype there), else its first
    parameter's dtype (float32 for a module without any)."""
    dtype = getattr(module, "dtype", None)
    if dtype is not None:
        return dtype
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.float32
