"""The model objects that FluxBridge nodes pass to each other, the load cache, and the tokenizer lookup.

Model objects (the custom socket types):

* `TransformerModel` (`FLUXBRIDGE_TRANSFORMER`): the diffusers `FluxTransformer2DModel`, its host handle
  (`host.wrap`: a `ModelPatcher` inside ComfyUI), what was detected (family, layout, variant, config), the
  load report, and the LoRA stack.
* `TextEncoders` (`FLUXBRIDGE_TEXT_ENCODERS`): CLIP-L and T5 (each an `Encoder`: model + handle + what was
  detected), their tokenizers and where those came from, and the LoRA stack for their parts.
* `VAEModel` (`FLUXBRIDGE_VAE`): the diffusers `AutoencoderKL`, its handle and latent format (scale, shift,
  channels).
* `ReduxModel` (`FLUXBRIDGE_REDUX`): the FLUX.1 Redux image encoder and the SigLIP vision tower it reads (each
  an `Encoder`), and the tower's pixel size, mean and std.

Caching and LoRAs (the design, in short):

* A loaded model is cached once, in a small LRU per kind, keyed by what makes it different: the resolved
  path, the file's (or folder's files') modification time and size, the dtype and the quantization. A
  second run, or a second loader node naming the same file, gets the same module back, and a file
  changed on disk is loaded again.
* The model objects are frozen. The LoRA node never touches weights: it returns a *new* object whose
  `loras` tuple has one more `(lora, strength)` entry and that shares the cached base module.
* A stack is applied when a node uses the model (`with transformer.patched():` in the sampler and the
  scheduler-step node, `with text_encoders.patched():` in text encode) and stays applied afterwards:
  each base module records the stack it carries (`use_stack`; the identity of each LoRA file, its
  strength, the order). A 28-step custom loop applies it once, not 28 times. When another stack, or none,
  needs the module (another graph branch, a run without the LoRA), the applied stack is removed first,
  bitwise, then the new one applied; an error or interrupt half-way through either leaves the module as it
  was before that step. A model dropped from the cache leaves clean (`release_loras`). Whatever must see
  the base sees it through `patched()` with its own (empty) stack; the LoRA node's report works from the
  base shapes (`base_shapes`); the Save/Convert nodes read the model file, never the module.
* Removal is exact (`convert.lora.apply_loras`): the originals of the patched tensors are put back on each
  parameter's current device. Which originals are held while applied: views of the memory-mapped model
  file (CPU, loaded without a cast) are kept for free; copies (a cast on load, a model on the GPU) are not
  kept: they are patched in place and read again from the file on removal, cast as the load cast them
  (`convert.origins`); only what
  the file cannot give again (GGUF blocks, a file changed on disk since) is kept, on the model's device
  when it has room (`host.lora_originals_device`), else on the offload device. fp8 / quantized weights are
  never patched: the LoRA runs as forward hooks, dropped on removal.
* A partly loaded model (ComfyUI's lowvram loading, standalone group offloading) is patched where each
  weight lies, removal puts each original back where its parameter lies by then, and
  `host.weights_changed` lets diffusers' group offloading re-read the changed weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import host
from ..common.errors import BadInput

# weight_dtype choices ("default": the host's compute dtype for its device) and their torch names
WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2")
TEXT_DTYPES = ("default", "bf16", "fp16", "fp32")
# quantize choices: weight-only quantization of the transformer's Linear layers, int8 / fp8 through torchao,
# quanto-int8 / quanto-fp8 through optimum-quanto (both in the optional `fluxbridge[quant]` dependency)
QUANTIZE = ("none", "int8", "fp8", "quanto-int8", "quanto-fp8")
# What a transformer is, when its file name does not say: "auto" reads the weights (and the name, for the
# variants only a name tells apart: Kontext has dev's keys and shapes).
VARIANT_CHOICES = ("auto", "kontext")
# the native loader's weight_dtype: ours (the dtype the weights are read into) and UNETLoader's fp8 choices
NATIVE_DTYPES = ("default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
                "fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}

# a diffusers pipeline folder's component sub-folders
TRANSFORMER_DIR, CLIP_DIR, T5_DIR, VAE_DIR = "transformer", "text_encoder", "text_encoder_2", "vae"
CLIP_TOKENIZER_DIR, T5_TOKENIZER_DIR = "tokenizer", "tokenizer_2"


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _torch_dtype(name: str):
    import torch
    return getattr(torch, _DTYPE_NAMES[name])


# ------------------------------------------------------------------------------------------ LoRA stack

@dataclass(frozen=True)
class LoraEntry:
    """One LoRA in a stack: the opened LoRA (as `convert.lora` reads it), its file name and strength."""
    name: str
    lora: Any
    strength: float


_APPLIED = "_fluxbridge_lora_stack"  # attribute of a base module: the stack applied to it now (`_Applied`)
_stack_lock = threading.RLock()


@dataclass
class _Applied:
    key: tuple  # the stack's identity: (LoRA file identity, strength) in order
    loras: list  # the LoRA objects (keeps those identified by object alive while the key holds their id)
    handle: Any  # convert.lora.apply.LoraHandle


def _stack_key(pairs) -> tuple:
    return tuple((lora.identity or ("object", id(lora)), float(strength)) for lora, strength in pairs)


def use_stack(module, family: str, loras, strength_of: Callable[[LoraEntry], float], origins=None):
    """Make `module` carry exactly this LoRA stack (the entries with a non-zero strength, in order).

    The stack stays applied after the call: the next use with the same stack (the next SchedulerStep, the
    next run) costs nothing. Another stack, or none, first removes the one applied (bitwise: the originals
    are put back, read again from the model file where they were not kept) and then applies its own.
    Both steps are atomic: an error or interrupt half-way leaves the module exactly as before that step
    (the base, after a removal). Returns the module.
    """
    pairs = [(e.lora, strength_of(e)) for e in loras if strength_of(e) != 0]
    key = _stack_key(pairs)
    with _stack_lock:
        current = module.__dict__.get(_APPLIED)
        if current is not None and current.key == key:
            return module
        if current is not None:
            _take_off(module, current)
            if not pairs:
                host.weights_changed(module)
        if pairs:
            from ..convert.lora.apply import apply_loras
            from ..pipeline.device import execution_device
            device = execution_device(module)  # partly loaded, its first weight may wait on the offload device
            handle = apply_loras(module, family, pairs, origins=origins,
                                 originals_device=lambda nbytes: host.lora_originals_device(device, nbytes))
            try:
                host.weights_changed(module)
            except BaseException:  # never leave the cached base patched without a record of it
                handle.remove()
                host.weights_changed(module)
                raise
            module.__dict__[_APPLIED] = _Applied(key, [lora for lora, _ in pairs], handle)
    return module


def _take_off(module, current: _Applied) -> None:
    """Remove the applied stack `current` from `module`. Where an original cannot be put back (its model file
    was written over since the load) the error goes up, and the record stays with no stack's key: the module
    is neither the base nor that stack now, so every later use tries the removal again and fails the same
    way, naming the file, instead of computing with half-restored weights."""
    try:
        current.handle.remove()
    except BaseException:
        current.key = None
        host.weights_changed(module)  # some originals did go back
        raise
    del module.__dict__[_APPLIED]


def release_loras(module) -> None:
    """Remove whatever stack `module` carries (it is the clean base afterwards)."""
    with _stack_lock:
        current = module.__dict__.get(_APPLIED)
        if current is not None:
            _take_off(module, current)
            host.weights_changed(module)


def applied_handle(module):
    """The `LoraHandle` of the stack `module` carries now, or None."""
    current = module.__dict__.get(_APPLIED)
    return None if current is None else current.handle


def base_shapes(module) -> dict[str, tuple]:
    """Parameter shapes of the base model, whatever stack it carries (a control LoRA widens img_in)."""
    from ..convert.lora.apply import logical_shapes
    shapes = logical_shapes(module)
    handle = applied_handle(module)
    if handle is not None:
        shapes.update(handle.original_shapes)
    return shapes


@contextlib.contextmanager
def _patched(module, family: str, loras, strength_of, origins=None):
    yield use_stack(module, family, loras, strength_of, origins)


# --------------------------------------------------------------------------------------- model objects

@dataclass(frozen=True)
class TransformerModel:
    module: Any  # diffusers FluxTransformer2DModel
    handle: Any  # host.wrap(module)
    name: str  # as the workflow names it
    path: str  # the file or folder loaded
    family: str
    layout: str
    variant: str | None
    config: dict
    dtype: str  # the compute dtype
    storage: str  # how the weights are held: a dtype, "fp8_e4m3fn (upcast to ...)", "int8 (torchao, ...)"
    report: dict
    loras: tuple = ()  # LoraEntry, applied in order when used
    origins: Any = None  # convert.origins.Origins: where each parameter came from (LoRA removal reads it)

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latents the model denoises (packed 2x2: out_channels / 4)."""
        return int(self.config["out_channels"]) // 4

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.config.get("guidance_embeds"))

    def with_lora(self, name: str, lora, strength: float) -> "TransformerModel":
        return dataclasses.replace(self, loras=self.loras + (LoraEntry(name, lora, float(strength)),))

    def patched(self):
        """`with model.patched() as module:` the module carrying this object's LoRA stack (none: the clean
        base). The stack stays on the module after the block, until a use with another stack."""
        return _patched(self.module, self.family, self.loras, lambda e: e.strength, self.origins)

    def input_channels(self) -> int:
        """The packed input channels the model takes while its LoRA stack is applied: a Depth/Canny control
        LoRA widens `img_in` (64 -> 128), worked out from the shapes without touching the weights. Planned
        once per object (its stack and its base's shapes never change), not at every Scheduler Step."""
        known = self.__dict__.get("_input_channels")
        if known is not None:
            return known
        channels = int(self.config["in_channels"])
        pairs = [(e.lora, e.strength) for e in self.loras if e.strength]
        if pairs:
            from ..convert.lora.patch import Plan
            widths = Plan(self.family, pairs, base_shapes(self.module)).expand
            channels = max([channels] + [int(w) for n, w in widths.items() if n.startswith("x_embedder.")])
        self.__dict__["_input_channels"] = channels  # (frozen: the field setter refuses; a replace() starts afresh)
        return channels


