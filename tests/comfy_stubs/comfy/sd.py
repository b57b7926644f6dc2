"""Stub of `comfy.sd`: `load_diffusion_model_state_dict` (records what it was given and returns a ModelPatcher
around a module holding that state dict under `diffusion_model.`) and `CLIP` (clone / add_patches on its
patcher). Calls are recorded in `_calls`."""
import torch

from .model_patcher import ModelPatcher

_calls = []


def _module_from_state_dict(state_dict):
    """A plain module whose state dict is `state_dict` (test helper: nested modules from the dotted names)."""
    root = torch.nn.Module()
    for name, tensor in state_dict.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
    return root


def load_diffusion_model_state_dict(sd, model_options={}):
    _calls.append(("load_diffusion_model_state_dict", (dict(sd),), {"model_options": dict(model_options)}))
    model = _module_from_state_dict({"diffusion_model." + k: v for k, v in sd.items()})
    return ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


class CLIP:
    def __init__(self, target=None, embedding_directory=None, no_init=False, tokenizer_data={}, parameters=0,
                 model_options={}):
        if no_init:
            return
        raise NotImplementedError("stub: build a CLIP with CLIP._from_state_dict")

    @classmethod
    def _from_state_dict(cls, state_dict):
        """Test helper: a CLIP whose model holds `state_dict` (ComfyUI's names: `clip_l.transformer.…`)."""
        clip = cls(no_init=True)
        clip.cond_stage_model = _module_from_state_dict(state_dict)
        clip.patcher = ModelPatcher(clip.cond_stage_model, torch.device("cpu"), torch.device("cpu"))
        return clip

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)
