"""Stub of `comfy.model_patcher`: wrapping a foreign module, and loading it fully or partly; the patch store of
a native MODEL (clone, add_patches, patch_model / unpatch_model through `comfy.lora.calculate_weight` in
float32).

`load` follows ComfyUI 0.3.64's `ModelPatcher.load`: every module that holds its own parameters (or carries
the cast protocol of `comfy.ops`) is a unit; the biggest go first onto the load device while the budget
`lowvram_model_memory` lasts. A unit with the cast protocol that does not fit stays on the offload device
with `comfy_cast_weights` set, so it casts its weights in as it runs; a unit without it that does not fit
simply stays where it is. `_left_behind` (a test helper) names the units that stayed behind in the last load.
"""
import torch

from . import model_management
from .patcher_extension import CallbacksMP


def _param(model, key):
    mod, _, leaf = key.rpartition(".")
    return (model.get_submodule(mod) if mod else model), leaf


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model = model
        if getattr(model, "device", None) is None:  # as the real one: it records the device on the module
            model.device = offload_device
        for name, value in (("model_loaded_weight_memory", 0), ("model_lowvram", False), ("lowvram_patch_counter", 0)):
            if not hasattr(model, name):
                setattr(model, name, value)
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size
        self.weight_inplace_update = weight_inplace_update
        self.parent = None
        self.callbacks = {}
        self._left_behind = []  # tests: names of the units the last load left on the offload device
        self.patches = {}  # key -> [(strength_patch, patch, strength_model, offset, function)]
        self.backup = {}

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = model_management.module_size(self.model)
        return self.size

    def loaded_size(self):
        return self.model.model_loaded_weight_memory

    def add_callback(self, call_type, callback):
        self.callbacks.setdefault(call_type, {}).setdefault(None, []).append(callback)

    def _units(self):
        """(bytes, name, module) of each module holding only its own parameters, or carrying the cast
        protocol; biggest first."""
        units = []
        for name, m in self.model.named_modules():
            own = dict(m.named_parameters(recurse=False))
            if any(n not in own for n, _ in m.named_parameters()):
                continue  # parameters in sub-modules: those are units of their own
            if own or hasattr(m, "comfy_cast_weights"):
                units.append((model_management.module_size(m), name, m))
        return sorted(units, key=lambda u: u[0], reverse=True)

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        used, behind = 0, []
        for size, name, m in self._units():
            castable = hasattr(m, "comfy_cast_weights")
            if not full_load and castable and used + size >= lowvram_model_memory:
                if not hasattr(m, "prev_comfy_cast_weights"):
                    m.prev_comfy_cast_weights = m.comfy_cast_weights
                m.comfy_cast_weights = True
                m.weight_function, m.bias_function = [], []
                behind.append(name)
                continue
            if castable and hasattr(m, "prev_comfy_cast_weights"):
                m.comfy_cast_weights = m.prev_comfy_cast_weights
                del m.prev_comfy_cast_weights
            if full_load or used + size < lowvram_model_memory:
                used += size
                m.to(device_to)
                m.comfy_patched_weights = True
            else:
                behind.append(name)
        if full_load and not behind:
            self.model.to(device_to)
            used = self.model_size()
        self._left_behind = behind
        self.model.model_lowvram = bool(behind)
        self.model.model_loaded_weight_memory = used
        self.model.device = device_to
        for callbacks in self.callbacks.get(CallbacksMP.ON_LOAD, {}).values():
            for callback in callbacks:
                callback(self, device_to, lowvram_model_memory, force_patch_weights, full_load)

    def partially_unload(self, device_to, memory_to_free=0):
        """Move loaded units that can cast (smallest first) back to `device_to` until `memory_to_free` bytes
        are freed; they cast their weights in from there. Returns the bytes freed."""
        freed = 0
        for size, name, m in reversed(self._units()):
            if freed >= memory_to_free:
                break
            if not getattr(m, "comfy_patched_weights", False) or not hasattr(m, "comfy_cast_weights"):
                continue
            m.to(device_to)
            m.prev_comfy_cast_weights = m.comfy_cast_weights
            m.comfy_cast_weights = True
            m.comfy_patched_weights = False
            self._left_behind.append(name)
            freed += size
        self.model.model_lowvram = True
        self.model.model_loaded_weight_memory -= freed
        return freed

    def detach(self, unpatch_all=True):
        """Everything back to the offload device, every layer back to its plain forward."""
        for m in self.model.modules():
            if hasattr(m, "prev_comfy_cast_weights"):
                m.comfy_cast_weights = m.prev_comfy_cast_weights
                del m.prev_comfy_cast_weights
            m.__dict__.pop("comfy_patched_weights", None)
        self.model.to(self.offload_device)
        self.model.device = self.offload_device
        self.model.model_lowvram = False
        self.model.model_loaded_weight_memory = 0
        self._left_behind = []
        if self in model_management.current_loaded_models:
            model_management.current_loaded_models.remove(self)
        return self.model

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size,
                           weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.backup = self.backup
        n.parent = self
        return n

    def model_state_dict(self, filter_prefix=None):
        sd = self.model.state_dict()
        return {k: v for k, v in sd.items() if filter_prefix is None or k.startswith(filter_prefix)}

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        model_sd = self.model.state_dict()
        taken = []
        for k in patches:
            key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            if key in model_sd:
                taken.append(k)
                self.patches.setdefault(key, []).append((strength_patch, patches[k], strength_model, offset, function))
        return taken

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        from .lora import calculate_weight
        for key, patches in self.patches.items():
            mod, leaf = _param(self.model, key)
            weight = getattr(mod, leaf)
            if key not in self.backup:
                self.backup[key] = weight
            out = calculate_weight(patches, weight.detach().to(torch.float32, copy=True), key)
            setattr(mod, leaf, torch.nn.Parameter(out.to(weight.dtype), requires_grad=False))
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        for key, weight in self.backup.items():
            mod, leaf = _param(self.model, key)
            setattr(mod, leaf, weight)
        self.backup.clear()
