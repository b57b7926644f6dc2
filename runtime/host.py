"""The host adapter: the only module that imports ComfyUI (`comfy`, `comfy_api`, `folder_paths`).

Inside ComfyUI every service below goes through the host: its device and dtype choices, its model manager
(`ModelPatcher` + `load_models_gpu`), its progress bar and interrupt flag, its model folders. Standalone (the
`fluxbridge` command, the tests) the same functions fall back to plain torch, tqdm (on a terminal only), a
threading.Event and one models directory (`set_models_dir()` or `FLUXBRIDGE_MODELS`) with the same sub-folder
names.

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
_ops = _extension = None  # comfy.ops and comfy.patcher_extension when IN_COMFY (partial loading; optional)


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
    global IN_COMFY, _mm, _patcher, _utils, _folders, _api, _ops, _extension
    names = ("comfy.model_management", "comfy.model_patcher", "comfy.utils", "folder_paths")
    running = "comfy.model_management" in sys.modules and "folder_paths" in sys.modules
    mods = [_optional_import(n) for n in names] if running else [None] * len(names)
    IN_COMFY = all(m is not None for m in mods)
    _mm, _patcher, _utils, _folders = mods if IN_COMFY else (None,) * len(names)
    _api = _optional_import("comfy_api.latest") if IN_COMFY else None
    _ops = _optional_import("comfy.ops") if IN_COMFY else None
    _extension = _optional_import("comfy.patcher_extension") if IN_COMFY else None
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
#
# Inside ComfyUI our models take part in its memory management like native ones. ComfyUI's partial
# ("lowvram") loading keeps the layers that do not fit on the offload device and has each of them fetch its
# weights as it runs; it does that for layers carrying its cast-and-move protocol (`comfy_cast_weights`,
# `weight_function`, `bias_function`, a forward that takes its weights through `comfy.ops.cast_bias_weight`).
# `make_castable` gives our diffusers/transformers layers that protocol by turning each standard torch layer
# into ComfyUI's own `comfy.ops.disable_weight_init` class of the same kind: same parameters, and the same
# forward (the torch one) until ComfyUI marks the layer to stay behind. What ComfyUI cannot stream (layers of
# other classes, such as T5's own RMSNorm, and buffers such as CLIP's position ids: all small) is kept on the
# compute device whenever ComfyUI loads the model (`_keep_on_device`). Standalone, nothing changes here:
# `load_to_device` moves whole models, or hands a model that does not fit to diffusers' group offloading.

HEADROOM = 2 << 30  # bytes left free on the device beside weights, for the sampler's activations
ROLES = ("diffusion", "text_encoder", "vae")  # which of ComfyUI's device rules a model follows

_lowvram = False  # standalone: group-offload every model that runs on a CUDA device (`fluxbridge run --lowvram`)


def devices(role: str = "diffusion"):
    """(load device, offload device) for a model of this role: ComfyUI's rules for its diffusion models, text
    encoders (`text_encoder_device`: the GPU only with normal or high VRAM, else the CPU) and VAEs inside
    ComfyUI; `torch_device()` and the CPU standalone."""
    if role not in ROLES:
        raise ValueError(f"unknown model role {role!r}; expected one of {', '.join(ROLES)}")
    if not IN_COMFY:
        return torch_device(), offload_device()
    if role == "text_encoder":
        return _mm.text_encoder_device(), _mm.text_encoder_offload_device()
    if role == "vae":
        return _mm.vae_device(), _mm.vae_offload_device()
    return _mm.get_torch_device(), _mm.unet_offload_device()


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
    return None if free >= nbytes + HEADROOM else offload_device()


def _free_memory(device) -> int:
    """Standalone: bytes free on a CUDA device, counting what torch holds cached but unused, within the
    process's share of the device (`torch.cuda.set_per_process_memory_fraction`)."""
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    free += torch.cuda.memory_reserved(device) - allocated
    share = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if share is not None:
        free = min(free, int(share(device) * total) - allocated)
    return max(free, 0)


def _castable_classes() -> dict:
    """torch layer class -> ComfyUI's `comfy.ops.disable_weight_init` class of the same name, where that class
    derives from the torch one (so its plain forward is torch's own)."""
    import torch
    found = {}
    ops = getattr(_ops, "disable_weight_init", None)
    for name in ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "GroupNorm",
                 "LayerNorm", "RMSNorm", "Embedding"):
        torch_class, comfy_class = getattr(torch.nn, name, None), getattr(ops, name, None)
        if torch_class is not None and isinstance(comfy_class, type) and issubclass(comfy_class, torch_class):
            found[torch_class] = comfy_class
    return found


