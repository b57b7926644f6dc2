"""Stub of `comfy.model_management`, as ComfyUI behaves with `--cpu`. Calls are recorded in `_calls`."""
import torch

_calls = []  # (function name, args, kwargs), for tests
current_loaded_models = []
interrupt_processing = False


class InterruptProcessingException(Exception):
    pass


def get_torch_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def get_free_memory(dev=None, torch_free_too=False):
    import psutil
    free = psutil.virtual_memory().available  # what ComfyUI reports for the CPU
    return (free, free) if torch_free_too else free


def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    return False


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    _calls.append(("load_models_gpu", (list(models),), {
        "memory_required": memory_required, "force_patch_weights": force_patch_weights,
        "minimum_memory_required": minimum_memory_required, "force_full_load": force_full_load}))
    for patcher in models:
        patcher.model.to(patcher.load_device)
        patcher.model.device = patcher.load_device  # as ModelPatcher.load does: the module must allow it
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
