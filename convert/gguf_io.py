"""GGUF reading: validated headers, logical (torch) shapes, row-sliceable quantized tensors, torch dequant.

A GGUF file stores shapes in ggml `ne` order (innermost first): the torch shape is the reverse. F32 and
F16 tensors (and the integer / F64 types) come back as plain torch tensors, zero-copy on a private
copy-on-write map of the file. Every other type, BF16 included, is a `GGUFTensor`: raw uint8 rows
`(rows, bytes_per_row)`. ggml blocks run along the innermost dimension, so whole rows are independent:
splitting a fused tensor (qkv, linear1) on the raw rows is exact, and fusing is a byte concatenation when
all parts share one type.

Dequantization is torch code written from the ggml block layouts (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K); it gives exactly the float32 values of `gguf.quants.dequantize`.
Other types fall back to gguf-py's numpy code. The `gguf` package is imported only when a GGUF is opened.
"""
from __future__ import annotations

import functools
import json
import mmap
import os
import struct
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from ..common.errors import BadInput

GGUF_MISSING = "GGUF support needs the 'gguf' package: pip install fluxbridge[gguf]"
MAX_TENSORS = 1_000_000
MAX_KV = 1_000_000
MAX_ARRAY_ITEMS = 16_000_000  # all metadata array elements together (gguf-py parses them one by one)
MAX_DIMS = 8
METADATA_ARRAY_LIMIT = 1024  # longer arrays (tokenizer vocabularies) are left out of `.metadata`

# ggml types that are plain tensors (no wrapper): id -> torch dtype
_PLAIN = {0: torch.float32, 1: torch.float16, 24: torch.int8, 25: torch.int16, 26: torch.int32,
          27: torch.int64, 28: torch.float64}
BF16_ID = 30
QK_K = 256

# GGUF metadata value types -> byte size (scalars); 8 = string, 9 = array
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


def _gguf(path):
    try:
        import gguf
    except ImportError:
        raise BadInput(path, GGUF_MISSING) from None
    return gguf


# ---------------------------------------------------------------------------------- header pre-scan

class _Scan:
    """Bounds-checked walk of a GGUF header, before gguf-py parses it (which trusts the counts)."""

    def __init__(self, path, buf, size: int):
        self.path, self.buf, self.size = path, buf, size
        self.array_items = 0

    def need(self, off: int, n: int, what: str):
        if n < 0 or off + n > self.size:
            raise BadInput(self.path, f"truncated: {what} at byte {off} needs {n} bytes, "
                                      f"the file has {self.size}")

    def u32(self, off, what):
        self.need(off, 4, what)
        return struct.unpack_from("<I", self.buf, off)[0]

    def u64(self, off, what):
        self.need(off, 8, what)
        return struct.unpack_from("<Q", self.buf, off)[0]

    def string(self, off, what) -> tuple[str, int]:
        n = self.u64(off, what)
        self.need(off + 8, n, what)
        try:
            return bytes(self.buf[off + 8:off + 8 + n]).decode("utf-8"), off + 8 + n
        except UnicodeDecodeError:
            raise BadInput(self.path, f"corrupt header: {what} at byte {off} is not UTF-8") from None

    def skip_value(self, off: int, vtype: int, key: str, depth: int = 0) -> int:
        if vtype in _VALUE_SIZES:
            self.need(off, _VALUE_SIZES[vtype], f"value of {key!r}")
            return off + _VALUE_SIZES[vtype]
        if vtype == _STRING:
            return self.string(off, f"value of {key!r}")[1]
        if vtype == _ARRAY:
            if depth:
                raise BadInput(self.path, f"corrupt header: nested array in {key!r}")
            itype = self.u32(off, f"array type of {key!r}")
            count = self.u64(off + 4, f"array length of {key!r}")
            off += 12
            if itype in _VALUE_SIZES:
                self.need(off, count * _VALUE_SIZES[itype], f"array {key!r}")
            elif itype in (_STRING, _ARRAY):
                self.need(off, count * 8, f"array {key!r}")  # every item is at least a length
            else:
                raise BadInput(self.path, f"corrupt header: {key!r} is an array of unknown type {itype}")
            self.array_items += count
            if self.array_items > MAX_ARRAY_ITEMS:
                raise BadInput(self.path, f"corrupt header: metadata arrays over {MAX_ARRAY_ITEMS} items")
            if itype in _VALUE_SIZES:
                return off + count * _VALUE_SIZES[itype]
            for _ in range(count):
                off = self.skip_value(off, itype, key, depth + 1)
            return off
        raise BadInput(self.path, f"corrupt header: {key!r} has unknown value type {vtype}")