def _quantized(module) -> bool:
    """A parameter held as a tensor subclass (torchao): not something ComfyUI's cast can move."""
    import torch
    return any(type(p.data) is not torch.Tensor for p in module.parameters(recurse=False))


def make_castable(module):
    """Inside ComfyUI: turn every plain torch layer of `module` (Linear, Conv, GroupNorm, LayerNorm, RMSNorm,
    Embedding; exactly those classes, not subclasses) into ComfyUI's `comfy.ops` class of the same kind, in
    place, so ComfyUI can leave it on the offload device and cast it in as it runs. Call it before anything
    wraps the layers' forward (diffusers' layerwise casting): a layer with its own `forward` attribute is
    left as it is, unless that forward calls the class's own at each call (`follows_class`: the fp8 upcast of
    `convert.upcast`). Standalone (or without `comfy.ops`): the module is returned unchanged. Returns `module`."""
    if not IN_COMFY or _ops is None:
        return module
    classes = _castable_classes()
    for layer in module.modules():
        target = classes.get(type(layer))
        wrapped = "forward" in layer.__dict__ and not getattr(layer.forward, "follows_class", False)
        if target is None or wrapped or _quantized(layer):
            continue
        layer.__class__ = target
        layer.weight_function, layer.bias_function = [], []  # per layer (ComfyUI's defaults are class-wide)
        if not hasattr(layer, "bias"):  # Embedding, RMSNorm: the cast reads `.bias` (ComfyUI's own init sets it)
            layer.bias = None
    return module


def _holder(module):
    """ComfyUI's ModelPatcher sets attributes such as `device` on the module it manages, and diffusers /
    transformers models have a read-only `device` property: give it a plain module holding ours.
    `streamable`: whether ComfyUI may load the model partially (no quantized tensor subclass in it, which its
    cast cannot move: such a model is loaded whole)."""
    import torch

    class FluxBridgeModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.streamable = not any(_quantized(m) for m in inner.modules())

    return FluxBridgeModel(module)