@dataclass(frozen=True)
class Encoder:
    """One text encoder: a transformers model, its handle, and what the loader detected."""
    module: Any
    handle: Any
    name: str
    path: str
    family: str
    layout: str
    config: dict
    dtype: str
    report: dict
    origins: Any = None


@dataclass(frozen=True)
class Tokenizers:
    clip: Any
    t5: Any
    clip_source: str  # where each was found (shown in the loader's UI text)
    t5_source: str


@dataclass(frozen=True)
class TextEncoders:
    clip: Encoder
    t5: Encoder
    tokenizers: Tokenizers
    loras: tuple = ()  # LoraEntry (strength = the text strength)

    @property
    def handles(self) -> list:
        return [self.clip.handle, self.t5.handle]

    def with_lora(self, name: str, lora, strength: float) -> "TextEncoders":
        return dataclasses.replace(self, loras=self.loras + (LoraEntry(name, lora, float(strength)),))

    @contextlib.contextmanager
    def patched(self):
        """`with encoders.patched():` CLIP-L and T5 carrying the parts of this object's LoRA stack for them
        (none: the clean bases); they stay applied until a use with another stack."""
        try:
            for enc in (self.clip, self.t5):
                use_stack(enc.module, enc.family, [e for e in self.loras if _has_family(e.lora, enc.family)],
                          lambda e: e.strength, enc.origins)
        except BaseException:  # T5 failed after CLIP-L changed: both go back to their clean bases
            for enc in (self.clip, self.t5):
                release_loras(enc.module)
            raise
        yield self


