"""Stub of `comfy_api.latest`: `ComfyExtension`, `io`, `ui`.

`io` and `ui` are a separate instance of the pack's `io_standalone.py` (the V3 surface our nodes use, with
the real keyword names), loaded by path under this package's name.
"""
import importlib.util
import sys
from abc import ABC, abstractmethod
from pathlib import Path

_path = Path(__file__).resolve().parents[4] / "runtime" / "io_standalone.py"
_spec = importlib.util.spec_from_file_location(__name__ + "._io", _path)
_io = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _io
_spec.loader.exec_module(_io)

io = _io.io
ui = _io.ui


class ComfyExtension(ABC):
    async def on_load(self) -> None:
        """Called when the extension is loaded (not called by ComfyUI 0.3.64)."""

    @abstractmethod
    async def get_node_list(self) -> list:
        """The node classes (subclasses of `io.ComfyNode`) this extension registers."""