def _keep_on_device(patcher, device_to, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
    """ComfyUI callback after it loaded a model (fully or partially): the parts it cannot stream (parameters
    of layers without the cast protocol, and every buffer) go to the compute device too, since those layers
    use them where they lie. They are small: T5's RMSNorm scales, CLIP's position ids."""
    if device_to is None:
        return
    for layer in patcher.model.modules():
        if not hasattr(layer, "comfy_cast_weights"):  # (ComfyUI's own layers hold no buffers)
            layer._apply(lambda t: t.to(device_to), recurse=False)  # this layer's own tensors, as `.to()` moves them


class Handle:
    """Standalone stand-in for ComfyUI's `ModelPatcher`: the module and the two devices it moves between;
    `group_offloaded` once diffusers' group offloading runs it (see `load_to_device`)."""

    def __init__(self, model, load_device, offload_device):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.group_offloaded = False

    def __repr__(self):
        return f"Handle({type(self.model).__name__}, load={self.load_device}, offload={self.offload_device})"


_resident = weakref.WeakSet()  # standalone: handles whose module sits whole on its load device


def wrap(module, role: str = "diffusion"):
    """A handle for `module` that `load_to_device` understands: a `ModelPatcher` inside ComfyUI (with the
    devices of the model's role, and `make_castable` layers), a `Handle` standalone. The module records its
    load device as where it computes (`pipeline.device`), since partly loaded it has weights elsewhere."""
    from ..pipeline.device import set_execution_device
    load, offload = devices(role)
    if IN_COMFY:
        holder = _holder(make_castable(module))
        handle = _patcher.ModelPatcher(holder, load_device=load, offload_device=offload)
        if _extension is not None:
            handle.add_callback(_extension.CallbacksMP.ON_LOAD, _keep_on_device)
    else:
        handle = Handle(module, load, offload)
    set_execution_device(module, load)
    return handle


def set_lowvram(on: bool) -> bool:
    """Standalone: group-offload every model that runs on a CUDA device, fitting or not (`--lowvram`).
    Returns the previous setting."""
    global _lowvram
    previous, _lowvram = _lowvram, bool(on)
    return previous


def load_to_device(handles, memory_required: int = 0):
    """Put these models on their load device before use; returns them as a list. `memory_required`: bytes
    the work about to run needs beside the weights (activations), so the weights leave room for it.

    Inside ComfyUI the model manager does it, as for its native models: it frees other models as needed and
    loads ours whole or, when they do not fit, partly (the rest is streamed in per layer as it runs; see
    `make_castable`); the vram-state flags (--lowvram, --novram, --highvram, --gpu-only, --reserve-vram)
    apply. A model holding quantized tensor subclasses asks for a full load; --novram loads it partly all the
    same, and then its quantized layers, which are not castable (`make_castable`), are kept on the compute
    device by `_keep_on_device`. Standalone, the models not named
    here go back to their offload device, so only the working set occupies the accelerator; a model that
    does not fit (or every model on a CUDA device under `set_lowvram(True)`) runs with diffusers' group
    offloading instead (`runtime/offload.py`).
    """
    handles = list(handles)
    if IN_COMFY:
        whole = not all(getattr(h.model, "streamable", False) for h in handles)
        _mm.load_models_gpu(handles, memory_required=memory_required, force_full_load=whole)
        return handles
    for h in list(_resident):
        if not any(h is x for x in handles):
            if h.offload_device != h.load_device:  # `.to()` walks every parameter: only when it moves
                h.model.to(h.offload_device)
            _resident.discard(h)
    for h in handles:
        if h in _resident or h.group_offloaded:  # a group-offloaded model brings its blocks in itself
            continue
        if _needs_group_offload(h, memory_required):
            from . import offload
            offload.enable(h.model, h.load_device, h.offload_device)
            h.group_offloaded = True
            continue
        h.model.to(h.load_device)
        _resident.add(h)
    return handles


def _needs_group_offload(handle, memory_required: int) -> bool:
    from . import offload
    device = handle.load_device
    return offload.should_offload(device, offload.model_bytes(handle.model), _free_memory(device),
                                  headroom=max(HEADROOM, memory_required), forced=_lowvram)


def weights_changed(module) -> None:
    """Tell the host that `module`'s weights were changed in place (LoRA applied or removed). Standalone, a
    group-offloaded module must re-read them (diffusers keeps its own pinned copies); ComfyUI needs nothing:
    our swaps keep each parameter's device, dtype and size, which is all its bookkeeping records."""
    if not IN_COMFY:
        from . import offload
        offload.refresh(module)


def soft_empty_cache():
    """Give cached accelerator memory back."""
    if IN_COMFY:
        _mm.soft_empty_cache()
        return
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ ComfyUI's native models

def _need_comfy(what: str) -> None:
    if not IN_COMFY:
        raise BadInput(what, "needs ComfyUI: it works on ComfyUI's native MODEL / CLIP (run the workflow in ComfyUI)")


def native_state_shapes(native) -> dict:
    """State-dict key -> logical shape of a native MODEL (a `ModelPatcher`) or CLIP (its `.patcher`); a
    quantized tensor (ComfyUI-GGUF) gives its unpacked shape."""
    _need_comfy("native model")
    patcher = getattr(native, "patcher", native)
    return {k: tuple(getattr(v, "tensor_shape", None) or v.shape) for k, v in patcher.model_state_dict().items()}


def patched_clone(native, batches, strength: float):
    """(clone, number of patches ComfyUI took): a clone of a native MODEL or CLIP with our patches added
    (`convert.lora.native.NativePatch`, in `add_patches` calls as `NativePlan.batches()` splits them).
    ComfyUI's ModelPatcher applies them when it loads the model, keeps the backups and restores them."""
    _need_comfy("native model")
    clone = native.clone()
    taken = 0
    for batch in batches:
        taken += len(clone.add_patches({_patch_key(p): _comfy_patch(p) for p in batch}, strength))
    return clone, taken


def _patch_key(p):
    """ComfyUI's patch key: the tensor's key, or (key, (dim, start, length)[, function on the delta])."""
    if p.swap:
        from ..convert.table import swap_halves
        return (p.key, (0, *p.rows) if p.rows else None, swap_halves)
    return (p.key, (0, *p.rows)) if p.rows else p.key


def _comfy_patch(p):
    if p.kind in ("diff", "set"):
        return (p.kind, p.weights)
    adapters = importlib.import_module("comfy.weight_adapter")
    if p.kind == "dora":
        return _dora_adapter(adapters)(set(), p.weights)
    cls = {"lora": adapters.LoRAAdapter, "loha": adapters.LoHaAdapter, "lokr": adapters.LoKrAdapter}[p.kind]
    return cls(set(), p.weights)


_DORA = None


def _dora_adapter(adapters):
    """A ComfyUI weight adapter whose arithmetic is ours (`native.dora_update`): see convert/lora/native.py."""
    global _DORA
    if _DORA is None or not issubclass(_DORA, adapters.WeightAdapterBase):
        from ..convert.lora.native import dora_update

        class FluxBridgeDoRA(adapters.WeightAdapterBase):
            name = "fluxbridge_dora"

            def __init__(self, loaded_keys, weights):
                self.loaded_keys = loaded_keys
                self.weights = weights  # (part, swap)

            def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                                 intermediate_dtype=None, original_weight=None):
                part, swap = self.weights
                return dora_update(weight, part, strength, swap)

        _DORA = FluxBridgeDoRA
    return _DORA