def _has_family(lora, family: str) -> bool:
    """Whether an opened LoRA has parts for `family`."""
    return bool(lora.family_parts(family))


@dataclass(frozen=True)
class ReduxModel:
    """FLUX.1 Redux (`FLUXBRIDGE_REDUX`): the Redux image encoder and the SigLIP vision tower it reads,
    each an `Encoder`, plus how the tower wants its pixels (size, mean, std)."""
    encoder: Encoder  # diffusers ReduxImageEncoder
    vision: Encoder  # transformers SigLIP vision tower
    image_size: int
    mean: tuple
    std: tuple

    @property
    def handles(self) -> list:
        return [self.vision.handle, self.encoder.handle]

    @property
    def text_width(self) -> int:
        """The width of the tokens it makes: the T5 width of the transformer they are for."""
        return int(self.encoder.config["txt_in_features"])


@dataclass(frozen=True)
class VAEModel:
    module: Any  # diffusers AutoencoderKL
    handle: Any
    name: str
    path: str
    layout: str
    config: dict
    dtype: str
    report: dict
    scaling_factor: float
    shift_factor: float

    @property
    def latent_channels(self) -> int:
        return int(self.config["latent_channels"])

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def latent_format(self):
        from ..pipeline.latents import LatentFormat
        return LatentFormat(scale=self.scaling_factor, shift=self.shift_factor,
                            channels=self.latent_channels, downscale=self.downscale)


