"""What every form shares: the storage a fitted form holds, counted honestly."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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


class LayerForm(Protocol):
    """What a form that replaces one candidate's weight (``ir.Candidate``) answers. ``value`` is
    what :meth:`fit` returns (for ``lowrank``: one ``Factorization`` per group); sizes are ints on
    the form's own scale (a rank, a kept count, ...).

    The engine's ``Plan`` calls ``fit``, ``size``, ``method``, ``info``, ``storage``, ``errors``,
    ``declines``, ``break_even``, ``transpose`` (the value for a node that reads the weight
    transposed, or the reason string why it cannot serve one) and ``emit``; the planner calls
    ``fit_full``, ``sizes``, ``params``, ``curve``, ``flops`` and ``probe_scale``; latency-aware
    planning times a form that has ``random`` (values of the right shapes, no fitting)."""

    name: str
    #: pass names (``passes.PASSES``) of the ops it emits for
    ops: tuple[str, ...]
    #: priced by the planner for every candidate it applies to without being asked for
    priced_by_default: bool

    def fit(self, cand, policy, method: str, stats: list, options: dict): ...

    def fit_full(self, cand, method: str, stats: list, options: dict): ...

    def sizes(self, cand, multiple: int) -> np.ndarray: ...

    def params(self, cand, sizes: np.ndarray, *, bias: bool) -> np.ndarray: ...

    def curve(self, full, sizes: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]: ...

    def flops(self, cand, sizes: np.ndarray, rows: float) -> tuple[float, np.ndarray]: ...

    def probe_scale(self, cand) -> float: ...

    def break_even(self, cand) -> float: ...

    def size(self, value) -> int: ...

    def method(self, value) -> str: ...

    def info(self, value) -> dict: ...

    def storage(self, value) -> Storage: ...

    def errors(self, cand, value) -> tuple[float, float]: ...

    def declines(self, value) -> str | None: ...

    def transpose(self, value): ...

    def emit(self, ctx, cand, value) -> None: ...
