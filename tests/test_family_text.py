"""Text encoder families (CLIP-L, T5-XXL): exact round trips, agreement with transformers, output parity."""
import pytest
import torch
from safetensors.torch import save_file

from fluxbridge.convert.families import clip, t5
from fluxbridge.convert.table import A, B
from model_state import assert_same_tensors as assert_bitwise, convert_state as convert, shapes_of  # tests/helpers

CLIP_SHAPES = [  # (hidden, layers, intermediate, vocab, positions): heads = hidden // 64
    (64, 2, 96, 100, 16),
    (128, 1, 200, 300, 12),
]
T5_SHAPES = [  # (d_model, heads, d_kv, d_ff, layers, buckets, vocab, gated)
    (64, 4, 16, 96, 2, 8, 120, True),  # v1.1 (FLUX): gated-gelu, wi_0 / wi_1
    (48, 2, 32, 80, 3, 16, 90, False),  # original T5: relu, wi; inner width 64 ≠ d_model
]
EXTRAS = {"text_projection.weight", "logit_scale", "text_model.embeddings.position_ids"}


def randomize(model, seed=0, std=0.3):
    torch.manual_seed(seed)
    with torch.no_grad():  # every tensor distinct (norms and biases too), so a mix-up shows
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


# ---------------------------------------------------------------------------------------------- CLIP

def tiny_clip(hidden, layers, inter, vocab, positions):
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=hidden // 64, max_position_embeddings=positions,
                            bos_token_id=vocab - 2, eos_token_id=vocab - 1, projection_dim=hidden)
    return randomize(CLIPTextModel(config))


def clip_ids(config, length=10, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size - 2, (2, length), generator=g)
    ids[:, 0] = config.bos_token_id
    ids[0, 6:] = config.eos_token_id  # eos then eos-padding, as CLIP's tokenizer pads
    ids[1, -1] = config.eos_token_id
    return ids


def clip_run(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.last_hidden_state, out.pooler_output


def comfy_clip_file(model):
    """What ComfyUI's clip_l.safetensors holds: text_model.* names plus its extras."""
    sd, _ = convert(clip.TABLE, model.state_dict(), B, A)
    hidden = model.config.hidden_size
    return dict(sd, **{"text_projection.weight": torch.randn(hidden, hidden), "logit_scale": torch.tensor(4.6),
                       "text_model.embeddings.position_ids": torch.arange(model.config.max_position_embeddings)[None]})


@pytest.mark.parametrize("shape", CLIP_SHAPES)
def test_clip_round_trips_are_bitwise_and_extras_are_reported(shape):
    """transformers → text_model.* → transformers and back: same keys, bit-identical tensors; the
    ComfyUI extras are reported, not placed, and do not disturb the inferred config."""
    model = tiny_clip(*shape)
    sd = model.state_dict()
    config = clip.infer_config(shapes_of(sd), B)
    hidden, layers, inter, vocab, positions = shape
    assert config == {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
                      "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
                      "max_position_embeddings": positions, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                      "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "projection_dim": hidden}
    original = comfy_clip_file(model)
    assert all(k.startswith("text_model.") for k in original if k not in EXTRAS)
    assert clip.infer_config(shapes_of(original), A) == config

    converted, report = convert(clip.TABLE, original, A, B)
    assert sorted(report["unplaced"]) == sorted(EXTRAS)
    assert_bitwise(converted, sd)
    back, _ = convert(clip.TABLE, converted, B, A)
    assert_bitwise(back, {k: v for k, v in original.items() if k not in EXTRAS})


def test_clip_table_matches_the_installed_transformers():
    """Side b is what the installed CLIPTextModel's state dict holds (flattened since transformers 5.6)."""
    from transformers import CLIPTextModel
    config = clip.infer_config(shapes_of(comfy_clip_file(tiny_clip(*CLIP_SHAPES[0]))), A)
    built = clip.build(config)
    assert isinstance(built, CLIPTextModel) and all(p.is_meta for p in built.parameters())
    assert clip.FLATTENED is (not hasattr(built, "text_model"))
    shapes = shapes_of(built.state_dict())
    assert all(clip.TABLE.match(k, B) for k in shapes)
    plan, report = clip.TABLE.convert(shapes, B, A)
    assert report["unplaced"] == [] and all(k.startswith("text_model.") for k in plan)


@pytest.mark.parametrize("shape", CLIP_SHAPES)
def test_clip_equals_transformers_from_pretrained_and_outputs_are_bitwise(tmp_path, shape):
    """A folder whose weights carry text_model.* names (and ComfyUI's extras): what transformers'
    `from_pretrained` loads equals our converted dict, and the model built by `build(infer_config(...))`
    plus an assigning load gives bit-identical last_hidden_state and pooler_output."""
    from transformers import CLIPTextModel
    model = tiny_clip(*shape)
    original = comfy_clip_file(model)
    model.config.save_pretrained(tmp_path)
    save_file(original, tmp_path / "model.safetensors")
    theirs = CLIPTextModel.from_pretrained(tmp_path).eval()

    ours = clip.build(clip.infer_config(shapes_of(original), A))
    converted, _ = convert(clip.TABLE, original, A, B)
    ours.load_state_dict(converted, strict=True, assign=True)
    assert not any(p.is_meta for p in ours.parameters())
    assert_bitwise(converted, theirs.state_dict())

    ids = clip_ids(model.config)
    reference = clip_run(model, ids)
    for result in (clip_run(ours.eval(), ids), clip_run(theirs, ids)):
        for x, y in zip(result, reference):
            assert torch.equal(x, y)


def test_clip_overrides_fill_what_shapes_cannot_tell():
    shapes = shapes_of(comfy_clip_file(tiny_clip(*CLIP_SHAPES[1])))
    config = clip.infer_config(shapes, A, overrides={"num_attention_heads": 4, "hidden_size": 999,
                                                     "eos_token_id": 2, "architectures": ["CLIPTextModel"]})
    assert config["num_attention_heads"] == 4 and config["eos_token_id"] == 2
    assert config["hidden_size"] == 128 and "architectures" not in config
    with pytest.raises(ValueError, match="not a multiple"):
        clip.infer_config(shapes, A, overrides={"num_attention_heads": 3})
    with pytest.raises(ValueError, match="not a complete CLIP"):
        clip.infer_config({"text_projection.weight": (8, 8)}, A)


def test_clip_l_config_from_full_size_shapes():
    """CLIP-L's released shapes (no tensors): 12 heads of 64, vocab 49408 with bos/eos 49406/49407."""
    shapes = {"text_model.embeddings.token_embedding.weight": (49408, 768),
              "text_model.embeddings.position_embedding.weight": (77, 768),
              "text_model.final_layer_norm.weight": (768,), "text_projection.weight": (768, 768), "logit_scale": ()}
    for i in range(12):
        shapes[f"text_model.encoder.layers.{i}.mlp.fc1.weight"] = (3072, 768)
    config = clip.infer_config(shapes, A)
    assert (config["num_attention_heads"], config["num_hidden_layers"], config["intermediate_size"]) == (12, 12, 3072)
    assert (config["bos_token_id"], config["eos_token_id"], config["max_position_embeddings"]) == (49406, 49407, 77)


# ------------------------------------------------------------------------------------------------ T5

def tiny_t5(d_model, heads, d_kv, d_ff, layers, buckets, vocab, gated):
    from transformers import T5Config, T5EncoderModel
    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_heads=heads,
                      relative_attention_num_buckets=buckets, feed_forward_proj="gated-gelu" if gated else "relu")
    return randomize(T5EncoderModel(config), std=0.2)


def t5_run(model, seed=3):
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(seed))
    ids[:, -1] = 1  # </s>
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def saved(sd):
    """What save_pretrained / ComfyUI write: the owner of the tied embedding only."""
    return {k: v for k, v in sd.items() if k not in t5.TIED}


