"""Byte extents: where a planned tensor's bytes lie in the source files, when no value changes.

Every layout change between Flux layouts moves whole rows (renames, row splits, fusing, the half swap,
the 1x1 reshape), so without a cast the bytes of each destination tensor are a few contiguous ranges
of the source file. Converting copies those ranges file to file inside the kernel (`copy_file_range`), so
memory stays flat whatever the model's size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .table import Step


@dataclass(frozen=True)
class Extents:
    ranges: tuple[tuple[Path, int, int], ...]  # (file, offset, nbytes), in order
    row_bytes: int  # bytes per row of dim 0 (all rows of one tensor are equally long)

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n in self.ranges)

    def narrow(self, start: int, length: int) -> "Extents":
        """The extents of bytes [start, start + length)."""
        out, pos = [], 0
        for path, off, n in self.ranges:
            lo, hi = max(start, pos), min(start + length, pos + n)
            if lo < hi:
                out.append((path, off + lo - pos, hi - lo))
            pos += n
        return Extents(tuple(out), self.row_bytes)


def step_extents(step: Step, locate: Callable[[str], Extents | None]) -> Extents | None:
    """The source byte ranges whose concatenation is what `materialize(step)` gives, else None."""
    kind = step.kind
    if kind == "cat":
        parts = [locate(s) for s in step.sources]
        if any(p is None for p in parts):
            return None
        return Extents(tuple(r for p in parts for r in p.ranges), parts[0].row_bytes)
    src = locate(step.sources[0])
    if src is None:
        return None
    if kind in ("copy", "rename", "reshape"):
        return src
    rb = src.row_bytes
    if kind == "swap_halves":
        rows = src.nbytes // rb
        half = rows // 2
        second, first = src.narrow(half * rb, (rows - half) * rb), src.narrow(0, half * rb)
        return Extents(second.ranges + first.ranges, rb)
    _, start, length = kind
    return src.narrow(start * rb, length * rb)


def copy_extents(ext: Extents, out_fd: int) -> None:
    """Append the bytes of `ext` to the file open at `out_fd`, file to file in the kernel."""
    for path, off, n in ext.ranges:
        fd = os.open(path, os.O_RDONLY)
        try:
            while n:
                try:
                    got = os.copy_file_range(fd, out_fd, n, off)
                except OSError:  # e.g. across file systems on old kernels: a plain read/write
                    got = os.write(out_fd, os.pread(fd, min(n, 64 << 20), off))
                if got <= 0:
                    raise OSError(f"{path}: file ended early (truncated while copying?)")
                off, n = off + got, n - got
        finally:
            os.close(fd)
