"""The host adapter, standalone and inside (stubbed) ComfyUI: devices, memory, progress, interrupt, files."""
import io
import os
import sys
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from fluxbridge.common.errors import BadInput


def touch(path: Path, data=b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class FakeModule:
    """Records where it is sent; holds no weights."""

    def __init__(self):
        self.moves = []

    def to(self, device):
        self.moves.append(str(device))
        return self

    def parameters(self):
        return iter(())

    buffers = parameters


# ---------------------------------------------------------------------------------------------- standalone

def test_cpu_device_and_dtype(standalone_host, monkeypatch):
    host = standalone_host
    cpu = torch.device("cpu")
    assert host.offload_device() == cpu and host.intermediate_device() == cpu
    assert host.compute_dtype(cpu) == torch.float32
    monkeypatch.setenv("FLUXBRIDGE_DEVICE", "cpu")
    assert host.torch_device() == cpu and host.compute_dtype() == torch.float32
    monkeypatch.delenv("FLUXBRIDGE_DEVICE")
    if not torch.cuda.is_available():
        assert host.torch_device().type in ("cpu", "mps")


def test_standalone_handles_keep_only_the_working_set_on_the_device(standalone_host, monkeypatch):
    host = standalone_host
    monkeypatch.setattr(host, "_free_memory", lambda device: 1 << 40)  # a roomy "cuda:0": everything fits
    a, b = FakeModule(), FakeModule()
    ha, hb = host.Handle(a, "cuda:0", "cpu"), host.Handle(b, "cuda:0", "cpu")
    assert host.load_to_device([ha]) == [ha] and a.moves == ["cuda:0"]
    host.load_to_device([hb])
    assert a.moves == ["cuda:0", "cpu"] and b.moves == ["cuda:0"]
    wrapped = host.wrap(torch.nn.Linear(2, 2))
    assert wrapped.load_device == host.torch_device() and wrapped.offload_device == host.offload_device()
    host.load_to_device([wrapped])
    host.soft_empty_cache()


def test_lora_originals_stay_unless_the_device_is_short(standalone_host, monkeypatch):
    host = standalone_host
    assert host.lora_originals_device("cpu", 10 ** 15) is None  # nothing to gain by moving on the CPU
    assert host.lora_originals_device("mps", 10 ** 15) is None  # unified memory: same RAM either way
    monkeypatch.setattr(host, "_free_memory", lambda device: 5 << 30)
    assert host.lora_originals_device("cuda:0", 2 << 30) is None  # room for them and the headroom
    assert host.lora_originals_device("cuda:0", 4 << 30) == torch.device("cpu")  # short: wait offloaded


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_outside_the_host_is_tqdm_on_a_terminal(standalone_host, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar = standalone_host.progress(4)
    assert isinstance(bar._tqdm, tqdm)
    bar.update()
    bar.update(2)
    assert bar.current == 3 and bar._tqdm.n == 3
    bar.update_absolute(9, total=10)
    assert bar.total == 10 and bar._tqdm.total == 10 and bar._tqdm.n == 9
    bar.update_absolute(50)  # clamped to the total
    assert bar.current == 10
    assert "\r" in sys.stderr.getvalue()  # tqdm drew its frames on the terminal


def test_progress_draws_nothing_into_a_pipe_or_a_file(standalone_host, monkeypatch):
    """Not a terminal: no bar and nothing written, but the count and the interrupt check still work."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bar = standalone_host.progress(4)
    assert bar._tqdm is None and standalone_host.terminal_bar(4) is None
    bar.update(2)
    bar.update_absolute(4)
    assert bar.current == 4 and err.getvalue() == ""
    standalone_host.request_interrupt()
    with pytest.raises(standalone_host.Interrupted):
        standalone_host.progress(2).update()


def test_interrupt(standalone_host):
    host = standalone_host
    host.check_interrupt()
    host.request_interrupt()
    with pytest.raises(host.Interrupted):
        host.check_interrupt()
    host.check_interrupt()  # the request was consumed
    host.request_interrupt()
    host.clear_interrupt()
    host.check_interrupt()
    bar = host.progress(3)
    host.request_interrupt()
    with pytest.raises(host.Interrupted):
        bar.update()


def test_model_lookup_and_legacy_folders(standalone_host, models_dir):
    host = standalone_host
    touch(models_dir / "diffusion_models" / "flux1-dev.safetensors")
    touch(models_dir / "unet" / "old" / "flux1-schnell.gguf")
    touch(models_dir / "unet" / "pickled.ckpt")  # our readers do not open pickles: not listed
    touch(models_dir / "diffusion_models" / ".hidden" / "x.safetensors")
    touch(models_dir / "diffusion_models" / "FLUX.1-dev" / "model_index.json", b"{}")
    touch(models_dir / "diffusion_models" / "FLUX.1-dev" / "transformer" / "a.safetensors")
    touch(models_dir / "clip" / "clip_l.safetensors")
    touch(models_dir / "tokenizers" / "clip_l" / "vocab.json", b"{}")

    expected = ["FLUX.1-dev", "flux1-dev.safetensors", os.path.join("old", "flux1-schnell.gguf")]
    assert host.list_models("diffusion_models") == sorted(expected)
    assert host.list_models("unet") == host.list_models("diffusion_models")
    assert host.list_models("clip") == host.list_models("text_encoders") == ["clip_l.safetensors"]
    assert host.list_models("tokenizers/clip_l") == ["vocab.json"]
    assert host.list_models("vae") == []

    assert host.model_path("unet", "flux1-dev.safetensors") == str(models_dir / "diffusion_models" /
                                                                   "flux1-dev.safetensors")
    assert host.model_path("diffusion_models", "old/flux1-schnell.gguf").endswith("flux1-schnell.gguf")
    assert os.path.isdir(host.model_path("diffusion_models", "FLUX.1-dev"))
    assert host.model_path("text_encoders", "clip_l.safetensors") == str(models_dir / "clip" / "clip_l.safetensors")
    assert host.folders("tokenizers/t5xxl") == [str(models_dir / "tokenizers" / "t5xxl")]

    with pytest.raises(BadInput, match="not found in the vae folder"):
        host.model_path("vae", "ae.safetensors")
    with pytest.raises(BadInput, match="unknown model folder kind"):
        host.list_models("checkpoints")


def test_models_folder_from_the_environment(standalone_host, models_dir, monkeypatch):
    host = standalone_host
    touch(models_dir / "vae" / "ae.safetensors")
    host.set_models_dir(None)
    with pytest.raises(BadInput, match="FLUXBRIDGE_MODELS"):
        host.model_path("vae", "ae.safetensors")
    assert host.list_models("vae") == []
    monkeypatch.setenv("FLUXBRIDGE_MODELS", str(models_dir))
    assert host.list_models("vae") == ["ae.safetensors"]
    with pytest.raises(BadInput, match="does not exist"):
        host.set_models_dir(models_dir / "nope")


@pytest.mark.parametrize("name", ["../secret.safetensors", "sub/../../secret.safetensors",
                                  "..\\secret.safetensors", "/etc/passwd", "C:\\models\\x.safetensors",
                                  "C:x.safetensors", "\\\\server\\share\\x.safetensors"])
def test_names_that_leave_the_folder_are_refused(standalone_host, models_dir, name):
    touch(models_dir.parent / "secret.safetensors")
    with pytest.raises(BadInput, match="outside the loras folder") as info:
        standalone_host.model_path("loras", name)
    assert info.value.path == name


def test_the_folder_itself_is_not_a_model(standalone_host):
    for name in (".", "./", "sub/.."):
        with pytest.raises(BadInput):
            standalone_host.model_path("loras", name)


def test_the_users_links_are_followed(standalone_host, models_dir, tmp_path):
    """Links the user made in a model folder are listed and load, as in ComfyUI: relative and absolute file
    links, a linked sub-folder, the folder itself a link (another drive, as far as we can tell), a diffusers
    folder linked in. A link loop ends; a broken link is not listed."""
    host = standalone_host
    store = tmp_path / "store"  # the user's model store, outside the models folder
    flux = touch(store / "flux1-dev.safetensors")
    touch(store / "styles" / "a.safetensors")
    touch(store / "styles" / "deeper" / "b.sft")
    touch(store / "FLUX.1-dev" / "model_index.json", b"{}")
    touch(store / "FLUX.1-dev" / "transformer" / "x.safetensors")
    loras, dm = models_dir / "loras", models_dir / "diffusion_models"
    (dm / "abs.safetensors").symlink_to(flux)
    (dm / "rel.safetensors").symlink_to(os.path.relpath(flux, dm))
    (dm / "FLUX.1-dev").symlink_to(store / "FLUX.1-dev", target_is_directory=True)
    (dm / "gone.safetensors").symlink_to(tmp_path / "nothing.safetensors")
    (loras / "styles").symlink_to(store / "styles", target_is_directory=True)
    (store / "styles" / "loop").symlink_to(store / "styles", target_is_directory=True)
    assert host.list_models("diffusion_models") == ["FLUX.1-dev", "abs.safetensors", "rel.safetensors"]
    assert host.list_models("loras") == [os.path.join("styles", "a.safetensors"),
                                         os.path.join("styles", "deeper", "b.sft")]
    assert host.model_path("diffusion_models", "abs.safetensors") == str(dm / "abs.safetensors")
    assert os.path.samefile(host.model_path("diffusion_models", "rel.safetensors"), flux)
    assert os.path.samefile(host.model_path("diffusion_models", "FLUX.1-dev"), store / "FLUX.1-dev")
    assert os.path.samefile(host.model_path("loras", "styles/deeper/b.sft"), store / "styles" / "deeper" / "b.sft")
    # the whole loras folder a link to another place
    (loras / "styles").unlink()
    loras.rmdir()
    loras.symlink_to(store / "styles", target_is_directory=True)
    assert host.list_models("loras") == ["a.safetensors", os.path.join("deeper", "b.sft")]
    assert os.path.samefile(host.model_path("loras", "a.safetensors"), store / "styles" / "a.safetensors")


def test_a_name_must_be_one_the_folder_lists(standalone_host, models_dir, tmp_path):
    """Following the user's links gives a workflow nothing more: a name must be listed. A decoy beside the
    folder, files the listing leaves out (pickles, a diffusers folder's insides, hidden folders, a path
    through a link loop, a broken link) are all refused, however the name is spelled."""
    host = standalone_host
    decoy = touch(tmp_path / "decoy.safetensors")
    loras = models_dir / "loras"
    touch(loras / "real.safetensors")
    touch(loras / "old.ckpt")
    touch(loras / ".cache" / "hidden.safetensors")
    touch(loras / "pipe" / "config.json", b"{}")
    touch(loras / "pipe" / "w.safetensors")
    (loras / "loop").symlink_to(loras, target_is_directory=True)
    (loras / "gone.safetensors").symlink_to(tmp_path / "nothing.safetensors")
    assert host.list_models("loras") == ["pipe", "real.safetensors"]
    assert host.model_path("loras", "./real.safetensors") == str(loras / "real.safetensors")
    for name in ("old.ckpt", ".cache/hidden.safetensors", "pipe/w.safetensors", "loop/real.safetensors",
                 "loop/loop/pipe", "gone.safetensors", "decoy.safetensors", "nothing.safetensors"):
        with pytest.raises(BadInput, match=r"not found in the loras folder .*\(it lists"):
            host.model_path("loras", name)
    for name in ("../decoy.safetensors", str(decoy), "real.safetensors\0", "sub/../../decoy.safetensors"):
        with pytest.raises(BadInput):
            host.model_path("loras", name)


def test_safe_output_path(standalone_host, tmp_path):
    host = standalone_host
    out = tmp_path / "output"
    first = host.safe_output_path("fluxbridge/transformer", ".safetensors")
    assert first == str(out / "fluxbridge" / "transformer_00001_.safetensors")
    touch(Path(first))
    assert host.safe_output_path("fluxbridge/transformer", "safetensors").endswith("transformer_00002_.safetensors")
    assert host.safe_output_path("lora", "") == str(out / "lora_00001_")
    for bad in ("../x", "a/../../x", "/tmp/x", "C:\\x", ""):
        with pytest.raises(BadInput):
            host.safe_output_path(bad, ".png")
    # a sub-folder of the output folder that the user linked elsewhere is the user's: written through
    (tmp_path / "elsewhere").mkdir()
    (out / "away").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert host.safe_output_path("away/x", ".png") == str(out / "away" / "x_00001_.png")


def test_standalone_node_api(standalone_host):
    from fluxbridge.runtime import io_standalone
    assert standalone_host.comfy_io() is io_standalone.io
    assert standalone_host.comfy_ui() is io_standalone.ui
    assert standalone_host.extension_class() is io_standalone.ComfyExtension


# -------------------------------------------------------------------------------------- inside (stubbed)

def test_a_comfyui_folder_on_sys_path_alone_is_not_a_host(monkeypatch):
    """Only a running ComfyUI (its core modules already imported) is a host; we never initialise one."""
    from fluxbridge.runtime import host
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "comfy_stubs"))
    assert not host.detect_host()
    assert "comfy.model_management" not in sys.modules and "folder_paths" not in sys.modules



def test_inside_comfy_the_model_manager_decides_how_much_to_load(comfy_stubs):
    host, mm = comfy_stubs.host, comfy_stubs.mm
    from comfy.model_patcher import ModelPatcher
    class WithDeviceProperty(torch.nn.Module):  # as diffusers / transformers models: read-only `device`
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 3)

        @property
        def device(self):
            return self.proj.weight.device

    module = WithDeviceProperty()
    handle = host.wrap(module)
    assert isinstance(handle, ModelPatcher)
    assert handle.model.inner is module and handle.load_device == mm.get_torch_device()
    assert handle.offload_device == mm.unet_offload_device()
    assert host.load_to_device([handle], memory_required=123) == [handle]
    name, (models,), kwargs = mm._calls[-1]
    assert name == "load_models_gpu" and models == [handle]
    assert kwargs["force_full_load"] is False and kwargs["memory_required"] == 123
    host.soft_empty_cache()
    assert mm._calls[-1][0] == "soft_empty_cache"


def test_inside_comfy_devices_and_dtype_come_from_the_host(comfy_stubs, monkeypatch):
    host, mm = comfy_stubs.host, comfy_stubs.mm
    assert host.IN_COMFY
    assert host.torch_device() == torch.device("cpu") and host.compute_dtype() == torch.float32
    monkeypatch.setattr(mm, "should_use_bf16", lambda device=None, *a, **k: True)
    assert host.compute_dtype() == torch.bfloat16
    monkeypatch.setattr(mm, "intermediate_device", lambda: torch.device("meta"))
    assert host.intermediate_device() == torch.device("meta")


def test_inside_comfy_free_memory_comes_from_the_host(comfy_stubs, monkeypatch):
    host, mm = comfy_stubs.host, comfy_stubs.mm
    asked = []
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: asked.append(dev) or 3 << 30)
    monkeypatch.setattr(mm, "unet_offload_device", lambda: torch.device("meta"))  # the host's choice, whatever it is
    assert host.lora_originals_device("cuda:1", 512 << 20) is None
    assert host.lora_originals_device("cuda:1", 2 << 30) == torch.device("meta")
    assert asked == [torch.device("cuda:1")] * 2


def test_inside_comfy_progress_and_interrupt(comfy_stubs):
    host, mm = comfy_stubs.host, comfy_stubs.mm
    bar = host.progress(5, node_id="7")
    assert isinstance(bar._bar, comfy_stubs.utils.ProgressBar) and bar._bar.node_id == "7"
    bar.update()
    bar.update_absolute(4, preview="P")
    assert bar._bar._seen == [(1, 5, None), (4, 5, "P")]
    host.request_interrupt()
    assert mm.processing_interrupted()
    with pytest.raises(mm.InterruptProcessingException):
        bar.update()
    host.request_interrupt()
    host.clear_interrupt()
    host.check_interrupt()


def test_inside_comfy_files_come_from_folder_paths(comfy_stubs):
    host, models = comfy_stubs.host, comfy_stubs.models
    touch(models / "unet" / "flux1-dev.safetensors")
    touch(models / "clip" / "t5xxl_fp16.safetensors")
    assert host.list_models("diffusion_models") == ["flux1-dev.safetensors"]
    assert host.model_path("unet", "flux1-dev.safetensors") == str(models / "unet" / "flux1-dev.safetensors")
    assert host.model_path("text_encoders", "t5xxl_fp16.safetensors").endswith("t5xxl_fp16.safetensors")
    with pytest.raises(BadInput, match="outside the diffusion_models folder"):
        host.model_path("diffusion_models", "../clip/t5xxl_fp16.safetensors")
    assert host.output_directory() == str(comfy_stubs.output)
    assert host.safe_output_path("fluxbridge/vae", ".safetensors").startswith(str(comfy_stubs.output))


def test_inside_comfy_extra_model_paths_and_links_are_listed(comfy_stubs, tmp_path):
    """The folders extra_model_paths.yaml adds (`add_model_folder_path`) are listed after the default one,
    links in them followed; what ComfyUI's own listing shows of them, ours shows too (our extensions)."""
    host, fp, models = comfy_stubs.host, comfy_stubs.folder_paths, comfy_stubs.models
    shared = tmp_path / "other-ui" / "models"  # e.g. a second UI's model store, on another drive
    touch(shared / "loras" / "style.safetensors")
    touch(shared / "loras" / "old.ckpt")
    touch(tmp_path / "store" / "detail.safetensors")
    (shared / "loras" / "linked").symlink_to(tmp_path / "store", target_is_directory=True)
    touch(models / "loras" / "mine.safetensors")
    fp.add_model_folder_path("loras", str(shared / "loras"))
    assert host.folders("loras") == [str(models / "loras"), str(shared / "loras")]
    ours = host.list_models("loras")
    assert ours == [os.path.join("linked", "detail.safetensors"), "mine.safetensors", "style.safetensors"]
    assert ours == [n for n in fp.get_filename_list("loras") if n.endswith(host.WEIGHT_EXTENSIONS)]
    assert os.path.samefile(host.model_path("loras", "linked/detail.safetensors"),
                            tmp_path / "store" / "detail.safetensors")
    with pytest.raises(BadInput, match="not found in the loras folder"):
        host.model_path("loras", "old.ckpt")


def test_inside_comfy_the_node_api_is_the_hosts(comfy_stubs):
    host, api = comfy_stubs.host, comfy_stubs.api
    assert host.comfy_io() is api.io and host.comfy_ui() is api.ui
    assert host.extension_class() is api.ComfyExtension