def load_like_the_loader(module, config, converted):
    """build on meta, assign the tensors, point tied aliases at their owner (as convert/load.py does)."""
    model = module.build(config)
    result = model.load_state_dict(converted, strict=False, assign=True)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= set(getattr(module, "TIED", {}))
    for alias, owner in getattr(module, "TIED", {}).items():
        if alias in result.missing_keys:
            parent, _, name = alias.rpartition(".")
            setattr(model.get_submodule(parent), name, model.get_parameter(owner))
    assert not any(p.is_meta for p in model.parameters())
    return model.eval()


@pytest.mark.parametrize("shape", T5_SHAPES)
def test_t5_round_trips_are_bitwise_and_config_is_inferred(shape):
    """Identity table: a → b → a bitwise with or without the tied alias; the config comes from shapes."""
    model = tiny_t5(*shape)
    sd = model.state_dict()
    d_model, heads, d_kv, d_ff, layers, buckets, vocab, gated = shape
    config = t5.infer_config(shapes_of(saved(sd)), A)
    assert {k: config[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                                   "relative_attention_num_buckets", "feed_forward_proj", "is_gated_act")} == {
        "vocab_size": vocab, "d_model": d_model, "d_kv": d_kv, "d_ff": d_ff, "num_layers": layers,
        "num_heads": heads, "relative_attention_num_buckets": buckets,
        "feed_forward_proj": "gated-gelu" if gated else "relu", "is_gated_act": gated}
    assert config["dense_act_fn"] == ("gelu_new" if gated else "relu")
    assert t5.infer_config(shapes_of(sd), B) == config
    for source in (sd, saved(sd)):
        a, report = convert(t5.TABLE, source, B, A)
        assert report["unplaced"] == []
        assert_bitwise(a, source)
        back, _ = convert(t5.TABLE, a, A, B)
        assert_bitwise(back, source)


