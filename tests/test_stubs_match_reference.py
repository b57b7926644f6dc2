"""The ComfyUI stubs keep the real signatures.

Each expected signature is ComfyUI 0.3.64's. The last column of a row says where it was read: "reference
N.N" is a section of the team's notes on the ComfyUI host (kept outside this repository), "source" is
ComfyUI 0.3.64's own code (comfy/model_management.py, comfy/model_patcher.py, comfy/utils.py,
folder_paths.py, comfy_api/latest). With COMFYUI_PATH set, the stubs are also compared with the real
functions (in a subprocess), which needs neither. That subprocess runs with $COMFY_PY when it is set (a python
with ComfyUI's requirements; on a CPU-only torch also a torchvision stand-in on PYTHONPATH), else with this
python (which then needs ComfyUI's requirements itself).
"""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STUBS = Path(__file__).resolve().parent / "comfy_stubs"

# (module, attribute path, expected signature, where it comes from). "..." at the end: a prefix.
EXPECTED = [
    ("comfy.model_management", "get_torch_device", "()", "reference 3.1"),
    ("comfy.model_management", "unet_offload_device", "()", "reference 3.1"),
    ("comfy.model_management", "intermediate_device", "()", "reference 3.1"),
    ("comfy.model_management", "should_use_bf16",
     "(device=None, model_params=0, prioritize_performance=True, manual_cast=False)", "reference 3.1 + source"),
    ("comfy.model_management", "load_models_gpu",
     "(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False)",
     "reference 3.1"),
    ("comfy.model_management", "soft_empty_cache", "(force=False)", "reference 3.1"),
    ("comfy.model_management", "get_free_memory", "(dev=None, torch_free_too=False)", "reference 3.1"),
    ("comfy.model_management", "processing_interrupted", "()", "reference 3.1"),
    ("comfy.model_management", "throw_exception_if_processing_interrupted", "()", "reference 3.1"),
    ("comfy.model_management", "interrupt_current_processing", "(value=True)", "reference 3.1 + source"),
    ("comfy.model_management", "text_encoder_device", "()", "reference 3.1"),
    ("comfy.model_management", "text_encoder_offload_device", "()", "reference 3.1"),
    ("comfy.model_management", "vae_device", "()", "reference 3.1"),
    ("comfy.model_management", "vae_offload_device", "()", "reference 3.1"),
    ("comfy.model_management", "is_device_cpu", "(device)", "reference 3.1"),
    ("comfy.model_management", "module_size", "(module)", "source (l.440)"),
    ("comfy.model_management", "extra_reserved_memory", "()", "source (l.563)"),
    ("comfy.model_management", "minimum_inference_memory", "()", "source (l.566)"),
    ("comfy.model_management", "cast_to",
     "(weight, dtype=None, device=None, non_blocking=False, copy=False, stream=None)", "source (l.1055)"),
    ("comfy.model_patcher", "ModelPatcher",
     "(model, load_device, offload_device, size=0, weight_inplace_update=False)", "reference 3.2"),
    ("comfy.model_patcher", "ModelPatcher.load",
     "(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False)",
     "reference 3.2 (l.636) + source"),
    ("comfy.model_patcher", "ModelPatcher.partially_unload", "(self, device_to, memory_to_free=0)", "source (l.800)"),
    ("comfy.model_patcher", "ModelPatcher.detach", "(self, unpatch_all=True)", "source (l.890)"),
    ("comfy.model_patcher", "ModelPatcher.add_callback", "(self, call_type, callback)", "source (l.913)"),
    ("comfy.model_patcher", "ModelPatcher.model_size", "(self)", "source (l.272)"),
    ("comfy.model_patcher", "ModelPatcher.loaded_size", "(self)", "source (l.278)"),
    ("comfy.ops", "cast_bias_weight", "(s, input=None, dtype=None, device=None, bias_dtype=None)",
     "reference 3.2 + source (comfy/ops.py l.61)"),
    ("comfy.ops", "disable_weight_init.Linear.forward_comfy_cast_weights", "(self, input)", "source"),
    ("comfy.ops", "disable_weight_init.Conv2d.forward_comfy_cast_weights", "(self, input)", "source"),
    ("comfy.ops", "disable_weight_init.GroupNorm.forward_comfy_cast_weights", "(self, input)", "source"),
    ("comfy.ops", "disable_weight_init.LayerNorm.forward_comfy_cast_weights", "(self, input)", "source"),
    ("comfy.ops", "disable_weight_init.RMSNorm.forward_comfy_cast_weights", "(self, input)", "source"),
    ("comfy.ops", "disable_weight_init.Embedding.forward_comfy_cast_weights", "(self, input, out_dtype=None)",
     "source"),
    ("comfy.model_patcher", "ModelPatcher.clone", "(self)", "source"),
    ("comfy.model_patcher", "ModelPatcher.add_patches", "(self, patches, strength_patch=1.0, strength_model=1.0)",
     "source"),
    ("comfy.model_patcher", "ModelPatcher.model_state_dict", "(self, filter_prefix=None)", "source"),
    ("comfy.model_patcher", "ModelPatcher.patch_model",
     "(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False)", "source"),
    ("comfy.model_patcher", "ModelPatcher.unpatch_model", "(self, device_to=None, unpatch_weights=True)", "source"),
    ("comfy.lora", "calculate_weight",
     "(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None)", "source"),
    ("comfy.weight_adapter", "LoRAAdapter", "(loaded_keys, weights)", "source"),
    ("comfy.weight_adapter", "LoHaAdapter", "(loaded_keys, weights)", "source"),
    ("comfy.weight_adapter", "LoKrAdapter", "(loaded_keys, weights)", "source"),
    ("comfy.weight_adapter", "WeightAdapterBase.calculate_weight",
     "(self, weight, key, strength, strength_model, offset, function, intermediate_dtype=torch.float32, "
     "original_weight=None)", "source"),
    ("comfy.sd", "load_diffusion_model_state_dict", "(sd, model_options={})", "source"),
    ("comfy.sd", "CLIP", "(target=None, embedding_directory=None, no_init=False, tokenizer_data={}, parameters=0, "
     "model_options={})", "source"),
    ("comfy.sd", "CLIP.clone", "(self)", "source"),
    ("comfy.sd", "CLIP.add_patches", "(self, patches, strength_patch=1.0, strength_model=1.0)", "source"),
    ("comfy.utils", "ProgressBar", "(total, node_id=None)", "reference 3.3"),
    ("comfy.utils", "ProgressBar.update", "(self, value)", "reference 3.3 ('n') + source"),
    ("comfy.utils", "ProgressBar.update_absolute", "(self, value, total=None, preview=None)", "reference 3.3"),
    ("folder_paths", "map_legacy", "(folder_name)", "reference 3.4 + source"),
    ("folder_paths", "get_filename_list", "(folder_name)", "reference 3.4 ('folder') + source"),
    ("folder_paths", "get_full_path", "(folder_name, filename)", "reference 3.4 + source"),
    ("folder_paths", "get_full_path_or_raise", "(folder_name, filename)", "reference 3.4 + source"),
    ("folder_paths", "get_folder_paths", "(folder_name)", "reference 3.4"),
    ("folder_paths", "add_model_folder_path", "(folder_name, full_folder_path, is_default=False)",
     "reference 3.4 ('name, path') + source"),
    ("folder_paths", "get_output_directory", "()", "reference 3.4"),
    ("comfy_api.latest", "ComfyExtension.get_node_list", "(self)", "reference 2.1"),
    ("comfy_api.latest", "io.NodeOutput", "(*args, ui=None, expand=None, block_execution=None)",
     "reference 2.1 ('*values') + source"),
    ("comfy_api.latest", "io.Image.Output", "(id=None, display_name=None, tooltip=None, is_output_list=False)",
     "reference 2.1"),
    ("comfy_api.latest", "io.Image.Input", "(id, display_name=None, optional=False, tooltip=None, lazy=None, ...)",
     "reference 2.1"),
    ("comfy_api.latest", "io.Latent.Input", "(id, display_name=None, optional=False, tooltip=None, lazy=None, ...)",
     "reference 2.1"),
    ("comfy_api.latest", "io.Int.Input", "(id, display_name=None, optional=False, tooltip=None, lazy=None, "
     "default=None, min=None, max=None, step=None, control_after_generate=None, display_mode=None, ...)",
     "reference 2.1 + source"),
    ("comfy_api.latest", "io.Float.Input", "(id, display_name=None, optional=False, tooltip=None, lazy=None, "
     "default=None, min=None, max=None, step=None, round=None, display_mode=None, ...)", "reference 2.1 + source"),
    ("comfy_api.latest", "io.String.Input", "(id, display_name=None, optional=False, tooltip=None, lazy=None, "
     "multiline=False, placeholder=None, default=None, dynamic_prompts=None, ...)", "reference 2.1 + source"),
    ("comfy_api.latest", "io.Combo.Input", "(id, options=None, display_name=None, optional=False, tooltip=None, "
     "lazy=None, default=None, control_after_generate=None, upload=None, image_folder=None, remote=None, ...)",
     "reference 2.1 + source"),
    ("comfy_api.latest", "ui.PreviewText", "(value, **kwargs)", "reference 2.1 + source"),
]
MUST_EXIST = [  # names the host or nodes use whose signature does not matter (classes, constants)
    ("comfy.model_management", "InterruptProcessingException"),
    ("comfy.weight_adapter", "WeightAdapterBase"),
    ("folder_paths", "folder_names_and_paths"),
    ("comfy_api.latest", "io.ComfyNode.define_schema"), ("comfy_api.latest", "io.ComfyNode.execute"),
    ("comfy_api.latest", "io.ComfyNode.GET_SCHEMA"), ("comfy_api.latest", "io.Schema"),
    ("comfy_api.latest", "io.Custom"), ("comfy_api.latest", "io.Boolean.Input"),
    ("comfy_api.latest", "io.Mask.Input"), ("comfy_api.latest", "io.Conditioning.Input"),
    ("comfy_api.latest", "io.Sigmas.Output"),
    ("comfy.model_management", "VRAMState.NO_VRAM"), ("comfy.model_management", "VRAMState.NORMAL_VRAM"),
    ("comfy.model_management", "vram_state"), ("comfy.model_management", "MIN_WEIGHT_MEMORY_RATIO"),
    ("comfy.ops", "CastWeightBiasOp.comfy_cast_weights"), ("comfy.ops", "CastWeightBiasOp.weight_function"),
    ("comfy.patcher_extension", "CallbacksMP.ON_LOAD"),
]
# ComfyUI's layer classes derive from the torch layer of the same name (what `host.make_castable` relies on)
OPS_BASES = ("Linear", "Conv2d", "GroupNorm", "LayerNorm", "RMSNorm", "Embedding")


