"""Reading and writing weight files: a validated, memory-mapped safetensors reader and a streaming writer.

Reading never trusts the file. The 8-byte header length, the JSON header and every tensor entry (dtype,
shape, data offsets) are checked against the file size *before* anything is allocated for tensor data;
every failure is a `BadInput(path, cause)`. Pickle-based checkpoints are refused, never unpickled.

Tensors are zero-copy views on a private copy-on-write mmap of the file (`mmap.ACCESS_COPY`): pages are
read when touched, the views are writable (writes stay in this process, never reach the file), and each
tensor keeps the mapping alive through its storage for as long as it lives.

`open_weights(path)` takes a `.safetensors`/`.sft` file, a diffusers model folder (one file or shards with
a `*.safetensors.index.json`) or a `.gguf` file, and returns a read-only mapping `name -> tensor`
(`WeightFile`, `ShardedWeights` or `gguf_io.GGUFFile`, all with the same interface).

`write_safetensors(path, entries, metadata)` writes one tensor at a time from producers, to a `.partial`
file that is fsync'ed and renamed onto the final name only when complete.
"""
from __future__ import annotations

import errno
import functools
import json
import mmap
import os
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import NamedTuple

import torch

from ..common.errors import BadInput, cannot_write
from .extents import Extents, copy_extents

MAX_HEADER = 100 * 1024 * 1024  # bytes of JSON header we accept (real FLUX headers are ~100 kB)
MAX_TENSORS = 1_000_000
MAX_NDIM = 64
MAX_NUMEL = 2 ** 50  # elements of one tensor, zero-sized dimensions skipped (torch's sizes are int64)

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, (dt, _) in DTYPES.items()}

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
PICKLE_REFUSED = "pickle-based checkpoint refused: convert it to safetensors first"
# diffusers / transformers file names of one model folder, most usual first
FOLDER_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PIPELINE_COMPONENTS = ("transformer", "unet")  # what a pipeline folder opens to

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


class TensorInfo(NamedTuple):
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data section
    end: int


# ------------------------------------------------------------------------------------------ reading

class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _refuse_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _is_int(x) -> bool:
    return type(x) is int  # not bool


