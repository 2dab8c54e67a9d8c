"""Embedding tables whitened by lookup frequency.

A Gather ``y = E[idx]`` is ``y = x @ E`` with one-hot rows ``x``, so the activation Gram that
whitened SVD uses is ``G = X^T X = diag(c)``, ``c_i`` = how often row i was looked up in the
calibration data. Minimising ``||X (E - A C)||_F`` is then the row-weighted problem
``min ||diag(sqrt(c)) (E - A C)||_F``, solved exactly by the SVD of ``diag(sqrt(c)) E``.
Rows never seen in calibration would get no weight at all and be reconstructed arbitrarily, so
counts are smoothed: ``w_i = sqrt(c_i + smoothing * mean(c))`` (default smoothing 0.1).
"""
from __future__ import annotations

import numpy as np

from .asvd import row_scaled
from .types import Factorization, LayerStats, RankPolicy


def factorize_rowfreq(
    b: np.ndarray,
    policy: RankPolicy,
    stats: LayerStats | None = None,
    *,
    smoothing: float = 0.1,
    solver: str = "auto",
    seed: int = 0,
    oversample: int | None = None,
    power_iters: int | None = None,
    **_ignored,
) -> Factorization:
    """Frequency-weighted SVD of an embedding table ``b [V, d]``; ``stats.in_sum`` holds the counts."""
    if stats is None or stats.in_sum is None:
        raise ValueError("rowfreq needs lookup counts (stats.in_sum)")
    counts = np.asarray(stats.in_sum, np.float64)
    if counts.shape != (b.shape[0],):
        raise ValueError(f"counts have shape {counts.shape}, table has {b.shape[0]} rows")
    mean = float(counts.mean()) if counts.size else 0.0
    w = np.sqrt(counts + smoothing * mean) if mean > 0 else np.ones_like(counts)
    return row_scaled(b, w, policy, None, method="rowfreq", bias_correction=False, solver=solver, seed=seed,
                      oversample=oversample, power_iters=power_iters,
                      info={"smoothing": smoothing, "rows_seen": int((counts > 0).sum())})
