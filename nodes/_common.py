"""What every node module shares: the V3 `io` namespace (through host), our socket types, UI payloads."""
from __future__ import annotations

from .. import host

io = host.comfy_io()

TRANSFORMER = io.Custom("FLUXBRIDGE_TRANSFORMER")
TEXT_ENCODERS = io.Custom("FLUXBRIDGE_TEXT_ENCODERS")
VAE = io.Custom("FLUXBRIDGE_VAE")

CATEGORY = "FluxBridge"
MAX_RESOLUTION = 16384
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def node_id(cls):
    """The id of the running node (for the progress bar), or None."""
    hidden = getattr(cls, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None


def ui(lines=(), payload: dict | None = None, **extra) -> dict | None:
    """A node's UI payload: `text` (lines shown under the node), `fluxbridge` (a structured object the web
    extension reads: loader detections, LoRA reports, sigmas) and any other keys given. None if empty."""
    out = {}
    lines = [str(x) for x in lines if x]
    if lines:
        out["text"] = ["\n".join(lines)]
    if payload:
        out["fluxbridge"] = [_jsonable(payload)]
    for key, value in extra.items():
        if value is not None:
            out[key] = _jsonable(value)
    return out or None


def _jsonable(obj, depth: int = 0):
    """Plain JSON values (tuples to lists, tensors to lists, dtypes and paths to strings)."""
    if depth > 12:
        return repr(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v, depth + 1) for v in obj]
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist(), depth + 1)
    return str(obj)


def files(kind: str) -> list:
    """Combo choices: the model files and folders of one kind (empty when none)."""
    try:
        return host.list_models(kind)
    except Exception:  # noqa: BLE001 - a schema must build even when a folder cannot be listed
        return []
