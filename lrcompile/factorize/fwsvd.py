"""Fisher-weighted SVD (FWSVD: Hsu et al. 2022, "Language Model Compression with Weighted
Low-rank Factorization", ICLR).

The empirical Fisher ``F_ij = sum_batches (dL/dB_ij)^2`` measures how much the task loss depends
on each weight. FWSVD collapses it to one importance per input row,

    d_i = sqrt(sum_j F_ij)   (+ eps * max(d)),

and solves the row-weighted problem ``min ||diag(d) (B - A C)||_F`` exactly:

    diag(d) B = U S V^T,   A = diag(1/d) U_r S_r,   C = V_r^T.

Constant ``d`` gives plain SVD's product ``A C``. The weight error is larger than plain SVD's,
but the loss-relevant rows are kept better. ``objective_error`` is the ``diag(d)``-weighted error.
"""
from __future__ import annotations

import numpy as np

from .asvd import guard, row_scaled
from .types import Factorization, LayerStats, RankPolicy


def factorize_fwsvd(
    b: np.ndarray,
    policy: RankPolicy,
    stats: LayerStats | None = None,
    *,
    eps: float = 1e-6,
    bias_correction: bool = False,
    solver: str = "auto",
    seed: int = 0,
    oversample: int | None = None,
    power_iters: int | None = None,
) -> Factorization:
    """FWSVD of ``b [K, N]``: SVD of ``diag(d) B`` with ``d_i = sqrt(sum_j F_ij)``.

    Args:
        b: the weight ``[K, N]``, used as ``X @ B``.
        policy: rank policy on the spectrum of ``diag(d) B``.
        stats: statistics with ``fisher [K, N]`` (same layout as ``b``).
        eps: zero guard relative to ``max(d)``.
        bias_correction: return ``mean(x) (B - A C)`` as the bias (needs ``in_sum``).
        solver: SVD solver (see ``svd.truncated_svd``).
        seed: seed of a randomized solver.
        oversample: randomized oversampling (None: the solver's default).
        power_iters: randomized power iterations (None: the solver's default).
    """
    if stats is None or stats.fisher is None:
        raise ValueError("FWSVD needs statistics with fisher (sum of squared gradients dL/dB)")
    if stats.fisher.shape != b.shape:
        raise ValueError(f"fisher is {stats.fisher.shape}, weight is {b.shape}")
    d = guard(np.sqrt(np.asarray(stats.fisher, np.float64).sum(axis=1)), eps)
    return row_scaled(
        b, d, policy, stats, method="fwsvd", bias_correction=bias_correction,
        solver=solver, seed=seed, oversample=oversample, power_iters=power_iters,
        info={"eps": eps},
    )
