"""Reading a LoRA file: the project's validated safetensors reader, plus PEFT's adapter_config.json.

Everything about the bytes (empty file, pickle, truncated or corrupt header) is checked by
`safetensors_io.open_weights`, which raises `BadInput(path, cause)`. This is the one place that opens
LoRA files, so switching readers is a one-line change.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ...common.errors import BadInput


def _open(path: Path):
    from ..safetensors_io import open_weights
    return open_weights(path)


def read_lora(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(name -> tensor, metadata) of a LoRA file, or of the one weights file in a folder.

    A PEFT `adapter_config.json` beside the weights is passed on as metadata `_adapter_config` (it holds
    the alphas of `save_pretrained` output).
    """
    path = Path(path)
    weights = _open(path)
    tensors = {k: weights[k] for k in weights.keys()}
    if not tensors:
        raise BadInput(path, "no tensors in it: not a LoRA")
    metadata = dict(getattr(weights, "metadata", None) or {})
    folder = path if path.is_dir() else path.parent
    config = folder / "adapter_config.json"
    if (path.is_dir() or path.name.startswith("adapter_model")) and config.is_file():
        try:
            metadata["_adapter_config"] = json.dumps(json.loads(config.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise BadInput(config, f"corrupt adapter_config.json: {exc}") from None
    return tensors, metadata
