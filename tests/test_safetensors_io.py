"""The safetensors layer: validated zero-copy reading, folders and shards, hostile files, the streaming writer."""
import gc
import json
import os
import pickle
import resource
import struct
import tempfile
import weakref
from pathlib import Path

import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fluxbridge.convert.safetensors_io import (
    MAX_HEADER, PICKLE_REFUSED, ShardedWeights, WeightFile, open_weights, write_safetensors)
from fluxbridge.common.errors import BadInput

MB = 2 ** 20


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f64": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "f32": torch.randn(5, 7, generator=g),
        "f16": torch.randn(4, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3) - 3,
        "i32": torch.tensor([-(2 ** 31), 2 ** 31 - 1], dtype=torch.int32),
        "i16": torch.tensor([-7, 9], dtype=torch.int16),
        "i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 3], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "e4m3": torch.randn(3, 4, generator=g).to(torch.float8_e4m3fn),
        "e5m2": torch.randn(4, 3, generator=g).to(torch.float8_e5m2),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "empty_bf16": torch.empty(3, 0, dtype=torch.bfloat16),
    }


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def raw_file(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    """A file with an arbitrary header (dict or bytes) and data section."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


# ------------------------------------------------------------------------------------------- reading

def test_reads_every_dtype_like_safetensors(tmp_path):
    sd = sample_tensors()
    save_file(sd, tmp_path / "m.safetensors", metadata={"format": "pt", "note": "x"})
    with open_weights(tmp_path / "m.safetensors") as wf:
        assert isinstance(wf, WeightFile)
        assert set(wf) == set(sd) and len(wf) == len(sd)
        assert wf.metadata == {"format": "pt", "note": "x"}
        assert wf.config is None
        for k, v in sd.items():
            assert wf.shape(k) == v.shape and wf.dtype(k) == v.dtype
            assert same(wf[k], v), k
        assert wf.dtype_name("e4m3") == "F8_E4M3" and wf.dtype_name("bf16") == "BF16"
        assert wf.dtypes()["F32"] == 3 and wf.dtypes()["BOOL"] == 1
        assert wf.nbytes == sum(v.numel() * v.element_size() for v in sd.values())
        assert "f32" in wf and "nope" not in wf
        with pytest.raises(KeyError):
            wf["nope"]


def test_zero_copy_views_are_lazy_and_private(tmp_path):
    big = torch.arange(16 * MB, dtype=torch.float32).reshape(4 * MB, 4)  # 64 MB
    save_file({"big": big, "small": torch.ones(3)}, tmp_path / "big.safetensors")
    del big
    gc.collect()
    wf = open_weights(tmp_path / "big.safetensors")
    before = rss()
    t = wf["big"]
    after_view = rss()
    base = torch.frombuffer(wf._buffer, dtype=torch.uint8, count=1).data_ptr()
    size = os.path.getsize(tmp_path / "big.safetensors")
    # the tensor's memory lies inside the mapping, exactly where its bytes are in the file
    assert base <= t.data_ptr() < base + size
    assert t.data_ptr() - base == wf.data_offset + wf.info("big").begin
    assert after_view - before < 8 * MB  # nothing was read to make the view
    assert t[-1, -1].item() == 16 * MB - 1
    t.sum()  # now the pages are read: the measurement above was of a lazy view
    after_touch = rss()
    assert after_touch - before > 32 * MB
    t[0, 0] = -1.0  # writable, without warnings, and private: the file does not change
    assert load_file(tmp_path / "big.safetensors")["big"][0, 0].item() == 0.0
    print(f"\nRSS growth for a 64 MB view: {(after_view - before) / MB:.2f} MB, "
          f"after reading it: {(after_touch - before) / MB:.2f} MB")


def test_tensors_keep_the_mapping_alive(tmp_path):
    sd = {"a": torch.randn(256, 256), "b": torch.randn(10)}
    save_file(sd, tmp_path / "m.safetensors")
    wf = open_weights(tmp_path / "m.safetensors")
    a = wf["a"].narrow(0, 10, 5)  # a view of a view still holds the map
    mm = wf._buffer.obj
    wf.close()
    del wf
    gc.collect()
    assert not mm.closed  # still viewed by `a`
    assert torch.equal(a, sd["a"][10:15])
    ref = weakref.ref(mm)
    del a, mm
    gc.collect()
    assert ref() is None  # the last view gone: unmapped
    wf = open_weights(tmp_path / "m.safetensors")
    mm = wf._buffer.obj
    wf.close()  # nothing handed out: closed at once
    assert mm.closed


def test_per_tensor_mapping_fallback(tmp_path):
    sd = sample_tensors()
    save_file(sd, tmp_path / "m.safetensors")
    wf = WeightFile.open(tmp_path / "m.safetensors", whole_map=False)
    assert wf._buffer is None
    for k, v in sd.items():
        assert same(wf[k], v), k
    kept = wf["f32"]
    wf.close()
    gc.collect()
    assert same(kept, sd["f32"])


def test_misaligned_offsets_are_copied_not_viewed(tmp_path):
    data = b"\x00" + struct.pack("<3f", 1.0, 2.0, 3.0)
    hdr = {"pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
           "x": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}
    h = json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    wf = open_weights(raw_file(tmp_path / "m.safetensors", h, data))
    x = wf["x"]
    assert x.tolist() == [1.0, 2.0, 3.0] and x.data_ptr() % 4 == 0


def test_bool_bytes_are_normalised(tmp_path):
    hdr = {"b": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}
    wf = open_weights(raw_file(tmp_path / "b.safetensors", hdr, b"\x00\x07\x01"))
    assert wf["b"].tolist() == [False, True, True]


# ------------------------------------------------------------------------------------------- folders

def test_diffusers_component_folder_with_config(tmp_path):
    sd = {"x_embedder.weight": torch.randn(8, 4)}
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"num_layers": 1}))
    wf = open_weights(tmp_path)
    assert wf.config == {"num_layers": 1}
    assert torch.equal(wf["x_embedder.weight"], sd["x_embedder.weight"])


def test_pipeline_folder_opens_its_transformer(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "vae").mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    assert list(open_weights(tmp_path)) == ["w"]
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "transformer").rmdir()
    with pytest.raises(BadInput, match="pipeline folder.*vae"):
        open_weights(tmp_path)


def make_shards(folder: Path, sd: dict, split: int = 2, index_name="diffusion_pytorch_model.safetensors.index.json"):
    names = sorted(sd)
    weight_map = {}
    for i in range(split):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{split:05d}.safetensors"
        part = {k: sd[k] for k in names[i::split]}
        save_file(part, folder / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    return weight_map


def test_sharded_folder(tmp_path):
    sd = {f"blocks.{i}.weight": torch.randn(3, i + 1) for i in range(5)}
    make_shards(tmp_path, sd)
    (tmp_path / "config.json").write_text('{"a": 1}')
    wf = open_weights(tmp_path)
    assert isinstance(wf, ShardedWeights) and len(wf.shards) == 2
    assert set(wf) == set(sd) and wf.config == {"a": 1} and wf.metadata == {"format": "pt"}
    for k, v in sd.items():
        assert torch.equal(wf[k], v) and wf.shape(k) == v.shape and wf.dtype(k) == torch.float32
    assert wf.dtypes() == {"F32": 5}
    assert wf.nbytes == sum(v.numel() * 4 for v in sd.values())
    wf.close()


@pytest.mark.parametrize("problem, match", [
    ("missing", "shard .* is missing"),
    ("escape", "not a file inside the folder"),
    ("absolute", "not a file inside the folder"),
    ("wrong_shard", "is not in its shard"),
    ("corrupt", "corrupt index"),
    ("no_map", "no weight_map"),
])
def test_sharded_folder_problems(tmp_path, problem, match):
    sd = {"a": torch.ones(2), "b": torch.zeros(3)}
    index = tmp_path / "model.safetensors.index.json"
    wm = make_shards(tmp_path, sd, index_name=index.name)
    if problem == "missing":
        (tmp_path / wm["a"]).unlink()
    elif problem == "escape":
        wm["a"] = "../outside.safetensors"
    elif problem == "absolute":
        wm["a"] = "/etc/passwd"
    elif problem == "wrong_shard":
        wm["a"] = wm["b"]
    if problem == "corrupt":
        index.write_text("{not json")
    elif problem == "no_map":
        index.write_text('{"metadata": {}}')
    else:
        index.write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(BadInput, match=match):
        open_weights(tmp_path)


def test_folder_problems(tmp_path):
    with pytest.raises(BadInput, match="no weights found"):
        open_weights(tmp_path)
    with pytest.raises(BadInput, match="no such file"):
        open_weights(tmp_path / "missing.safetensors")
    torch.save({"w": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(BadInput, match="pickle-based checkpoint refused"):
        open_weights(tmp_path)
    save_file({"w": torch.ones(1)}, tmp_path / "a.fp16.safetensors")
    assert list(open_weights(tmp_path)) == ["w"]  # the one weights file there
    save_file({"w": torch.ones(1)}, tmp_path / "b.safetensors")
    with pytest.raises(BadInput, match="several weight files"):
        open_weights(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(BadInput, match="config.json"):
        open_weights(tmp_path)


# ------------------------------------------------------------------------------------------- hostile

def valid_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
                   "c": torch.tensor([1, 2], dtype=torch.int8)}, f"{d}/v.safetensors", metadata={"k": "v"})
        return Path(f"{d}/v.safetensors").read_bytes()


VALID = valid_bytes()


def test_empty_and_tiny_files(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(BadInput, match="empty"):
        open_weights(tmp_path / "e.safetensors")
    (tmp_path / "t.safetensors").write_bytes(b"\x01\x02\x03")
    with pytest.raises(BadInput, match="not a safetensors file"):
        open_weights(tmp_path / "t.safetensors")


def test_truncated_file(tmp_path):
    (tmp_path / "t.safetensors").write_bytes(VALID[:-5])
    with pytest.raises(BadInput, match="truncated: tensor") as exc:
        open_weights(tmp_path / "t.safetensors")
    assert str(exc.value).startswith(str(tmp_path / "t.safetensors") + ": ")


def test_header_length_beyond_the_file(tmp_path):
    p = raw_file(tmp_path / "h.safetensors", b'{"a": 1}', length=1234)
    with pytest.raises(BadInput, match="truncated: the header says it is 1234 bytes but the file has only 8"):
        open_weights(p)
    (tmp_path / "g.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(BadInput, match="not a safetensors file"):
        open_weights(tmp_path / "g.safetensors")


def test_header_over_the_size_cap(tmp_path):
    p = tmp_path / "cap.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER + 1) + b"{")
        f.truncate(MAX_HEADER + 64)  # sparse: no real disk use
    with pytest.raises(BadInput, match="corrupt header: .* over the 100 MB limit"):
        open_weights(p)


def test_tensor_of_1e12_elements_refused_before_allocating(tmp_path):
    huge = {"w": {"dtype": "F32", "shape": [10 ** 6, 10 ** 6], "data_offsets": [0, 4 * 10 ** 12]}}
    liar = {"w": {"dtype": "F32", "shape": [10 ** 6, 10 ** 6], "data_offsets": [0, 4]}}
    gc.collect()
    before, peak_before = rss(), peak_rss()
    with pytest.raises(BadInput, match="truncated: tensor 'w' ends at byte 4000000000000"):
        open_weights(raw_file(tmp_path / "huge.safetensors", huge, b"\0" * 4))
    with pytest.raises(BadInput, match="needs 4000000000000 bytes, its data_offsets give 4"):
        open_weights(raw_file(tmp_path / "liar.safetensors", liar, b"\0" * 4))
    grown, peak_grown = rss() - before, peak_rss() - peak_before
    print(f"\nRSS growth while refusing a 10**12-element header: {grown / MB:.2f} MB "
          f"(peak growth {peak_grown / MB:.2f} MB)")
    assert grown < 50 * MB and peak_grown < 50 * MB


@pytest.mark.parametrize("header, data, match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 8, "truncated: tensor 'a' ends at byte 16"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, "0 <= begin <= end"),
    ({"a": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}}, 8, "tensor 'a' has unknown dtype 'Q4_K'"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 8, "non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, "non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [2]}}, 8, "has no data_offsets"),
    ({"a": [1, 2]}, 8, "entry 'a' is not an object"),
    ({"__metadata__": {"k": 1}}, 0, "not a string"),
    ({"__metadata__": [1]}, 0, "__metadata__ is not an object"),
    (b"[1, 2]", 0, "no JSON header"),
    (b"{} [1]", 0, "not valid JSON"),
    (b"{not json}", 0, "not valid JSON"),
    (b'{"a": NaN}', 0, "not valid JSON"),
    (b"{" + b'"a":' * 1 + b"[" * 100000 + b"]" * 100000 + b"}", 0, "not valid JSON|not an object"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', 8, "duplicate entry 'a'"),
    (b'{"\xff": 1}', 0, "not UTF-8"),
])
def test_corrupt_headers(tmp_path, header, data, match):
    p = raw_file(tmp_path / "c.safetensors", header, b"\0" * data)
    with pytest.raises(BadInput, match=match):
        open_weights(p)


class Evil:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    payloads = {
        "evil.pt": pickle.dumps({"w": Evil(marker)}, protocol=2),
        "evil.ckpt": pickle.dumps(Evil(marker), protocol=4),
        "evil.safetensors": pickle.dumps(Evil(marker), protocol=4),
        "evil0.safetensors": pickle.dumps(Evil(marker), protocol=0),
        "evil_no_suffix": pickle.dumps(Evil(marker), protocol=5),
    }
    for name, blob in payloads.items():
        (tmp_path / name).write_bytes(blob)
    torch.save({"w": torch.ones(3)}, tmp_path / "model.pt")
    (tmp_path / "model_pt_renamed.safetensors").write_bytes((tmp_path / "model.pt").read_bytes())
    torch.save({"w": torch.ones(3)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "legacy.sft").write_bytes((tmp_path / "legacy.pth").read_bytes())
    for name in [*payloads, "model.pt", "model_pt_renamed.safetensors", "legacy.pth", "legacy.sft"]:
        with pytest.raises(BadInput) as exc:
            open_weights(tmp_path / name)
        if name != "evil0.safetensors":  # a protocol-0 pickle has no magic: just not a safetensors file
            assert PICKLE_REFUSED in str(exc.value), name
    assert not marker.exists()


def _check_file_bytes(blob: bytes):
    """Opening these bytes gives BadInput or a readable file, never another exception."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.safetensors"
        p.write_bytes(blob)
        try:
            wf = open_weights(p)
        except BadInput:
            return
        for k in wf:
            t = wf[k]
            t.reshape(-1)[:1].tolist() if t.numel() else None
            assert t.shape == wf.shape(k)
        wf.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.integers(0, 8 + struct.unpack("<Q", VALID[:8])[0] - 1), st.integers(0, 7)),
                      min_size=1, max_size=6))
