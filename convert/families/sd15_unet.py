"""SD1.5 UNet: LDM / CompVis names (side a) ⇄ diffusers UNet2DConditionModel (side b).

Pure renames; the work is in the numbering. With L = `config["layers_per_block"]` (an int):
input block n ≥ 1 is down block (n-1)//(L+1), slot (n-1)%(L+1) (slot L holds the downsampler `.0.op`);
output block n is up block n//(L+1), slot n%(L+1); an up block's upsampler sits at `.1.conv` when the
block has no attention and at `.2.conv` when it has (`Index.to_a` reads `config["up_block_types"]`).
Resnet inner names are renamed (`inner`), SpatialTransformer inner names are the same on both sides.

The LCM `time_embedding.cond_proj.weight` has no LDM name: it is kept verbatim on both sides (under the
prefix on side a), where diffusers' `convert_ldm_unet_checkpoint` drops it.

Only the UNet is here: a full SD checkpoint's `first_stage_model.` / `cond_stage_model.` parts, its
schedule buffers (`betas`, `alphas_cumprod`, …) and `model_ema.*` lie outside `model.diffusion_model.`.
SDXL-style `label_emb` (class / added embeddings) has no rule and is reported as unplaced.
"""
from __future__ import annotations

from typing import Mapping

from ..table import A, B, Index, Rule, Table, indices

FAMILY = "sd15-unet"
COMFY_PREFIX = "model.diffusion_model."
ORIGINAL_LAYOUT = "ldm"
PREFIXES = ("", "model.diffusion_model.")


def _lpb(config: Mapping) -> int:
    try:
        value = config["layers_per_block"]
    except (KeyError, TypeError):
        raise ValueError("the UNet block numbering needs config['layers_per_block']") from None
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"layers_per_block {list(value)} differs per block: not supported")
        value = value[0]
    return int(value)


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type


def _down_to_b(v, c):
    block, slot = divmod(v["n"] - 1, _lpb(c) + 1)
    return {"b": block, "l": slot}


def _down_to_a(v, c):
    return {"n": v["b"] * (_lpb(c) + 1) + v["l"] + 1}


def _downsample_to_b(v, c):
    block, slot = divmod(v["n"] - 1, _lpb(c) + 1)
    if slot != _lpb(c):
        raise ValueError(f"input_blocks.{v['n']}.0.op is not in a downsampler slot")
    return {"b": block}


def _downsample_to_a(v, c):
    return {"n": (v["b"] + 1) * (_lpb(c) + 1)}


def _up_to_b(v, c):
    block, slot = divmod(v["n"], _lpb(c) + 1)
    return {"b": block, "l": slot}


def _up_to_a(v, c):
    return {"n": v["b"] * (_lpb(c) + 1) + v["l"]}


def _upsample_to_b(v, c):
    block, slot = divmod(v["n"], _lpb(c) + 1)
    if slot != _lpb(c) or v["s"] not in (1, 2):
        raise ValueError(f"output_blocks.{v['n']}.{v['s']}.conv is not an upsampler")
    return {"b": block}


def _upsample_to_a(v, c):
    try:
        attention = _has_attention(c["up_block_types"][v["b"]])
    except (KeyError, IndexError, TypeError):
        raise ValueError("placing an LDM upsampler needs config['up_block_types']") from None
    return {"n": v["b"] * (_lpb(c) + 1) + _lpb(c), "s": 2 if attention else 1}


DOWN, DOWNSAMPLE = Index(_down_to_b, _down_to_a), Index(_downsample_to_b, _downsample_to_a)
UP, UPSAMPLE = Index(_up_to_b, _up_to_a), Index(_upsample_to_b, _upsample_to_a)
RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
          ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))

TABLE = Table([
    Rule("time_embed.0", "time_embedding.linear_1"),
    Rule("time_embed.2", "time_embedding.linear_2"),
    Rule("time_embedding.cond_proj", "time_embedding.cond_proj"),  # LCM: no LDM name, kept verbatim
    Rule("input_blocks.0.0", "conv_in"),
    Rule("input_blocks.{n}.0", "down_blocks.{b}.resnets.{l}", index=DOWN, inner=RESNET),
    Rule("input_blocks.{n}.1", "down_blocks.{b}.attentions.{l}", index=DOWN),
    Rule("input_blocks.{n}.0.op", "down_blocks.{b}.downsamplers.0.conv", index=DOWNSAMPLE),
    Rule("middle_block.0", "mid_block.resnets.0", inner=RESNET),
    Rule("middle_block.1", "mid_block.attentions.0"),
    Rule("middle_block.2", "mid_block.resnets.1", inner=RESNET),
    Rule("output_blocks.{n}.0", "up_blocks.{b}.resnets.{l}", index=UP, inner=RESNET),
    Rule("output_blocks.{n}.1", "up_blocks.{b}.attentions.{l}", index=UP),
    Rule("output_blocks.{n}.{s}.conv", "up_blocks.{b}.upsamplers.0.conv", index=UPSAMPLE),
    Rule("out.0", "conv_norm_out"),
    Rule("out.2", "conv_out"),
])

