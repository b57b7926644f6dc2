"""The pack as Python sees it: the installed `fluxbridge` package, and the folder ComfyUI imports by path."""
import asyncio
import glob
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fluxbridge
from checkout_env import checkout_env  # tests/helpers

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HEAVY = ("torch", "diffusers", "transformers", "comfy", "comfy_api", "folder_paths", "safetensors")


def _installed():
    """Whether pip installed fluxbridge here (the egg-info an editable build leaves in the checkout,
    which is on sys.path when pytest runs from it, does not count)."""
    paths = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    return any(True for _ in importlib.metadata.distributions(name="fluxbridge", path=paths))


def test_package_metadata_agrees():
    assert fluxbridge.__version__ == PYPROJECT["project"]["version"]
    assert fluxbridge.WEB_DIRECTORY == "./web"
    assert not hasattr(fluxbridge, "NODE_CLASS_MAPPINGS"), "V1 mappings would win over comfy_entrypoint"
    assert "web" not in PYPROJECT["tool"]["comfy"], "WEB_DIRECTORY already registers web/ (twice loads it twice)"
    assert "torch" not in " ".join(PYPROJECT["project"]["dependencies"])
    requirements = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip()]
    assert requirements == PYPROJECT["project"]["dependencies"]
    packages = PYPROJECT["tool"]["setuptools"]["packages"]
    for name in packages:
        assert (ROOT.joinpath(*name.split(".")[1:]) / "__init__.py").is_file(), name
    assert package_folders() <= set(packages), "a package folder is missing from pyproject's package list"


def test_package_data_carries_what_the_pack_reads():
    """A non-editable `pip install` takes the package data pyproject names: it must cover every file of the
    tokenizers the pack falls back on, the example workflows and the web extension."""
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["fluxbridge"]
    carried = {Path(p) for pattern in patterns for p in glob.glob(pattern, root_dir=ROOT, recursive=True)
               if (ROOT / p).is_file()}
    needed = {p.relative_to(ROOT) for folder, suffixes in (("tokenizers", None), ("example_workflows", {".json"}),
                                                          ("web", {".js", ".css"}))
              for p in (ROOT / folder).rglob("*") if p.is_file() and (suffixes is None or p.suffix in suffixes)}
    assert {Path("tokenizers/clip_l/vocab.json"), Path("tokenizers/t5xxl/tokenizer.json"),
            Path("tokenizers/LICENSE-t5xxl.txt")} <= needed
    assert needed - carried == set()


def package_folders():
    """Every sub-package of the checkout (folders with an __init__.py under ones that have one)."""
    found = set()
    for dirpath, dirnames, _ in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if (Path(dirpath, d) / "__init__.py").is_file()]
        found |= {".".join(("fluxbridge", *Path(dirpath, d).relative_to(ROOT).parts)) for d in dirnames}
    return found | {"fluxbridge"}


def test_importing_the_pack_is_light(tmp_path):
    """Importing the pack (and its command-line and host modules) loads no torch, diffusers or ComfyUI."""
    code = ("import sys, fluxbridge, fluxbridge.runtime.host, fluxbridge.headless.cli, fluxbridge.common.errors;"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=checkout_env(tmp_path), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.skipif(not _installed(), reason="fluxbridge is not pip-installed in this environment")
def test_installed_package_is_this_checkout(tmp_path):
    """After `pip install -e .`: `import fluxbridge` from anywhere is this folder, and the command works."""
    done = subprocess.run([sys.executable, "-c", "import fluxbridge; print(fluxbridge.__file__)"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == ROOT / "__init__.py"
    script = Path(sys.executable).parent / ("fluxbridge.exe" if os.name == "nt" else "fluxbridge")
    assert script.exists(), "the `fluxbridge` command was not installed"
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"fluxbridge {fluxbridge.__version__}"


def load_like_comfyui(pack_dir: Path):
    """What `nodes.load_custom_node` does: import <dir>/__init__.py by path under the mangled name."""
    name = str(pack_dir).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, pack_dir / "__init__.py",
                                                  submodule_search_locations=[str(pack_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_comfyui_loads_the_folder_under_any_name(tmp_path, comfy_stubs):
    pack_dir = tmp_path / "ComfyUI" / "custom_nodes" / "some_other_name.v2"
    pack_dir.parent.mkdir(parents=True)
    pack_dir.symlink_to(ROOT, target_is_directory=True)
    before = set(sys.modules)
    try:
        module = load_like_comfyui(pack_dir)
        assert module.WEB_DIRECTORY == "./web" and not hasattr(module, "NODE_CLASS_MAPPINGS")
        extension = asyncio.run(module.comfy_entrypoint())
        assert isinstance(extension, comfy_stubs.api.ComfyExtension)
        nodes = asyncio.run(extension.get_node_list())
        assert isinstance(nodes, list)
        pack_host = sys.modules[module.__name__ + ".runtime.host"]
        assert pack_host.IN_COMFY and pack_host.comfy_io() is comfy_stubs.api.io
        ids = []
        for node in nodes:
            assert issubclass(node, comfy_stubs.api.io.ComfyNode), node
            schema = node.GET_SCHEMA()
            assert schema.node_id.startswith("FluxBridge"), schema.node_id
            assert schema.category.startswith("FluxBridge/"), schema.node_id
            ids.append(schema.node_id)
        assert len(ids) == len(set(ids)), "duplicate node ids"
    finally:
        for name in set(sys.modules) - before:
            if name.startswith(str(pack_dir).replace(".", "_x_")):
                del sys.modules[name]