def test_fuzz_bit_flipped_header(flips):
    blob = bytearray(VALID)
    for pos, bit in flips:
        blob[pos] ^= 1 << bit
    _check_file_bytes(bytes(blob))


@settings(max_examples=150, deadline=None)
@given(header=st.binary(max_size=200), data=st.binary(max_size=64))
def test_fuzz_random_headers(header, data):
    _check_file_bytes(struct.pack("<Q", len(header)) + header + data)


@settings(max_examples=100, deadline=None)
@given(header=st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2 ** 40) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "a", "b"]), kids, max_size=4),
    max_leaves=20), data=st.binary(max_size=32))
def test_fuzz_json_headers(header, data):
    h = json.dumps(header).encode()
    _check_file_bytes(struct.pack("<Q", len(h)) + h + data)


# ------------------------------------------------------------------------------------------- writing

def test_streaming_writer_round_trip(tmp_path):
    sd = sample_tensors()
    alive = []

    def producer(name):
        def make():
            assert all(r() is None for r in alive), "a previous tensor is still alive"
            t = sd[name].clone()
            alive.append(weakref.ref(t))
            return t
        return make

    def entries():  # a generator: one spec at a time
        for name, t in sd.items():
            yield name, tuple(t.shape), t.dtype, producer(name)

    out = write_safetensors(tmp_path / "out.safetensors", entries(), {"format": "pt", "k": "v"})
    assert out == tmp_path / "out.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    back = load_file(out)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        assert same(back[k], v), k
    with safe_open(out, "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    # data are aligned to their dtype, the header to 8 bytes
    wf = open_weights(out)
    assert wf.data_offset % 8 == 0
    assert all(wf.info(k).begin % sd[k].element_size() == 0 for k in sd)
    # the same tensor bytes as safetensors' own writer
    save_file(sd, tmp_path / "ref.safetensors", metadata={"format": "pt", "k": "v"})
    ref = open_weights(tmp_path / "ref.safetensors")
    for k in sd:
        assert same(ref[k], wf[k])


def test_writer_starts_writeback_of_finished_ranges(tmp_path, monkeypatch):
    """Finished bytes are handed to the disk while the next tensor is produced: contiguous ranges from
    the file's start, never beyond what was written, and the file is the same as without."""
    import fluxbridge.convert.safetensors_io as sio
    sd = sample_tensors()
    ranges, results = [], []
    real = sio._sync_file_range()

    def spy(fd, offset, nbytes):
        assert os.fstat(fd).st_size >= offset + nbytes  # only bytes already in the file
        ranges.append((offset, nbytes))
        if real is not None:
            results.append(real(fd, offset, nbytes, sio._SYNC_FILE_RANGE_WRITE))

    monkeypatch.setattr(sio, "WRITEBACK_STEP", 1)
    monkeypatch.setattr(sio, "_start_writeback", spy)
    out = write_safetensors(tmp_path / "out.safetensors", sd)
    nonempty = sum(t.numel() > 0 for t in sd.values())
    assert len(ranges) == nonempty  # the header, then each tensor with bytes but the last
    assert ranges[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:]))
    assert ranges[-1][0] + ranges[-1][1] < out.stat().st_size
    assert all(r == 0 for r in results)  # the kernel took every request (Linux)
    back = load_file(out)
    assert all(same(back[k], v) for k, v in sd.items())


