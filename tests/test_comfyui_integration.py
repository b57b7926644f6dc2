"""The pack inside a real ComfyUI (skipped unless COMFYUI_PATH names a ComfyUI checkout).

ComfyUI's own loader (`nodes.load_custom_node`) imports the pack from `custom_nodes/<another name>/`, in a
subprocess, with the in-process harness order of the reference (ComfyUI first on sys.path, argument parsing
enabled, `folder_paths`, then `utils.extra_config`, then `nodes`). Every node of NODE_LIST must then be
registered in `nodes.NODE_CLASS_MAPPINGS` under its schema id.

The subprocesses run with $COMFY_PY when it is set (a python with ComfyUI's requirements: einops, torchsde,
...; on a CPU-only torch also a torchvision stand-in on PYTHONPATH), else with this python.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("COMFY_PY", sys.executable)

pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

HARNESS = r"""
import asyncio, inspect, json, sys
comfy_root, pack = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_root)
sys.argv = ["main.py", "--cpu", "--disable-all-custom-nodes"]
import comfy.options
comfy.options.enable_args_parsing()
import folder_paths
import utils.extra_config  # before `nodes` (nodes.py shadows the top-level utils package)
import nodes
loaded = nodes.load_custom_node(pack, ignore=set(nodes.NODE_CLASS_MAPPINGS), module_parent="custom_nodes")
if inspect.iscoroutine(loaded):
    loaded = asyncio.run(loaded)
module = sys.modules[pack.replace(".", "_x_")]
ours = [n.GET_SCHEMA().node_id for n in sys.modules[module.__name__ + ".nodes"].NODE_LIST]
print("RESULT " + json.dumps({
    "loaded": bool(loaded), "ours": ours,
    "registered": [i for i in ours if i in nodes.NODE_CLASS_MAPPINGS],
    "in_comfy": sys.modules[module.__name__ + ".runtime.host"].IN_COMFY,
    "web": nodes.EXTENSION_WEB_DIRS.get(module.__name__) or nodes.EXTENSION_WEB_DIRS.get(pack.split("/")[-1]),
}))
"""


def test_comfyui_registers_every_node(tmp_path):
    pack = tmp_path / "custom_nodes" / "fluxbridge-under-another-name"
    pack.parent.mkdir()
    pack.symlink_to(ROOT, target_is_directory=True)
    done = subprocess.run([PYTHON, "-c", HARNESS, COMFYUI, str(pack)], capture_output=True, text=True,
                          timeout=300, cwd=COMFYUI)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"the harness failed:\n{done.stderr[-5000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert "Cannot import" not in done.stderr and "IMPORT FAILED" not in done.stderr, done.stderr[-5000:]
    assert result["loaded"] and result["in_comfy"]
    assert result["registered"] == result["ours"]
    if (ROOT / "web").is_dir():
        assert result["web"], "WEB_DIRECTORY was not registered"


PARTIAL = r"""
import importlib.util, json, sys
comfy_root, pack, models_dir = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, comfy_root)
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import folder_paths, comfy.model_management, comfy.model_patcher, comfy.utils, comfy.ops
import torch
spec = importlib.util.spec_from_file_location("fb", pack + "/__init__.py", submodule_search_locations=[pack])
sys.modules["fb"] = fb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fb)
from fb.runtime import host, models
from fb.convert.lora.formats import load_lora
assert host.IN_COMFY
g = torch.Generator().manual_seed(0)
tr, _ = models.load_transformer(models_dir + "/transformer.safetensors")
c = tr.config
x = dict(hidden_states=torch.randn(1, 16, c["in_channels"], generator=g),
         encoder_hidden_states=torch.randn(1, 8, c["joint_attention_dim"], generator=g),
         pooled_projections=torch.randn(1, c["pooled_projection_dim"], generator=g), timestep=torch.tensor([0.5]),
         img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)