# ----------------------------------------------------------------------------------------------- cache

CACHE_LIMITS = {"transformer": 2, "clip-l": 2, "t5-xxl": 2, "vae": 2, "lora": 8, "tokenizer": 8, "flux-redux": 2,
                "siglip-vision": 2}
_cache: OrderedDict = OrderedDict()
_cache_lock = threading.RLock()
stats = {"hits": 0, "loads": 0}


def cache_key(kind: str, path, *options) -> tuple:
    """(kind, real path, what identifies the content without reading it: `convert.origins.signature`,
    options)."""
    from ..convert.origins import signature
    return (kind, os.path.realpath(path), signature(path)) + tuple(options)


def cached(key: tuple, build: Callable[[], Any]) -> tuple[Any, bool]:
    """(value, was_cached). Builds on a miss; keeps at most CACHE_LIMITS[kind] entries per kind, and
    drops an entry for the same path and options whose file changed."""
    kind = key[0]
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            stats["hits"] += 1
            return _cache[key], True
    value = build()
    with _cache_lock:
        stale = [k for k in _cache if k[0] == kind and k[1] == key[1] and k[3:] == key[3:]]
        for k in stale:
            _evict(k)
        _cache[key] = value
        same = [k for k in _cache if k[0] == kind]
        for k in same[:max(0, len(same) - CACHE_LIMITS.get(kind, 2))]:
            _evict(k)
        stats["loads"] += 1
    return value, False


def _evict(key) -> None:
    """Drop a cache entry; a model leaves as its clean base (its LoRA stack removed, the originals it held
    freed), in case something still holds it."""
    value = _cache.pop(key)
    module = getattr(value, "module", None)
    if module is not None:
        try:
            release_loras(module)
        except BadInput:
            # its file was written over, so the originals are gone: it leaves patched, and any holder's next
            # use of it fails naming the file; the load that is replacing it goes on
            pass


def clear_cache() -> None:
    with _cache_lock:
        for key in list(_cache):
            _evict(key)


def cache_keys(kind: str | None = None) -> list:
    with _cache_lock:
        return [k for k in _cache if kind is None or k[0] == kind]


# ------------------------------------------------------------------------------------------ tokenizers

