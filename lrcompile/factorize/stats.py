"""Streaming calibration statistics for one layer ``y = x @ B`` (``B [K, N]``).

Data-aware factorizers never see activations, only sums over calibration rows, accumulated in
float64 one batch at a time (nothing is stored per row):

    count    = number of kept rows
    gram     = sum_t x_t^T x_t            [K, K]   (X^T X: whitened SVD, EoRA, dictionaries)
    abs_sum  = sum_t |x_t|                [K]      (ASVD's channel scales)
    in_sum   = sum_t x_t                  [K]      (mean correction, centred Gram)
    out_sum  = sum_t y_t                  [N]      (AFM's output mean)
    out_gram = sum_t y_t^T y_t            [N, N]   (AFM's output covariance)
    fisher   = sum_batches (dL/dB)^2      [K, N]   (FWSVD, Hsu et al. 2022)
    cross    = sum_t x'_t^T x_t           [K, K]   (target correction, see below)
    ref_gram = sum_t x_t^T x_t            [K, K]   (the original's Gram, with ``cross``)

A batch ``x [..., K]`` is flattened to rows over its leading dimensions; an optional ``mask``
broadcastable to those dimensions drops the rows where it is 0 (padding tokens must not enter
G: they would pull the whitening towards directions the model never uses on real data).
Every batch is cast to float64 *before* the GEMM, in chunks that bound the temporary copy, so
the sums do not lose the small eigenvalues of G to float32 rounding. Sums (not means) merge
exactly across batches, workers and shards: ``merge(a, b)`` adds them.

Paired batches (``cross=True``, sequential calibration with target correction): ``x`` are the
layer's inputs in the partly compressed model, ``ref`` the original model's inputs on the same
calibration rows (same shape). ``gram``/``abs_sum``/``in_sum`` describe ``x``; ``cross = X^T Xref``
and ``ref_gram = Xref^T Xref``. The mask drops the same rows from both.
"""
from __future__ import annotations

import numpy as np

from .types import LayerStats

# Rows converted to float64 at a time: bounds the temporary copy to about 32 MiB per operand.
_CHUNK_ELEMENTS = 1 << 22


