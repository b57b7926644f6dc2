"""Stub of `comfy.model_patcher`: wrapping a module, and the patch store of a native MODEL (clone,
add_patches, patch_model / unpatch_model through `comfy.lora.calculate_weight` in float32)."""
import torch

from . import model_management


def _param(model, key):
    mod, _, leaf = key.rpartition(".")
    return (model.get_submodule(mod) if mod else model), leaf


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model = model
        if getattr(model, "device", None) is None:  # as the real one: it records the device on the module
            model.device = offload_device
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size
        self.weight_inplace_update = weight_inplace_update
        self.parent = None
        self.patches = {}  # key -> [(strength_patch, patch, strength_model, offset, function)]
        self.backup = {}

    def model_size(self):
        if self.size > 0:
            return self.size
        return sum(t.nelement() * t.element_size() for t in self.model.state_dict().values())

    def is_clone(self, other):
        return getattr(other, "model", None) is self.model

    def current_loaded_device(self):
        return self.load_device if self in model_management.current_loaded_models else self.offload_device

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
