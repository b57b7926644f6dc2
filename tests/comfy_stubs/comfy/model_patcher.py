"""Stub of `comfy.model_patcher`: wrapping a foreign module, and loading it fully or partly.

`load` follows ComfyUI 0.3.64's `ModelPatcher.load`: every module that holds its own parameters (or carries
the cast protocol of `comfy.ops`) is a unit; the biggest go first onto the load device while the budget
`lowvram_model_memory` lasts. A unit with the cast protocol that does not fit stays on the offload device
with `comfy_cast_weights` set, so it casts its weights in as it runs; a unit without it that does not fit
simply stays where it is. `_left_behind` (a test helper) names the units that stayed behind in the last load.
"""
from . import model_management
from .patcher_extension import CallbacksMP


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

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = model_management.module_size(self.model)
        return self.size

    def loaded_size(self):
        return self.model.model_loaded_weight_memory

    def is_clone(self, other):
        return getattr(other, "model", None) is self.model

    def current_loaded_device(self):
        return self.model.device

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
