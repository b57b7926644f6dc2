"""FLUX.1 Redux image encoder (`flux1-redux-dev.safetensors`): BFL names (side a) ⇄ diffusers ReduxImageEncoder (b).

Two linear layers, `redux_up` (SigLIP width -> 3 x text width) and `redux_down` (3 x text width -> text
width), with a SiLU between. BFL, ComfyUI and diffusers use the same names, so the table only says which
names are Redux's (for detection). The tokens it makes are appended to the T5 sequence, so their width is
the transformer's text width (`joint_attention_dim`).
"""
from __future__ import annotations

from typing import Mapping

from ..table import Rule, Table

FAMILY = "flux-redux"
COMFY_PREFIX = ""
ORIGINAL_LAYOUT = "bfl"
PREFIXES = ("",)

TABLE = Table([Rule("redux_up", "redux_up"), Rule("redux_down", "redux_down")])


def infer_config(shapes: Mapping[str, tuple], side: str) -> dict:
    """diffusers ReduxImageEncoder config (`redux_dim`: the image features' width, `txt_in_features`: the
    text width the tokens come out in) from the tensor shapes."""
    up, down = shapes.get("redux_up.weight"), shapes.get("redux_down.weight")
    if up is None or down is None:
        raise ValueError(f"not a complete Redux encoder: no {'redux_up' if up is None else 'redux_down'} weights")
    (hidden, redux_dim), (text_width, down_in) = tuple(up), tuple(down)
    if down_in != hidden:
        raise ValueError(f"redux_up makes {hidden} features but redux_down takes {down_in}")
    if hidden != 3 * text_width:  # diffusers' ReduxImageEncoder (and ComfyUI's) fix the hidden width at 3x
        raise ValueError(f"redux_up makes {hidden} features, not 3 x the output width {text_width}")
    return {"redux_dim": redux_dim, "txt_in_features": text_width}


def build(config: Mapping):
    """The diffusers model with parameters on the meta device."""
    from accelerate import init_empty_weights
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    with init_empty_weights(include_buffers=False):
        return ReduxImageEncoder(**config)
