"""Two-sided (Kronecker-factored curvature) weighted SVD: inputs on one side, the model's output
sensitivity on the other.

Objective: for a layer ``y = x B`` (``B [K, N]``) inside a model with output ``f``, a change
``E = B - A C`` of the weight moves the output by ``J vec(X E)`` (``J`` the Jacobian of ``f`` with
respect to the layer's output rows). The Gauss-Newton cost ``||J vec(X E)||^2`` is the sum over row
pairs of ``x_s E g_s g_t^T E^T x_t``; its Kronecker-factored approximation (K-FAC: Martens and
Grosse 2015; as a compression metric e.g. Wang et al. 2019 "EigenDamage") keeps only the
product of the two second moments:

    tr(E^T Gx E Gy),   Gx = X^T X  [K, K],   Gy = E[g g^T]  [N, N],

with ``g = dLoss/dy`` per row (token) of the layer output; without labels the loss is a random
probe ``sum(v * f)``, ``v ~ N(0, I)``, whose ``E_v[g g^T] = J^T J`` row by row (see
``lrcompile.fisher.collect_output_curvature``). With ``Gx = L L^T`` and ``Gy = M M^T``,

    tr(E^T Gx E Gy) = ||L^T E M||_F^2,

so the rank-r optimum is the truncated SVD of the doubly whitened weight:

    L^T B M = U S V^T,   A = L^-T U_r S_r,   C = V_r^T M^-1,   min cost = sum_{i>r} s_i^2 .

(``A C = L^-T (L^T B M)_r M^-1``; ``L^T A C M`` is the best rank-r approximation of ``L^T B M``
because ``L^T`` and ``M`` are invertible.) ``A`` and ``C`` come from triangular solves, never
explicit inverses; a Gram that Cholesky rejects takes whiten's clamped-eigh root.

Both Grams are damped relative to their mean eigenvalue, ``G + lambda tr(G)/dim I`` (``damping``
for ``Gx``, ``out_damping`` for ``Gy``; see ``whiten`` for the measurements behind 1e-2). With
``Gy = I`` the method is exactly ``whiten`` (same ``A C``). ``energy``/``max_error`` read the
spectrum ``S`` (damped); ``objective_error`` is the undamped
``sqrt(tr(E^T Gx E Gy) / tr(B^T Gx B Gy))``.

Measured on all-MiniLM-L6-v2 (``--only MatMul``, 256 calibration reviews, 4 probes per batch of 16,
mean embedding cosine to the original on 500 other reviews; one ``lrcompile bench`` run each):

    MatMul params kept      whiten   kfac     (compile s, whiten / kfac)
    --ratio 0.7 (67%)       0.907    0.928    36 / 108
    --ratio 0.5 (50%)       0.858    0.883    24 / 106
    --params 0.7            0.943    0.969    275 / 273
    --params 0.5            0.885    0.929    221 / 272

At ``--ratio 0.5``: 16 probes 0.888 (343 s), ``out_damping`` 0.1 0.885, 1e-3 0.883, so the defaults
are 4 probes and 1e-2; ``--sequential`` 0.899 (446 s). The output curvature costs one backward pass
per probe (70 s of the 106 s above, on 2 cores).

Target correction (sequential calibration, ``stats.cross``): the cost becomes
``tr((X' M - X B)^T (X' M - X B) Gy)``, whose unconstrained minimiser ``B*`` does not depend on
``Gy`` (it is whiten's ridge solution), so the rank-r optimum is the doubly whitened truncated SVD
of ``B*``, as in ``whiten``.
"""
from __future__ import annotations

import numpy as np

from .types import Factorization, LayerStats, RankPolicy
from .whiten import (
    DEFAULT_DAMPING,
    corrected_target,
    sqrt_factor,
    lowrank_in_metric,
    mean_correction,
    out_dtype,
    rel_norm,
)


def _damped(g: np.ndarray, damping: float, what: str) -> tuple[np.ndarray, float]:
    dim = g.shape[0]
    scale = float(np.trace(g)) / dim
    if not scale > 0:
        raise ValueError(f"the {what} Gram is zero: the layer saw no (non-zero) {what}s")
    lam = damping * scale
    return g + lam * np.eye(dim), lam