HEADS = 8  # SD1's `attention_head_dim: 8` means 8 heads; not stored in the weights


def _largest_divisor(values, most: int) -> int:
    return next(g for g in range(most, 0, -1) if all(v % g == 0 for v in values))


def _to_b_shapes(shapes: Mapping[str, tuple]) -> dict:
    """Side-a shapes renamed to side b: the a→b numbering needs only layers_per_block."""
    ops = indices(shapes, r"input_blocks\.(\d+)\.0\.op\.")
    outputs = indices(shapes, r"output_blocks\.(\d+)\.")
    if not ops and not outputs:
        raise ValueError("not a complete UNet: no output_blocks weights")
    lpb = min(ops) - 1 if ops else max(outputs)  # one level: output blocks 0..L
    config = {"layers_per_block": lpb}
    out = {}
    for key, shape in shapes.items():
        m = TABLE.match(key, A)
        if m is not None:
            out[TABLE.render(m, B, 0, config)] = tuple(shape)
    return out


def infer_config(shapes: Mapping[str, tuple], side: str) -> dict:
    """diffusers UNet2DConditionModel config from tensor shapes alone (any widths, depth and levels).

    Not derivable and set as in SD1.x: 8 attention heads (or the largest count ≤ 8 dividing every
    attention width), GroupNorm 32 groups (or the largest count ≤ 32 dividing every width), the
    sinusoidal time embedding settings, and `sample_size` (left unset).
    """
    if side == A:
        shapes = _to_b_shapes(shapes)
    get = lambda name: tuple(shapes[name]) if name in shapes else None
    conv_in, conv_out, time1 = get("conv_in.weight"), get("conv_out.weight"), get("time_embedding.linear_1.weight")
    levels = len(indices(shapes, r"down_blocks\.(\d+)\."))
    missing = [n for n, v in (("conv_in", conv_in), ("conv_out", conv_out), ("time embedding", time1),
                              ("down blocks", levels or None)) if v is None]
    if missing:
        raise ValueError(f"not a complete UNet: no {', '.join(missing)} weights")
    lpb = len(indices(shapes, r"down_blocks\.0\.resnets\.(\d+)\."))
    channels, depths = [], []
    for b in range(levels):
        conv1 = get(f"down_blocks.{b}.resnets.0.conv1.weight")
        if conv1 is None:
            raise ValueError(f"not a complete UNet: no first resnet in down block {b}")
        channels.append(conv1[0])
        depths.append(len(indices(shapes, rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.")))
    down_attn = [any(k.startswith(f"down_blocks.{b}.attentions.") for k in shapes) for b in range(levels)]
    up_attn = [any(k.startswith(f"up_blocks.{b}.attentions.") for k in shapes) for b in range(levels)]
    mid_attn = any(k.startswith("mid_block.attentions.0.") for k in shapes)
    if not mid_attn:
        raise ValueError("a UNet mid block without attention is not supported")
    to_k = next((s for k, s in shapes.items() if k.endswith("transformer_blocks.0.attn2.to_k.weight")), None)
    proj_in = next((s for k, s in shapes.items() if k.endswith(".proj_in.weight")), None)
    if to_k is None or proj_in is None:
        raise ValueError("not a complete UNet: no cross-attention weights")
    mid_depth = len(indices(shapes, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."))
    attn_depths = {d for d, a in zip(depths, down_attn) if a} | {mid_depth}
    attn_channels = [c for c, a, u in zip(channels, down_attn, up_attn) if a or u] + [channels[-1]]
    cond_proj = get("time_embedding.cond_proj.weight")
    return {
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn),
        "block_out_channels": tuple(channels),
        "layers_per_block": lpb,
        "cross_attention_dim": to_k[1],
        "attention_head_dim": _largest_divisor(attn_channels, HEADS),
        "transformer_layers_per_block": attn_depths.pop() if len(attn_depths) == 1 else tuple(max(d, 1) for d in depths),
        "use_linear_projection": len(proj_in) == 2,
        "norm_num_groups": _largest_divisor(channels, 32),
        "time_embedding_dim": time1[0],
        "time_cond_proj_dim": cond_proj[1] if cond_proj is not None else None,
        "conv_in_kernel": conv_in[2],
        "conv_out_kernel": conv_out[2],
    }


def build(config: Mapping):
    """The diffusers UNet2DConditionModel with parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights(include_buffers=False):
        return UNet2DConditionModel(**config)
