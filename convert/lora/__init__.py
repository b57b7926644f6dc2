"""Flux LoRAs: every published format → canonical parts → patches on a loaded model (removable), and
back out to the formats the tools read.

    file ─ read (safetensors_io) ─ parse (formats.py) ─ resolve on the model via the layout table (patch.py)
         ─ apply / remove (apply.py) | bake while converting (bake.py) | write another format (write.py)

Public API
----------
load_lora(path_or_state_dict, metadata=None, name=None) -> Lora
    Parse any supported format (see `formats.py` for the list). `Lora.parts` is the canonical form:
    `Part(family, side, module, kind, tensors, alpha, rank, scale, ...)`; `Lora.report` is JSON-able.
    Raises `BadInput` for files that are not Flux LoRAs, NaN/inf values, empty files and pickles.
apply_loras(model, family=None, loras=[(lora_or_path, strength), ...], text_strength=None) -> LoraHandle
    Patch a diffusers FluxTransformer2DModel or a transformers CLIP-L / T5 encoder (family "flux-transformer",
    "clip-l", "t5-xxl"; guessed from the class when None). `handle.remove()` restores bitwise;
    `handle.reports` has one report per LoRA. Atomic: nothing changes unless everything was computed.
apply_to_models({family: model}, loras, strength_text=None) -> MultiHandle
inspect_lora(path) -> dict                                   (`fluxbridge lora inspect`)
looks_like_lora(keys) -> bool     LoRA tensor names (ask before model detection: tables place them too)
convert_lora(src, dst, to) -> dict, to in diffusers | bfl | kohya | comfy   (`fluxbridge lora convert`)

Baking (`fluxbridge convert --lora FILE[:STRENGTH]`) — the chosen interface:
    LoraSet.open(specs).patched_getter(family, plan_b, get_b) -> (getter, report, expanded)
        wraps the converter's per-tensor getter (diffusers-side names); each patched tensor is computed by
        `Plan.compute`, the same function `apply_loras` uses, so baked == applied, bitwise.
    patch_tensors(loras, family, side_b_weights) -> dict[name, Tensor]   (the same, for a whole mapping)
"""
from .apply import LoraHandle, MultiHandle, apply_loras, apply_to_models
from .bake import LoraSet, patch_tensors
from .formats import Lora, Part, load_lora, looks_like_lora
from .inspect import inspect_lora
from .write import convert_lora

__all__ = ["Lora", "Part", "LoraHandle", "MultiHandle", "LoraSet", "load_lora", "apply_loras",
           "apply_to_models", "inspect_lora", "convert_lora", "patch_tensors", "looks_like_lora"]
