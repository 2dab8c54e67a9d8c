"""What every form shares: the storage a fitted form holds, counted honestly."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stored:
    """One tensor a form stores: its shape and dtype, and the bytes of the indices that locate its
    values (0 for a dense tensor)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    index_bytes: int = 0

    @property
    def values(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.values * np.dtype(self.dtype).itemsize + self.index_bytes


@dataclass(frozen=True)
class Storage:
    """What a fitted form stores. ``params`` is its parameter-equivalent: values plus index bytes
    counted in units of the values' dtype, so that forms compete fairly under one budget."""

    tensors: tuple[Stored, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def params(self) -> int:
        total = 0.0
        for t in self.tensors:
            total += t.values + t.index_bytes / np.dtype(t.dtype).itemsize
        return int(np.ceil(total))
