"""Shared fixtures. Also makes `import fluxbridge` mean *this* checkout, installed or not, and puts
`tests/helpers` (plain modules the test files share, e.g. `gguf_bytes`) on `sys.path`.

Never put a conftest.py at the repository root: the root is the package (it has an `__init__.py`).
"""
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUBS = Path(__file__).resolve().parent / "comfy_stubs"
STUB_MODULES = ("comfy", "comfy_api", "folder_paths")
MODEL_SUBFOLDERS = ("diffusion_models", "unet", "text_encoders", "clip", "vae", "loras",
                    "tokenizers/clip_l", "tokenizers/t5xxl")


def _bind_checkout():
    """`pip install -e .` maps `fluxbridge` to this folder; without it (or when it maps to another checkout),
    register this folder as the package, the way the editable install does."""
    spec = importlib.util.find_spec("fluxbridge")
    if spec is not None and spec.origin and Path(spec.origin).resolve() == ROOT / "__init__.py":
        return
    spec = importlib.util.spec_from_file_location("fluxbridge", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fluxbridge"] = module
    spec.loader.exec_module(module)


_bind_checkout()
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))  # importlib mode: no test dir on the path


def _is_stub_module(name):
    return any(name == m or name.startswith(m + ".") for m in STUB_MODULES)


@pytest.fixture
def models_dir(tmp_path):
    """An empty standalone models folder with every standard sub-folder (legacy names included)."""
    root = tmp_path / "models"
    for sub in MODEL_SUBFOLDERS:
        (root / sub).mkdir(parents=True)
    return root


@pytest.fixture
def standalone_host(models_dir, tmp_path, monkeypatch):
    """`fluxbridge.runtime.host` outside ComfyUI, using `models_dir` and `tmp_path/output`; restored afterwards."""
    from fluxbridge.runtime import host
    for var in ("FLUXBRIDGE_MODELS", "FLUXBRIDGE_OUTPUT", "FLUXBRIDGE_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(host, "_models_dir", None)
    monkeypatch.setattr(host, "_output_dir", None)
    assert not host.detect_host(), "ComfyUI modules are importable outside the stub fixture"
    host.set_models_dir(models_dir)
    host.set_output_dir(tmp_path / "output")
    host.clear_interrupt()
    yield host
    host.clear_interrupt()


@pytest.fixture
def on_host(standalone_host, models_dir):
    """The standalone host on `models_dir` (a module with its own models overrides `models_dir`); gives
    that folder."""
    return models_dir


@pytest.fixture
def comfy_stubs(tmp_path):
    """The ComfyUI stubs (`tests/comfy_stubs`) importable as `comfy`, `comfy_api`, `folder_paths`, laid out
    under `tmp_path/comfyui`; `fluxbridge.runtime.host` re-detects them. Undone afterwards (sys.path, sys.modules,
    host detection)."""
    saved = {name: mod for name, mod in sys.modules.items() if _is_stub_module(name)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(STUBS))
    try:
        import comfy.model_management
        import comfy.model_patcher
        import comfy.utils
        import comfy_api.latest
        import folder_paths
        from fluxbridge.runtime import host

        folder_paths._configure(tmp_path / "comfyui")
        comfy.model_management._calls.clear()
        assert host.detect_host()
        yield SimpleNamespace(host=host, mm=comfy.model_management, utils=comfy.utils,
                              folder_paths=folder_paths, api=comfy_api.latest,
                              models=Path(folder_paths.models_dir), output=Path(folder_paths.output_directory))
    finally:
        sys.path.remove(str(STUBS))
        for name in [n for n in sys.modules if _is_stub_module(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
        from fluxbridge.runtime import host
        host.detect_host()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is fastest, and immune to a busy machine's thread contention."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