@pytest.mark.parametrize("shape", T5_SHAPES)
def test_t5_tied_embedding_and_outputs_are_bitwise(tmp_path, shape):
    """A shared-only file (ComfyUI / save_pretrained): the built model gets `encoder.embed_tokens` tied
    to `shared`, matches transformers' `from_pretrained`, and gives bit-identical outputs."""
    from transformers import T5EncoderModel
    model = tiny_t5(*shape)
    file = saved(model.state_dict())
    config = t5.infer_config(shapes_of(file), A)
    converted, _ = convert(t5.TABLE, file, A, B)
    ours = load_like_the_loader(t5, config, converted)
    assert ours.encoder.embed_tokens.weight is ours.shared.weight
    model.save_pretrained(tmp_path)
    theirs = T5EncoderModel.from_pretrained(tmp_path).eval()
    reference = t5_run(model)
    assert torch.isfinite(reference).all()
    assert torch.equal(t5_run(ours), reference)
    assert torch.equal(t5_run(theirs), reference)


def test_t5_gguf_names_map_to_hf_names_and_back():
    """llama.cpp GGUF names (ComfyUI-GGUF's T5_SD_MAP) ⇄ HF names, bitwise, every tensor but the alias."""
    sd = saved(tiny_t5(*T5_SHAPES[0]).state_dict())
    gguf, report = convert(t5.GGUF_TABLE, sd, B, A)
    assert report["unplaced"] == []
    for name in ("token_embd.weight", "enc.output_norm.weight", "enc.blk.0.attn_rel_b.weight",
                 "enc.blk.1.attn_q.weight", "enc.blk.1.attn_o.weight", "enc.blk.1.attn_norm.weight",
                 "enc.blk.1.ffn_gate.weight", "enc.blk.1.ffn_up.weight", "enc.blk.1.ffn_down.weight",
                 "enc.blk.1.ffn_norm.weight"):
        assert name in gguf
    assert torch.equal(gguf["enc.blk.1.ffn_gate.weight"], sd["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"])
    back, _ = convert(t5.GGUF_TABLE, gguf, A, B)
    assert_bitwise(back, sd)
    assert t5.infer_config(shapes_of(back), A) == t5.infer_config(shapes_of(sd), A)


def test_t5_xxl_config_from_full_size_shapes():
    """T5-XXL v1.1's released shapes (no tensors): d_model 4096, 64 heads of 64, d_ff 10240, 24 layers,
    32 buckets, gated-gelu."""
    shapes = {"shared.weight": (32128, 4096), "encoder.final_layer_norm.weight": (4096,),
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64)}
    for i in range(24):
        p = f"encoder.block.{i}."
        shapes.update({p + f"layer.0.SelfAttention.{x}.weight": (4096, 4096) for x in "qkvo"})
        shapes.update({p + "layer.1.DenseReluDense.wi_0.weight": (10240, 4096),
                       p + "layer.1.DenseReluDense.wi_1.weight": (10240, 4096),
                       p + "layer.1.DenseReluDense.wo.weight": (4096, 10240)})
    config = t5.infer_config(shapes, A)
    assert (config["d_model"], config["num_heads"], config["d_kv"], config["d_ff"]) == (4096, 64, 64, 10240)
    assert (config["num_layers"], config["relative_attention_num_buckets"], config["vocab_size"]) == (24, 32, 32128)
    assert config["feed_forward_proj"] == "gated-gelu" and config["dense_act_fn"] == "gelu_new"
    assert config["relative_attention_max_distance"] == 128  # not stored: T5's value
    hinted = t5.infer_config(shapes, A, overrides={"relative_attention_max_distance": 64, "num_heads": 3})
    assert hinted["relative_attention_max_distance"] == 64 and hinted["num_heads"] == 64  # shapes win
    with pytest.raises(ValueError, match="not a complete T5"):
        t5.infer_config({"shared.weight": (10, 8)}, A)


def test_text_encoders_in_a_flux_bundle_are_found_under_their_prefixes():
    """ComfyUI all-in-one Flux checkpoint: CLIP-L and T5 under `text_encoders.*.transformer.`, side a;
    ComfyUI's `logit_scale` / `text_projection` extras are not CLIP weights."""
    from fluxbridge.convert.detect import components
    clip_a, _ = convert(clip.TABLE, tiny_clip(*CLIP_SHAPES[0]).state_dict(), B, A)
    t5_a = saved(tiny_t5(*T5_SHAPES[0]).state_dict())
    keys = ["text_encoders.clip_l.transformer." + k for k in clip_a] + ["text_encoders.t5xxl.transformer." + k for k in t5_a]
    keys += ["text_encoders.clip_l.logit_scale", "text_encoders.clip_l.transformer.text_projection.weight"]
    found = {c.family: c for c in components(keys)}
    assert set(found) == {clip.FAMILY, t5.FAMILY}
    assert found[clip.FAMILY].side == A and found[clip.FAMILY].prefix == "text_encoders.clip_l.transformer."
    assert found[clip.FAMILY].unplaced == ["text_encoders.clip_l.transformer.text_projection.weight"]
    assert found[t5.FAMILY].prefix == "text_encoders.t5xxl.transformer." and len(found[t5.FAMILY].names) == len(t5_a)
    assert clip.infer_config({n: clip_a[n].shape for n in found[clip.FAMILY].names}, A)["hidden_size"] == CLIP_SHAPES[0][0]