def _prescan(path, buf, size: int, quant_sizes) -> None:
    s = _Scan(path, buf, size)
    if size < 4 or bytes(buf[:4]) != b"GGUF":
        raise BadInput(path, "not a GGUF file (no GGUF magic)")
    version = s.u32(4, "version")
    if version & 0xFFFF == 0 and version:
        raise BadInput(path, "big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise BadInput(path, f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = s.u64(8, "tensor count")
    n_kv = s.u64(16, "metadata count")
    if n_tensors > MAX_TENSORS or n_tensors * 24 > size:
        raise BadInput(path, f"corrupt header: {n_tensors} tensors in a file of {size} bytes")
    if n_kv > MAX_KV or n_kv * 12 > size:
        raise BadInput(path, f"corrupt header: {n_kv} metadata entries in a file of {size} bytes")
    off, alignment, keys = 24, 32, set()
    for _ in range(n_kv):
        key, off = s.string(off, "metadata key")
        if key in keys:
            raise BadInput(path, f"corrupt header: duplicate metadata key {key!r}")
        keys.add(key)
        vtype = s.u32(off, f"type of {key!r}")
        off += 4
        if key == "general.alignment":
            if vtype != _UINT32:
                raise BadInput(path, "corrupt header: general.alignment is not a uint32")
            alignment = s.u32(off, "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise BadInput(path, f"corrupt header: alignment {alignment} is not a power of two")
        off = s.skip_value(off, vtype, key)
    infos, names = [], set()
    for _ in range(n_tensors):
        name, off = s.string(off, "tensor name")
        if name in names:
            raise BadInput(path, f"corrupt header: tensor {name!r} appears twice")
        names.add(name)
        n_dims = s.u32(off, f"dimension count of {name!r}")
        if n_dims > MAX_DIMS:
            raise BadInput(path, f"corrupt header: tensor {name!r} has {n_dims} dimensions")
        s.need(off + 4, 8 * n_dims, f"shape of {name!r}")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
        off += 4 + 8 * n_dims
        qtype = s.u32(off, f"type of {name!r}")
        rel = s.u64(off + 4, f"offset of {name!r}")
        off += 12
        if qtype not in quant_sizes:
            raise BadInput(path, f"tensor {name!r} has unknown GGML type {qtype}")
        block, type_size = quant_sizes[qtype]
        numel = 1
        for d in dims:
            numel *= d
        if numel > 2 ** 50:
            raise BadInput(path, f"corrupt header: tensor {name!r} has shape {list(dims)}")
        if dims and dims[0] % block:
            raise BadInput(path, f"corrupt header: tensor {name!r} rows of {dims[0]} are not whole "
                                 f"blocks of {block}")
        infos.append((name, rel, numel // block * type_size))
    data_start = off + (-off % alignment)
    spans = []
    for name, rel, nbytes in infos:
        begin = data_start + rel
        if begin + nbytes > size:
            raise BadInput(path, f"truncated: tensor {name!r} ends at byte {begin + nbytes}, "
                                 f"the file has {size}")
        if nbytes:
            spans.append((begin, begin + nbytes, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise BadInput(path, f"corrupt header: tensors {n0!r} and {n1!r} overlap")


# ------------------------------------------------------------------------------------ dequantization

def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """An fp16 field of every block, as float32 of shape (n, 1)."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).to(torch.float32)


def _u8(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def _low_high(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k): the low nibbles first, then the high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 8k) bits, little-endian (bit j of the little-endian word)."""
    return ((qh.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(qh.shape[0], -1)


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _f16(b, 0)


def _q4_0(b):
    q = _low_high(b[:, 2:]).to(torch.int8) - 8
    return _f16(b, 0) * q.to(torch.float32)


def _q4_1(b):
    q = _low_high(b[:, 4:]).to(torch.float32)
    return _f16(b, 0) * q + _f16(b, 2)


def _q5_0(b):
    q = (_low_high(b[:, 6:]) | (_bits(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return _f16(b, 0) * q.to(torch.float32)


def _q5_1(b):
    q = (_low_high(b[:, 8:]) | (_bits(b[:, 4:8]) << 4)).to(torch.float32)
    return _f16(b, 0) * q + _f16(b, 2)


def _q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = (qs.reshape(n, 2, 1, 32) >> _u8(0, 2, 4, 6).reshape(1, 1, 4, 1)) & 3
    q = q.reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    low = (scales[:, :8].reshape(n, 1, 8) >> _u8(0, 4).reshape(1, 2, 1)).reshape(n, 16)
    high = (scales[:, 8:12].reshape(n, 1, 4) >> _u8(0, 2, 4, 6).reshape(1, 4, 1)).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * sc.to(torch.float32)).reshape(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> _u8(0, 2, 4, 6).reshape(1, 1, 4, 1)).reshape(n, 16, 16) & 3
    qh = (hmask.reshape(n, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8, 1))
    qh = (qh.reshape(n, 16, 16) & 1) ^ 1  # a set bit means no offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (Q4_K, Q5_K)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.to(torch.float32)).reshape(n, 8, 1)
    q = ((b[:, 16:].reshape(n, 4, 1, 32) >> _u8(0, 4).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
    return (d * q.to(torch.float32) - dm).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.to(torch.float32)).reshape(n, 8, 1)
    ql = ((b[:, 48:].reshape(n, 4, 1, 32) >> _u8(0, 4).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
    qh = (b[:, 16:48].reshape(n, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8, 1)) & 1
    q = (ql | (qh.reshape(n, 8, 32) << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = (_f16(b, 208) * scales.contiguous().view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    low = ((ql.reshape(n, 2, 1, 64) >> _u8(0, 4).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
    high = ((qh.reshape(n, 2, 1, 32) >> _u8(0, 2, 4, 6).reshape(1, 1, 4, 1)) & 0x03).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
    return (d * q).reshape(n, QK_K)


# ggml type id -> (name, block size, bytes per block, torch decoder or None)
QTYPES: dict[int, tuple[str, int, int, object]] = {
    2: ("Q4_0", 32, 18, _q4_0), 3: ("Q4_1", 32, 20, _q4_1), 6: ("Q5_0", 32, 22, _q5_0),
    7: ("Q5_1", 32, 24, _q5_1), 8: ("Q8_0", 32, 34, _q8_0), 10: ("Q2_K", 256, 84, _q2_k),
    11: ("Q3_K", 256, 110, _q3_k), 12: ("Q4_K", 256, 144, _q4_k), 13: ("Q5_K", 256, 176, _q5_k),
    14: ("Q6_K", 256, 210, _q6_k), BF16_ID: ("BF16", 1, 2, None),
}


@functools.lru_cache(maxsize=None)
def can_dequantize(qtype: int) -> bool:
    """Plain types, our torch decoders, and whatever gguf-py's numpy code can decode (tried on one block)."""
    if qtype in _PLAIN or qtype in QTYPES:
        return True
    import numpy as np
    import gguf
    try:
        t = gguf.GGMLQuantizationType(qtype)
        _, type_size = gguf.GGML_QUANT_SIZES[t]
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), t)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def _qinfo(qtype: int) -> tuple[str, int, int, object]:
    if qtype in QTYPES:
        return QTYPES[qtype]
    import gguf  # a type we have no torch decoder for: sizes and numpy code from gguf-py
    t = gguf.GGMLQuantizationType(qtype)
    block, size = gguf.GGML_QUANT_SIZES[t]
    return t.name, block, size, None


class GGUFTensor:
    """A GGUF tensor kept in its stored form: raw uint8 rows `(rows, bytes_per_row)`.

    `shape` is the logical torch shape; `qtype` the ggml type id (`qtype_name` its name); `dtype` the
    dtype of the natural dequantized result (bfloat16 for BF16, float32 for the block types, whose
    values are exact in float32). Rows can be narrowed and concatenated without dequantizing.
    """

    __slots__ = ("raw", "qtype", "shape")

    def __init__(self, raw: torch.Tensor, qtype: int, shape):
        shape = torch.Size(shape)
        name, block, type_size, _ = _qinfo(int(qtype))
        if len(shape) == 0 or shape[-1] % block:
            raise ValueError(f"{name} tensor of shape {tuple(shape)}: rows are not whole blocks of {block}")
        bytes_per_row = shape[-1] // block * type_size
        rows = 1
        for s in shape[:-1]:
            rows *= s
        if raw.dtype != torch.uint8 or raw.numel() != rows * bytes_per_row:
            raise ValueError(f"{name} tensor of shape {tuple(shape)} needs {rows * bytes_per_row} bytes, "
                             f"got {raw.numel()} of {raw.dtype}")
        self.raw = raw.reshape(rows, bytes_per_row)
        self.qtype = int(qtype)
        self.shape = shape

    # -- tensor-like facts
    @property
    def qtype_name(self) -> str:
        return _qinfo(self.qtype)[0]

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.qtype == BF16_ID else torch.float32

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def __repr__(self) -> str:
        return f"GGUFTensor({self.qtype_name}, shape={tuple(self.shape)})"

    # -- rows
    def narrow_rows(self, start: int, length: int):
        """Rows `start:start+length` of dim 0, on the raw bytes (a view, no dequantization)."""
        n = self.shape[0]
        if start < 0 or length < 0 or start + length > n:
            raise IndexError(f"rows [{start}, {start + length}) out of range for {n} rows")
        if self.ndim >= 2:
            inner = self.raw.shape[0] // n if n else 0
            raw = self.raw.narrow(0, start * inner, length * inner)
            return GGUFTensor(raw, self.qtype, (length, *self.shape[1:]))
        _, block, type_size, _ = _qinfo(self.qtype)
        if start % block or length % block:  # a 1-D tensor's rows are its elements: only whole blocks
            return self.dequantize(self.dtype).narrow(0, start, length)
        raw = self.raw.narrow(1, start // block * type_size, length // block * type_size)
        return GGUFTensor(raw, self.qtype, (length,))

    @classmethod
    def cat_rows(cls, parts):
        """Concatenate along dim 0: raw bytes when every part is a GGUFTensor of one type, else values."""
        parts = list(parts)
        same = (all(isinstance(p, GGUFTensor) for p in parts)
                and len({p.qtype for p in parts}) == 1 and len({p.ndim for p in parts}) == 1
                and len({tuple(p.shape[1:]) for p in parts}) == 1)
        if same:
            first = parts[0]
            rows = sum(p.shape[0] for p in parts)
            dim = 0 if first.ndim >= 2 else 1
            raw = torch.cat([p.raw for p in parts], dim)
            return cls(raw, first.qtype, (rows, *first.shape[1:]))
        dtype = parts[0].dtype
        for p in parts[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        return torch.cat([p.dequantize(dtype) if isinstance(p, GGUFTensor) else p.to(dtype) for p in parts], 0)

    def reshape(self, *shape):
        """Reshape keeping the stored form where the rows allow it (same row width, or BF16)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        shape = torch.Size(self._resolve(shape))
        _, block, _, _ = _qinfo(self.qtype)
        if shape and (shape[-1] == self.shape[-1] or block == 1):
            return GGUFTensor(self.raw.reshape(-1), self.qtype, shape)
        return self.dequantize(self.dtype).reshape(shape)

    def _resolve(self, shape) -> tuple[int, ...]:
        shape = list(shape)
        if shape.count(-1) == 1:
            known = 1
            for s in shape:
                known *= s if s != -1 else 1
            shape[shape.index(-1)] = self.numel() // known if known else 0
        return tuple(shape)

    # -- values
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values as a plain tensor of `dtype` (exactly gguf-py's float32 values before the cast)."""
        name, _, type_size, decode = _qinfo(self.qtype)
        if self.raw.numel() == 0:  # no elements: no bytes to view (a zero-row view cannot be reinterpreted)
            return torch.zeros(self.shape, dtype=dtype)
        if self.qtype == BF16_ID:
            raw = self.raw
            try:
                values = raw.view(torch.bfloat16)
            except RuntimeError:  # not aligned / not contiguous for a reinterpreting view
                values = raw.contiguous().clone().view(torch.bfloat16)
            return values.reshape(self.shape).to(dtype)
        if decode is None:
            import numpy as np
            import gguf
            out = gguf.quants.dequantize(self.raw.contiguous().numpy().view(np.uint8),
                                         gguf.GGMLQuantizationType(self.qtype))
            return torch.from_numpy(np.ascontiguousarray(out)).reshape(self.shape).to(dtype)
        blocks = self.raw.reshape(-1, type_size)
        if blocks.shape[0] == 0:
            return torch.zeros(self.shape, dtype=dtype)
        return decode(blocks).reshape(self.shape).to(dtype)

    def to(self, dtype: torch.dtype) -> torch.Tensor:
        """Only a dtype: `dequantize(dtype)`."""
        if not isinstance(dtype, torch.dtype):
            raise TypeError("GGUFTensor.to() takes a dtype only; dequantize first for devices")
        return self.dequantize(dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """torch functions on a GGUFTensor: `torch.cat` on dim 0 keeps raw rows, anything else dequantizes."""
        kwargs = kwargs or {}
        if func is torch.cat:
            tensors = args[0] if args else kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if dim == 0:
                return cls.cat_rows(tensors)

        def plain(x):
            if isinstance(x, GGUFTensor):
                return x.dequantize(x.dtype)
            if isinstance(x, (list, tuple)):
                return type(x)(plain(y) for y in x)
            return x
        return func(*plain(tuple(args)), **{k: plain(v) for k, v in kwargs.items()})


# ------------------------------------------------------------------------------------------ reading

class GGUFFile(Mapping):
    """A validated GGUF file: read-only mapping `name -> torch.Tensor | GGUFTensor` (logical shapes).

    Same interface as `safetensors_io.WeightFile`: `.path`, `.metadata` (str values; arrays over 1024
    items are left out), `.config` (None), `.shape(name)`, `.dtype(name)`, `.dtype_name(name)` (ggml type
    name), `.dtypes()`, `.nbytes`, `.close()`. `.architecture` is `general.architecture` or None.
    """

    def __init__(self, path, reader):
        self.path = Path(path)
        self.config = None
        self._reader = reader
        # header facts as plain values, so that closing drops every reference to the map
        self._infos: dict[str, tuple[int, str, torch.Size, int]] = {
            t.name: (int(t.tensor_type), t.tensor_type.name,
                     torch.Size(int(d) for d in reversed(t.shape.tolist())), int(t.n_bytes))
            for t in reader.tensors}
        self._index = {t.name: i for i, t in enumerate(reader.tensors)}
        self.metadata: dict[str, str] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            if field.types and field.types[0] == _ARRAY and len(field.data) > METADATA_ARRAY_LIMIT:
                continue
            value = field.contents()
            self.metadata[key] = value if isinstance(value, str) else json.dumps(value)
        self.architecture = self.metadata.get("general.architecture")

    def __getitem__(self, name: str):
        qtype, _, shape, _ = self._infos[name]
        if self._reader is None:
            raise ValueError(f"{self.path}: the file is closed")
        data = torch.from_numpy(self._reader.tensors[self._index[name]].data)
        if qtype in _PLAIN:
            return data.reshape(shape)
        return GGUFTensor(data, qtype, shape)

    def __iter__(self):
        return iter(self._infos)

    def __len__(self):
        return len(self._infos)

    def __contains__(self, name):
        return name in self._infos

    def shape(self, name: str) -> torch.Size:
        return self._infos[name][2]

    def dtype(self, name: str) -> torch.dtype:
        qtype = self._infos[name][0]
        if qtype in _PLAIN:
            return _PLAIN[qtype]
        return torch.bfloat16 if qtype == BF16_ID else torch.float32

    def dtype_name(self, name: str) -> str:
        return self._infos[name][1]

    def qtype(self, name: str) -> int:
        return self._infos[name][0]

    def dtypes(self) -> Counter:
        return Counter(i[1] for i in self._infos.values())

    @property
    def nbytes(self) -> int:
        return sum(i[3] for i in self._infos.values())

    def close(self):
        """Drop this object's hold on the file; tensors handed out keep the map alive themselves."""
        self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"GGUFFile({str(self.path)!r}, {len(self)} tensors, arch={self.architecture!r})"


def open_gguf(path) -> GGUFFile:
    """Open a GGUF file, checking its header against the file size before gguf-py reads it."""
    path = Path(path)
    gguf = _gguf(path)
    sizes = {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise BadInput(path, "not a GGUF file: the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                _prescan(path, mm, size, sizes)
    except OSError as exc:
        raise BadInput(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        reader = gguf.GGUFReader(path, "c")  # private copy-on-write map: writable, zero-copy tensors
    except BadInput:
        raise
    except Exception as exc:  # gguf-py raises ValueError, KeyError, IndexError, ... on bad files
        raise BadInput(path, f"corrupt GGUF file: {type(exc).__name__}: {exc}") from None
    try:
        opened = GGUFFile(path, reader)
    except (ValueError, UnicodeDecodeError, IndexError) as exc:
        raise BadInput(path, f"corrupt GGUF metadata: {exc}") from None
    for name in opened:
        if not can_dequantize(opened.qtype(name)):
            raise BadInput(path, f"tensor {name!r} has GGML type {opened.dtype_name(name)}, "
                                 "which cannot be dequantized (no decoder for it)")
    return opened