def test_writer_accepts_pairs_and_mappings_and_casts(tmp_path):
    a = torch.randn(3, 4)
    write_safetensors(tmp_path / "p.safetensors", [("a", a), ("b", torch.ones(2, dtype=torch.int16))])
    write_safetensors(tmp_path / "m.safetensors", {"a": a})
    assert torch.equal(load_file(tmp_path / "p.safetensors")["a"], a)
    assert torch.equal(load_file(tmp_path / "m.safetensors")["a"], a)
    write_safetensors(tmp_path / "c.safetensors", [("a", (3, 4), torch.bfloat16, lambda: a)])
    assert torch.equal(load_file(tmp_path / "c.safetensors")["a"], a.bfloat16())


def test_writer_is_atomic(tmp_path):
    final = tmp_path / "out.safetensors"

    def boom():
        raise RuntimeError("producer failed")

    entries = [("a", (2,), torch.float32, lambda: torch.ones(2)), ("b", (2,), torch.float32, boom)]
    with pytest.raises(RuntimeError, match="producer failed"):
        write_safetensors(final, entries)
    assert list(tmp_path.iterdir()) == []  # no final file, no .partial
    save_file({"old": torch.zeros(1)}, final)
    old = final.read_bytes()
    with pytest.raises(RuntimeError):
        write_safetensors(final, entries)
    assert final.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    with pytest.raises(ValueError, match="shape"):
        write_safetensors(final, [("a", (3,), torch.float32, lambda: torch.ones(2))])
    with pytest.raises(ValueError, match="twice"):
        write_safetensors(final, [("a", torch.ones(1)), ("a", torch.ones(1))])
    assert final.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
