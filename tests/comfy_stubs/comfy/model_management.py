"""Stub of `comfy.model_management`, as ComfyUI behaves with `--cpu`. Calls are recorded in `_calls`.

`load_models_gpu` decides how much of each model to load the way ComfyUI 0.3.64 does (its vram state, the
free memory `get_free_memory` reports, the memory the caller needs): fully, or partly through
`ModelPatcher.load(..., lowvram_model_memory=budget)`. Like ComfyUI, a model whose load device is the CPU is
always loaded fully; tests that want to see partial loading on the CPU set `_cpu_counts_as_gpu`.
"""
from enum import Enum

import torch

_calls = []  # (function name, args, kwargs), for tests
_cpu_counts_as_gpu = False  # tests: treat a CPU load device as an accelerator (ComfyUI never loads the CPU partly)
_LOWVRAM_FLOOR = 128 * 1024 * 1024  # ComfyUI's least budget for a partial load; tests of tiny models lower it
current_loaded_models = []
interrupt_processing = False


class VRAMState(Enum):
    DISABLED = 0  # no VRAM: the model computes on the CPU
    NO_VRAM = 1  # --novram
    LOW_VRAM = 2  # --lowvram
    NORMAL_VRAM = 3
    HIGH_VRAM = 4  # --highvram, --gpu-only
    SHARED = 5  # unified memory (Apple)


vram_state = VRAMState.NORMAL_VRAM
MIN_WEIGHT_MEMORY_RATIO = 0.0  # ComfyUI's value on NVIDIA (0.4 elsewhere)
EXTRA_RESERVED_VRAM = 400 * 1024 * 1024  # --reserve-vram sets it


class InterruptProcessingException(Exception):
    pass


def get_torch_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def text_encoder_device():
    return torch.device("cpu")


def text_encoder_offload_device():
    return torch.device("cpu")


def vae_device():
    return torch.device("cpu")


def vae_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def is_device_cpu(device):
    return torch.device(device).type == "cpu"


def get_free_memory(dev=None, torch_free_too=False):
    import psutil
    free = psutil.virtual_memory().available  # what ComfyUI reports for the CPU
    return (free, free) if torch_free_too else free


def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    return False


def module_size(module):
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def extra_reserved_memory():
    return EXTRA_RESERVED_VRAM


def minimum_inference_memory():
    return 1024 * 1024 * 1024 * 0.8 + extra_reserved_memory()


def cast_to(weight, dtype=None, device=None, non_blocking=False, copy=False, stream=None):
    """The tensor on `device` in `dtype` (the same tensor when it is already there and no copy is asked)."""
    return weight.to(device=device, dtype=dtype, non_blocking=non_blocking, copy=copy)


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    _calls.append(("load_models_gpu", (list(models),), {
        "memory_required": memory_required, "force_patch_weights": force_patch_weights,
        "minimum_memory_required": minimum_memory_required, "force_full_load": force_full_load}))
    inference = minimum_inference_memory()
    minimum = max(inference, (memory_required if minimum_memory_required is None else minimum_memory_required)
                  + extra_reserved_memory())
    for patcher in models:
        device = patcher.load_device
        state = VRAMState.DISABLED if is_device_cpu(device) and not _cpu_counts_as_gpu else vram_state
        budget = 0  # 0: load fully
        if state in (VRAMState.LOW_VRAM, VRAMState.NORMAL_VRAM) and not force_full_load:
            loaded = patcher.loaded_size()
            free = get_free_memory(device) + loaded
            budget = max(_LOWVRAM_FLOOR, free - minimum, min(free * MIN_WEIGHT_MEMORY_RATIO, free - inference))
            budget = max(0.1, budget - loaded)
        if state == VRAMState.NO_VRAM:
            budget = 0.1
        full = budget == 0 or patcher.loaded_size() + budget > patcher.model_size()
        patcher.load(device, lowvram_model_memory=patcher.loaded_size() + budget if budget else 0,
                     force_patch_weights=force_patch_weights, full_load=full)
        if patcher not in current_loaded_models:
            current_loaded_models.append(patcher)


def soft_empty_cache(force=False):
    _calls.append(("soft_empty_cache", (), {"force": force}))


def interrupt_current_processing(value=True):
    global interrupt_processing
    interrupt_processing = value


def processing_interrupted():
    return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()
