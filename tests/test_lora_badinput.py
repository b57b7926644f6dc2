"""Bad input gives `BadInput(path, cause)` with a clear cause; odd keys are reported, never fatal."""
import pytest
import torch
from safetensors.torch import save_file

from fluxbridge.convert.lora import apply_loras, convert_lora, inspect_lora, load_lora
from fluxbridge.convert.lora.synth import Entry, write_keys
from fluxbridge.common.errors import BadInput
from fluxbridge.headless.factory import tiny_flux_transformer


def lora_pair(prefix, r=2, o=8, i=8):
    return {f"{prefix}.lora_down.weight": torch.randn(r, i), f"{prefix}.lora_up.weight": torch.randn(o, r),
            f"{prefix}.alpha": torch.tensor(1.0)}


SD15 = {**lora_pair("lora_unet_down_blocks_0_attentions_0_proj_in"),
        **lora_pair("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_q"),
        **lora_pair("lora_unet_mid_block_attentions_0_proj_out"),
        **lora_pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj")}
SDXL = {**lora_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k"),
        **lora_pair("lora_unet_output_blocks_2_1_proj_in"),
        **lora_pair("lora_te1_text_model_encoder_layers_3_mlp_fc1"),
        **lora_pair("lora_te2_text_model_encoder_layers_3_mlp_fc1")}


@pytest.mark.parametrize("name,sd", [("sd15", SD15), ("sdxl", SDXL)])
def test_sd_loras_are_refused_with_a_sample_of_keys(tmp_path, name, sd):
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, path)
    with pytest.raises(BadInput) as err:
        load_lora(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: not a Flux LoRA: ")
    sample = msg.split("not a Flux LoRA: ")[1].split(", ")
    assert len(sample) == 3 and all(k in sd for k in sample)
    with pytest.raises(BadInput, match="not a Flux LoRA"):
        inspect_lora(path)


def test_shape_mismatch_names_module_and_both_shapes():
    model = tiny_flux_transformer(width=32, heads=2, double=1, single=1)
    wide = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, 48),
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(48, 2)}
    with pytest.raises(BadInput) as err:
        apply_loras(model, "flux-transformer", [load_lora(wide, name="w48.safetensors")])
    msg = str(err.value)
    assert msg.startswith("w48.safetensors: ") and "double_blocks.0.img_attn.proj" in msg
    assert "[48, 48]" in msg and "[32, 32]" in msg and "transformer_blocks.0.attn.to_out.0" in msg
    # one module off among good ones: applied, and the odd one reported with both shapes
    fine = {"lora_unet_double_blocks_0_txt_attn_proj.lora_down.weight": torch.randn(2, 32),
            "lora_unet_double_blocks_0_txt_attn_proj.lora_up.weight": torch.randn(32, 2),
            "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(2, 32),
            "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(100, 2)}
    with apply_loras(model, "flux-transformer", [load_lora({**wide, **fine}, name="mixed")]) as h:
        reasons = {d["key"]: d["reason"] for d in h.reports[0]["not_placed"]}
        assert "[48, 48]" in reasons["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"]
        why = reasons["lora_unet_single_blocks_0_linear1.lora_down.weight"]
        assert "single_blocks.0.linear1 gives [100, 32]" in why and "need [224, 32]" in why
        assert h.reports[0]["applied"]["patched"] == ["transformer_blocks.0.attn.to_add_out"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(tmp_path, value):
    sd = lora_pair("lora_unet_double_blocks_0_img_attn_proj", o=32, i=32)
    sd["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"][3, 1] = value
    path = tmp_path / "nan.safetensors"
    save_file(sd, path)
    with pytest.raises(BadInput, match="lora_up.weight holds NaN or infinite values"):
        load_lora(path)


def test_empty_pickle_and_tensorless_files(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(BadInput, match="empty"):
        load_lora(empty)
    pickled = tmp_path / "lora.safetensors"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, pickled)
    with pytest.raises(BadInput) as err:
        load_lora(pickled)
    assert "pickle" in str(err.value).lower() and str(err.value).startswith(str(pickled))
    for suffix in (".pt", ".ckpt"):
        p = tmp_path / f"lora{suffix}"
        torch.save({"a": torch.zeros(1)}, p)
        with pytest.raises(BadInput, match="(?i)pickle"):
            load_lora(p)
    none = tmp_path / "none.safetensors"
    save_file({}, none)
    with pytest.raises(BadInput, match="no tensors"):
        load_lora(none)
    with pytest.raises(BadInput, match="no such file"):
        load_lora(tmp_path / "missing.safetensors")


def test_odd_keys_are_reported_with_reasons():
    sd = {**lora_pair("lora_unet_double_blocks_0_img_attn_proj", o=32, i=32)}
    sd["lora_unet_double_blocks_0_txt_attn_proj.lora_down.weight"] = torch.randn(2, 32)  # no up
    sd["lora_unet_double_blocks_0_img_mlp_0.lora_mid.weight"] = torch.randn(2, 2, 3, 3)
    sd["lora_unet_double_blocks_0_img_mlp_2.lora_down.weight"] = torch.randn(3, 128)
    sd["lora_unet_double_blocks_0_img_mlp_2.lora_up.weight"] = torch.randn(32, 2)  # rank 3 vs 2
    sd["lora_unet_double_blocks_0_img_attn_proj_typo.lora_down.weight"] = torch.randn(2, 2)
    sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"] = torch.randn(2, 2)
    sd["lora_unet_single_blocks_0_linear1.oft_blocks"] = torch.randn(2, 2)
    sd["double_blocks.0.img_attn.qkv.weight"] = torch.randn(96, 32)
    reasons = {d["key"]: d["reason"] for d in load_lora(sd, name="odd").not_placed}
    assert reasons["lora_unet_double_blocks_0_txt_attn_proj.lora_down.weight"].startswith("incomplete LoRA pair")
    assert reasons["lora_unet_double_blocks_0_img_mlp_0.lora_mid.weight"].startswith("convolution-only")
    assert reasons["lora_unet_double_blocks_0_img_mlp_2.lora_up.weight"].startswith("shape mismatch")
    assert reasons["lora_unet_double_blocks_0_img_attn_proj_typo.lora_down.weight"] == "unknown module"
    assert reasons["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].startswith("wrong architecture")
    assert reasons["lora_unet_single_blocks_0_linear1.oft_blocks"].startswith("unsupported adapter type")
    assert reasons["double_blocks.0.img_attn.qkv.weight"] == "a full model weight, not a LoRA tensor"


def test_convert_refuses_unknown_target_and_unwritable_files(tmp_path):
    sd = lora_pair("lora_unet_double_blocks_0_img_attn_proj", o=32, i=32)
    src = tmp_path / "k.safetensors"
    save_file(sd, src)
    with pytest.raises(BadInput, match="unknown LoRA format 'xlabs'"):
        convert_lora(src, tmp_path / "o.safetensors", "xlabs")
    with pytest.raises(BadInput, match="destination is the source"):
        convert_lora(src, src, "kohya")
    full_only = tmp_path / "full.safetensors"
    save_file(write_keys([Entry("double_blocks.0.img_attn.proj", "full", {"diff": torch.randn(32, 32)})],
                         "kohya")[0], full_only)
    with pytest.raises(BadInput, match="nothing of this LoRA can be written as kohya"):
        convert_lora(full_only, tmp_path / "o.safetensors", "kohya")
    assert not (tmp_path / "o.safetensors").exists()
