"""Output-feature PCA (AFM, "atomic feature mimicking": Yu & Wu, "Compressing Transformers:
Features Are Low-Rank, but Weights Are Not!", AAAI 2023; the CTR-model use in METHODS.md is
Yu et al. 2024).

A layer's outputs ``y = x B`` usually occupy far fewer than N directions. With the output mean and
covariance over the calibration rows,

    mu = E[y],   Cov = E[y^T y] - mu^T mu = Q Lam Q^T   (eigh, descending, signs fixed so the
                                                       largest entry of each vector is positive)

keep the top-k eigenvectors ``U_k`` and project the centred output onto them:

    y ~= mu + (y - mu) U_k U_k^T = x (B U_k) U_k^T + mu (I - U_k U_k^T)
    A = B U_k [K, k],   C = U_k^T [k, N],   d = mu (I - U_k U_k^T) [N].

Exact at k = N (then d = 0). On the calibration rows the squared output error is exactly
``T * sum_{i>k} lam_i``, so ``objective_error = sqrt(sum_{i>k} lam_i / sum_i lam_i)`` (output
variance not explained) and the rank policy's ``energy``/``max_error`` refer to that spectrum.

Bias convention: the statistics are of the *pre-bias* output ``y = x B`` (what
``derive.with_output_stats`` produces); the layer's own bias stays where it is, after the chain.
Statistics collected after the bias (``y = x B + b``) have the same covariance and the mean shifted
by ``b``: pass ``bias=b`` and it is subtracted from ``mu``, so the result is exact in both cases.

Embedding tables: a Gather of ``E [V, d]`` is a one-hot MatMul, so the pipeline passes the
output statistics ``sum y = c E`` and ``Y^T Y = E^T diag(c) E`` (``derive.onehot_output_stats``,
``c`` = lookup counts) and the same algebra applies: Gather ``E U_k``, MatMul ``U_k^T``, Add ``d``.
"""
from __future__ import annotations

import numpy as np

from .svd import choose_rank
from .types import Factorization, LayerStats, RankPolicy
from .whiten import out_dtype, rel_norm


def principal_axes(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a covariance, deterministic signs."""
    lam, q = np.linalg.eigh(0.5 * (cov + cov.T))
    lam, q = np.maximum(lam[::-1], 0.0), q[:, ::-1]
    flip = np.sign(q[np.argmax(np.abs(q), axis=0), np.arange(q.shape[1])])
    return lam, q * np.where(flip == 0, 1.0, flip)


def _pca_rank(policy: RankPolicy, lam: np.ndarray, count: float, k: int, n: int) -> int:
    s = np.sqrt(lam * count)  # singular values of the centred output matrix
    return choose_rank(policy, s, float(np.sum(s * s)), k, n)


def _unexplained(lam: np.ndarray, r: int) -> float:
    total = float(np.sum(lam))
    return float(np.sqrt(np.sum(lam[r:]) / total)) if total > 0 else 0.0


def factorize_afm(
    b: np.ndarray,
    policy: RankPolicy,
    stats: LayerStats | None = None,
    *,
    bias: np.ndarray | None = None,
    solver: str = "eigh",
    seed: int = 0,
) -> Factorization:
    """AFM of ``b [K, N]``: ``A = B U_k``, ``C = U_k^T``, bias ``d = mu (I - U_k U_k^T)``.

    Args:
        b: the weight ``[K, N]``, used as ``X @ B``.
        policy: rank policy on the output covariance spectrum.
        stats: statistics with ``out_sum``, ``out_gram`` and ``count`` of the pre-bias output.
        bias: the layer's bias ``[N]`` if the output statistics were collected after it.
        solver: recorded only (AFM always uses a dense ``eigh`` of the ``[N, N]`` covariance).
        seed: unused (deterministic); accepted for the common method signature.

    Returns:
        A ``Factorization`` whose ``bias`` is the mean correction ``d`` (``X A C + d ~= X B``).
    """
    if stats is None or stats.out_sum is None or stats.out_gram is None or stats.count < 1:
        raise ValueError("AFM needs output statistics out_sum and out_gram (and count > 0)")
    b64, dtype = np.asarray(b, np.float64), out_dtype(np.asarray(b))
    k, n = b64.shape
    if stats.out_gram.shape != (n, n):
        raise ValueError(f"out_gram is {stats.out_gram.shape}, weight needs ({n}, {n})")
    mu = stats.out_sum / stats.count
    cov = stats.out_gram / stats.count - np.outer(mu, mu)
    if bias is not None:
        mu = mu - np.asarray(bias, np.float64)
    lam, q = principal_axes(cov)
    r = _pca_rank(policy, lam, stats.count, k, n)
    u = q[:, :r]
    a = b64 @ u
    d = mu - (mu @ u) @ u.T
    return Factorization(
        a=a.astype(dtype),
        c=u.T.astype(dtype),
        rank=r,
        method="afm",
        rel_error=rel_norm(b64 - a @ u.T, b64),
        objective_error=_unexplained(lam, r),
        bias=d.astype(dtype),
        singular_values=np.sqrt(lam * stats.count),
        info={"bias_given": bias is not None, "solver": "eigh", "calib_rows": int(stats.count)},
    )
