"""CLIP-L text encoder: original HF / ComfyUI names (side a) ⇄ the installed transformers CLIPTextModel (side b).

Pure renames. Side a is `text_model.…` (ComfyUI's `clip_l.safetensors`, SD checkpoints, Flux bundles).
transformers ≥ 5.6 flattened CLIPTextModel (no `text_model.` level, and `load_state_dict` does not remap
it), so side b drops the prefix there and keeps it on older versions. Which one applies is decided at
import from the installed version (cheap: importing transformers' CLIP module costs seconds, and the
tables are read on every detection); `build()` checks the real structure and refuses a mismatch.

`text_projection.weight`, `logit_scale` and `text_model.embeddings.position_ids` (ComfyUI / SD extras)
have no rule: the loader reports them, `infer_config` ignores them.
"""
from __future__ import annotations

import math
import re
from importlib import metadata
from typing import Mapping

from ..table import A, Rule, Table, depth

FAMILY = "clip-l"
COMFY_PREFIX = ""
ORIGINAL_LAYOUT = "comfy"  # ComfyUI's standalone clip_l.safetensors has the original HF names
PREFIXES = ("", "text_encoders.clip_l.transformer.", "cond_stage_model.transformer.",
            "conditioner.embedders.0.transformer.", "clip_l.")
NATIVE_PREFIX = "clip_l.transformer."  # where ComfyUI's native Flux CLIP holds these tensors (its state dict)

FLATTENED_SINCE = (5, 6)


def _installed_transformers() -> tuple[int, int]:
    try:
        found = re.match(r"(\d+)\.(\d+)", metadata.version("transformers"))
    except metadata.PackageNotFoundError:
        return FLATTENED_SINCE
    return (int(found.group(1)), int(found.group(2))) if found else FLATTENED_SINCE


FLATTENED = _installed_transformers() >= FLATTENED_SINCE
_TA = "text_model."
_TB = "" if FLATTENED else "text_model."
_LAYER = "encoder.layers.{i}."
_LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")

TABLE = Table([
    Rule(_TA + "embeddings.token_embedding", _TB + "embeddings.token_embedding"),
    Rule(_TA + "embeddings.position_embedding", _TB + "embeddings.position_embedding"),
    *(Rule(_TA + _LAYER + part, _TB + _LAYER + part) for part in _LAYER_PARTS),
    Rule(_TA + "final_layer_norm", _TB + "final_layer_norm"),
])

# Not derivable from shapes; taken from a config.json when the caller has one.
HEAD_SIZE = 64  # as released (CLIP-L: 768 = 12 x 64)
OVERRIDABLE = ("num_attention_heads", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
               "pad_token_id", "projection_dim")


def default_heads(hidden: int) -> int:
    """Heads are not stored: d_head 64 as released (12 for CLIP-L), gcd(hidden, 64) for other widths."""
    return hidden // math.gcd(hidden, HEAD_SIZE)


def infer_config(shapes: Mapping[str, tuple], side: str, overrides: Mapping | None = None) -> dict:
    """transformers CLIPTextConfig (as a dict) from tensor shapes.

    Heads: d_head 64 as in the released models, or gcd(hidden, 64) when the width is no multiple of 64
    (tiny models). bos/eos are the last two ids of the vocabulary, as in CLIP's BPE vocabulary (49406,
    49407); the pooled output is taken at the first eos. `overrides` (e.g. a config.json) supplies the
    values shapes cannot tell (`OVERRIDABLE`); shape-derived values always win.
    """
    p = _TA if side == A else _TB
    token, pos = shapes.get(p + "embeddings.token_embedding.weight"), shapes.get(p + "embeddings.position_embedding.weight")
    fc1 = shapes.get(p + "encoder.layers.0.mlp.fc1.weight")
    layers = depth(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")
    missing = [n for n, v in (("token_embedding", token), ("position_embedding", pos),
                              ("encoder.layers.0.mlp.fc1", fc1)) if v is None]
    if missing:
        raise ValueError(f"not a complete CLIP text model: no {', '.join(missing)} weights")
    vocab, hidden = tuple(token)
    config = {
        "num_attention_heads": default_heads(hidden),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "projection_dim": hidden,
    }
    config.update({k: v for k, v in (overrides or {}).items() if k in OVERRIDABLE})
    config.update({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": tuple(fc1)[0],
        "num_hidden_layers": layers,
        "max_position_embeddings": tuple(pos)[0],
    })
    if hidden % config["num_attention_heads"]:
        raise ValueError(f"width {hidden} is not a multiple of {config['num_attention_heads']} heads")
    return config


def build(config: Mapping):
    """transformers CLIPTextModel with parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights(include_buffers=False):
        model = CLIPTextModel(CLIPTextConfig(**config))
    if hasattr(model, "text_model") == FLATTENED:
        raise RuntimeError(f"transformers' CLIPTextModel {'wraps' if FLATTENED else 'lacks'} `text_model`, "
                           "unlike what its version promised: the CLIP-L table does not fit it")
    return model
