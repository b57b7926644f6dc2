"""FLUX.1 transformer: BFL original (side a) ⇄ diffusers FluxTransformer2DModel (side b).

Three value changes, everything else is a rename: the qkv split, the linear1 split as [D, D, D, rest]
(not equal quarters), and the half swap of the final modulation (BFL shift/scale, diffusers scale/shift).
"""
from __future__ import annotations

from typing import Mapping

from ..table import A, B, SWAP_HALVES, Rule, Split, Table, depth

FAMILY = "flux-transformer"
COMFY_PREFIX = "model.diffusion_model."
PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
NATIVE_PREFIX = "diffusion_model."  # where ComfyUI's native MODEL holds these tensors (its state dict)
# The input layer a control LoRA may widen (FLUX.1 Depth/Canny LoRAs: 64 -> 128 inputs; diffusers zero-pads it
# the same way), and the config key that follows its width (`convert.lora.patch.may_widen`, `expanded_config`).
EXPANDABLE = ("img_in", "in_channels")

_D, _S = "double_blocks.{i}.", "transformer_blocks.{i}."
_SB, _SS = "single_blocks.{i}.", "single_transformer_blocks.{i}."

TABLE = Table([
    Rule("img_in", "x_embedder"),
    Rule("txt_in", "context_embedder"),
    Rule("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    Rule("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    Rule("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    Rule("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    Rule("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    Rule("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    # double blocks
    Rule(_D + "img_mod.lin", _S + "norm1.linear"),
    Rule(_D + "txt_mod.lin", _S + "norm1_context.linear"),
    Rule(_D + "img_attn.qkv", (_S + "attn.to_q", _S + "attn.to_k", _S + "attn.to_v"), Split(3)),
    Rule(_D + "txt_attn.qkv", (_S + "attn.add_q_proj", _S + "attn.add_k_proj", _S + "attn.add_v_proj"),
         Split(3)),
    Rule(_D + "img_attn.norm.query_norm.scale", _S + "attn.norm_q.weight"),
    Rule(_D + "img_attn.norm.key_norm.scale", _S + "attn.norm_k.weight"),
    Rule(_D + "txt_attn.norm.query_norm.scale", _S + "attn.norm_added_q.weight"),
    Rule(_D + "txt_attn.norm.key_norm.scale", _S + "attn.norm_added_k.weight"),
    Rule(_D + "img_attn.proj", _S + "attn.to_out.0"),
    Rule(_D + "txt_attn.proj", _S + "attn.to_add_out"),
    Rule(_D + "img_mlp.0", _S + "ff.net.0.proj"),
    Rule(_D + "img_mlp.2", _S + "ff.net.2"),
    Rule(_D + "txt_mlp.0", _S + "ff_context.net.0.proj"),
    Rule(_D + "txt_mlp.2", _S + "ff_context.net.2"),
    # single blocks
    Rule(_SB + "linear1", (_SS + "attn.to_q", _SS + "attn.to_k", _SS + "attn.to_v", _SS + "proj_mlp"),
         Split("in", "in", "in", "rest")),
    Rule(_SB + "linear2", _SS + "proj_out"),
    Rule(_SB + "norm.query_norm.scale", _SS + "attn.norm_q.weight"),
    Rule(_SB + "norm.key_norm.scale", _SS + "attn.norm_k.weight"),
    Rule(_SB + "modulation.lin", _SS + "norm.linear"),
    # final layer
    Rule("final_layer.linear", "proj_out"),
    Rule("final_layer.adaLN_modulation.1", "norm_out.linear", SWAP_HALVES),
])

# Names used below to read hyper-parameters, on each side.
_NAMES = {
    "img_in": ("img_in.weight", "x_embedder.weight"),
    "txt_in": ("txt_in.weight", "context_embedder.weight"),
    "vector_in": ("vector_in.in_layer.weight", "time_text_embed.text_embedder.linear_1.weight"),
    "query_norm": ("double_blocks.0.img_attn.norm.query_norm.scale", "transformer_blocks.0.attn.norm_q.weight"),
    "single_query_norm": ("single_blocks.0.norm.query_norm.scale", "single_transformer_blocks.0.attn.norm_q.weight"),
    "mlp": ("double_blocks.0.img_mlp.0.weight", "transformer_blocks.0.ff.net.0.proj.weight"),
    "single_mlp": (None, "single_transformer_blocks.0.proj_mlp.weight"),
    "linear1": ("single_blocks.0.linear1.weight", None),
    "out": ("final_layer.linear.weight", "proj_out.weight"),
    "guidance": ("guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight"),
}
_BLOCKS = {A: (r"double_blocks\.(\d+)\.", r"single_blocks\.(\d+)\."),
           B: (r"transformer_blocks\.(\d+)\.", r"single_transformer_blocks\.(\d+)\.")}


def default_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes are not stored in a checkpoint: FLUX.1 uses (16, 56, 56) for d_head 128; scale that.

    Every axis is even (RoPE rotates pairs); tiny models are built with the same rule.
    """
    if head_dim < 6 or head_dim % 2:
        raise ValueError(f"head size {head_dim}: three RoPE axes need an even head size of at least 6")
    first = max(2, 2 * round(head_dim / 16))
    second = 2 * ((head_dim - first) // 4)
    return first, second, head_dim - first - second


def infer_config(shapes: Mapping[str, tuple], side: str) -> dict:
    """diffusers FluxTransformer2DModel config from tensor shapes alone (any width and depth)."""
    s = 0 if side == A else 1

    def shape(what):
        name = _NAMES[what][s]
        return tuple(shapes[name]) if name is not None and name in shapes else None

    img_in, txt_in, vector_in, q = shape("img_in"), shape("txt_in"), shape("vector_in"), shape("query_norm")
    q = q or shape("single_query_norm")
    out = shape("out")
    missing = [n for n, v in (("img_in", img_in), ("txt_in", txt_in), ("vector_in", vector_in),
                              ("query_norm", q), ("final projection", out)) if v is None]
    if missing:
        raise ValueError(f"not a complete Flux transformer: no {', '.join(missing)} weights")
    width, head_dim = img_in[0], q[0]
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of the head size {head_dim}")
    mlp = shape("mlp") or shape("single_mlp")
    if mlp is None and shape("linear1") is not None:
        mlp = (shape("linear1")[0] - 3 * width,)
    if mlp is not None and mlp[0] != 4 * width:
        raise ValueError(f"MLP width {mlp[0]} is not 4 x {width}: diffusers' Flux blocks cannot hold it")
    double_rx, single_rx = _BLOCKS[side]
    return {
        "patch_size": 1,
        "in_channels": img_in[1],
        "out_channels": out[0],
        "num_layers": depth(shapes, double_rx),
        "num_single_layers": depth(shapes, single_rx),
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": txt_in[1],
        "pooled_projection_dim": vector_in[1],
        "guidance_embeds": shape("guidance") is not None,
        "axes_dims_rope": default_axes(head_dim),
    }


def variant(config: Mapping, filename: str = "") -> str:
    """dev / schnell / fill / depth-or-canny / kontext (Kontext has dev's keys: only its name tells)."""
    in_ch, out_ch = config["in_channels"], config["out_channels"]
    if in_ch == out_ch * 6:
        return "fill"
    if in_ch == out_ch * 2:
        return "depth" if "canny" not in filename.lower() else "canny"
    if not config["guidance_embeds"]:
        return "schnell"
    return "kontext" if "kontext" in filename.lower() else "dev"


def build(config: Mapping):
    """The diffusers model with parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights(include_buffers=False):
        return FluxTransformer2DModel(**config)
