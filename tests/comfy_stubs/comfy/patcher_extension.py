"""Stub of `comfy.patcher_extension`: the names of the ModelPatcher callbacks the host registers."""


class CallbacksMP:
    ON_LOAD = "on_load_after"  # called as callback(patcher, device_to, lowvram_model_memory, force_patch_weights,
    #                             full_load) at the end of ModelPatcher.load
