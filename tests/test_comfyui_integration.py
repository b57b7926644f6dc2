"""The pack inside a real ComfyUI (skipped unless COMFYUI_PATH names a ComfyUI checkout).

ComfyUI's own loader (`nodes.load_custom_node`) imports the pack from `custom_nodes/<another name>/`, in a
subprocess, with the in-process harness order of the reference (ComfyUI first on sys.path, argument parsing
enabled, `folder_paths`, then `utils.extra_config`, then `nodes`). Every node of NODE_LIST must then be
registered in `nodes.NODE_CLASS_MAPPINGS` under its schema id.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI = os.environ.get("COMFYUI_PATH")

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
    done = subprocess.run([sys.executable, "-c", HARNESS, COMFYUI, str(pack)], capture_output=True, text=True,
                          timeout=300, cwd=COMFYUI)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"the harness failed:\n{done.stderr[-5000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert "Cannot import" not in done.stderr and "IMPORT FAILED" not in done.stderr, done.stderr[-5000:]
    assert result["loaded"] and result["in_comfy"]
    assert result["registered"] == result["ours"]
    if (ROOT / "web").is_dir():
        assert result["web"], "WEB_DIRECTORY was not registered"