class StatsAccumulator:
    """Accumulates a layer's calibration statistics over streamed batches.

    Args:
        k: input features (rows of ``B``).
        n: output features (columns of ``B``); needed for output statistics and Fisher.
        gram: collect ``X^T X``.
        abs_sum: collect ``sum |x|`` per input channel.
        in_sum: collect ``sum x`` per input channel.
        out_gram: collect ``sum y`` and ``Y^T Y`` of the layer output (needs ``n``; pass ``y``
            to ``update``). Collect the *pre-bias* output ``x @ B`` (see ``afm``).
        fisher: collect the sum of squared weight gradients (``add_grad``; needs ``n``).
        cross: collect ``X^T Xref`` and ``Xref^T Xref`` from paired batches (pass ``ref`` to
            ``update``).
    """

    def __init__(
        self,
        k: int,
        n: int | None = None,
        *,
        gram: bool = True,
        abs_sum: bool = True,
        in_sum: bool = True,
        out_gram: bool = False,
        fisher: bool = False,
        cross: bool = False,
    ) -> None:
        if k < 1 or (n is not None and n < 1):
            raise ValueError(f"feature sizes must be positive, got k={k}, n={n}")
        if (out_gram or fisher) and n is None:
            raise ValueError("output statistics and Fisher need the output size n")
        self.k, self.n = k, n
        self.count = 0
        self.grad_batches = 0
        f64 = np.float64
        self.gram = np.zeros((k, k), f64) if gram else None
        self.abs_sum = np.zeros(k, f64) if abs_sum else None
        self.in_sum = np.zeros(k, f64) if in_sum else None
        self.out_sum = np.zeros(n, f64) if out_gram else None
        self.out_gram = np.zeros((n, n), f64) if out_gram else None
        self.fisher = np.zeros((k, n), f64) if fisher else None
        self.cross = np.zeros((k, k), f64) if cross else None
        self.ref_gram = np.zeros((k, k), f64) if cross else None

    def _arrays(self) -> dict[str, np.ndarray | None]:
        names = ("gram", "abs_sum", "in_sum", "out_sum", "out_gram", "fisher", "cross", "ref_gram")
        return {name: getattr(self, name) for name in names}

    @property
    def config(self) -> dict:
        """The constructor arguments (two accumulators merge only when these agree)."""
        flags = {name: arr is not None for name, arr in self._arrays().items()}
        flags.pop("out_sum")
        flags.pop("ref_gram")
        return {"k": self.k, "n": self.n, **flags}

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulated sums (independent of how many rows were seen)."""
        return sum(a.nbytes for a in self._arrays().values() if a is not None)

    def update(self, x: np.ndarray, y: np.ndarray | None = None, mask: np.ndarray | None = None,
               ref: np.ndarray | None = None) -> None:
        """Add one batch of layer inputs (and outputs).

        Args:
            x: inputs ``[..., K]``; leading dimensions are flattened to rows.
            y: outputs ``[..., N]`` with the same leading dimensions (required when output
                statistics are collected, ignored otherwise).
            mask: broadcastable to ``x.shape[:-1]``; rows where it is 0 are dropped.
            ref: the original model's inputs for the same rows, shaped like ``x`` (required
                when ``cross`` is collected, ignored otherwise).
        """
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.k:
            raise ValueError(f"expected inputs [..., {self.k}], got shape {x.shape}")
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.k)
        if self.out_gram is not None:
            if y is None:
                raise ValueError("this accumulator collects output statistics: pass y")
            y = np.asarray(y)
            if y.shape != (*lead, self.n):
                raise ValueError(f"expected outputs {(*lead, self.n)}, got shape {y.shape}")
            ys = y.reshape(-1, self.n)
        if self.cross is not None:
            if ref is None:
                raise ValueError("this accumulator collects the cross-Gram: pass ref")
            ref = np.asarray(ref)
            if ref.shape != x.shape:
                raise ValueError(f"expected reference inputs {x.shape}, got shape {ref.shape}")
            refs = ref.reshape(-1, self.k)
        if mask is not None:
            keep = np.broadcast_to(np.asarray(mask), lead).reshape(-1) != 0
            rows = rows[keep]
            if self.out_gram is not None:
                ys = ys[keep]
            if self.cross is not None:
                refs = refs[keep]
        step = max(1, _CHUNK_ELEMENTS // max(self.k, self.n or 1))
        for lo in range(0, rows.shape[0], step):
            xc = rows[lo : lo + step].astype(np.float64)
            if self.gram is not None:
                self.gram += xc.T @ xc
            if self.abs_sum is not None:
                self.abs_sum += np.abs(xc).sum(axis=0)
            if self.in_sum is not None:
                self.in_sum += xc.sum(axis=0)
            if self.out_gram is not None:
                yc = ys[lo : lo + step].astype(np.float64)
                self.out_sum += yc.sum(axis=0)
                self.out_gram += yc.T @ yc
            if self.cross is not None:
                rc = refs[lo : lo + step].astype(np.float64)
                self.cross += xc.T @ rc
                self.ref_gram += rc.T @ rc
        self.count += rows.shape[0]

    def add_grad(self, grad: np.ndarray) -> None:
        """Add squared loss gradients ``dL/dB`` to the Fisher sum.

        Args:
            grad: ``[K, N]`` (one batch's gradient) or ``[..., K, N]`` (per-sample gradients,
                each squared separately: the empirical Fisher).
        """
        if self.fisher is None:
            raise ValueError("this accumulator was built without fisher=True")
        g = np.asarray(grad, dtype=np.float64)
        if g.ndim < 2 or g.shape[-2:] != (self.k, self.n):
            raise ValueError(f"expected gradients [..., {self.k}, {self.n}], got shape {g.shape}")
        g = g.reshape(-1, self.k, self.n)
        self.fisher += np.einsum("bkn,bkn->kn", g, g)
        self.grad_batches += g.shape[0]

    def result(self) -> LayerStats:
        """A snapshot of the statistics (copies; the accumulator can keep going)."""
        arrs = {name: None if a is None else a.copy() for name, a in self._arrays().items()}
        for name in ("gram", "out_gram", "ref_gram"):
            if arrs[name] is not None:  # exact symmetry for Cholesky / eigh
                arrs[name] = 0.5 * (arrs[name] + arrs[name].T)
        return LayerStats(count=self.count, **arrs)


class FisherAccumulator(StatsAccumulator):
    """Only the Fisher sum of a ``[K, N]`` weight (for FWSVD): ``add_grad`` per batch."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__(k, n, gram=False, abs_sum=False, in_sum=False, fisher=True)


def merge(a: StatsAccumulator, b: StatsAccumulator) -> StatsAccumulator:
    """A new accumulator holding the statistics of both (e.g. from two workers or shards).

    Raises:
        ValueError: when the two were configured differently.
    """
    if a.config != b.config:
        raise ValueError(f"cannot merge accumulators with different configs: {a.config} vs {b.config}")
    out = StatsAccumulator.__new__(type(a))
    StatsAccumulator.__init__(out, **{k: v for k, v in a.config.items()})
    out.count = a.count + b.count
    out.grad_batches = a.grad_batches + b.grad_batches
    for name, arr in out._arrays().items():
        if arr is not None:
            arr += getattr(a, name) + getattr(b, name)
    return out
