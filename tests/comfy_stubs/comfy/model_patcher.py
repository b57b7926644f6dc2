"""Stub of `comfy.model_patcher`: only what wrapping a foreign module needs."""
from . import model_management


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

    def model_size(self):
        if self.size > 0:
            return self.size
        return sum(t.nelement() * t.element_size() for t in self.model.state_dict().values())

    def is_clone(self, other):
        return getattr(other, "model", None) is self.model

    def current_loaded_device(self):
        return self.load_device if self in model_management.current_loaded_models else self.offload_device