def _clip_tokenizer_files(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file() \
        or (folder / "tokenizer.json").is_file()


def _t5_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()


def _pipeline_root(path) -> Path | None:
    """The diffusers pipeline folder a model path is (or sits in), if any."""
    if path is None:
        return None
    p = Path(path)
    for candidate in (p, p.parent):
        if candidate.is_dir() and (candidate / "model_index.json").is_file():
            return candidate
    return None


# The tokenizer files the pack carries (`tokenizers/README.md`: origin and licences), used when nothing
# closer to the model has them.
PACK_TOKENIZERS = Path(__file__).resolve().parents[1] / "tokenizers"
_TOKENIZER_KINDS = {"clip": "tokenizers/clip_l", "t5": "tokenizers/t5xxl"}  # host folder kinds (and sub-folders)


def tokenizer_candidates(model_paths=()) -> dict[str, list[tuple[Path, str]]]:
    """Where each tokenizer is looked for, in order: (folder, how to describe it). A diffusers folder the
    encoders came from, then the host's folders (standalone: the models folder's `tokenizers/clip_l|t5xxl`;
    in ComfyUI: its bundled copies), then the pack's own copy."""
    found = {"clip": [], "t5": []}
    for path in model_paths:
        root = _pipeline_root(path)
        if root is not None:
            found["clip"].append((root / CLIP_TOKENIZER_DIR, f"the diffusers folder {root}"))
            found["t5"].append((root / T5_TOKENIZER_DIR, f"the diffusers folder {root}"))
    where = "ComfyUI's bundled copy" if host.IN_COMFY else "the models folder"
    for which, kind in _TOKENIZER_KINDS.items():
        for folder in host.folders(kind):
            found[which].append((Path(folder), f"{where} ({folder})"))
        own = PACK_TOKENIZERS / kind.split("/")[1]
        found[which].append((own, f"the pack's own copy ({own})"))
    return found


def find_tokenizers(model_paths=()) -> Tokenizers:
    """The CLIP-L and T5 tokenizers, from the first place in `tokenizer_candidates` that has the files.
    Raises BadInput naming every place it looked (only when the pack's own copy is missing too)."""
    model_paths = [p for p in model_paths if p is not None]
    candidates = tokenizer_candidates(model_paths)
    result = {}
    for which, has_files in (("clip", _clip_tokenizer_files), ("t5", _t5_tokenizer_files)):
        for folder, label in candidates[which]:
            if folder.is_dir() and has_files(folder):
                result[which] = (_load_tokenizer(which, folder), label)
                break
        else:
            name = "CLIP-L" if which == "clip" else "T5"
            raise BadInput(None, f"no {name} tokenizer found; looked in: "
                                 f"{', '.join(str(f) for f, _ in candidates[which])}. Put the files of a diffusers "
                                 f"folder's {CLIP_TOKENIZER_DIR if which == 'clip' else T5_TOKENIZER_DIR}/ into the "
                                 f"models folder's {_TOKENIZER_KINDS[which]}/, or reinstall the pack")
    return Tokenizers(clip=result["clip"][0], t5=result["t5"][0], clip_source=result["clip"][1],
                      t5_source=result["t5"][1])


def _load_tokenizer(which: str, folder: Path):
    def build():
        try:
            if which == "clip":
                from transformers import CLIPTokenizer
                return CLIPTokenizer.from_pretrained(str(folder))
            from transformers import T5TokenizerFast
            return T5TokenizerFast.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError) as exc:
            raise BadInput(folder, f"cannot load the {'CLIP-L' if which == 'clip' else 'T5'} tokenizer: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return cached(cache_key("tokenizer", folder, which), build)[0]


# ------------------------------------------------------------------------------------------- loading

def component_path(path, sub: str) -> Path:
    """A diffusers pipeline folder's component (`transformer/`, `vae/`, ...), else the path itself."""
    p = Path(path)
    if p.is_dir() and (p / "model_index.json").is_file():
        if not (p / sub).is_dir():
            raise BadInput(p, f"a diffusers pipeline folder without a {sub}/ folder")
        return p / sub
    return p


def _quant_library(how: str, path):
    """The library behind a quantize choice (optimum.quanto or torchao.quantization), imported now so that
    a missing one is said before a long load."""
    package, module = ("optimum-quanto", "optimum.quanto") if how.startswith("quanto-") else \
        ("torchao", "torchao.quantization")
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BadInput(path, f"quantize={how} needs {package}, which is not installed: "
                             f"pip install 'fluxbridge[quant]' (or pip install {package})") from None


def _quantize(module, how: str, path) -> str:
    """Weight-only quantization of the Linear layers, by the library's own API; returns its name."""
    lib = _quant_library(how, path)
    if how.startswith("quanto-"):
        lib.quantize(module, weights=lib.qint8 if how == "quanto-int8" else lib.qfloat8)
        lib.freeze(module)  # quantized weights now, not at the first forward
        return "optimum-quanto"
    names = (("Int8WeightOnlyConfig", "int8_weight_only") if how == "int8"
             else ("Float8WeightOnlyConfig", "float8_weight_only"))
    config = next((getattr(lib, n)() for n in names if hasattr(lib, n)), None)
    if config is None:
        raise BadInput(path, f"quantize={how}: this torchao ({getattr(lib, '__version__', '?')}) has none of "
                             f"{', '.join(names)}")
    import torch
    lib.quantize_(module, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
    return "torchao"


def _display_name(path) -> str:
    return os.path.basename(os.fspath(path).rstrip("/\\")) or os.fspath(path)


def _named(model, name: str | None):
    """The cached model object under the name this loader gives it (the cache keeps the first one's)."""
    return dataclasses.replace(model, name=name) if name and name != model.name else model


def _check_choice(path, option: str, value, choices) -> None:
    if value not in choices:
        raise BadInput(path, f"{option} {value!r}: expected one of {', '.join(choices)}")


def load_transformer(path, weight_dtype: str = "default", quantize: str = "none",
                     name: str | None = None, variant: str = "auto") -> tuple[TransformerModel, bool]:
    """(TransformerModel, was_cached) for a Flux transformer file or diffusers folder.

    weight_dtype: "default" = the host's compute dtype for its device (bf16 on a capable GPU, else fp32);
    fp8_e4m3fn / fp8_e5m2 keep the Linear weights in fp8 and upcast each layer to the compute dtype as it runs
    (`convert.upcast`): an fp8 or scaled-fp8 file's weights stay the file's bytes (no full-precision copy
    is made), a wider file's are cast to that fp8 type. quantize: int8 / fp8 weight-only quantization of the
    Linear layers through torchao, or quanto-int8 / quanto-fp8 through optimum-quanto (the optional
    `fluxbridge[quant]` dependency). variant: "auto" (detected), or "kontext" for a FLUX.1 Kontext file whose
    name does not say so (its weights are shaped like dev's).
    """
    from ..convert.load import load_model

    _check_choice(path, "weight_dtype", weight_dtype, WEIGHT_DTYPES)
    _check_choice(path, "quantize", quantize, QUANTIZE)
    _check_choice(path, "variant", variant, VARIANT_CHOICES)
    fp8 = weight_dtype.startswith("fp8")
    if fp8 and quantize != "none":
        raise BadInput(path, f"weight_dtype {weight_dtype} and quantize {quantize} both set how the weights are "
                             "stored: choose one of them")
    compute = host.compute_dtype(host.torch_device())
    dtype = compute if weight_dtype == "default" or fp8 else _torch_dtype(weight_dtype)
    source = component_path(path, TRANSFORMER_DIR)

    def build():
        if quantize != "none":
            _quant_library(quantize, path)  # fail before a long load
        loaded = load_model(source, family="flux-transformer", dtype=dtype,
                            fp8=_torch_dtype(weight_dtype) if fp8 else None)
        storage = dtype_name(dtype)
        if fp8:
            names = {v: k for k, v in _DTYPE_NAMES.items()}
            held = ", ".join(names.get(n, n) for n in loaded.report.get("fp8_storage") or {}) or weight_dtype
            storage = f"{held} (computing in {dtype_name(dtype)})"
        elif quantize != "none":
            library = _quantize(loaded.model, quantize, path)
            storage = f"{quantize} ({library}, computing in {dtype_name(dtype)})"
        # `host.wrap` makes the layers castable after the quantization above: a layer holding a quantized
        # tensor stays a plain torch layer, which ComfyUI never casts (its cast cannot copy those tensors to
        # another device). The fp8 upcast, by contrast, calls the (castable) layer's class forward, so fp8
        # layers stream like any other.
        module = loaded.model
        return TransformerModel(module=module, handle=host.wrap(module, "diffusion"), name=_display_name(path),
                                path=str(source), family=loaded.family, layout=loaded.layout,
                                variant=loaded.variant, config=dict(loaded.config), dtype=dtype_name(dtype),
                                storage=storage, report=loaded.report, origins=loaded.origins)

    model, hit = cached(cache_key("transformer", source, dtype_name(dtype), weight_dtype, quantize), build)
    model = _named(model, name)
    if variant == "kontext" and model.variant != "kontext":
        cfg = model.config
        if cfg["in_channels"] != cfg["out_channels"] or not cfg.get("guidance_embeds"):
            raise BadInput(path, f"variant kontext: this is a {model.variant} model ({cfg['in_channels']} input "
                                 f"channels, {'with' if cfg.get('guidance_embeds') else 'no'} guidance embedding); "
                                 f"FLUX.1 Kontext is shaped like dev ({cfg['out_channels']} input channels, "
                                 f"guidance embedding)")
        model = dataclasses.replace(model, variant="kontext")
    return model, hit


def load_native_transformer(path, weight_dtype: str = "default", name: str | None = None):
    """(ComfyUI's native MODEL, what was read) for a Flux transformer file or diffusers folder in any layout:
    the weights in the BFL layout (`convert.load.load_original`), built by ComfyUI's own loader.

    weight_dtype: "default" keeps the stored dtypes (scaled fp8 and GGUF dequantized to bf16) and lets ComfyUI
    choose; bf16 / fp16 / fp32 read the weights in that dtype and have ComfyUI keep it; the fp8 choices are
    UNETLoader's (ComfyUI stores the weights in fp8; `_fast` also computes in fp8 where it can).
    """
    from ..convert.load import load_original

    _check_choice(path, "weight_dtype", weight_dtype, NATIVE_DTYPES)
    fp8 = weight_dtype.startswith("fp8")
    dtype = None if weight_dtype == "default" or fp8 else _torch_dtype(weight_dtype)
    loaded = load_original(component_path(path, TRANSFORMER_DIR), family="flux-transformer", dtype=dtype)
    comfy_dtype = _torch_dtype(weight_dtype.removesuffix("_fast")) if fp8 else dtype
    model = host.native_diffusion_model(loaded.model, comfy_dtype, fp8_fast=weight_dtype.endswith("_fast"),
                                        name=name or _display_name(path))
    loaded.model = None  # ComfyUI holds its own copy now
    return model, loaded


def _load_encoder(path, family: str, dtype, name: str) -> tuple[Encoder, bool]:
    from ..convert.load import load_model

    def build():
        loaded = load_model(path, family=family, dtype=dtype)
        return Encoder(module=loaded.model, handle=host.wrap(loaded.model, "text_encoder"), name=name,
                       path=str(path), family=loaded.family, layout=loaded.layout, config=dict(loaded.config),
                       dtype=dtype_name(dtype), report=loaded.report, origins=loaded.origins)

    enc, hit = cached(cache_key(family, path, dtype_name(dtype)), build)
    return _named(enc, name), hit


def load_text_encoders(clip_path, t5_path, weight_dtype: str = "default", clip_name: str | None = None,
                       t5_name: str | None = None) -> tuple[TextEncoders, bool]:
    """(TextEncoders, both_were_cached): CLIP-L and T5 files, or diffusers folders (`text_encoder/`,
    `text_encoder_2/` of a pipeline folder), plus the tokenizers (see `find_tokenizers`)."""
    _check_choice(clip_path, "weight_dtype", weight_dtype, TEXT_DTYPES)
    dtype = host.compute_dtype(host.torch_device()) if weight_dtype == "default" else _torch_dtype(weight_dtype)
    clip, hit_clip = _load_encoder(component_path(clip_path, CLIP_DIR), "clip-l", dtype,
                                   clip_name or _display_name(clip_path))
    t5, hit_t5 = _load_encoder(component_path(t5_path, T5_DIR), "t5-xxl", dtype, t5_name or _display_name(t5_path))
    tokenizers = find_tokenizers([clip_path, t5_path])
    return TextEncoders(clip=clip, t5=t5, tokenizers=tokenizers), hit_clip and hit_t5


def load_vae(path, name: str | None = None) -> tuple[VAEModel, bool]:
    """(VAEModel, was_cached) for a VAE file (BFL `ae.safetensors`, LDM) or diffusers folder."""
    from ..convert.load import load_model

    source = component_path(path, VAE_DIR)
    dtype = host.compute_dtype(host.torch_device())

    def build():
        loaded = load_model(source, family="flux-vae", dtype=dtype)
        cfg = dict(loaded.config)
        shift = cfg.get("shift_factor")
        return VAEModel(module=loaded.model, handle=host.wrap(loaded.model, "vae"), name=_display_name(path),
                        path=str(source), layout=loaded.layout, config=cfg, dtype=dtype_name(dtype),
                        report=loaded.report, scaling_factor=float(cfg.get("scaling_factor") or 1.0),
                        shift_factor=float(shift) if shift is not None else 0.0)

    vae, hit = cached(cache_key("vae", source, dtype_name(dtype)), build)
    return _named(vae, name), hit


def _image_processor(folder) -> dict:
    """A transformers folder's preprocessor_config.json (SigLIP image size, mean, std), or {}."""
    import json
    cfg = Path(folder) / "preprocessor_config.json"
    if not (Path(folder).is_dir() and cfg.is_file()):
        return {}
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise BadInput(cfg, f"corrupt preprocessor_config.json: {exc}") from None
    return data if isinstance(data, dict) else {}


def load_redux(redux_path, vision_path, redux_name: str | None = None,
               vision_name: str | None = None) -> tuple[ReduxModel, bool]:
    """(ReduxModel, both_were_cached): the Redux encoder file (`style_models`) and the SigLIP vision tower
    (`clip_vision`: a single file as ComfyUI keeps it, or a transformers folder). Their widths must meet:
    the tower's features are what the encoder takes."""
    from ..convert.families import siglip

    dtype = host.compute_dtype(host.torch_device())
    redux_name, vision_name = redux_name or _display_name(redux_path), vision_name or _display_name(vision_path)
    encoder, hit_encoder = _load_encoder(Path(redux_path), "flux-redux", dtype, redux_name)
    vision, hit_vision = _load_encoder(Path(vision_path), "siglip-vision", dtype, vision_name)
    tower = siglip.vision_config(vision.module.config.to_dict())
    if int(tower["hidden_size"]) != int(encoder.config["redux_dim"]):
        raise BadInput(redux_name, f"the Redux encoder takes {encoder.config['redux_dim']}-wide image features, "
                                   f"but the vision tower {vision_name!r} makes {tower['hidden_size']}-wide ones")
    proc = _image_processor(vision_path)
    size = proc.get("size") or {}
    image_size = int(size.get("height") or size.get("shortest_edge") or tower["image_size"]) \
        if isinstance(size, dict) else int(size)
    return ReduxModel(encoder=encoder, vision=vision, image_size=image_size,
                      mean=tuple(proc.get("image_mean") or siglip.IMAGE_MEAN),
                      std=tuple(proc.get("image_std") or siglip.IMAGE_STD)), hit_encoder and hit_vision


def open_lora(path):
    """The opened LoRA (read, detected, mapped to canonical parts), cached by file; its `identity` is the
    file's (path, size, modification time), which names it in a stack."""
    from ..convert.lora.formats import load_lora
    key = cache_key("lora", path)

    def build():
        lora = load_lora(path)
        lora.identity = key
        return lora
    return cached(key, build)[0]


def lora_report(module, family: str, lora, strength: float) -> dict:
    """What applying `lora` to the base `module` would do (format, patched modules, zero-filled, and the parts
    that fit no tensor of this module), worked out from the parameter shapes without touching the weights.
    The file's own unusable keys (`lora.not_placed`) are not repeated here: they are the file's, whichever
    models it is planned on."""
    from ..convert.lora.patch import Plan
    return Plan(family, [(lora, float(strength))], base_shapes(module)).reports[0]


# ------------------------------------------------------------------------------------------ checks

def check_vae_latent(vae: VAEModel, samples, what: str = "latent") -> None:
    """A latent going into (or made for) this VAE has its channel count."""
    ch = int(samples.shape[1]) if getattr(samples, "ndim", 0) == 4 else None
    if ch is None:
        raise BadInput(what, f"expected LATENT samples [B, C, H, W], got shape {list(getattr(samples, 'shape', []))}")
    if ch != vae.latent_channels:
        raise BadInput(vae.name, f"the {what} has {ch} channels, but VAE {vae.name!r} has {vae.latent_channels} "
                                 f"latent channels (a Flux VAE has 16, an SD VAE 4)")