te, _ = models.load_text_encoders(models_dir + "/clip.safetensors", models_dir + "/t5.safetensors")
vae, _ = models.load_vae(models_dir + "/vae.safetensors")
ids = torch.randint(0, 1000, (1, 12), generator=g)
z = torch.randn(1, 16, 4, 4, generator=g)
runs = {"transformer": (tr.handle, lambda: tr.module(**x)[0]),
        "clip": (te.clip.handle, lambda: te.clip.module(ids).pooler_output),
        "t5": (te.t5.handle, lambda: te.t5.module(ids)[0]),
        "vae": (vae.handle, lambda: vae.module.decode(z).sample)}
lora = tr.with_lora("l", load_lora(models_dir + "/lora.safetensors"), 1.0)
out = {}
with torch.no_grad():
    base = {k: v.clone() for k, v in tr.module.state_dict().items()}
    reference = {k: f() for k, (h, f) in runs.items()}
    with lora.patched():  # on the whole model
        with_lora = tr.module(**x)[0]
    with tr.patched():  # a use without the stack takes it off (it stays on after its block)
        out["removed_whole"] = all(torch.equal(v, base[k]) for k, v in tr.module.state_dict().items())
    for k, (h, f) in runs.items():
        h.load(torch.device("cpu"), lowvram_model_memory=1)  # ComfyUI on a GPU with no room for weights
        layers = [m for m in h.model.modules() if list(m.parameters(recurse=False))]
        out[k] = {"layers": len(layers), "castable": sum(isinstance(m, comfy.ops.CastWeightBiasOp) for m in layers),
                  "behind": sum(bool(getattr(m, "comfy_cast_weights", False)) for m in layers),
                  "bitwise": bool(torch.equal(f(), reference[k]))}
    with lora.patched():  # applied now to the partly loaded model
        out["lora_bitwise"] = bool(torch.equal(tr.module(**x)[0], with_lora))
    with tr.patched():  # and removed from it
        out["restored"] = all(torch.equal(v, base[k]) for k, v in tr.module.state_dict().items())
        out["base_again"] = bool(torch.equal(tr.module(**x)[0], reference["transformer"]))
    out["lora_changes"] = not torch.equal(with_lora, reference["transformer"])
print("RESULT " + json.dumps(out))
"""


def test_comfyui_loads_our_models_partly_and_they_compute_the_same(tmp_path):
    """ComfyUI's own ModelPatcher.load with a 1-byte budget leaves every layer of our transformer, CLIP-L, T5 and
    VAE that carries its cast protocol on the offload device; the outputs are bitwise unchanged, and a LoRA
    applied to the partly loaded transformer gives what it gives on the whole one and is removed bitwise (the
    base's weights and output again)."""
    from safetensors.torch import save_file
    from fluxbridge.headless import demo, factory

    tr = factory.tiny_flux_transformer(width=64, double=2, single=2)
    for name, model, layout in (("transformer", tr, "bfl"), ("clip", factory.tiny_clip_l(), "comfy"),
                                ("t5", factory.tiny_t5(), "comfy"), ("vae", factory.tiny_flux_vae(), "bfl")):
        factory.save_layout(model, tmp_path / f"{name}.safetensors", layout)
    save_file(demo.tiny_lora(tr, "peft", seed=1), str(tmp_path / "lora.safetensors"))
    done = subprocess.run([PYTHON, "-c", PARTIAL, COMFYUI, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=COMFYUI)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"the harness failed:\n{done.stderr[-5000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    for name in ("transformer", "clip", "vae"):
        r = result[name]
        assert r["castable"] == r["layers"] == r["behind"] and r["bitwise"], (name, r)
    t5 = result["t5"]  # its own RMSNorm is kept on the device: not castable, not left behind
    assert t5["castable"] == t5["behind"] < t5["layers"] and t5["bitwise"], t5
    assert result["lora_changes"] and result["removed_whole"]
    assert result["lora_bitwise"] and result["restored"] and result["base_again"]
