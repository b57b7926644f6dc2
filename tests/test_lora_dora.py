"""DoRA means the same weights in the tool a file is written for. ComfyUI's formula is re-implemented here
from its source (comfy/weight_adapter/base.py, `weight_decompose`, ComfyUI 0.3.64); PEFT (installed) is the
oracle for `lora_magnitude_vector`. Files are built in the key layouts real DoRA files have."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxbridge.convert.lora import apply_loras, convert_lora, load_lora
from fluxbridge.headless.factory import tiny_flux_transformer

FLUX = "flux-transformer"
pytestmark = pytest.mark.usefixtures("one_thread")


def comfy_weight_decompose(dora_scale, weight, lora_diff, alpha, strength):
    """ComfyUI's `weight_decompose` (float32 intermediate, `function` = identity), written from its source:
    the patched weight, divided by the norm of `weight` itself on the output axis (dora_scale [out, ...]),
    of the patched weight per input column otherwise, plus the weight dtype's epsilon; strength interpolates."""
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], 1)
    else:
        norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(weight_calc.shape[1], 1).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / norm)
    if strength != 1.0:
        return weight + strength * (weight_calc - weight)
    return weight_calc


def comfy_lora_weight(sd, key, weight, strength):
    """What ComfyUI's LoRA loader makes of `key` (lora_up/lora_down/alpha/dora_scale) on `weight`."""
    up, down = sd[key + ".lora_up.weight"].float(), sd[key + ".lora_down.weight"].float()
    alpha = float(sd[key + ".alpha"]) / down.shape[0] if key + ".alpha" in sd else 1.0
    diff = up @ down
    if key + ".dora_scale" in sd:
        return comfy_weight_decompose(sd[key + ".dora_scale"].float(), weight.float(), diff, alpha, strength)
    return weight.float() + strength * alpha * diff


def model():
    return tiny_flux_transformer(width=32, heads=2, double=1, single=1, seed=6)


def test_peft_magnitude_equals_peft_merge():
    """A diffusers-format DoRA (`lora_magnitude_vector`, alpha in the metadata) applied by us equals PEFT's
    own merge of the same adapter on the same weight."""
    g = torch.Generator().manual_seed(1)
    m = model()
    w = m.transformer_blocks[0].attn.to_out[0].weight.detach().clone()
    r, alpha = 4, 8
    A, Bm = torch.randn(r, 32, generator=g) * 0.3, torch.randn(32, r, generator=g) * 0.3
    mag = torch.rand(32, generator=g) + 0.5
    sd = {"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": A,
          "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": Bm,
          "transformer.transformer_blocks.0.attn.to_out.0.lora_magnitude_vector": mag}
    meta = {"lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.use_dora": true}'}
    with apply_loras(m, FLUX, [load_lora(sd, meta, name="dora")]):
        ours = m.transformer_blocks[0].attn.to_out[0].weight.detach().clone()

    torch.testing.assert_close(ours, peft_merge(w, A, Bm, mag, r, alpha), rtol=1e-5, atol=1e-6)


def peft_merge(w, A, Bm, mag, r, alpha):
    """PEFT's own DoRA merge of an adapter (A, B, magnitude, r, alpha) on a Linear holding `w`."""
    from peft import LoraConfig, get_peft_model
    holder = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0]))
    holder[0].weight.data.copy_(w)
    peft = get_peft_model(holder, LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], use_dora=True))
    layer = peft.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(Bm)
        layer.lora_magnitude_vector["default"].weight.copy_(mag)
    return peft.merge_and_unload()[0].weight.detach()


def kohya_dora(g, module="double_blocks_0_img_attn_proj", out=32, inp=32, r=4, alpha=2.0):
    """kohya / LyCORIS DoRA keys: `lora_unet_<module>.lora_down/up.weight`, `.alpha`, `.dora_scale` [1, in]."""
    base = f"lora_unet_{module}"
    return {f"{base}.lora_down.weight": torch.randn(r, inp, generator=g) * 0.3,
            f"{base}.lora_up.weight": torch.randn(out, r, generator=g) * 0.3,
            f"{base}.alpha": torch.tensor(alpha),
            f"{base}.dora_scale": torch.rand(1, inp, generator=g) + 0.5}


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_lycoris_dora_written_for_comfy_gives_the_same_weights_there(tmp_path, strength):
    g = torch.Generator().manual_seed(2)
    sd = {**kohya_dora(g), **kohya_dora(g, "double_blocks_0_txt_attn_qkv", out=96)}
    save_file(sd, tmp_path / "kohya_dora.safetensors")
    report = convert_lora(tmp_path / "kohya_dora.safetensors", tmp_path / "comfy.safetensors", "comfy")
    assert report["not_written"] == []
    written = load_file(tmp_path / "comfy.safetensors")
    assert written["diffusion_model.double_blocks.0.img_attn.proj.dora_scale"].shape == (1, 32)
    m = model()
    proj = m.transformer_blocks[0].attn.to_out[0].weight.detach().clone()
    a = m.transformer_blocks[0].attn
    qkv = torch.cat([a.add_q_proj.weight, a.add_k_proj.weight, a.add_v_proj.weight]).detach().clone()
    # in ComfyUI, the written file gives what the source file gives there
    for key, w in (("double_blocks.0.img_attn.proj", proj), ("double_blocks.0.txt_attn.qkv", qkv)):
        there = comfy_lora_weight(written, "diffusion_model." + key, w, strength)
        source = comfy_lora_weight(sd, "lora_unet_" + key.replace(".", "_"), w, strength)
        torch.testing.assert_close(there, source, rtol=0, atol=0)
    # and our apply of either file gives ComfyUI's weights
    for path in ("kohya_dora.safetensors", "comfy.safetensors"):
        with apply_loras(m, FLUX, [(load_lora(tmp_path / path), strength)]):
            torch.testing.assert_close(a.to_out[0].weight, comfy_lora_weight(sd, "lora_unet_double_blocks_0_img_attn_proj",
                                                                              proj, strength), rtol=1e-5, atol=1e-6)
            got = torch.cat([a.add_q_proj.weight, a.add_k_proj.weight, a.add_v_proj.weight])
            torch.testing.assert_close(got, comfy_lora_weight(sd, "lora_unet_double_blocks_0_txt_attn_qkv", qkv,
                                                              strength), rtol=1e-5, atol=1e-6)