def native_diffusion_model(state_dict, dtype=None, fp8_fast: bool = False, name: str = "model"):
    """ComfyUI's own MODEL built from a diffusion model's state dict in its original layout (what UNETLoader
    does with a file): `dtype` (a torch dtype or None for ComfyUI's choice) is UNETLoader's weight_dtype."""
    _need_comfy(name)
    options = {}
    if dtype is not None:
        options["dtype"] = dtype
    if fp8_fast:
        options["fp8_optimizations"] = True
    model = importlib.import_module("comfy.sd").load_diffusion_model_state_dict(state_dict, model_options=options)
    if model is None:
        raise BadInput(name, "ComfyUI does not recognise these weights as a diffusion model it can build")
    return model


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


def terminal_bar(total, **options):
    """Standalone: a tqdm bar on stderr when stderr is a terminal; else None. A pipe or a log file gets no
    bar at all (tqdm's carriage-return frames would fill it), so a failing command's stderr is its one
    error line."""
    try:
        interactive = sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        interactive = False
    if not interactive:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, **options)


class Progress:
    """A progress bar: ComfyUI's `ProgressBar` in the host, `terminal_bar` (tqdm on a terminal) outside.

    Every update also checks for an interrupt, so a loop that reports progress can be stopped.
    """

    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        if IN_COMFY:
            self._bar, self._tqdm = _utils.ProgressBar(total, node_id=node_id), None
        else:
            self._bar, self._tqdm = None, terminal_bar(total, leave=False, dynamic_ncols=True)

    def update(self, n=1):
        self.update_absolute(self.current + n)

    def update_absolute(self, value, total=None, preview=None):
        check_interrupt()
        if total is not None:
            self.total = total
        value = min(value, self.total)
        if self._bar is not None:
            self._bar.update_absolute(value, total, preview)
        elif self._tqdm is not None:
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
    "style_models": ("style_models",),  # FLUX.1 Redux (ComfyUI's folder for it)
    "clip_vision": ("clip_vision",),  # the SigLIP vision tower Redux reads
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
    """Standalone: use this models directory (None: back to `FLUXBRIDGE_MODELS`). Returns the one set before
    (None: none was), to put back."""
    global _models_dir
    if path is not None and not os.path.isdir(path):
        raise BadInput(path, "the models folder does not exist")
    before, _models_dir = _models_dir, None if path is None else os.path.abspath(path)
    return before


def models_dir():
    """Standalone: the models directory in use, or None."""
    return _models_dir or os.environ.get("FLUXBRIDGE_MODELS") or None


def set_output_dir(path):
    """Standalone: write outputs here (None: back to `FLUXBRIDGE_OUTPUT`, else ./output). Returns the one set
    before (None: none was), to put back."""
    global _output_dir
    before, _output_dir = _output_dir, None if path is None else os.path.abspath(path)
    return before


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


def model_choices(kind) -> list:
    """`list_models(kind)` for a combo's choices: empty when the folders cannot be listed, since a node's
    schema must build all the same (a name then fails validation, naming the folder)."""
    try:
        return list_models(kind)
    except Exception:  # noqa: BLE001
        return []


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
