"""GGUF files written byte by byte, valid or hostile, for the reader's tests: one builder for all of them."""
import struct


def gguf_string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_bytes(kv=(), tensors=(), data=b"", version=3, n_tensors=None, n_kv=None, magic=b"GGUF") -> bytes:
    """kv = [(key, value type + value bytes)], tensors = [(name, ggml dims (innermost first), ggml type,
    offset)], then the data section. The counts are the lists' lengths unless given (hostile headers)."""
    head = magic + struct.pack("<I", version)
    head += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors, len(kv) if n_kv is None else n_kv)
    for key, blob in kv:
        head += gguf_string(key) + blob
    for name, dims, qtype, offset in tensors:
        head += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        head += struct.pack("<IQ", qtype, offset)
    head += b"\0" * (-len(head) % 32)
    return head + data


ARCH = ("general.architecture", struct.pack("<I", 8) + gguf_string("flux"))  # general.architecture = "flux"
