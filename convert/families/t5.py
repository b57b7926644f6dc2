"""T5-XXL v1.1 encoder: HF / ComfyUI names (side a) ⇄ transformers T5EncoderModel (side b).

The names are identical on both sides (identity rules: the table still says which names are T5's, for
detection and for LoRAs). `shared.weight` owns the token embedding; `encoder.embed_tokens.weight` is the
tied alias transformers lists in its state dict and files usually lack (`TIED`: the loader points it at
the owner). A file that carries the alias keeps it through a conversion.

llama.cpp / city96 GGUF files name the same tensors differently: `GGUF_TABLE` maps those (side a) to the
HF names (side b). Only the gated (v1.1) feed-forward is mapped there: llama.cpp calls both a non-gated
`wi` and a gated `wi_1` `ffn_up`, and one table cannot pick by context.
"""
from __future__ import annotations

from typing import Mapping

from ..table import Rule, Table, depth

FAMILY = "t5-xxl"
COMFY_PREFIX = ""
ORIGINAL_LAYOUT = "comfy"  # ComfyUI's t5xxl_*.safetensors: the HF names, `shared.weight` only
PREFIXES = ("", "text_encoders.t5xxl.transformer.")
NATIVE_PREFIX = "t5xxl.transformer."  # where ComfyUI's native Flux CLIP holds these tensors (its state dict)

TIED = {"encoder.embed_tokens.weight": "shared.weight"}  # b-side alias -> owner; needs no file tensor

_BLOCK = "encoder.block.{i}."
_ATTN = _BLOCK + "layer.0.SelfAttention."
_FF = _BLOCK + "layer.1.DenseReluDense."
_NAMES = ("shared", "encoder.embed_tokens", "encoder.final_layer_norm",
          _ATTN + "q", _ATTN + "k", _ATTN + "v", _ATTN + "o", _ATTN + "relative_attention_bias",
          _BLOCK + "layer.0.layer_norm",
          _FF + "wi", _FF + "wi_0", _FF + "wi_1", _FF + "wo",
          _BLOCK + "layer.1.layer_norm")

TABLE = Table([Rule(name, name) for name in _NAMES])

_GGUF_BLOCK = "enc.blk.{i}."
GGUF_TABLE = Table([
    Rule("token_embd", "shared"),
    Rule("enc.output_norm", "encoder.final_layer_norm"),
    Rule(_GGUF_BLOCK + "attn_q", _ATTN + "q"),
    Rule(_GGUF_BLOCK + "attn_k", _ATTN + "k"),
    Rule(_GGUF_BLOCK + "attn_v", _ATTN + "v"),
    Rule(_GGUF_BLOCK + "attn_o", _ATTN + "o"),
    Rule(_GGUF_BLOCK + "attn_rel_b", _ATTN + "relative_attention_bias"),
    Rule(_GGUF_BLOCK + "attn_norm", _BLOCK + "layer.0.layer_norm"),
    Rule(_GGUF_BLOCK + "ffn_gate", _FF + "wi_0"),
    Rule(_GGUF_BLOCK + "ffn_up", _FF + "wi_1"),
    Rule(_GGUF_BLOCK + "ffn_down", _FF + "wo"),
    Rule(_GGUF_BLOCK + "ffn_norm", _BLOCK + "layer.1.layer_norm"),
])

# Not derivable from shapes (T5 defaults, as in v1.1); a config.json may supply them.
OVERRIDABLE = ("relative_attention_max_distance", "layer_norm_epsilon", "dense_act_fn", "pad_token_id",
               "eos_token_id", "decoder_start_token_id")


def infer_config(shapes: Mapping[str, tuple], side: str, overrides: Mapping | None = None) -> dict:
    """transformers T5Config (as a dict) for T5EncoderModel from tensor shapes (both sides use HF names).

    Heads and buckets come from block 0's relative attention bias `(buckets, heads)`, d_kv from the q
    projection's rows / heads, gated-gelu (v1.1) when `wi_0` exists, else relu (original T5).
    """
    embed = shapes.get("shared.weight") or shapes.get("encoder.embed_tokens.weight")
    bias = shapes.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    q = shapes.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    gate = shapes.get("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    wi = gate or shapes.get("encoder.block.0.layer.1.DenseReluDense.wi.weight")
    missing = [n for n, v in (("shared", embed), ("block 0 relative_attention_bias", bias), ("block 0 q", q),
                              ("block 0 DenseReluDense.wi", wi)) if v is None]
    if missing:
        raise ValueError(f"not a complete T5 encoder: no {', '.join(missing)} weights")
    (vocab, d_model), (buckets, heads) = tuple(embed), tuple(bias)
    if tuple(q)[0] % heads:
        raise ValueError(f"attention width {tuple(q)[0]} is not a multiple of {heads} heads")
    gated = gate is not None
    config = {"relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
              "dense_act_fn": "gelu_new" if gated else "relu"}
    config.update({k: v for k, v in (overrides or {}).items() if k in OVERRIDABLE})
    config.update({
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": tuple(q)[0] // heads,
        "d_ff": tuple(wi)[0],
        "num_layers": depth(shapes, r"encoder\.block\.(\d+)\."),
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "is_gated_act": gated,
        "is_encoder_decoder": False,
        "use_cache": False,
    })
    return config


def build(config: Mapping):
    """transformers T5EncoderModel with parameters on the meta device (buffers real).

    The tie of `encoder.embed_tokens` to `shared` does not survive meta construction nor an assigning
    load: point the alias at the owner after loading (`TIED`).
    """
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    with init_empty_weights(include_buffers=False):
        return T5EncoderModel(T5Config(**config))