def test_peft_dora_is_not_written_as_a_dora_scale_comfyui_would_misread(tmp_path):
    """Written as `.dora_scale [out, 1]` (as before), ComfyUI divides by the unpatched weight's row norms and
    applies other weights than PEFT: the part is left out, with the reason."""
    g = torch.Generator().manual_seed(3)
    m = model()
    w = m.transformer_blocks[0].attn.to_out[0].weight.detach().clone()
    A, Bm = torch.randn(4, 32, generator=g) * 0.3, torch.randn(32, 4, generator=g) * 0.3
    mag = torch.rand(32, generator=g) + 0.5
    sd = {"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": A,
          "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": Bm,
          "transformer.transformer_blocks.0.attn.to_out.0.lora_magnitude_vector": mag,
          "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": A.clone(),
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": Bm.clone()}
    save_file(sd, tmp_path / "peft_dora.safetensors")
    report = convert_lora(tmp_path / "peft_dora.safetensors", tmp_path / "comfy.safetensors", "comfy")
    [left_out] = report["not_written"]
    assert left_out["module"] == "double_blocks.0.img_attn.proj" and "ComfyUI" in left_out["reason"]
    written = load_file(tmp_path / "comfy.safetensors")
    assert not any("img_attn.proj" in k or "dora_scale" in k for k in written)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight" in written  # the rest is written
    # why: PEFT's weights and what ComfyUI makes of the same magnitude as an [out, 1] dora_scale differ
    merged = w + Bm @ A
    peft = merged * (mag[:, None] / merged.norm(dim=1, keepdim=True))
    comfy = comfy_weight_decompose(mag[:, None], w, Bm @ A, 1.0, 1.0)
    assert (peft - comfy).abs().max() > 1e-3


def test_output_axis_dora_scale_is_the_trainers_and_not_written_for_comfy(tmp_path):
    """LyCORIS' `dora_scale` [out, 1] (`wd_on_output`) normalises each row of the patched weight: the same
    formula as PEFT's magnitude, which is the oracle here (the same numbers as a `lora_magnitude_vector`).
    ComfyUI divides that axis by the unpatched weight's norm instead, so it is not written for ComfyUI."""
    g = torch.Generator().manual_seed(4)
    down, up = torch.randn(4, 32, generator=g) * 0.3, torch.randn(32, 4, generator=g) * 0.3
    d = torch.rand(32, 1, generator=g) + 0.5
    base = "lora_unet_double_blocks_0_img_attn_proj"
    sd = {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": torch.tensor(4.0),
          f"{base}.dora_scale": d}
    m = model()
    layer = m.transformer_blocks[0].attn.to_out[0]
    w = layer.weight.detach().clone()
    with apply_loras(m, FLUX, [(load_lora(sd, name="lycoris-out"), 1.0)]):
        ours = layer.weight.detach().clone()
    torch.testing.assert_close(ours, peft_merge(w, down, up, d.flatten(), 4, 4), rtol=1e-5, atol=1e-6)
    assert (ours - comfy_lora_weight(sd, base, w, 1.0)).abs().max() > 1e-3  # ComfyUI reads it otherwise
    save_file({**sd, **kohya_dora(g, "double_blocks_0_img_mlp_2", out=32, inp=128)}, tmp_path / "both.safetensors")
    report = convert_lora(tmp_path / "both.safetensors", tmp_path / "comfy.safetensors", "comfy")
    assert [d["module"] for d in report["not_written"]] == ["double_blocks.0.img_attn.proj"]
    assert "ComfyUI" in report["not_written"][0]["reason"]
    written = load_file(tmp_path / "comfy.safetensors")
    assert "diffusion_model.double_blocks.0.img_mlp.2.dora_scale" in written  # the input axis is written
    assert not any("img_attn.proj" in k for k in written)


def test_zero_rows_and_columns_give_zeros_not_nan():
    """A row (or column) that is zero in the base and in ΔW has norm 0: epsilon keeps it at 0, no NaN."""
    g = torch.Generator().manual_seed(5)
    m = model()
    layer = m.transformer_blocks[0].attn.to_out[0]
    with torch.no_grad():
        layer.weight[3].zero_()
        layer.weight[:, 5].zero_()
    up = torch.randn(32, 4, generator=g)
    up[3] = 0
    down = torch.randn(4, 32, generator=g)
    down[:, 5] = 0
    peft = {"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": down,
            "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": up,
            "transformer.transformer_blocks.0.attn.to_out.0.lora_magnitude_vector": torch.rand(32, generator=g) + .5}
    base = "diffusion_model.double_blocks.0.img_attn.proj"
    rows = {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
            f"{base}.dora_scale": torch.rand(32, 1, generator=g) + .5}
    cols = dict(rows, **{f"{base}.dora_scale": torch.rand(1, 32, generator=g) + .5})
    for sd, zero in ((peft, (3, slice(None))), (rows, (3, slice(None))), (cols, (slice(None), 5))):
        with apply_loras(m, FLUX, [load_lora(sd, name="zero")]):
            w = layer.weight.detach()
            assert torch.isfinite(w).all()
            assert torch.count_nonzero(w[zero]) == 0
