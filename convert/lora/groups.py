"""Disjoint groups (union-find): things joined, directly or through others, end in one group.

Used where LoRA parts or parameters must be taken together: the siblings whose shapes must agree
(`siblings.py`), the parameters a DoRA part over a fused module computes at once (`patch.Plan`).
"""
from __future__ import annotations

from typing import Hashable, Iterator


class Groups:
    def __init__(self):
        self._parent: dict = {}

    def find(self, x: Hashable) -> Hashable:
        """The representative of `x`'s group (`x` joins as a group of its own if new)."""
        parent = self._parent
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    def join(self, first: Hashable, *others: Hashable) -> None:
        root = self.find(first)
        for x in others:
            r = self.find(x)
            if r != root:
                self._parent[r] = root

    def __iter__(self) -> Iterator:
        return iter(self._parent)
