"""The host adapter: the only module that imports ComfyUI (`comfy`, `comfy_api`, `folder_paths`).

Inside ComfyUI every service below goes through the host: its device and dtype choices, its model manager
(`ModelPatcher` + `load_models_gpu`), its progress bar and interrupt flag, its model folders. Standalone (the
`fluxbridge` command, the tests) the same functions fall back to plain torch, tqdm, a threading.Event and one
models directory (`set_models_dir()` or `FLUXBRIDGE_MODELS`) with the same sub-folder names.

Which host we run in is read once at import (`IN_COMFY`, see `detect_host()`; tests that install stubs call it
again). torch and tqdm are imported on first use, so importing this module stays cheap.
"""
from __future__ import annotations

import importlib
import ntpath
import os
import re
import sys
import threading
import weakref

from ..common.errors import BadInput

IN_COMFY = False  # set by detect_host(): comfy.model_management, comfy.model_patcher, comfy.utils, folder_paths
_mm = _patcher = _utils = _folders = _api = None  # the host's modules when IN_COMFY (_api: comfy_api.latest)


def _optional_import(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def detect_host() -> bool:
    """(Re)read whether we run inside a ComfyUI process; return IN_COMFY.

    ComfyUI has imported its core modules before it loads any pack, so they are looked for in `sys.modules`:
    a ComfyUI folder that merely lies on `sys.path` (say, the current directory of `python -m fluxbridge`)
    does not make a host, and is not initialised by us.
    """
    global IN_COMFY, _mm, _patcher, _utils, _folders, _api
    names = ("comfy.model_management", "comfy.model_patcher", "comfy.utils", "folder_paths")
    running = "comfy.model_management" in sys.modules and "folder_paths" in sys.modules
    mods = [_optional_import(n) for n in names] if running else [None] * len(names)
    IN_COMFY = all(m is not None for m in mods)
    _mm, _patcher, _utils, _folders = mods if IN_COMFY else (None,) * len(names)
    _api = _optional_import("comfy_api.latest") if IN_COMFY else None
    return IN_COMFY


detect_host()


# ------------------------------------------------------------------------------------------- node API

def _standalone_api():
    from . import io_standalone
    return io_standalone


def comfy_io():
    """The V3 `io` namespace: `comfy_api.latest.io` in ComfyUI, our `io_standalone` stand-in otherwise."""
    return _api.io if _api is not None else _standalone_api().io


def comfy_ui():
    """The V3 `ui` namespace (`ui.PreviewText`, ...), from the same place as `comfy_io()`."""
    return _api.ui if _api is not None else _standalone_api().ui


def extension_class():
    """`ComfyExtension`, the base class of what `comfy_entrypoint()` returns."""
    return _api.ComfyExtension if _api is not None else _standalone_api().ComfyExtension


# ------------------------------------------------------------------------------------- device and dtype

def torch_device():
    """Where models compute. Standalone: `FLUXBRIDGE_DEVICE` if set, else CUDA, MPS or CPU."""
    if IN_COMFY:
        return _mm.get_torch_device()
    import torch
    if os.environ.get("FLUXBRIDGE_DEVICE"):
        return torch.device(os.environ["FLUXBRIDGE_DEVICE"])
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def offload_device():
    """Where idle models wait."""
    if IN_COMFY:
        return _mm.unet_offload_device()
    import torch
    return torch.device("cpu")


def intermediate_device():
    """Where node outputs (images, latents) live."""
    if IN_COMFY:
        return _mm.intermediate_device()
    import torch
    return torch.device("cpu")


def compute_dtype(device=None):
    """bf16 where the device does it well (the host decides inside ComfyUI), fp32 otherwise."""
    import torch
    device = torch_device() if device is None else torch.device(device)
    if IN_COMFY:
        use_bf16 = _mm.should_use_bf16(device)
    else:
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if use_bf16 else torch.float32


# ------------------------------------------------------------------------------------ memory management

LORA_HEADROOM = 2 << 30  # bytes left free beside kept originals, for the sampler's activations


def lora_originals_device(device, nbytes: int):
    """Where the original weights wait while LoRAs are applied to a model on `device` (`nbytes` of them):
    None (where they are) on the CPU, on unified memory, or where the device has room for the patched
    copies (as many bytes again) and some headroom; else the offload device, where ComfyUI keeps its own
    LoRA backups."""
    import torch
    device = torch.device(device)
    if device.type in ("cpu", "mps"):
        return None
    free = _mm.get_free_memory(device) if IN_COMFY else _free_memory(device)
    return None if free >= nbytes + LORA_HEADROOM else offload_device()


def _free_memory(device) -> int:
    """Standalone: bytes free on a CUDA device, counting what torch holds cached but unused."""
    import torch
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class Handle:
    """Standalone stand-in for ComfyUI's `ModelPatcher`: the module and the two devices it moves between."""

    def __init__(self, model, load_device, offload_device):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device

    def __repr__(self):
        return f"Handle({type(self.model).__name__}, load={self.load_device}, offload={self.offload_device})"


_resident = weakref.WeakSet()  # standalone: handles whose module sits on its load device


def wrap(module):
    """A handle for `module` that `load_to_device` understands (a `ModelPatcher` inside ComfyUI)."""
    if IN_COMFY:
        return _patcher.ModelPatcher(_holder(module), load_device=torch_device(),
                                     offload_device=offload_device())
    return Handle(module, torch_device(), offload_device())


def _holder(module):
    """ComfyUI's ModelPatcher sets attributes such as `device` on the module it manages, and diffusers /
    transformers models have a read-only `device` property: give it a plain module holding ours."""
    import torch

    class FluxBridgeModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    return FluxBridgeModel(module)


def load_to_device(handles):
    """Put these models on their load device before use; returns them as a list.

    Inside ComfyUI the model manager does it (fully: our modules are not `comfy.ops` layers, so partial
    loading would leave weights behind) and frees others as needed. Standalone, the models not named here
    go back to their offload device, so only the working set occupies the accelerator.
    """
    handles = list(handles)
    if IN_COMFY:
        _mm.load_models_gpu(handles, force_full_load=True)
        return handles
    for h in list(_resident):
        if not any(h is x for x in handles):
            if h.offload_device != h.load_device:  # `.to()` walks every parameter: only when it moves
                h.model.to(h.offload_device)
            _resident.discard(h)
    for h in handles:
        if h not in _resident:
            h.model.to(h.load_device)
            _resident.add(h)
    return handles


def soft_empty_cache():
    """Give cached accelerator memory back."""
    if IN_COMFY:
        _mm.soft_empty_cache()
        return
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------- progress and interrupt

class Interrupted(Exception):
    """Standalone: the user asked to stop. (Inside ComfyUI the host's own exception is raised instead.)"""


_interrupt = threading.Event()


def request_interrupt():
    if IN_COMFY:
        _mm.interrupt_current_processing(True)
    else:
        _interrupt.set()


def clear_interrupt():
    if IN_COMFY:
        _mm.interrupt_current_processing(False)
    else:
        _interrupt.clear()


def check_interrupt():
    """Raise if the user asked to stop; the request is consumed, as ComfyUI does."""
    if IN_COMFY:
        _mm.throw_exception_if_processing_interrupted()
    elif _interrupt.is_set():
        _interrupt.clear()
        raise Interrupted("interrupted")


class Progress:
    """A progress bar: ComfyUI's `ProgressBar` in the host, tqdm (on stderr) outside.

    Every update also checks for an interrupt, so a loop that reports progress can be stopped.
    """

    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        if IN_COMFY:
            self._bar, self._tqdm = _utils.ProgressBar(total, node_id=node_id), None
        else:
            from tqdm import tqdm
            self._bar, self._tqdm = None, tqdm(total=total, leave=False, dynamic_ncols=True)

    def update(self, n=1):
        self.update_absolute(self.current + n)

    def update_absolute(self, value, total=None, preview=None):
        check_interrupt()
        if total is not None:
            self.total = total
        value = min(value, self.total)
        if self._bar is not None:
            self._bar.update_absolute(value, total, preview)
        else:
            if total is not None:
                self._tqdm.total = total
            self._tqdm.update(value - self.current)
            if value >= self.total:
                self._tqdm.close()
        self.current = value

    def close(self):
        if self._tqdm is not None:
            self._tqdm.close()


def progress(total, node_id=None) -> Progress:
    return Progress(total, node_id=node_id)


# ----------------------------------------------------------------------------------------- model files

KINDS = {  # kind -> its sub-folders of a standalone models directory (inside ComfyUI: the host's own)
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "loras": ("loras",),
    "tokenizers/clip_l": (os.path.join("tokenizers", "clip_l"),),
    "tokenizers/t5xxl": (os.path.join("tokenizers", "t5xxl"),),
}
LEGACY = {"unet": "diffusion_models", "clip": "text_encoders"}
WEIGHT_EXTENSIONS = (".safetensors", ".sft", ".gguf")  # what our readers open (no pickle formats)
# Inside ComfyUI the tokenizers are the host's bundled copies (relative to the `comfy` package).
_BUNDLED_TOKENIZERS = {"tokenizers/clip_l": "sd1_tokenizer", "tokenizers/t5xxl": "text_encoders/t5_tokenizer"}

_models_dir = None
_output_dir = None


def set_models_dir(path):
    """Standalone: use this models directory (None: back to `FLUXBRIDGE_MODELS`)."""
    global _models_dir
    if path is not None and not os.path.isdir(path):
        raise BadInput(path, "the models folder does not exist")
    _models_dir = None if path is None else os.path.abspath(path)


def models_dir():
    """Standalone: the models directory in use, or None."""
    return _models_dir or os.environ.get("FLUXBRIDGE_MODELS") or None


def set_output_dir(path):
    """Standalone: write outputs here (None: back to `FLUXBRIDGE_OUTPUT`, else ./output)."""
    global _output_dir
    _output_dir = None if path is None else os.path.abspath(path)


def output_directory() -> str:
    if IN_COMFY:
        return _folders.get_output_directory()
    return _output_dir or os.path.abspath(os.environ.get("FLUXBRIDGE_OUTPUT") or "output")


def _kind(kind):
    kind = LEGACY.get(kind, kind)
    if kind not in KINDS:
        raise BadInput(kind, f"unknown model folder kind; expected one of {', '.join(KINDS)}")
    return kind


def folders(kind) -> list:
    """The existing directories that hold models of this kind, in lookup order."""
    kind = _kind(kind)
    if IN_COMFY:
        if kind in _BUNDLED_TOKENIZERS:
            roots = [os.path.join(os.path.dirname(_mm.__file__), _BUNDLED_TOKENIZERS[kind])]
        else:
            try:
                roots = _folders.get_folder_paths(kind)
            except KeyError:  # a ComfyUI without this folder kind
                roots = []
    else:
        base = models_dir()
        roots = [os.path.join(base, sub) for sub in KINDS[kind]] if base else []
    return [r for r in roots if os.path.isdir(r)]


def check_name(name, where):
    """Refuse names that leave their folder by their spelling: absolute, drive letters, '..' parts, NUL.

    This is all a name from a workflow is checked for beyond being listed (`model_path`): links the user
    made inside a folder are the user's and are followed; a workflow cannot make one."""
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise BadInput(repr(name), f"not a usable file name in the {where} folder")
    try:
        os.fsencode(name)
    except UnicodeError:  # e.g. a lone surrogate from a JSON escape
        raise BadInput(ascii(name), f"not a usable file name in the {where} folder") from None
    if os.path.isabs(name) or ntpath.isabs(name) or ntpath.splitdrive(name)[0]:
        raise BadInput(name, f"an absolute path leads outside the {where} folder; give a name inside it")
    if ".." in re.split(r"[\\/]", name):
        raise BadInput(name, f"a '..' part leads outside the {where} folder")
    if os.path.normpath(name) == ".":
        raise BadInput(name, f"names the {where} folder itself, not a file in it")


def walk(root):
    """`os.walk(root)` as ComfyUI lists its folders: links followed (linked files and sub-folders, other
    drives), hidden sub-folders skipped, and a link back to a folder above it not entered again (no endless
    loop). Yields (dirpath, dirnames, filenames), sorted; the caller may prune dirnames."""
    above = {root: {os.path.realpath(root)}}  # dirpath -> the real folders from root down to it
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        chain = above.pop(dirpath)
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in chain:
                keep.append(d)
                above[os.path.join(dirpath, d)] = chain | {real}
        dirnames[:] = keep
        yield dirpath, dirnames, sorted(filenames)


def _is_model_dir(filenames) -> bool:
    """A diffusers/transformers folder: listed (and resolved) as one entry."""
    return "model_index.json" in filenames or "config.json" in filenames


def _listing(kind) -> dict:
    """{name: full path} of what the kind's folders hold, the first folder winning a name: weight files
    (`WEIGHT_EXTENSIONS`) and diffusers folders (one entry each), or every file for the tokenizer kinds.
    Names are relative paths; broken links are left out."""
    tokenizers = kind.startswith("tokenizers/")
    found = {}
    for root in folders(kind):
        for dirpath, dirnames, filenames in walk(root):
            if not tokenizers and dirpath != root and _is_model_dir(filenames):
                dirnames[:] = []
                found.setdefault(os.path.relpath(dirpath, root), dirpath)
                continue
            for f in filenames:
                path = os.path.join(dirpath, f)
                if (tokenizers or f.lower().endswith(WEIGHT_EXTENSIONS)) and os.path.isfile(path):
                    found.setdefault(os.path.relpath(path, root), path)
    return found


def list_models(kind) -> list:
    """Sorted names (relative paths) of the weight files and model folders of this kind, links followed
    (see `walk`). Tokenizer kinds list every file."""
    return sorted(_listing(_kind(kind)))


def model_path(kind, name) -> str:
    """The full path of a model file or folder named by a workflow: the name must be one that
    `list_models(kind)` lists (so a workflow reaches only what the user put in the kind's folders)."""
    kind = _kind(kind)
    check_name(name, kind)
    path = _listing(kind).get(os.path.normpath(name))
    if path is not None:
        return path
    roots = folders(kind)
    if roots:
        where = ", ".join(roots)
        if not kind.startswith("tokenizers/"):
            where += f" (it lists {', '.join(WEIGHT_EXTENSIONS)} files and diffusers folders)"
    elif IN_COMFY:
        where = f"(no {kind} folder exists)"
    elif models_dir():
        where = f"(no {'/'.join(KINDS[kind])} folder under {models_dir()})"
    else:
        where = "(no models folder: pass --models DIR or set FLUXBRIDGE_MODELS)"
    raise BadInput(name, f"not found in the {kind} folder {where}")


def safe_output_path(filename_prefix, ext) -> str:
    """A new path in the output directory: '<prefix>_00001_<ext>', counting up past existing files.

    The prefix may name sub-folders (created here), also ones the user linked elsewhere; `check_name`
    refuses a prefix that leaves the folder by its spelling. `ext` is like ".safetensors" (or "" for a folder).
    """
    check_name(filename_prefix, "output")
    base = output_directory()
    subfolder, stem = os.path.split(os.path.normpath(filename_prefix))
    if not stem or stem in (".", ".."):
        raise BadInput(filename_prefix, "the prefix names no file")
    folder = os.path.join(base, subfolder)
    ext = ext if not ext or ext.startswith(".") else "." + ext
    if any(len(os.fsencode(part)) > 200 for part in re.split(r"[\\/]", filename_prefix)):
        raise BadInput(filename_prefix[:60] + "...", "a file or folder name in the prefix is over 200 bytes long")
    try:
        os.makedirs(folder, exist_ok=True)
        names = os.listdir(folder)
    except OSError as exc:  # e.g. a part of the prefix names an existing file
        raise BadInput(filename_prefix, f"cannot make the folder {folder}: {exc.strerror or exc}") from None
    taken = re.compile(re.escape(stem) + r"_(\d+)_")
    counters = [int(m.group(1)) for m in map(taken.match, names) if m]
    counter = max(counters, default=0) + 1
    path = os.path.join(folder, f"{stem}_{counter:05}_{ext}")
    while os.path.lexists(path):  # one the count missed (e.g. other case on a case-insensitive disk)
        counter += 1
        path = os.path.join(folder, f"{stem}_{counter:05}_{ext}")
    return path
