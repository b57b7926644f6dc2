"""Where each parameter of a loaded model came from, so that it can be read again exactly as it was loaded.

`load.load_model` records, per parameter, the layout-table plan step that made it (source tensors in the
file, row slice of a fused tensor, swap, concatenation) and the cast it applied; `Origins.reader()` opens the
file again and `Reread.read(name)` repeats that step and that cast, giving the very values the load gave
(bitwise: the same bytes through the same operations). LoRA removal uses it to restore a patched weight
without keeping a second copy of it while the LoRA is applied (`convert.lora.apply`).

Three cases, per parameter:
* a view of the file's mapping (CPU, no cast): keeping the tensor itself costs nothing (`is_view`);
* made from the file by a plan step and a cast (a copy): read again on removal (`rereadable`), provided the
  file has not changed since the load (size and modification time, checked when a reader opens and again
  before each read: a file written over while a LoRA is applied is refused, never read as the original);
* anything else (GGUF blocks dequantized, fp8 kept as stored, tensors the plan did not make): not rereadable,
  and `why_not` says why; LoRA removal then keeps the original.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..common.errors import BadInput
from .table import Step, materialize


def signature(path) -> tuple:
    """What identifies the content of a file or folder without reading it: (relative name, mtime, size) of the
    file, or of every file under the folder."""
    path = Path(path)
    try:
        if path.is_dir():
            entries = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(filenames):
                    st = os.stat(os.path.join(dirpath, f))
                    entries.append((os.path.relpath(os.path.join(dirpath, f), path), st.st_mtime_ns, st.st_size))
            return tuple(entries)
        st = path.stat()
    except OSError as exc:
        raise BadInput(path, f"cannot read: {exc.strerror or exc}") from None
    return ((path.name, st.st_mtime_ns, st.st_size),)


def as_loaded(step: Step, get: Callable[[str], object], dtype: torch.dtype | None,
              dequantize_to: torch.dtype | None = None) -> torch.Tensor:
    """The tensor a plan step makes from the source, cast to the load dtype: a view where no cast is needed.
    `dtype` None keeps each stored dtype, and dequantizes GGUF blocks to `dequantize_to`."""
    t = materialize(step, get)
    if not isinstance(t, torch.Tensor):  # a GGUF quantized tensor (rows already split)
        t = t.dequantize(dtype or dequantize_to)
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t


@dataclass
class Origins:
    path: Path
    signature: tuple
    names: dict[str, str]          # plan (diffusers-side) name -> key in the file
    dtype: torch.dtype             # the load's cast
    keep_fp8: bool                 # how the file was viewed (quant.QuantView)
    steps: dict[str, Step] = field(default_factory=dict)     # rereadable parameters
    views: dict[str, int] = field(default_factory=dict)      # parameter -> data_ptr of its view of the file
    why_not: dict[str, str] = field(default_factory=dict)    # parameter -> why it cannot be read again

    def is_view(self, name: str, t: torch.Tensor) -> bool:
        """Whether `t` (the parameter's tensor now) is still the view of the file the load made."""
        return t.device.type == "cpu" and self.views.get(name) == t.data_ptr()

    def rereadable(self, name: str) -> bool:
        return name in self.steps

    def reader(self) -> "Reread | str":
        """A reader of the file as it was loaded, or why there is none (the file changed or went away)."""
        from .safetensors_io import open_weights
        try:
            # each tensor mapped on its own while it is read: the file's pages do not stay in this process
            raw = open_weights(self.path, whole_map=False)
        except BadInput as exc:
            return f"the model file cannot be read again ({exc.cause})"
        why = self.changed(raw)
        if why:
            raw.close()
            return why
        return Reread(self, raw)

    def changed(self, raw) -> str | None:
        """Why the opened file `raw` is not the one loaded (None: it is). What is checked is the file its held
        descriptors read (a file renamed over since still reads the old bytes there, and passes); a file mapped
        whole (GGUF) holds none, so its path is checked."""
        held = raw.held_files() if hasattr(raw, "held_files") else {}
        if not held:
            try:
                return None if signature(self.path) == self.signature else CHANGED
            except BadInput as exc:
                return f"the model file cannot be read again ({exc.cause})"
        loaded = {name: (mtime, size) for name, mtime, size in self.signature}
        for path, st in held.items():
            name = path.name if path == self.path else os.path.relpath(path, self.path)
            if loaded.get(name) != (st.st_mtime_ns, st.st_size):
                return CHANGED
        return None


CHANGED = "the model file changed on disk since it was loaded (size or modification time)"


class Reread:
    """The model file opened again; `read(name)` is the parameter as the load made it, on `device`.

    It is opened when a LoRA is applied and read when the LoRA is removed, maybe hours later. The file may
    change on disk meanwhile: renamed over (a download, our own writer), the descriptor held here still reads
    the old bytes; written over in place (`cp`), it would read other values, or fault past a shortened end.
    So each read first checks the file (`Origins.changed`) and refuses (`BadInput`) rather than put other
    values into the model."""

    def __init__(self, origins: Origins, raw):
        from .quant import logical_weights
        self.origins, self.raw = origins, raw
        self.source = logical_weights(raw, keep_fp8=origins.keep_fp8)

    def read(self, name: str, device=None) -> torch.Tensor:
        o = self.origins
        why = o.changed(self.raw)
        if why:
            raise BadInput(o.path, f"{why}, while a LoRA was applied: the original {name} cannot be read "
                                   "back from it; load the model again")
        t = as_loaded(o.steps[name], lambda n: self.source[o.names[n]], o.dtype)
        return t if device is None or t.device == torch.device(device) else t.to(device)

    def close(self) -> None:
        self.source.close()
