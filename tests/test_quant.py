"""fp8 files: plain fp8, ComfyUI scaled fp8 and the newer comfy_quant form give the logical weights."""
import json

import pytest
import torch
from safetensors.torch import save_file

from fluxbridge.convert.quant import INPUT_SCALES_NOTE, QuantView, logical_weights, quantize_fp8
from fluxbridge.convert.safetensors_io import open_weights
from fluxbridge.common.errors import BadInput

D = 32
LINEARS = {  # a tiny Flux-like transformer: the Linear layers that scaled fp8 files quantize
    "img_in": (D, 64),
    "double_blocks.0.img_attn.qkv": (3 * D, D),
    "double_blocks.0.img_mlp.0": (4 * D, D),
    "single_blocks.0.linear1": (7 * D, D),
    "single_blocks.0.linear2": (D, 5 * D),
    "final_layer.adaLN_modulation.1": (2 * D, D),
}
UNSCALED = {  # kept in bf16 by such files
    "double_blocks.0.img_attn.norm.query_norm.scale": (D // 2,),
    "double_blocks.0.img_attn.norm.key_norm.scale": (D // 2,),
}


def original(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {f"{k}.weight": torch.randn(*s, generator=g) * 0.2 for k, s in LINEARS.items()}
    w.update({f"{k}.bias": torch.randn(s[0], generator=g).bfloat16() for k, s in LINEARS.items()})
    w.update({k: torch.randn(*s, generator=g).bfloat16() for k, s in UNSCALED.items()})
    return w


def scaled_fp8_dict(prefix="", marker_numel=0, dtype=torch.float8_e4m3fn, input_scales=True):
    """An old-style ComfyUI scaled fp8 state dict (what `save_file` of such a model writes)."""
    sd = {}
    for k, v in original().items():
        layer = k[: -len(".weight")]
        if k.endswith(".weight") and layer in LINEARS:
            q, scale = quantize_fp8(v, dtype)
            sd[prefix + k] = q
            sd[prefix + layer + ".scale_weight"] = scale
            if input_scales and layer != "img_in":
                sd[prefix + layer + ".scale_input"] = torch.tensor(1.0)
        else:
            sd[prefix + k] = v
    sd[prefix + "scaled_fp8"] = torch.zeros(marker_numel, dtype=dtype)
    return sd


def to_comfy_quant(sd, in_metadata=False):
    """The newer form (ComfyUI `convert_old_quants`): weight_scale / input_scale / comfy_quant."""
    out, layers = {}, {}
    fmt_of = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            fmt_of[k[: -len(".weight")]] = "float8_e4m3fn" if v.dtype == torch.float8_e4m3fn else "float8_e5m2"
    for k, v in sd.items():
        if k.endswith("scaled_fp8"):
            continue
        if k.endswith(".scale_weight"):
            out[k.replace(".scale_weight", ".weight_scale")] = v
        elif k.endswith(".scale_input"):
            out[k.replace(".scale_input", ".input_scale")] = v
        else:
            out[k] = v
    for layer, fmt in fmt_of.items():
        blob = json.dumps({"format": fmt}).encode()
        if in_metadata:
            layers[layer] = {"format": fmt}
        else:
            out[layer + ".comfy_quant"] = torch.tensor(list(blob), dtype=torch.uint8)
    metadata = None
    if in_metadata:
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    return out, metadata


def reference(sd, prefix=""):
    """`W = weight.float() * scale_weight` for every scaled layer, straight from the state dict."""
    return {prefix + f"{layer}.weight": sd[prefix + f"{layer}.weight"].float() * sd[prefix + f"{layer}.scale_weight"]
            for layer in LINEARS}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_scaled_fp8_dequantizes_exactly(tmp_path, prefix, dtype):
    sd = scaled_fp8_dict(prefix, dtype=dtype)
    save_file(sd, tmp_path / "flux-fp8-scaled.safetensors")
    view = logical_weights(open_weights(tmp_path / "flux-fp8-scaled.safetensors"))
    expected_keys = {prefix + k for k in original()}
    assert set(view) == expected_keys and len(view) == len(expected_keys)
    ref = reference(sd, prefix)
    for k in expected_keys:
        t = view[k]
        assert view.shape(k) == t.shape and view.dtype(k) == t.dtype
        if k in ref:
            assert t.dtype == torch.float32 and torch.equal(t, ref[k]), k
            w = original()[k[len(prefix):]]
            assert (t - w).norm() < (0.08 if dtype == torch.float8_e4m3fn else 0.15) * w.norm()
        else:
            assert torch.equal(t, sd[k])  # biases and norms untouched
    for hidden in ("scaled_fp8", "img_in.scale_weight", "single_blocks.0.linear1.scale_input"):
        hidden = prefix + hidden
        assert hidden not in view
        with pytest.raises(KeyError):
            view[hidden]
    r = view.report
    assert r["scheme"] == "scaled_fp8" and r["dequantized"] == len(LINEARS)
    assert r["scale_weight_applied"] == len(LINEARS) and r["weight_scale_applied"] == 0
    assert r["dropped"]["markers"] == [prefix + "scaled_fp8"]
    assert r["dropped"]["input_scales"] == len(LINEARS) - 1
    assert r["full_precision_matrix_mult"] is False
    assert any(INPUT_SCALES_NOTE in n for n in r["notes"]) and any("scaled_fp8 marker" in n for n in r["notes"])
    json.dumps(r)
    fp8 = "F8_E4M3" if dtype == torch.float8_e4m3fn else "F8_E5M2"
    assert view.storage_dtypes[fp8] == len(LINEARS) + 1  # weights + marker
    assert view.dtypes()["float32"] == len(LINEARS)


def test_marker_with_two_elements_means_full_precision_matmul(tmp_path):
    save_file(scaled_fp8_dict(marker_numel=2), tmp_path / "m.safetensors")
    view = QuantView(open_weights(tmp_path / "m.safetensors"))
    assert view.report["full_precision_matrix_mult"] is True
    assert "scaled_fp8" not in view


@pytest.mark.parametrize("in_metadata", [False, True], ids=["comfy_quant", "metadata"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_newer_form_gives_the_same_weights(tmp_path, in_metadata, dtype):
    old = scaled_fp8_dict(dtype=dtype)
    save_file(old, tmp_path / "old.safetensors")
    new, metadata = to_comfy_quant(old, in_metadata)
    save_file(new, tmp_path / "new.safetensors", metadata=metadata)
    a = QuantView(open_weights(tmp_path / "old.safetensors"))
    b = QuantView(open_weights(tmp_path / "new.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    r = b.report
    assert r["scheme"] == "comfy_quant" and r["weight_scale_applied"] == len(LINEARS)
    assert r["dropped"]["comfy_quant"] == (0 if in_metadata else len(LINEARS))
    assert not any(k.endswith((".comfy_quant", ".weight_scale", ".input_scale")) for k in b)


def test_dequantize_to_a_requested_dtype(tmp_path):
    sd = scaled_fp8_dict()
    save_file(sd, tmp_path / "m.safetensors")
    view = QuantView(open_weights(tmp_path / "m.safetensors"), dtype=torch.bfloat16)
    ref = reference(sd)
    for k, v in ref.items():
        assert view.dtype(k) == torch.bfloat16 and torch.equal(view[k], v.bfloat16())


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8", "int8_tensorwise", "awq_w4a16"])
def test_unsupported_formats_are_refused_naming_the_layer(tmp_path, fmt):
    new, _ = to_comfy_quant(scaled_fp8_dict())
    layer = "double_blocks.0.img_mlp.0"
    new[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    save_file(new, tmp_path / "m.safetensors")
    with pytest.raises(BadInput, match=f"layer {layer}: quantization format '{fmt}' is not supported"):
        QuantView(open_weights(tmp_path / "m.safetensors"))
    # the same through the safetensors metadata
    new.pop(layer + ".comfy_quant")
    meta = {"_quantization_metadata": json.dumps({"layers": {layer: {"format": fmt}}})}
    save_file(new, tmp_path / "n.safetensors", metadata=meta)
    with pytest.raises(BadInput, match=f"layer {layer}: quantization format '{fmt}'"):
        QuantView(open_weights(tmp_path / "n.safetensors"))


def test_unlabelled_non_fp8_quantization_is_refused(tmp_path):
    layer = "double_blocks.0.img_attn.qkv"
    sd = {f"{layer}.weight": torch.zeros(3 * D, D // 2, dtype=torch.uint8),  # nvfp4-like packing
          f"{layer}.weight_scale": torch.ones(3 * D, 2, dtype=torch.float8_e4m3fn),
          f"{layer}.weight_scale_2": torch.tensor(1.0)}
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(BadInput, match=f"layer {layer}: weight_scale_2 .* not supported"):
        QuantView(open_weights(tmp_path / "m.safetensors"))
    sd = {f"{layer}.weight": torch.zeros(3 * D, D, dtype=torch.int8), f"{layer}.weight_scale": torch.tensor(0.1)}
    save_file(sd, tmp_path / "i.safetensors")
    with pytest.raises(BadInput, match=f"layer {layer}: weight stored as I8 .* not supported"):
        QuantView(open_weights(tmp_path / "i.safetensors"))


def test_format_must_match_storage(tmp_path):
    new, _ = to_comfy_quant(scaled_fp8_dict(dtype=torch.float8_e5m2))
    layer = "img_in"
    new[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    save_file(new, tmp_path / "m.safetensors")
    with pytest.raises(BadInput, match="layer img_in: format float8_e4m3fn but the weight is stored as F8_E5M2"):
        QuantView(open_weights(tmp_path / "m.safetensors"))
    new[layer + ".comfy_quant"] = torch.tensor(list(b"not json"), dtype=torch.uint8)
    save_file(new, tmp_path / "c.safetensors")
    with pytest.raises(BadInput, match="layer img_in: corrupt comfy_quant"):
        QuantView(open_weights(tmp_path / "c.safetensors"))


@pytest.mark.parametrize("scale_shape", ["row", "row1"])
def test_per_row_scales_broadcast_by_rows(tmp_path, scale_shape):
    w = torch.randn(3 * D, D)
    q, scale = quantize_fp8(w, per_row=True)
    assert scale.shape == (3 * D, 1)
    s = scale.reshape(-1) if scale_shape == "row" else scale
    sd = {"qkv.weight": q, "qkv.scale_weight": s, "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    save_file(sd, tmp_path / "m.safetensors")
    view = QuantView(open_weights(tmp_path / "m.safetensors"))
    assert torch.equal(view["qkv.weight"], q.float() * scale)
    assert (view["qkv.weight"] - w).norm() < 0.08 * w.norm()
    sd["qkv.scale_weight"] = torch.ones(D)  # neither a scalar nor one per row
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(BadInput, match="layer qkv: scale of shape \\[32\\] does not fit"):
        QuantView(open_weights(tmp_path / "bad.safetensors"))


def test_plain_fp8_is_a_cast_or_kept(tmp_path):
    sd = {k: (v.to(torch.float8_e4m3fn) if k.endswith(".weight") else v) for k, v in original().items()}
    save_file(sd, tmp_path / "fp8.safetensors")
    wf = open_weights(tmp_path / "fp8.safetensors")
    view = QuantView(wf)
    assert set(view) == set(sd) and view.report["scheme"] == "fp8"
    assert view.report["fp8_unscaled"] == len(LINEARS) and view.report["dequantized"] == 0
    k = "img_in.weight"
    assert view.dtype(k) == torch.bfloat16 and torch.equal(view[k], sd[k].to(torch.bfloat16))
    assert torch.equal(view[k].float(), sd[k].float())  # the cast is exact
    kept = QuantView(wf, keep_fp8=True)
    t = kept[k]
    assert t.dtype == torch.float8_e4m3fn and kept.dtype(k) == torch.float8_e4m3fn
    assert t.data_ptr() == wf[k].data_ptr()  # untouched: the file's own zero-copy view
    assert kept.report["fp8_kept"] is True
    same, none = kept.scaled(k)  # no scale: the plain tensor and None
    assert none is None and same.dtype == torch.float8_e4m3fn and torch.equal(same.float(), t.float())


def test_keep_fp8_gives_weight_and_scale_pairs(tmp_path):
    sd = scaled_fp8_dict()
    save_file(sd, tmp_path / "m.safetensors")
    view = QuantView(open_weights(tmp_path / "m.safetensors"), keep_fp8=True)
    k = "double_blocks.0.img_attn.qkv.weight"
    q, scale = view.scaled(k)
    assert q.dtype == torch.float8_e4m3fn and torch.equal(q.float(), sd[k].float())
    assert scale.shape == () and torch.equal(q.float() * scale, view[k])  # __getitem__ stays the true value
    assert view.is_scaled(k) and not view.is_scaled(k.replace(".weight", ".bias"))
    bias, none = view.scaled(k.replace(".weight", ".bias"))
    assert none is None and bias.dtype == torch.bfloat16
    with pytest.raises(KeyError):
        view.scaled("scaled_fp8")


def test_unquantized_files_are_untouched(tmp_path):
    sd = {"proj.weight": torch.randn(4, 4).bfloat16(), "proj.input_scale": torch.tensor(0.5),
          "norm.weight": torch.ones(4)}
    save_file(sd, tmp_path / "m.safetensors")
    view = QuantView(open_weights(tmp_path / "m.safetensors"))
    assert set(view) == set(sd) and view.report["scheme"] == "none"
    for k, v in sd.items():
        assert torch.equal(view[k], v)


def test_quantize_fp8_scale_formula():
    w = torch.randn(16, 8) * 3
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        q, scale = quantize_fp8(w, dtype)
        assert q.dtype == dtype and scale.dtype == torch.float32 and scale.shape == ()
        assert torch.equal(scale, w.abs().amax() / torch.finfo(dtype).max)
        assert q.float().abs().max() <= torch.finfo(dtype).max
    q, scale = quantize_fp8(torch.zeros(4, 4))
    assert scale.item() == 1.0 and q.float().abs().sum() == 0
    with pytest.raises(ValueError):
        quantize_fp8(w, torch.bfloat16)


def test_gguf_tensors_pass_through(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "flux")
    raw = gguf.quants.quantize(np.ones((4, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("a.weight", raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    view = logical_weights(open_weights(tmp_path / "m.gguf"))
    t = view["a.weight"]
    assert hasattr(t, "narrow_rows") and view.dtype("a.weight") == torch.float32
    assert torch.allclose(t.dequantize(), torch.ones(4, 32), atol=1e-3) and view.report["scheme"] == "none"