def resolve(module, path):
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def plain_signature(obj) -> str:
    """The signature without annotations (real ComfyUI annotates some, the reference does not)."""
    sig = inspect.signature(obj)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def matches(actual: str, expected: str) -> bool:
    if expected.endswith(", ...)"):
        return actual.startswith(expected[:-len(", ...)")] + ",") or actual == expected[:-len(", ...)")] + ")"
    return actual == expected


@pytest.mark.parametrize("module_name,path,expected,source", EXPECTED, ids=[f"{m}.{p}" for m, p, *_ in EXPECTED])
def test_stub_signature_matches_the_reference(comfy_stubs, module_name, path, expected, source):
    import importlib
    actual = plain_signature(resolve(importlib.import_module(module_name), path))
    assert matches(actual, expected), f"{module_name}.{path}{actual} drifted from {expected} ({source})"


def test_stub_surface_exists(comfy_stubs):
    import importlib
    import torch
    for module_name, path in MUST_EXIST:
        resolve(importlib.import_module(module_name), path)
    ops = importlib.import_module("comfy.ops")
    for name in OPS_BASES:
        assert issubclass(getattr(ops.disable_weight_init, name), getattr(torch.nn, name)), name
    assert importlib.import_module("comfy.patcher_extension").CallbacksMP.ON_LOAD == "on_load_after"
    assert inspect.isabstract(comfy_stubs.api.ComfyExtension)
    assert inspect.iscoroutinefunction(comfy_stubs.api.ComfyExtension.get_node_list)
    assert issubclass(comfy_stubs.mm.InterruptProcessingException, Exception)


