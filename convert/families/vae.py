"""FLUX VAE (and SD-style VAEs): LDM / BFL `ae.safetensors` (side a) ⇄ diffusers AutoencoderKL (side b).

Two value changes, everything else is a rename: the mid-block attention projections are 1x1 convs
`(o, i, 1, 1)` in LDM and Linear `(o, i)` in diffusers (`CONV1x1`, weights only), and the decoder's
up-blocks are numbered the other way round (`up.{levels-1-i}` ⇄ `up_blocks.{i}`; `levels` is
`len(config["block_out_channels"])`, so that conversion needs the config).

Legacy diffusers attention names (diffusers < 0.14: `query`, `key`, `value`, `proj_attn`) are read on
side b by alias rules placed after the modern ones: both share the side-a template and the table keeps
the first rule among equally specific templates (a stable sort), so a→b always writes the modern names.
Loading a legacy side-b file therefore needs b→a→b (an identity b→b plan keeps the legacy names).
"""
from __future__ import annotations

from typing import Mapping

from ..table import A, B, CONV1x1, Index, Rule, Table, depth

FAMILY = "flux-vae"
COMFY_PREFIX = ""
PREFIXES = ("", "vae.", "first_stage_model.")

# Latent normalisation is not stored in the weights. A VAE without quant_conv is taken to be the FLUX
# VAE (the SD3 VAE has the same shapes but other factors: pass a config to load it); one with
# quant_conv is an SD-style VAE.
FLUX_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
SD_FACTORS = {"scaling_factor": 0.18215, "shift_factor": None}


def _levels(config: Mapping) -> int:
    try:
        return len(config["block_out_channels"])
    except (KeyError, TypeError):
        raise ValueError("renumbering the VAE decoder needs config['block_out_channels']") from None


def _reverse_up(values: dict, config: Mapping) -> dict:
    """`up.{j}` ⇄ `up_blocks.{levels-1-j}`: its own inverse."""
    return dict(values, i=_levels(config) - 1 - values["i"])


REVERSED = Index(to_b=_reverse_up, to_a=_reverse_up)
_RESNET = (("nin_shortcut", "conv_shortcut"),)  # norm1, conv1, norm2, conv2 keep their names


def _half(part: str) -> list[Rule]:
    """The rules of the encoder or the decoder (their mid blocks and ends are named alike)."""
    p, mid, attn = f"{part}.", f"{part}.mid.", f"{part}.mid_block.attentions.0."
    rules = [
        Rule(p + "conv_in", p + "conv_in"),
        Rule(p + "conv_out", p + "conv_out"),
        Rule(p + "norm_out", p + "conv_norm_out"),
        Rule(mid + "block_1", p + "mid_block.resnets.0", inner=_RESNET),
        Rule(mid + "block_2", p + "mid_block.resnets.1", inner=_RESNET),
        Rule(mid + "attn_1.norm", attn + "group_norm"),
    ]
    modern = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    legacy = {"q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}
    rules += [Rule(mid + "attn_1." + a, attn + b, CONV1x1) for a, b in modern.items()]
    rules += [Rule(mid + "attn_1." + a, attn + b, CONV1x1) for a, b in legacy.items()]  # read-only aliases
    return rules


TABLE = Table([
    *_half("encoder"),
    Rule("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}", inner=_RESNET),
    Rule("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv"),
    *_half("decoder"),
    Rule("decoder.up.{i}.block.{j}", "decoder.up_blocks.{i}.resnets.{j}", index=REVERSED, inner=_RESNET),
    Rule("decoder.up.{i}.upsample.conv", "decoder.up_blocks.{i}.upsamplers.0.conv", index=REVERSED),
    Rule("quant_conv", "quant_conv"),
    Rule("post_quant_conv", "post_quant_conv"),
])

_NAMES = {  # (side a, side b) names read by infer_config
    "conv_in": ("encoder.conv_in.weight", "encoder.conv_in.weight"),
    "latent_in": ("decoder.conv_in.weight", "decoder.conv_in.weight"),
    "conv_out": ("decoder.conv_out.weight", "decoder.conv_out.weight"),
    "level_conv": ("encoder.down.{i}.block.0.conv1.weight", "encoder.down_blocks.{i}.resnets.0.conv1.weight"),
    "quant_conv": ("quant_conv.weight", "quant_conv.weight"),
    "post_quant_conv": ("post_quant_conv.weight", "post_quant_conv.weight"),
}
_LEVELS = {A: r"encoder\.down\.(\d+)\.", B: r"encoder\.down_blocks\.(\d+)\."}
_LAYERS = {A: r"encoder\.down\.0\.block\.(\d+)\.", B: r"encoder\.down_blocks\.0\.resnets\.(\d+)\."}
_MID_ATTN = {A: "encoder.mid.attn_1.", B: "encoder.mid_block.attentions.0."}


def norm_groups(channels, most: int = 32) -> int:
    """GroupNorm groups are not stored: 32 as released, else the largest count ≤ 32 dividing every width.

    Tiny test models are built with the same rule, so they round-trip through `infer_config`.
    """
    return next(g for g in range(most, 0, -1) if all(c % g == 0 for c in channels))


def infer_config(shapes: Mapping[str, tuple], side: str) -> dict:
    """diffusers AutoencoderKL config from tensor shapes alone (any widths, depth and latent size)."""
    s = 0 if side == A else 1

    def shape(what, **values):
        name = _NAMES[what][s].format(**values)
        return tuple(shapes[name]) if name in shapes else None

    conv_in, latent_in, conv_out = shape("conv_in"), shape("latent_in"), shape("conv_out")
    levels = depth(shapes, _LEVELS[side])
    missing = [n for n, v in (("encoder.conv_in", conv_in), ("decoder.conv_in", latent_in),
                              ("decoder.conv_out", conv_out), ("encoder levels", levels or None)) if v is None]
    if missing:
        raise ValueError(f"not a complete VAE: no {', '.join(missing)} weights")
    channels = []
    for i in range(levels):
        conv = shape("level_conv", i=i)
        if conv is None:
            raise ValueError(f"not a complete VAE: no first resnet in encoder level {i}")
        channels.append(conv[0])
    quant = shape("quant_conv") is not None
    post_quant = shape("post_quant_conv") is not None
    return {
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(channels),
        "layers_per_block": depth(shapes, _LAYERS[side]),
        "latent_channels": latent_in[1],
        "norm_num_groups": norm_groups(channels),
        "use_quant_conv": quant,
        "use_post_quant_conv": post_quant,
        "mid_block_add_attention": any(k.startswith(_MID_ATTN[side]) for k in shapes),
        **(SD_FACTORS if quant or post_quant else FLUX_FACTORS),
    }


def build(config: Mapping):
    """The diffusers AutoencoderKL with parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights(include_buffers=False):
        return AutoencoderKL(**config)