def looks_like_pickle(head: bytes) -> bool:
    """A zip archive (torch.save since 1.6) or a pickle stream of protocol 2 or later."""
    return head[:4] in _ZIP_MAGIC or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _parse_header(path, f, size: int) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(tensor infos, metadata, data section start) from an open file of `size` bytes; nothing else read."""
    if size == 0:
        raise BadInput(path, "not a safetensors file: the file is empty")
    head = f.read(9)
    if size < 8:
        raise BadInput(path, f"not a safetensors file: only {size} bytes")
    (n,) = struct.unpack("<Q", head[:8])
    json_like = head[8:9] == b"{"
    if not json_like and looks_like_pickle(head):
        raise BadInput(path, PICKLE_REFUSED)
    if n > size - 8:
        if json_like:
            raise BadInput(path, f"truncated: the header says it is {n} bytes but the file has only "
                                 f"{size - 8} bytes after the length field")
        raise BadInput(path, "not a safetensors file (its first 8 bytes are not a plausible header length)")
    if n > MAX_HEADER:
        raise BadInput(path, f"corrupt header: {n} bytes, over the {MAX_HEADER // 2**20} MB limit")
    if n < 2 or not json_like:
        raise BadInput(path, "not a safetensors file (no JSON header)")
    f.seek(8)
    raw = f.read(n)
    if len(raw) != n:
        raise BadInput(path, f"truncated: could read only {len(raw)} of the header's {n} bytes")
    if raw.count(b'"data_offsets"') > MAX_TENSORS:
        raise BadInput(path, f"corrupt header: more than {MAX_TENSORS} tensors")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=_refuse_constant)
    except _DuplicateKey as exc:
        raise BadInput(path, f"corrupt header: duplicate entry {exc.args[0]!r}") from None
    except UnicodeDecodeError:
        raise BadInput(path, "corrupt header: not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise BadInput(path, f"corrupt header: not valid JSON ({_short(exc)})") from None
    if not isinstance(header, dict):
        raise BadInput(path, f"corrupt header: a JSON {type(header).__name__}, not an object")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise BadInput(path, "corrupt header: __metadata__ is not an object")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise BadInput(path, f"corrupt header: __metadata__ value of {k!r} is not a string")
    if len(header) > MAX_TENSORS:
        raise BadInput(path, f"corrupt header: {len(header)} tensors, over the limit of {MAX_TENSORS}")

    data_start = 8 + n
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _check_entry(path, name, entry, data_len)
    spans = sorted((i.begin, i.end, name) for name, i in infos.items() if i.end > i.begin)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise BadInput(path, f"corrupt header: tensors {n0!r} [{b0}, {e0}) and {n1!r} [{b1}, {e1}) overlap")
    return infos, metadata, data_start


def _check_entry(path, name: str, entry, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise BadInput(path, f"corrupt header: entry {name!r} is not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise BadInput(path, f"corrupt header: tensor {name!r} has no {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise BadInput(path, f"tensor {name!r} has unknown dtype {dtype!r} "
                             f"(known: {', '.join(DTYPES)})")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(_is_int(d) and d >= 0 for d in shape)):
        raise BadInput(path, f"corrupt header: tensor {name!r} has shape {_short(shape)}, "
                             "not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise BadInput(path, f"corrupt header: tensor {name!r} has data_offsets {_short(offsets)}, "
                             "not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    numel, extent = 1, 1
    for d in shape:
        numel *= d
        extent *= max(d, 1)
    if extent > MAX_NUMEL:  # an empty tensor with absurd sizes: no bytes to check, but torch cannot hold it
        raise BadInput(path, f"corrupt header: tensor {name!r} has shape {_short(shape)}, "
                             f"over the limit of {MAX_NUMEL} elements")
    itemsize = DTYPES[dtype][1]
    if end > data_len:
        raise BadInput(path, f"truncated: tensor {name!r} ends at byte {end} of the data section, "
                             f"which has only {data_len} bytes")
    if end - begin != numel * itemsize:
        raise BadInput(path, f"corrupt header: tensor {name!r} of shape {shape} and dtype {dtype} needs "
                             f"{numel * itemsize} bytes, its data_offsets give {end - begin}")
    return TensorInfo(dtype, tuple(shape), begin, end)


def _short(x, limit: int = 80) -> str:
    s = repr(x) if not isinstance(x, BaseException) else str(x)
    return s if len(s) <= limit else s[:limit] + "..."


class WeightFile(Mapping):
    """A validated safetensors file: read-only mapping `name -> torch.Tensor` of lazy zero-copy views.

    `.path`, `.metadata` (dict[str, str]), `.config` (a folder's config.json, else None), `.shape(name)`,
    `.dtype(name)` (torch dtype), `.dtype_name(name)` ("BF16"), `.dtypes()` (Counter of dtype names),
    `.nbytes`. `close()` drops the file's mapping; tensors already handed out keep it alive themselves.
    """

    def __init__(self, path, infos: dict[str, TensorInfo], metadata: dict[str, str], data_start: int,
                 buffer: memoryview | None, file=None, config: dict | None = None):
        self.path = Path(path)
        self.metadata = metadata
        self.config = config
        self._infos = infos
        self._data_start = data_start
        self._buffer = buffer  # memoryview of the whole-file mapping, or None (per-tensor mappings)
        self._file = file  # kept open only when each tensor gets its own mapping

    @classmethod
    def open(cls, path, whole_map: bool = True) -> "WeightFile":
        path = Path(path)
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise BadInput(path, f"cannot open: {exc.strerror or exc}") from None
        try:
            size = os.fstat(f.fileno()).st_size
            infos, metadata, data_start = _parse_header(path, f, size)
            buffer = None
            if whole_map:
                try:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError):
                    mm = None  # e.g. no address space / commit for one map: map each tensor on its own
                if mm is not None:
                    if len(mm) != size:
                        raise BadInput(path, "the file changed while it was being opened")
                    buffer = memoryview(mm)
        except BaseException:
            f.close()
            raise
        if buffer is not None:
            f.close()
            return cls(path, infos, metadata, data_start, buffer)
        return cls(path, infos, metadata, data_start, None, file=f)

    # -- mapping
    def __getitem__(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        dtype, itemsize = DTYPES[info.dtype]
        nbytes = info.end - info.begin
        if nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        buf, offset, absolute = self._region(info)
        if info.dtype == "BOOL":  # only 0/1 are valid bools: normalise (a copy; bool tensors are tiny)
            return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset).ne(0).view(info.shape)
        if absolute % itemsize:  # misaligned for its dtype: copy the bytes rather than make a bad view
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset).clone()
            return raw.view(dtype).view(info.shape)
        return torch.frombuffer(buf, dtype=dtype, count=nbytes // itemsize, offset=offset).view(info.shape)

    def _region(self, info: TensorInfo) -> tuple[memoryview, int, int]:
        """(buffer, offset in it, absolute file offset) of a tensor's bytes."""
        absolute = self._data_start + info.begin
        if self._buffer is not None:
            return self._buffer, absolute, absolute
        if self._file is None:
            raise ValueError(f"{self.path}: the file is closed")
        start = absolute - absolute % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(self._file.fileno(), absolute + (info.end - info.begin) - start,
                       access=mmap.ACCESS_COPY, offset=start)
        return memoryview(mm), absolute - start, absolute

    def __iter__(self):
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name) -> bool:
        return name in self._infos

    def maps(self, t) -> bool:
        """Whether tensor `t` lies in this file's mapping: a zero-copy view of the file's bytes (which the page
        cache holds, and which can be read again at no cost)."""
        if self._buffer is None or not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.numel():
            return False
        base = torch.frombuffer(self._buffer, dtype=torch.uint8, count=1).data_ptr()
        return base <= t.data_ptr() < base + len(self._buffer)

    def held_files(self) -> dict[Path, os.stat_result]:
        """The file this object reads through a descriptor it holds open (per-tensor mappings), with the status
        that descriptor sees now: a file renamed over since keeps its old status here (its bytes are still the
        ones read), one written over in place shows the change. Empty when no descriptor is held."""
        return {} if self._file is None else {self.path: os.fstat(self._file.fileno())}

    # -- header facts (no data read)
    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._infos[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._infos[name].dtype][0]

    def dtype_name(self, name: str) -> str:
        return self._infos[name].dtype

    def dtypes(self) -> Counter:
        return Counter(i.dtype for i in self._infos.values())

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def extent(self, name: str) -> Extents | None:
        """Where the tensor's bytes lie in the file (None for bool tensors, which are normalised)."""
        info = self._infos[name]
        if info.dtype == "BOOL":
            return None
        nbytes = info.end - info.begin
        rows = info.shape[0] if info.shape else 1
        return Extents(((self.path, self._data_start + info.begin, nbytes),), nbytes // rows if rows else 0)

    @property
    def nbytes(self) -> int:
        return sum(i.end - i.begin for i in self._infos.values())

    @property
    def data_offset(self) -> int:
        """Where the data section starts in the file."""
        return self._data_start

    # -- lifetime
    def close(self) -> None:
        """Drop this object's hold on the file. Tensors handed out stay valid (they hold the mapping)."""
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            mm = buffer.obj
            del buffer
            try:
                mm.close()  # refused (BufferError) while any tensor still views it: it then lives on
            except BufferError:
                pass
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"WeightFile({str(self.path)!r}, {len(self)} tensors)"


class ShardedWeights(Mapping):
    """A sharded diffusers/transformers folder (`*.safetensors.index.json`) seen as one mapping."""

    def __init__(self, path, shards: dict[str, WeightFile], where: dict[str, WeightFile],
                 config: dict | None, index: str):
        self.path = Path(path)
        self.config = config
        self.index = index
        self.shards = shards
        self._where = where
        self.metadata: dict[str, str] = {}
        for wf in shards.values():
            self.metadata.update(wf.metadata)

    def __getitem__(self, name):
        return self._where[name][name]

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

    def __contains__(self, name):
        return name in self._where

    def maps(self, t) -> bool:
        return any(wf.maps(t) for wf in self.shards.values())

    def held_files(self) -> dict[Path, os.stat_result]:
        return {p: st for wf in self.shards.values() for p, st in wf.held_files().items()}

    def shape(self, name):
        return self._where[name].shape(name)

    def dtype(self, name):
        return self._where[name].dtype(name)

    def dtype_name(self, name):
        return self._where[name].dtype_name(name)

    def extent(self, name):
        return self._where[name].extent(name)

    def dtypes(self) -> Counter:
        return Counter(self._where[n].dtype_name(n) for n in self._where)

    @property
    def nbytes(self) -> int:
        return sum(self._where[n].info(n).end - self._where[n].info(n).begin for n in self._where)

    def close(self):
        for wf in self.shards.values():
            wf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"ShardedWeights({str(self.path)!r}, {len(self.shards)} shards, {len(self)} tensors)"


def open_weights(path, whole_map: bool = True):
    """Open weights for reading: a safetensors file, a diffusers model folder, or a GGUF file.

    Returns a read-only mapping `name -> tensor` with `.path`, `.metadata`, `.config`, `.shape(name)`,
    `.dtype(name)`, `.dtype_name(name)`, `.dtypes()`, `.nbytes`, `.close()`. Raises `BadInput`.
    `whole_map=False`: each safetensors tensor gets a mapping of its own bytes, released with the tensor
    (for reading a few tensors once, without the whole file's pages staying mapped).
    """
    path = Path(path)
    try:
        is_dir = path.is_dir()
        exists = is_dir or path.exists()
    except OSError as exc:
        raise BadInput(path, f"cannot access: {exc.strerror or exc}") from None
    if not exists:
        raise BadInput(path, "no such file or folder")
    if is_dir:
        return _open_folder(path, whole_map)
    return _open_file(path, whole_map)


def _open_file(path: Path, whole_map: bool = True):
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise BadInput(path, PICKLE_REFUSED)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise BadInput(path, f"cannot open: {exc.strerror or exc}") from None
    if suffix == ".gguf" or head[:4] == b"GGUF":
        from .gguf_io import open_gguf
        return open_gguf(path)
    return WeightFile.open(path, whole_map)


def _read_config(folder: Path) -> dict | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise BadInput(cfg, f"corrupt config.json: {_short(exc)}") from None
    if not isinstance(data, dict):
        raise BadInput(cfg, "corrupt config.json: not a JSON object")
    return data


def _open_folder(folder: Path, whole_map: bool = True):
    config = _read_config(folder)
    for name in FOLDER_FILES:
        if (folder / name).is_file():
            wf = WeightFile.open(folder / name, whole_map)
            wf.config = config
            return wf
    indexes = sorted(p.name for p in folder.glob("*.safetensors.index.json"))
    if indexes:
        preferred = [n + ".index.json" for n in FOLDER_FILES]
        chosen = next((n for n in preferred if n in indexes), None)
        if chosen is None and len(indexes) > 1:
            raise BadInput(folder, f"several shard indexes ({', '.join(indexes)}): open the one you mean")
        return _open_sharded(folder, folder / (chosen or indexes[0]), config, whole_map)
    singles = sorted(p.name for p in folder.iterdir()
                     if p.is_file() and p.suffix.lower() in SAFETENSORS_SUFFIXES)
    if len(singles) == 1:
        wf = WeightFile.open(folder / singles[0], whole_map)
        wf.config = config
        return wf
    if len(singles) > 1:
        raise BadInput(folder, f"several weight files ({', '.join(singles[:6])}"
                               f"{' ...' if len(singles) > 6 else ''}): open the one you mean")
    if (folder / "model_index.json").is_file():  # a whole diffusers pipeline: its denoiser
        for sub in PIPELINE_COMPONENTS:
            if (folder / sub).is_dir():
                return _open_folder(folder / sub, whole_map)
        subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise BadInput(folder, f"a diffusers pipeline folder: open one of its components ({', '.join(subs)})")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise BadInput(folder / pickles[0], PICKLE_REFUSED)
    raise BadInput(folder, "no weights found: expected " + ", ".join(FOLDER_FILES)
                   + " or a *.safetensors.index.json with its shards")


def _safe_member(name) -> bool:
    """A file name inside the folder: relative, no '..', no drive (judged on the name, not on links)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return False
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.drive or pure.root or ".." in pure.parts:
            return False
    return True


def _open_sharded(folder: Path, index_path: Path, config, whole_map: bool = True) -> ShardedWeights:
    try:
        if index_path.stat().st_size > MAX_HEADER:
            raise BadInput(index_path, "corrupt index: too large")
        index = json.loads(index_path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise BadInput(index_path, f"corrupt index: duplicate entry {exc.args[0]!r}") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise BadInput(index_path, f"corrupt index: {_short(exc)}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInput(index_path, "corrupt index: no weight_map object")
    shards: dict[str, WeightFile] = {}
    where: dict[str, WeightFile] = {}
    try:
        for name, shard in weight_map.items():
            if not _safe_member(shard):
                raise BadInput(index_path, f"tensor {name!r} names shard {_short(shard)}, "
                                           "which is not a file inside the folder")
            if shard not in shards:
                shard_path = folder / shard
                if not shard_path.is_file():
                    raise BadInput(index_path, f"shard {shard} is missing")
                if shard_path.suffix.lower() in PICKLE_SUFFIXES:
                    raise BadInput(shard_path, PICKLE_REFUSED)
                shards[shard] = WeightFile.open(shard_path, whole_map)
            if name not in shards[shard]:
                raise BadInput(index_path, f"tensor {name!r} is not in its shard {shard}")
            where[name] = shards[shard]
    except BaseException:
        for wf in shards.values():
            wf.close()
        raise
    return ShardedWeights(folder, shards, where, config, index_path.name)


# ------------------------------------------------------------------------------------------ writing

Entry = tuple  # (name, shape, dtype, producer) or (name, tensor)


def _specs(entries) -> list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], object]]]:
    items = entries.items() if isinstance(entries, Mapping) else entries
    specs, seen = [], set()
    for entry in items:
        if len(entry) == 2:
            name, t = entry
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
            spec = (name, tuple(t.shape), t.dtype, (lambda t=t: t))
        elif len(entry) == 4:
            name, shape, dtype, make = entry
            if not callable(make):
                raise TypeError(f"{name}: the producer is not callable")
            spec = (name, tuple(int(s) for s in shape), dtype, make)
        else:
            raise TypeError("entries are (name, shape, dtype, producer) or (name, tensor)")
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if name in seen:
            raise ValueError(f"tensor {name!r} is given twice")
        if spec[2] not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {spec[2]} cannot be stored in safetensors")
        if any(s < 0 for s in spec[1]):
            raise ValueError(f"{name}: negative size in shape {spec[1]}")
        seen.add(name)
        specs.append(spec)
    return specs


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def build_header(specs, metadata: Mapping[str, str] | None) -> tuple[bytes, list]:
    """The padded JSON header and the specs in data order (widest dtype first, so data stays aligned)."""
    ordered = sorted(specs, key=lambda s: -s[2].itemsize)  # stable: keeps the caller's order otherwise
    header: dict = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"metadata must map str to str, got {k!r}: {type(v).__name__}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, shape, dtype, _ in ordered:
        n = _numel(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return raw, ordered


def _write_tensor(f, t: torch.Tensor) -> None:
    if t.numel() == 0:
        return
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    f.write(t.view(torch.uint8).numpy().data)


def write_safetensors(path, entries: Iterable[Entry] | Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file, streaming: memory stays near one tensor.

    `entries` is an iterable (a generator is fine) of `(name, shape, dtype, producer)`, where
    `producer()` returns the tensor (or anything with `.dequantize(dtype)`, or the `Extents` of bytes to
    copy from a source file) only when its turn comes and
    the result is dropped right after it is written; or of plain `(name, tensor)` pairs; or a mapping
    `name -> tensor`. A produced tensor of another dtype is cast to the declared one; a wrong shape is an
    error. The data goes to `<path>.partial` in the same folder, is fsync'ed and then renamed onto `path`;
    on any error the partial file is removed and `path` is left as it was.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors writing needs a little-endian machine")
    path = Path(path)
    header, ordered = build_header(_specs(entries), metadata)
    partial = path.with_name(path.name + ".partial")
    try:
        f = open(partial, "wb")
    except OSError as exc:
        raise cannot_write(path, exc) from None
    try:
        with f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            written_back = 0  # the file's bytes before this offset are already on their way to the disk
            for name, shape, dtype, make in ordered:
                pos = f.tell()
                if pos - written_back >= WRITEBACK_STEP:
                    f.flush()
                    _start_writeback(f.fileno(), written_back, pos - written_back)
                    written_back = pos
                t = make()
                if isinstance(t, Extents):  # bytes of the source file: copied file to file
                    if t.nbytes != _numel(shape) * dtype.itemsize:
                        raise ValueError(f"{name}: {t.nbytes} source bytes for shape {shape} of {dtype}")
                    f.flush()
                    copy_extents(t, f.fileno())
                    f.seek(0, os.SEEK_END)
                    continue
                if not isinstance(t, torch.Tensor) and hasattr(t, "dequantize"):
                    t = t.dequantize(dtype)
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{name}: the producer returned {type(t).__name__}, not a tensor")
                if tuple(t.shape) != shape:
                    raise ValueError(f"{name}: the producer returned shape {tuple(t.shape)}, "
                                     f"the header declares {shape}")
                if t.dtype != dtype:
                    t = t.to(dtype)
                _write_tensor(f, t)
                del t
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException as exc:
        try:
            partial.unlink()
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and (exc.errno in _REFUSED_WRITES or exc.filename in (str(partial), str(path))):
            raise cannot_write(path, exc) from None
        raise
    _fsync_dir(path.parent)
    return path


# errno values that say the destination cannot take the file (not that our code is wrong)
_REFUSED_WRITES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def make_folder(folder) -> None:
    """`mkdir -p`; a place that cannot hold a folder (a file on the way, no permission) is `BadInput`."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BadInput(folder, "a file is where this folder (or one above it) would go") from None
    except OSError as exc:
        raise cannot_write(folder, exc) from None


WRITEBACK_STEP = 64 << 20  # bytes written between two writeback starts


@functools.cache
def _sync_file_range():
    """libc's `sync_file_range` (Linux), or None; looked up on first use. Python's `os` does not expose it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE_WRITE = 2  # start writing the dirty pages of the range out; do not wait


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Let the disk write a finished range while the next one is produced, so the final fsync waits for
    the last piece only, not the whole file (measured: a 2.6 GB copy + fsync 2.7-3.4 s -> 2.6-2.8 s).
    Advisory: a failure or a platform without the call changes nothing but the timing."""
    sync_file_range = _sync_file_range()
    if sync_file_range is not None:
        sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable where the platform allows it (POSIX); harmless elsewhere."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