PROBE = r"""
import importlib, inspect, json, sys
sys.path.insert(0, sys.argv[1])
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
out = {}
for module_name, path in json.loads(sys.stdin.read()):
    try:
        obj = importlib.import_module(module_name)
        for part in path.split("."):
            obj = getattr(obj, part)
        sig = inspect.signature(obj)
        params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
        out[module_name + ":" + path] = str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))
    except Exception as exc:
        out[module_name + ":" + path] = "ERROR " + repr(exc)
print("SIGNATURES " + json.dumps(out))
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to compare with a real ComfyUI")
def test_stubs_match_a_real_comfyui(comfy_stubs):
    import importlib
    names = [(m, p) for m, p, *_ in EXPECTED]
    python = os.environ.get("COMFY_PY", sys.executable)
    done = subprocess.run([python, "-c", PROBE, os.environ["COMFYUI_PATH"]], input=json.dumps(names),
                          capture_output=True, text=True, timeout=300, cwd=os.environ["COMFYUI_PATH"])
    line = [l for l in done.stdout.splitlines() if l.startswith("SIGNATURES ")]
    assert line, done.stderr[-3000:]
    real = json.loads(line[-1][len("SIGNATURES "):])
    drift = []
    for module_name, path, expected, _ in EXPECTED:
        ours = plain_signature(resolve(importlib.import_module(module_name), path))
        theirs = real[f"{module_name}:{path}"]
        if ours != theirs and not (expected.endswith(", ...)") and matches(theirs, expected)):
            drift.append(f"{module_name}.{path}: stub {ours}, ComfyUI {theirs}")
    assert not drift, "\n".join(drift)
