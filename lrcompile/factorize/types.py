"""Value types shared by every factorizer. Pure numpy: no onnx, graphsurgeon or tensorrt here.

Layout (see METHODS.md): a weight ``B`` is ``[K, N]`` (in x out), used as ``X @ B``. A rank-r
factorization is ``B ~= A @ C`` with ``A [K, r]`` and ``C [r, N]``; optionally a bias correction
``d [N]`` is added after the chain (``X @ A @ C + d``), for methods with mean correction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def break_even_rank(k: int, n: int) -> float:
    """The rank at which ``A @ C`` holds as many parameters as ``B``: ``K*N/(K+N)``."""
    return k * n / (k + n)


@dataclass(frozen=True)
class RankPolicy:
    """How to choose the rank of one factorization. Exactly one criterion is set.

    Attributes:
        rank: a fixed rank (used as given, capped at min(K, N)).
        ratio: fraction of the *break-even* rank budget: ``r = floor(ratio * K*N/(K+N))``,
            i.e. the factors keep about ``ratio`` of the weight's parameters.
        energy: smallest rank whose kept spectral energy (sum of s_i^2 of the matrix the
            method decomposes) is at least this fraction.
        max_error: smallest rank whose relative Frobenius error in the method's objective is
            at most this value.
        multiple: derived ranks are rounded to a multiple of this (hardware-friendly GEMM
            tiles); ``ratio`` rounds down (stays within budget), ``energy``/``max_error``
            round up (keep the promise). 1 disables rounding.
    """

    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    max_error: float | None = None
    multiple: int = 8

    def __post_init__(self) -> None:
        set_ = [n for n in ("rank", "ratio", "energy", "max_error") if getattr(self, n) is not None]
        if len(set_) != 1:
            raise ValueError(f"RankPolicy needs exactly one of rank/ratio/energy/max_error, got {set_ or 'none'}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.ratio is not None and not (0 < self.ratio <= 1):
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.energy is not None and not (0 < self.energy <= 1):
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.max_error is not None and not (0 <= self.max_error < 1):
            raise ValueError(f"max_error must be in [0, 1), got {self.max_error}")
        if self.multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {self.multiple}")

    def describe(self) -> str:
        for n in ("rank", "ratio", "energy", "max_error"):
            v = getattr(self, n)
            if v is not None:
                return f"{n}={v}"
        raise AssertionError


@dataclass(frozen=True)
class LayerStats:
    """Calibration statistics of one layer, accumulated in float64 (see lrcompile.factorize.stats).

    Attributes:
        count: number of rows (tokens / samples) accumulated.
        gram: ``X^T X`` summed over rows, ``[K, K]`` (None when not collected).
        abs_sum: ``sum |x|`` per input channel, ``[K]``.
        in_sum: ``sum x`` per input channel, ``[K]``.
        out_sum: ``sum y`` per output channel ``[N]`` (y = layer output), for output-side methods.
        out_gram: ``Y^T Y`` summed over rows ``[N, N]``.
        fisher: Fisher information of the weight ``[K, N]`` (sum of squared loss gradients).
        cross: ``X'^T X`` ``[K, K]``, for target correction (sequential calibration): ``X'`` are
            the layer's inputs in the partly compressed model (``gram`` is then ``X'^T X'``),
            ``X`` the original model's inputs for the same rows. With it, whitened SVD fits
            ``X' A C`` to the original output ``X B`` instead of ``X' B`` (see ``whiten``).
        ref_gram: ``X^T X`` ``[K, K]`` of the original inputs (collected with ``cross``): gives
            ``||X B||`` and the objective's constant, for ``objective_error``.
        grad_gram: ``sum_t g_t^T g_t`` ``[N, N]`` of the loss gradients ``g = dLoss/dy`` at the
            layer's output rows (the output side of a Kronecker-factored curvature, for ``kfac``).
    """

    count: int
    gram: np.ndarray | None = None
    abs_sum: np.ndarray | None = None
    in_sum: np.ndarray | None = None
    out_sum: np.ndarray | None = None
    out_gram: np.ndarray | None = None
    fisher: np.ndarray | None = None
    cross: np.ndarray | None = None
    ref_gram: np.ndarray | None = None
    grad_gram: np.ndarray | None = None


@dataclass(frozen=True)
class Factorization:
    """The result of factorizing one weight ``B [K, N]``.

    Attributes:
        a: left factor ``[K, r]`` (same dtype as the weight).
        c: right factor ``[r, N]``.
        rank: r.
        method: the factorizer's name (e.g. ``"svd"``, ``"whiten"``).
        rel_error: ``||B - A C||_F / ||B||_F`` (the weight error).
        objective_error: the relative error in the method's own objective (e.g.
            ``||X(B - AC)||_F / ||X B||_F`` for whitened SVD); equals ``rel_error`` for plain SVD.
        bias: optional ``[N]`` correction added after ``X @ A @ C`` (mean correction), or None.
        singular_values: the spectrum of the matrix the method decomposed (the leading ones
            when a randomized SVD was used), for reports and plots.
        info: free-form details (solver used, damping, timing) for the JSON report.
    """

    a: np.ndarray
    c: np.ndarray
    rank: int
    method: str
    rel_error: float
    objective_error: float
    bias: np.ndarray | None = None
    singular_values: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a.shape[0], self.c.shape[1])

    @property
    def params_before(self) -> int:
        k, n = self.shape
        return k * n

    @property
    def params_after(self) -> int:
        return self.a.size + self.c.size + (0 if self.bias is None else self.bias.size)

    def pays_off(self) -> bool:
        return self.rank < break_even_rank(*self.shape)

    def dense(self) -> np.ndarray:
        return self.a @ self.c


def round_rank(r: float, multiple: int, *, up: bool, cap: int) -> int:
    """Round ``r`` to a multiple of ``multiple`` (up or down), within ``[1, cap]``.

    Rounding down never exceeds the budget ``r``: a layer whose budget is under one multiple
    (a small layer) keeps ``floor(r)`` unrounded rather than being pushed up to ``multiple``.
    """
    if multiple <= 1:
        out = math.ceil(r) if up else math.floor(r)
    elif up:
        out = int(math.ceil(r / multiple) * multiple)
    else:
        out = int(math.floor(r / multiple) * multiple)
        if out < 1:
            out = math.floor(r)
    return int(max(1, min(out, cap)))


@dataclass(frozen=True)
class SparseFit:
    """The result of a sparse or sparse + dense fit of one weight ``B [K, N]``:
    ``B ~= A @ C + S`` where any of the parts may be absent.

    The forms that make one (``lrcompile.factorize.sparse`` and ``.sparsedense``):

    ===============  =========================  =========================  ===========================
    kind             a                          c                          s
    ===============  =========================  =========================  ===========================
    ``nm``           None                       None                       ``[K, N]`` N:M along K
    ``lowrank+sparse`` ``[K, r]`` dense         ``[r, N]`` dense           ``[K, N]`` (``pattern``)
    ``dense-nm``     ``[K, k]`` dense (D)       ``[k, N]`` N:M along k     None
    ``dictionary``   ``[K, k]`` dense (D)       ``[k, N]`` s per column    None
    ===============  =========================  =========================  ===========================

    Sparse arrays are held dense, with exact zeros off the pattern (``pattern`` names it:
    ``"nm:2:4"`` along the reduction axis, ``"unstructured"``, ``"rows"`` = whole input rows of
    ``B`` (channel-wise), ``"cols:s"`` = at most ``s`` nonzeros per column). ``c_pattern`` is the
    pattern of ``c`` for ``dense-nm`` / ``dictionary`` (None: dense).

    Attributes:
        rel_error: ``||B - B'||_F / ||B||_F``.
        objective_error: the relative error in the fit's own metric, ``||L^T (B - B')||_F /
            ||L^T B||_F`` with ``G = L L^T`` the (undamped) input Gram; equals ``rel_error`` when
            no Gram was given.
        info: scalar details (iterations, damping, nonzeros, ...) for the JSON report.
    """

    kind: str
    method: str
    rel_error: float
    objective_error: float
    a: np.ndarray | None = None
    c: np.ndarray | None = None
    s: np.ndarray | None = None
    pattern: str | None = None
    c_pattern: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        if self.s is not None:
            return tuple(self.s.shape)
        return (self.a.shape[0], self.c.shape[1])

    def dense(self) -> np.ndarray:
        """``A C + S`` as one dense ``[K, N]`` array (float64)."""
        out = np.zeros(self.shape, np.float64)
        if self.a is not None:
            out += self.a.astype(np.float64) @ self.c.astype(np.float64)
        if self.s is not None:
            out += self.s
        return out
