"""GGUF: torch dequantization equal to gguf-py, exact row splits, validated reading of hostile files."""
import struct
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from fluxbridge.convert.gguf_io import GGUF_MISSING, QTYPES, GGUFFile, GGUFTensor, open_gguf  # noqa: E402
from fluxbridge.convert.safetensors_io import open_weights  # noqa: E402
from fluxbridge.convert.table import cat_rows, narrow_rows, swap_halves  # noqa: E402
from fluxbridge.common.errors import BadInput  # noqa: E402
from gguf_bytes import ARCH, gguf_bytes, gguf_string  # noqa: E402  (tests/helpers)

QUANTIZABLE = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16]  # gguf-py 0.19 can quantize these
K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]  # it cannot quantize these: random valid blocks
# where each type keeps its fp16 fields (d, dmin / m) inside a block
FP16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
               Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_blocks(qtype, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random raw rows of a block type: random bytes, with sane finite fp16 scale fields."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for at in FP16_FIELDS[qtype]:
        vals = rng.uniform(-1.5, 1.5, size=(rows, cols // block)).astype(np.float16)
        raw[:, :, at:at + 2] = vals.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, cols // block * size)


def reference(raw: np.ndarray, qtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32))


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype == torch.float32 and a.shape == b.shape
            and torch.equal(a.view(torch.int32), b.view(torch.int32)))


def wrap(raw: np.ndarray, qtype, shape) -> GGUFTensor:
    return GGUFTensor(torch.from_numpy(raw.copy()), int(qtype), shape)


# ------------------------------------------------------------------------------------ dequantization

@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_dequantize_equals_gguf_py_on_quantized_data(qtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((48, 256)) * rng.uniform(0.01, 3, size=(48, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    raw = gguf.quants.quantize(x, qtype)
    t = wrap(raw, qtype, (48, 256))
    ours = t.dequantize()
    assert bitwise_equal(ours, reference(raw, qtype).reshape(48, 256))
    assert t.dequantize(torch.bfloat16).dtype == torch.bfloat16
    x = torch.from_numpy(x)
    assert (ours - x).norm() < 0.15 * x.norm()  # and it is the data we quantized


@pytest.mark.parametrize("qtype", [q for q in QUANTIZABLE if q != Q.BF16] + K_QUANTS, ids=lambda q: q.name)
def test_dequantize_equals_gguf_py_on_random_blocks(qtype):
    raw = random_blocks(qtype, 12, 512, seed=int(qtype))
    ours = wrap(raw, qtype, (12, 512)).dequantize()
    assert bitwise_equal(ours, reference(raw, qtype).reshape(12, 512))


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_gguf_py_cannot_quantize_k_quants(qtype):
    """Why the K-quant tests use random blocks (if gguf-py learns to quantize them, use its data too)."""
    try:
        gguf.quants.quantize(np.zeros((1, 256), np.float32), qtype)
    except NotImplementedError:
        return
    pytest.fail(f"gguf-py now quantizes {qtype.name}: test the dequantizer on its data too")


def test_every_listed_type_has_torch_code():
    assert {QTYPES[int(q)][0] for q in QUANTIZABLE + K_QUANTS} == {q.name for q in QUANTIZABLE + K_QUANTS}


# ------------------------------------------------------------------------------------ rows

def fused(qtype, rows: int, cols: int):
    if qtype in QUANTIZABLE:
        rng = np.random.default_rng(2)
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    return random_blocks(qtype, rows, cols, seed=3)


@pytest.mark.parametrize("qtype", QUANTIZABLE + K_QUANTS, ids=lambda q: q.name)
def test_row_splits_are_exact_for_fused_qkv_and_linear1(qtype):
    D, cols = 32, 256  # rows as in Flux (3D; D, D, D, 4D); 256 input columns: one K-quant block per row
    for sizes in ([D, D, D], [D, D, D, 4 * D]):  # img_attn.qkv; single_blocks linear1 = [D, D, D, 4D]
        rows = sum(sizes)
        t = wrap(fused(qtype, rows, cols), qtype, (rows, cols))
        full = t.dequantize()
        start, parts = 0, []
        for n in sizes:
            part = t.narrow_rows(start, n)
            assert isinstance(part, GGUFTensor) and part.shape == (n, cols) and part.qtype == int(qtype)
            assert part.raw.data_ptr() == t.raw[start].data_ptr()  # a view of the raw rows
            assert bitwise_equal(part.dequantize(), full[start:start + n])
            parts.append(part)
            start += n
        again = GGUFTensor.cat_rows(parts)
        assert isinstance(again, GGUFTensor) and torch.equal(again.raw, t.raw)


def test_layout_table_ops_work_on_quantized_rows():
    D = 64
    t = wrap(fused(Q.Q8_0, 2 * D, D), Q.Q8_0, (2 * D, D))
    swapped = swap_halves(t)  # final_layer.adaLN_modulation.1 <-> norm_out.linear
    assert isinstance(swapped, GGUFTensor)
    full = t.dequantize()
    assert torch.equal(swapped.dequantize(), torch.cat([full[D:], full[:D]]))
    assert torch.equal(narrow_rows(t, 5, 7).dequantize(), full[5:12])
    assert torch.equal(cat_rows([narrow_rows(t, 0, D), narrow_rows(t, D, D)]).raw, t.raw)


def test_mixed_types_concatenate_as_values():
    D = 64
    a = wrap(fused(Q.Q8_0, D, D), Q.Q8_0, (D, D))
    b = wrap(fused(Q.Q4_0, D, D), Q.Q4_0, (D, D))
    plain = torch.randn(D, D)
    mixed = GGUFTensor.cat_rows([a, b])
    assert isinstance(mixed, torch.Tensor) and torch.equal(mixed, torch.cat([a.dequantize(), b.dequantize()]))
    via_torch = torch.cat([plain, a])  # a plain tensor first: torch.cat dispatches to GGUFTensor
    assert torch.equal(via_torch, torch.cat([plain, a.dequantize()]))


def test_one_dimensional_rows():
    for qtype in (Q.Q8_0, Q.BF16):
        raw = fused(qtype, 1, 192).reshape(-1)
        t = wrap(raw, qtype, (192,))
        full = t.dequantize()
        part = t.narrow_rows(64, 64)  # whole blocks: stays quantized
        assert isinstance(part, GGUFTensor) and torch.equal(part.dequantize(), full[64:128])
        assert torch.equal(GGUFTensor.cat_rows([t.narrow_rows(0, 64), part]).dequantize(), full[:128])
        odd = t.narrow_rows(3, 10)  # not whole Q8_0 blocks: values; BF16 blocks are single elements
        assert isinstance(odd, GGUFTensor) == (qtype == Q.BF16)
        assert torch.equal(odd.dequantize() if qtype == Q.BF16 else odd, full[3:13])


def test_bf16_dequantizes_to_a_view_and_reshapes():
    x = torch.randn(8, 4, 1, 1).bfloat16()
    raw = x.reshape(8, 4).view(torch.uint8).numpy()
    t = wrap(raw, Q.BF16, (8, 4, 1, 1))
    assert t.dtype == torch.bfloat16 and torch.equal(t.dequantize(torch.bfloat16), x)
    r = t.reshape(8, 4)  # VAE attention 1x1 conv -> linear
    assert isinstance(r, GGUFTensor) and torch.equal(r.dequantize(torch.bfloat16), x.reshape(8, 4))


# ------------------------------------------------------------------------------------ files

def write_flux_gguf(path: Path):
    """A small Flux-like GGUF, BFL names, mixed types; returns {name: (qtype, expected float32 values)}."""
    D, rng = 64, np.random.default_rng(4)
    w = gguf.GGUFWriter(str(path), "flux")
    w.add_uint32("general.quantization_version", 2)
    expected = {}

    def add(name, x, qtype):
        if qtype == Q.F32:
            w.add_tensor(name, x.astype(np.float32))
            expected[name] = (qtype, torch.from_numpy(x.astype(np.float32)))
            return
        if qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
            expected[name] = (qtype, torch.from_numpy(x.astype(np.float16).astype(np.float32)))
            return
        raw = gguf.quants.quantize(x.astype(np.float32), qtype) if qtype in QUANTIZABLE else x
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        shape = gguf.quants.quant_shape_from_byte_shape(raw.shape, qtype)
        expected[name] = (qtype, reference(raw, qtype).reshape(shape))

    add("img_in.weight", rng.standard_normal((D, 64)), Q.F16)
    add("img_in.bias", rng.standard_normal(D), Q.F32)
    add("double_blocks.0.img_attn.qkv.weight", rng.standard_normal((3 * D, D)), Q.Q8_0)
    add("double_blocks.0.img_attn.qkv.bias", rng.standard_normal(3 * D), Q.F32)
    add("double_blocks.0.img_attn.proj.weight", rng.standard_normal((D, D)), Q.Q5_0)
    add("single_blocks.0.linear1.weight", rng.standard_normal((7 * D, D)), Q.Q4_0)
    add("single_blocks.0.linear2.weight", rng.standard_normal((D, 5 * D)), Q.Q5_1)
    add("final_layer.adaLN_modulation.1.weight", rng.standard_normal((2 * D, D)), Q.BF16)
    add("double_blocks.0.img_mlp.0.weight", random_blocks(Q.Q6_K, 4 * D, 256), Q.Q6_K)
    add("double_blocks.0.img_mlp.2.weight", random_blocks(Q.Q4_K, D, 512), Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_flux_gguf_through_open_weights(tmp_path):
    path = tmp_path / "flux1-dev-Q8_0.gguf"
    expected = write_flux_gguf(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about non-writable arrays
        g = open_weights(path)
        assert isinstance(g, GGUFFile)
        assert list(g) == list(expected)
        assert g.metadata["general.architecture"] == "flux" and g.architecture == "flux"
        assert g.metadata["general.quantization_version"] == "2"
        assert g.config is None
        for name, (qtype, values) in expected.items():
            t = g[name]
            assert g.shape(name) == values.shape and g.dtype_name(name) == qtype.name
            if qtype in (Q.F32, Q.F16):
                assert type(t) is torch.Tensor and t.dtype == g.dtype(name)
                assert torch.equal(t.float(), values)
                t.mul_(1)  # writable (private copy-on-write map)
            else:
                assert isinstance(t, GGUFTensor) and t.shape == values.shape and t.dtype == g.dtype(name)
                assert bitwise_equal(t.dequantize(), values), name
    assert g.dtypes()["F32"] == 2 and g.dtypes()["Q6_K"] == 1
    assert g.nbytes == sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    qkv = g["double_blocks.0.img_attn.qkv.weight"]
    D = qkv.shape[1]
    assert torch.equal(qkv.narrow_rows(D, D).dequantize(), expected["double_blocks.0.img_attn.qkv.weight"][1][D:2 * D])
    g.close()


def test_gguf_by_content_without_the_suffix(tmp_path):
    path = tmp_path / "model.bin.gguf.renamed"
    write_flux_gguf(path)
    assert isinstance(open_weights(path), GGUFFile)


def test_missing_gguf_package_is_bad_input(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    write_flux_gguf(path)
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(BadInput, match="GGUF support needs the 'gguf' package: pip install fluxbridge\\[gguf\\]"):
        open_weights(path)
    assert GGUF_MISSING in str(pytest.raises(BadInput, open_gguf, path).value)


# ------------------------------------------------------------------------------------ hostile files



def test_hand_built_gguf_is_readable(tmp_path):
    data = np.arange(8, dtype=np.float32).tobytes()
    p = tmp_path / "ok.gguf"
    p.write_bytes(gguf_bytes([ARCH], [("w", (4, 2), 0, 0)], data))
    g = open_weights(p)
    assert g.shape("w") == (2, 4) and torch.equal(g["w"], torch.arange(8.0).reshape(2, 4))


@pytest.mark.parametrize("blob, match", [
    (gguf_bytes([ARCH], n_tensors=2 ** 40), "corrupt header: 1099511627776 tensors"),
    (gguf_bytes([ARCH], n_kv=2 ** 50), "metadata entries"),
    (gguf_bytes([("a", struct.pack("<I", 9) + struct.pack("<IQ", 4, 2 ** 40))]), "truncated: array 'a'"),
    (gguf_bytes([("a", struct.pack("<I", 9) + struct.pack("<IQ", 8, 2 ** 40))]), "truncated: array 'a'"),
    (gguf_bytes([("a", struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 1))]), "nested array"),
    (gguf_bytes([("a", struct.pack("<I", 77))]), "unknown value type 77"),
    (gguf_bytes([("a", struct.pack("<I", 8) + struct.pack("<Q", 2 ** 60))]), "truncated"),
    (gguf_bytes([ARCH, ARCH]), "duplicate metadata key"),
    (gguf_bytes([("general.alignment", struct.pack("<I", 4) + struct.pack("<I", 24))]), "power of two"),
    (gguf_bytes([], [("w", (64,), 99, 0)], b"\0" * 256), "unknown GGML type 99"),
    (gguf_bytes([], [("w", (64,), 9, 0)], b"\0" * 256), "tensor 'w' has GGML type Q8_1, which cannot be dequantized"),
    (gguf_bytes([], [("w", (64,), 0, 0)], b"\0" * 16), "truncated: tensor 'w' ends at byte"),
    (gguf_bytes([], [("w", (2 ** 40, 2 ** 40), 0, 0)], b"\0" * 16), "corrupt header: tensor 'w' has shape"),
    (gguf_bytes([], [("w", (31,), 8, 0)], b"\0" * 64), "not whole blocks of 32"),
    (gguf_bytes([], [("a", (8,), 0, 0), ("b", (8,), 0, 16)], b"\0" * 64), "overlap"),
    (gguf_bytes([], [("a", (8,), 0, 0), ("a", (8,), 0, 32)], b"\0" * 64), "appears twice"),
    (gguf_bytes([], [("w", (1,) * 9, 0, 0)], b"\0" * 64), "9 dimensions"),
    (gguf_bytes([], [], version=1), "version 1 is not supported"),
    (gguf_bytes([], [], version=3 << 24), "big-endian"),
    (gguf_bytes([("\xff", b"")]).replace(gguf_string("\xff"), struct.pack("<Q", 1) + b"\xff"), "not UTF-8"),
    (b"GGML" + b"\0" * 60, "not a GGUF file"),
    (b"", "empty"),
], ids=lambda x: None if isinstance(x, bytes) else x[:30])
def test_hostile_gguf_headers(tmp_path, blob, match):
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    with pytest.raises(BadInput, match=match):
        open_weights(p)


def test_truncated_gguf(tmp_path):
    p = tmp_path / "t.gguf"
    write_flux_gguf(p)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(BadInput, match="truncated: tensor"):
        open_weights(p)


def _valid_small_gguf() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "v.gguf"
        w = gguf.GGUFWriter(str(p), "flux")
        w.add_tensor("a.weight", gguf.quants.quantize(np.ones((4, 32), np.float32), Q.Q8_0),
                     raw_shape=(4, 34), raw_dtype=Q.Q8_0)
        w.add_tensor("a.bias", np.arange(4, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return p.read_bytes()


VALID = _valid_small_gguf()
HEADER_LEN = VALID.index(b"a.bias") + 40  # through the last tensor info


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.integers(0, HEADER_LEN - 1), st.integers(0, 7)), min_size=1, max_size=4))
def test_fuzz_bit_flipped_gguf_header(flips):
    blob = bytearray(VALID)
    for pos, bit in flips:
        blob[pos] ^= 1 << bit
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.gguf"
        p.write_bytes(bytes(blob))
        try:
            g = open_weights(p)
        except BadInput:
            return
        for k in g:
            t = g[k]
            (t.dequantize() if isinstance(t, GGUFTensor) else t).sum()


def test_tensors_outlive_the_closed_file(tmp_path):
    import gc
    import weakref
    path = tmp_path / "m.gguf"
    expected = write_flux_gguf(path)
    g = open_weights(path)
    name = "double_blocks.0.img_attn.qkv.weight"
    part = g[name].narrow_rows(0, 8)
    bias = g["img_in.bias"]
    reader = weakref.ref(g._reader)
    g.close()
    with pytest.raises(ValueError, match="closed"):
        g[name]
    assert g.shape(name) == expected[name][1].shape  # header facts stay
    del g
    gc.collect()
    assert reader() is None
    assert torch.equal(part.dequantize(), expected[name][1][:8])
    assert torch.equal(bias, expected["img_in.bias"][1])


def test_inspect_names_the_quantization_types(tmp_path):
    """`inspect` on a GGUF counts tensors per ggml type (Q8_0, F16, F32), not per dequantized dtype."""
    from collections import Counter

    from gguf_flux import tiny_model, write_flux_gguf  # tests/helpers

    from fluxbridge.convert.inspect import inspect_path
    path = tmp_path / "flux1-dev-Q8_0.gguf"
    types = write_flux_gguf(tiny_model(), path)
    info = inspect_path(path)
    assert info["family"] == "flux-transformer" and info["variant"] == "dev"
    assert info["dtypes"] == dict(Counter(types.values()))
    assert set(info["dtypes"]) == {"Q8_0", "F16", "F32"} and info["dtypes"]["F16"] == 1