def factorize_kfac(
    b: np.ndarray,
    policy: RankPolicy,
    stats: LayerStats | None = None,
    *,
    damping: float = DEFAULT_DAMPING,
    out_damping: float = DEFAULT_DAMPING,
    bias_correction: bool = False,
    solver: str = "auto",
    seed: int = 0,
    oversample: int | None = None,
    power_iters: int | None = None,
) -> Factorization:
    """Two-sided weighted SVD of ``b [K, N]``: minimises ``tr((B-AC)^T Gx (B-AC) Gy)``.

    Args:
        b: the weight ``[K, N]``, used as ``X @ B``.
        policy: rank policy on the spectrum of ``L^T B M``.
        stats: statistics with ``gram`` (``X^T X``) and ``grad_gram`` (``sum g g^T`` of the loss
            gradients at the layer's output rows); ``in_sum`` for ``bias_correction``; ``cross`` and
            ``ref_gram`` for target correction.
        damping: relative damping of the input Gram (as in ``whiten``).
        out_damping: relative damping of the output-gradient Gram.
        bias_correction: whiten the input side with the centred Gram and return the mean
            correction ``mean(x) (B - A C)`` as ``Factorization.bias``.
        solver: SVD solver (see ``svd.truncated_svd``).
        seed: seed of a randomized solver.
        oversample: randomized oversampling (None: the solver's default).
        power_iters: randomized power iterations (None: the solver's default).

    Returns:
        A ``Factorization`` with ``A = L^-T U_r S_r``, ``C = V_r^T M^-1``.

    Raises:
        ValueError: missing, mis-shaped or all-zero statistics, negative damping.
    """
    if stats is None or stats.gram is None or stats.grad_gram is None:
        raise ValueError("kfac needs calibration statistics with gram and grad_gram")
    if damping < 0 or out_damping < 0:
        raise ValueError(f"damping must be >= 0, got damping={damping}, out_damping={out_damping}")
    b64, dtype = np.asarray(b, np.float64), out_dtype(np.asarray(b))
    k, n = b64.shape
    if stats.gram.shape != (k, k):
        raise ValueError(f"gram is {stats.gram.shape}, weight needs ({k}, {k})")
    if stats.grad_gram.shape != (n, n):
        raise ValueError(f"grad_gram is {stats.grad_gram.shape}, weight needs ({n}, {n})")
    gx = np.asarray(stats.gram, np.float64)
    if bias_correction:
        if stats.in_sum is None or stats.count < 1:
            raise ValueError("bias_correction needs calibration statistics with in_sum")
        gx = gx - np.outer(stats.in_sum, stats.in_sum) / stats.count
    gy = np.asarray(stats.grad_gram, np.float64)
    gy = 0.5 * (gy + gy.T)
    gxd, lam = _damped(gx, damping, "input")
    gyd, _ = _damped(gy, out_damping, "output-gradient")
    root_t, root_t_solve, info_x = sqrt_factor(gxd)
    out_t, out_t_solve, info_y = sqrt_factor(gyd)  # M^T m and M^-T m, Gy = M M^T
    corrected = stats.cross is not None and not bias_correction
    target = corrected_target(b64, gxd, stats, lam) if corrected else b64
    svd_opts = {"solver": solver, "seed": seed, "oversample": oversample, "power_iters": power_iters}
    # B M = (M^T B^T)^T; lowrank_in_metric applies L^T on the left and returns A = L^-T U_r S_r
    a, vt, r, spectrum = lowrank_in_metric(out_t(target.T).T, root_t, root_t_solve, policy, **svd_opts)
    c = out_t_solve(vt.T).T  # V_r^T M^-1 = (M^-T V_r)^T

    m = a @ c
    e = b64 - m
    if corrected:
        if stats.ref_gram is None:
            raise ValueError("target correction needs ref_gram (X^T X of the original inputs) with cross")
        den = float(np.sum((stats.ref_gram @ b64) * (b64 @ gy)))
        num = (float(np.sum((stats.gram @ m) * (m @ gy))) - 2.0 * float(np.sum((stats.cross @ b64) * (m @ gy)))
               + den)
    else:
        num = float(np.sum((gx @ e) * (e @ gy)))
        den = float(np.sum((stats.gram @ b64) * (b64 @ gy)))
    bias = mean_correction(b64, a, c, stats).astype(dtype) if bias_correction else None
    return Factorization(
        a=a.astype(dtype),
        c=c.astype(dtype),
        rank=r,
        method="kfac",
        rel_error=rel_norm(e, b64),
        objective_error=float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0,
        bias=bias,
        singular_values=spectrum,
        info={
            "root": info_x["root"],
            "out_root": info_y["root"],
            **({"clamped": info_x["clamped"]} if "clamped" in info_x else {}),
            **({"out_clamped": info_y["clamped"]} if "clamped" in info_y else {}),
            "damping": damping,
            "out_damping": out_damping,
            "bias_correction": bias_correction,
            **({"target_correction": True, "target_shift": rel_norm(target - b64, b64)} if corrected else {}),
            **svd_opts,
            "calib_rows": int(stats.count),
        },
    )
