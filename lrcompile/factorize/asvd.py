"""Activation-aware SVD (ASVD: Yuan et al. 2023, "ASVD: Activation-aware Singular Value
Decomposition for Compressing Large Language Models").

Input channels that carry large activations matter more. With per-channel scales

    s_k = mean_t |x_tk| ^ alpha   (+ eps * max(s), so dead channels stay invertible),

ASVD decomposes the scaled weight ``diag(s) B = U S V^T`` and undoes the scaling on the left:

    A = diag(1/s) U_r S_r,   C = V_r^T,

the best rank-r approximation in the diagonal metric ``||diag(s) (B - A C)||_F`` (whitened SVD
with the diagonal root ``R = diag(s)``; ``alpha = 0`` is plain SVD). ``objective_error`` is that
scaled error relative to ``||diag(s) B||_F``.
"""
from __future__ import annotations

import logging

import numpy as np

from .types import Factorization, LayerStats, RankPolicy
from .whiten import lowrank_in_metric, mean_correction, out_dtype, rel_norm

log = logging.getLogger(__name__)


def row_scaled(
    b: np.ndarray,
    w: np.ndarray,
    policy: RankPolicy,
    stats: LayerStats | None,
    *,
    method: str,
    bias_correction: bool,
    info: dict,
    **svd_opts,
) -> Factorization:
    """Rank-r factorization of ``b`` best in ``||diag(w) (B - A C)||_F`` (shared by ASVD, FWSVD).

    Args:
        b: the weight ``[K, N]``.
        w: positive row weights ``[K]``.
        policy: rank policy on the spectrum of ``diag(w) B``.
        stats: calibration statistics (``in_sum`` when ``bias_correction``).
        method: name recorded in the result.
        bias_correction: add the mean correction ``mean(x) (B - A C)`` as the bias.
        info: method options to record (replayability).
        **svd_opts: ``solver``, ``seed``, ``oversample``, ``power_iters`` (see ``lowrank_in_metric``).
    """
    b64, dtype = np.asarray(b, np.float64), out_dtype(np.asarray(b))
    wc = w[:, None]
    a, c, r, spectrum = lowrank_in_metric(
        b64, lambda m: wc * m, lambda y: y / wc, policy, **svd_opts
    )
    e = b64 - a @ c
    bias = mean_correction(b64, a, c, stats).astype(dtype) if bias_correction else None
    return Factorization(
        a=a.astype(dtype),
        c=c.astype(dtype),
        rank=r,
        method=method,
        rel_error=rel_norm(e, b64),
        objective_error=rel_norm(wc * e, wc * b64),
        bias=bias,
        singular_values=spectrum,
        info={**info, "bias_correction": bias_correction, **svd_opts},
    )


def guard(w: np.ndarray, eps: float) -> np.ndarray:
    """``w + eps * max(w)``; all-equal weights (plain SVD) when ``w`` is all zero."""
    top = float(np.max(w)) if w.size else 0.0
    if not top > 0:
        log.warning("row weights are all zero: falling back to uniform weights (plain SVD)")
        return np.ones_like(w)
    return w + eps * top


def factorize_asvd(
    b: np.ndarray,
    policy: RankPolicy,
    stats: LayerStats | None = None,
    *,
    alpha: float = 0.5,
    eps: float = 1e-6,
    bias_correction: bool = False,
    solver: str = "auto",
    seed: int = 0,
    oversample: int | None = None,
    power_iters: int | None = None,
) -> Factorization:
    """ASVD of ``b [K, N]``: SVD of ``diag(s) B`` with ``s = mean|x|^alpha``.

    Args:
        b: the weight ``[K, N]``, used as ``X @ B``.
        policy: rank policy on the spectrum of ``diag(s) B``.
        stats: calibration statistics with ``abs_sum`` and ``count``.
        alpha: scaling exponent (0: plain SVD; the paper uses about 0.5).
        eps: zero guard relative to ``max(s)``.
        bias_correction: return ``mean(x) (B - A C)`` as the bias (needs ``in_sum``).
        solver: SVD solver (see ``svd.truncated_svd``).
        seed: seed of a randomized solver.
        oversample: randomized oversampling (None: the solver's default).
        power_iters: randomized power iterations (None: the solver's default).
    """
    if stats is None or stats.abs_sum is None or stats.count < 1:
        raise ValueError("ASVD needs calibration statistics with abs_sum (and count > 0)")
    if stats.abs_sum.shape != (b.shape[0],):
        raise ValueError(f"abs_sum is {stats.abs_sum.shape}, weight needs ({b.shape[0]},)")
    s = guard((np.asarray(stats.abs_sum, np.float64) / stats.count) ** alpha, eps)
    return row_scaled(
        b, s, policy, stats, method="asvd", bias_correction=bias_correction,
        solver=solver, seed=seed, oversample=oversample, power_iters=power_iters,
        info={"alpha": alpha, "eps": eps, "calib_rows": int(stats.count)},
    )
