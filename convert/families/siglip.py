"""SigLIP vision tower (the image encoder FLUX.1 Redux reads): HF names (side a) ⇄ transformers SiglipVisionModel (b).

Side a is `vision_model.…`: ComfyUI's `clip_vision/sigclip_vision_patch14_384.safetensors`, and the vision
half of a whole SigLIP checkpoint (`google/siglip-so400m-patch14-384`, whose `text_model.…` half is left
unplaced). Side b drops that prefix: recent transformers keep the tower's modules directly on
SiglipVisionModel, older ones under `.vision_model`; `build()` returns the module that has them either way.

Only renames. `head.…` (the attention-pooling head) is loaded when the file has it; Redux reads the
per-patch features (`last_hidden_state`), not the pooled one.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

from ..table import A, Rule, Table, depth

FAMILY = "siglip-vision"
COMFY_PREFIX = ""
ORIGINAL_LAYOUT = "comfy"
PREFIXES = ("",)

_A = "vision_model."
_LAYER = "encoder.layers.{i}."
_NAMES = ("embeddings.patch_embedding", "embeddings.position_embedding",
          *(_LAYER + p for p in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj",
                                 "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")),
          "post_layernorm", "head.probe", "head.attention", "head.layernorm", "head.mlp.fc1", "head.mlp.fc2")

TABLE = Table([Rule(_A + name, name) for name in _NAMES])

# What every released SigLIP has and no checkpoint stores (SiglipVisionConfig's defaults).
HIDDEN_ACT = "gelu_pytorch_tanh"
LAYER_NORM_EPS = 1e-6
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # SiglipImageProcessor (and ComfyUI's SigLIP configs)


def default_heads(hidden: int) -> int:
    """Heads are not stored. The released towers have 16 heads from width 1024 up (large: 64 wide,
    so400m: 72, giant: 96) and 64-wide heads below (base: 12); other widths: gcd(hidden, 64)-wide heads."""
    if hidden >= 1024 and hidden % 16 == 0:
        return 16
    return hidden // math.gcd(hidden, 64)


def image_size(grid: int, patch: int) -> int:
    """The input size of a tower with `grid` x `grid` patches of `patch` pixels. Any size from grid*patch to
    grid*patch + patch - 1 gives that grid (the patch convolution drops the rest); the released towers take
    a multiple of 16 there (so400m-patch14-384: 27 x 14 = 378 -> 384; base-patch16-224: 14 x 16 = 224)."""
    low = grid * patch
    return next((s for s in range(low, low + patch) if s % 16 == 0), low)


def infer_config(shapes: Mapping[str, tuple], side: str) -> dict:
    """transformers SiglipVisionConfig (as a dict) from tensor shapes (the image size: `image_size`)."""
    p = _A if side == A else ""
    patch = shapes.get(p + "embeddings.patch_embedding.weight")
    pos = shapes.get(p + "embeddings.position_embedding.weight")
    fc1 = shapes.get(p + "encoder.layers.0.mlp.fc1.weight")
    missing = [n for n, v in (("patch_embedding", patch), ("position_embedding", pos),
                              ("encoder.layers.0.mlp.fc1", fc1)) if v is None]
    if missing:
        raise ValueError(f"not a complete SigLIP vision tower: no {', '.join(missing)} weights")
    hidden, channels, ph, pw = tuple(patch)
    if ph != pw:
        raise ValueError(f"patches of {ph}x{pw} pixels: SigLIP patches are square")
    grid = math.isqrt(tuple(pos)[0])
    if grid * grid != tuple(pos)[0]:
        raise ValueError(f"{tuple(pos)[0]} position embeddings do not make a square grid of patches")
    heads = default_heads(hidden)
    return {
        "hidden_size": hidden,
        "intermediate_size": tuple(fc1)[0],
        "num_hidden_layers": depth(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\."),
        "num_attention_heads": heads,
        "num_channels": channels,
        "image_size": image_size(grid, ph),
        "patch_size": ph,
        "hidden_act": HIDDEN_ACT,
        "layer_norm_eps": LAYER_NORM_EPS,
        "vision_use_head": (p + "head.probe") in shapes,
    }


def foreign(keys) -> str | None:
    """Why keys that share SigLIP's names belong to another model, or None. A CLIP vision tower (ViT-L/H/G
    in ComfyUI's clip_vision folder) has the same layer names, plus a class token and a pre-layernorm."""
    if any(k.endswith("embeddings.class_embedding") or ".pre_layrnorm." in k for k in keys):
        return ("a CLIP vision tower (it has a class embedding and a pre-layernorm), not SigLIP: FLUX.1 Redux "
                "reads SigLIP features (sigclip_vision_patch14_384.safetensors)")
    return None


def vision_config(config: Mapping) -> dict:
    """The vision part of a config: a SiglipVisionConfig dict, or a whole SiglipConfig's `vision_config`."""
    return dict(config.get("vision_config") or config)


def build(config: Mapping):
    """The module holding the tower's parameters under side-b names, on the meta device."""
    from accelerate import init_empty_weights
    from transformers import SiglipVisionConfig, SiglipVisionModel

    with init_empty_weights(include_buffers=False):
        model = SiglipVisionModel(SiglipVisionConfig(**vision_config(config)))
    return getattr(model, "vision_model", model)
