"""Sparse forms of a weight: N:M pruning with second-order refit (SparseGPT-style OBS) and the
scaled low-rank + sparse split (OATS), with an exact refit in the input metric.

Layout (METHODS.md): ``B [K, N]`` (in x out), used as ``X @ B``; the reduction axis is ``K`` (the
rows of ``B``). With calibration inputs ``X [T, K]`` and ``G = X^T X`` the objective is

    ||X (B - B')||_F^2 = tr(E^T G E),   E = B - B',

reported relative to ``||X B||_F`` with the *undamped* ``G`` (``SparseFit.objective_error``).
The fits themselves use the damped ``H = G + lambda tr(G)/K I`` (``whiten.DEFAULT_DAMPING``).

N:M pruning (``nm_prune``). Every output column keeps at most ``n`` nonzeros in each group of
``m`` consecutive rows of ``B`` (consecutive along ``order`` when given: a Conv's ``K`` is
(channel, ky, kx) flattened, and sparse-weight kernels want groups of ``m`` input channels at
one spatial position). ``method="magnitude"`` keeps the ``n`` largest ``|w|`` per group (the
baseline). ``method="obs"`` (Frantar & Alistarh 2023, "SparseGPT"; Hassibi & Stork's optimal
brain surgeon): the columns of ``B`` share ``H``, so each is pruned independently with the same
inverse Hessian. Removing weight ``i`` of a column ``w`` and re-optimising the others costs
``w_i^2 / [H^-1]_ii`` and moves the others by ``delta = -w_i / [H^-1]_ii * H^-1[:, i]``. Rows are
processed in order; once a row is done (kept or zeroed) it is frozen, so the inverse Hessian of
the remaining rows is needed after each step. With the upper Cholesky factor ``H^-1 = U^T U``,
row ``i`` of ``U`` divided by ``U_ii`` is exactly ``H_rest^-1[i, i:] / sqrt(H_rest^-1[i, i])`` for
the rows ``i..K-1`` still free, so the whole sweep reads:

    for each group of m rows starting at i: keep, per column, the n largest
        w_j^2 / U_jj^2  (j in the group, w as updated so far);
    for each row i: e = (w_i - q_i) / U_ii  (q_i = w_i if kept else 0);  w_{i:} -= U[i, i:]^T e .

Kept rows give ``e = 0`` (no update): only pruned weights push their error onto later rows.
This runs on all ``N`` columns at once (``e`` is a row vector of ``N``), in blocks of ``block``
rows whose updates to later blocks are applied as one GEMM (lazy batch update). Without a Gram
``H = I``: ``U = I``, no updates and the score is ``w^2``, so ``obs`` equals ``magnitude``.
The result is greedy (the group's mask is fixed before its rows are refit), so it is not the
best mask; on tiny problems (K = 8, 2:4, brute force over all 6^2 masks with the exact refit)
its error stayed within a small factor of the optimum (see the tests).

Low rank + sparse (``lowrank_sparse``). ``B ~= A C + S`` with ``S`` on a pattern:
``"unstructured"`` (the ``nonzeros`` largest entries), ``"rows"`` (whole input rows of ``B``,
i.e. input channels: the LOST channel-wise form; ``nonzeros // N`` rows) or ``"nm"`` (N:M along
``K``). OATS (Zhang & Papyan 2024, "OATS: outlier-aware pruning through sparse and low rank
decomposition") scales the input channels by ``D = diag(sqrt(diag(H)))`` and alternates on
``B_s = D B``:

    L = best rank-r of (B_s - S)   (truncated SVD),    S = projection of (B_s - L) on the pattern,

(each step optimal for the scaled Frobenius objective, so it never increases; the SVD after the
first is one warm-started block power step on the previous right subspace, ``_lowrank_tracked``,
within 0.5% of the exact SVD's result in our tests; the best iterate is kept), then unscales:
``A C = D^-1 L``, ``S <- D^-1 S``. ``D`` only sees the diagonal of ``G``; with a Gram we then
refine in the full metric by block coordinate descent on the damped objective
``||R^T (B - A C - S)||_F`` (``H = R R^T``):

    low-rank step: the whitened optimum of (B - S) (SVD of R^T (B - S), as whiten.py);
    sparse step:   with Q = B - A C, choose the support in the metric, then take the
                   least-squares values on it, per column j:
                   S[P_j, j] = H[P_j, P_j]^-1 (H Q)[P_j, j]   ("rows": one solve, shared rows).
                   Support: "unstructured" = the mask of an OBS sweep of Q (as for N:M, but
                   each block of rows keeps its share of ``nonzeros``, its largest
                   q^2 / U_ii^2: SparseGPT's adaptive mask); "rows" = the rows with the largest
                   OBS saliency ||Q_i||^2 / [H^-1]_ii; "nm" = the OBS N:M sweep of Q, values
                   included (HASSLE-free's idea: the sparse step by OBS on the residual).

The least-squares values make each sparse step no worse than ``S = 0`` on the damped objective;
re-choosing the support each round is not monotone, so every round's result is a candidate.
Measured on MiniLM (layer 2, query and FFN down, 20% of a 50% budget in S, 4 rounds), the
re-chosen OBS support beat a support fixed from OATS by 2-5% in objective, and the D-scaled
magnitude support by the same; the refit itself cuts OATS's objective by about 30%: its diagonal
scaling misses the correlations of real activations.
Two chains run: one from the OATS result, one from the pure whitened low rank (``S = 0``). The
second makes the result never worse than the pure whitened low rank at the same rank (up to the
damping, which the steps minimise instead of the undamped objective). The candidate with the
lowest *undamped* objective is kept (``info["source"]``).

The factors are split as whiten.py does: ``A`` carries the singular values, ``C`` has orthonormal
rows (``A = D^-1 U_r S_r``, ``C = V_r^T`` from OATS; ``A = R^-T U_r S_r``,
``C = V_r^T`` from a whitened step).

Everything runs in float64 and is deterministic (stable sorts, seeded SVD); returned arrays have
the weight's dtype (float64 for integer weights) and ``s`` has exact zeros off its pattern.
The errors are computed from the returned (cast) arrays.
"""
from __future__ import annotations

import logging

import numpy as np
import scipy.linalg as sla

from .svd import truncated_svd
from .types import RankPolicy, SparseFit
from .whiten import DEFAULT_DAMPING, lowrank_in_metric, out_dtype, rel_norm, sqrt_factor

log = logging.getLogger(__name__)

NM_METHODS = ("obs", "magnitude")
PATTERNS = ("unstructured", "rows", "nm")

#: relative decrease of the scaled OATS error under which the alternation stops early.
OATS_TOL = 1e-9

#: extra right vectors tracked by the OATS low-rank step (``_lowrank_tracked``).
OATS_OVERSAMPLE = 16

#: rounds of (low-rank step, sparse step) of each refit chain (see the module docstring); on
#: MiniLM 5 rounds gave a 1-2% lower objective than 3 for about 1.4x the time.
DEFAULT_REFIT_ITERS = 5


# ----------------------------------------------------------------------------- helpers


def group_order(k: int, m: int, order=None) -> np.ndarray:
    """The row order whose consecutive runs of ``m`` form the N:M groups (validated).

    Args:
        k: the reduction size ``K``.
        m: the group size.
        order: None (natural order) or a permutation of ``range(k)``.

    Returns:
        ``order`` as an int64 array.

    Raises:
        ValueError: ``m < 1``, ``k`` not divisible by ``m``, or ``order`` not a permutation.
    """
    if m < 1:
        raise ValueError(f"group size m must be >= 1, got {m}")
    if k % m:
        raise ValueError(
            f"N:M needs the reduction size K={k} to be divisible by M={m}; "
            "pad the weight or choose another M"
        )
    if order is None:
        return np.arange(k)
    perm = np.asarray(order)
    if perm.shape != (k,) or not np.issubdtype(perm.dtype, np.integer):
        raise ValueError(f"order must be a permutation of range({k}) (1-D integers), got shape {perm.shape}")
    if not np.array_equal(np.sort(perm), np.arange(k)):
        raise ValueError(f"order must be a permutation of range({k}): it repeats or misses rows")
    return perm.astype(np.int64)


def nm_mask_ok(s: np.ndarray, n: int, m: int, order=None) -> bool:
    """Whether ``s [K, N]`` holds at most ``n`` nonzeros in every group of ``m`` consecutive rows
    (along ``order``) of every column.

    Raises:
        ValueError: as ``group_order`` (``K`` not divisible by ``m``, bad ``order``).
    """
    s = np.asarray(s)
    if s.ndim != 2:
        raise ValueError(f"expected a 2-D [K, N] array, got shape {s.shape}")
    k = s.shape[0]
    perm = group_order(k, m, order)
    counts = (s[perm] != 0).reshape(k // m, m, s.shape[1]).sum(axis=1)
    return bool(np.all(counts <= n))


def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer))) or not 0 <= n <= m:
        raise ValueError(f"N:M needs integers 0 <= n <= m, got n={n}, m={m}")


def _check_weight(b) -> tuple[np.ndarray, np.dtype]:
    b = np.asarray(b)
    if b.ndim != 2 or b.size == 0:
        raise ValueError(f"expected a non-empty 2-D weight [K, N], got shape {b.shape}")
    b64 = b.astype(np.float64)
    if not np.all(np.isfinite(b64)):
        raise ValueError("the weight has non-finite entries")
    return b64, out_dtype(b)


def _check_gram(gram, k: int) -> np.ndarray | None:
    """The Gram as float64: ``[K, K]``, or ``[K]`` for a diagonal one (given as a vector, or a
    matrix whose off-diagonal entries are all zero: lookups, per-channel scales)."""
    if gram is None:
        return None
    g = np.asarray(gram, np.float64)
    if g.shape not in ((k, k), (k,)):
        raise ValueError(f"gram is {g.shape}, weight needs ({k}, {k}) or its diagonal ({k},)")
    if not np.all(np.isfinite(g)):
        raise ValueError("the gram has non-finite entries")
    if g.ndim == 2 and np.count_nonzero(g) == np.count_nonzero(np.diagonal(g)):
        g = np.diagonal(g).copy()
    if g.ndim == 1 and np.any(g < 0):
        raise ValueError("a diagonal gram must be >= 0")
    return g


def _damped(g: np.ndarray, damping: float) -> np.ndarray:
    """``G + damping tr(G)/K I`` (a vector for a diagonal ``G``); inputs that never fire
    (``G_ii = 0``) get ``H_ii = 1`` so the damped Gram stays invertible (their weights do not
    reach the objective)."""
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    k = g.shape[0]
    diag = g if g.ndim == 1 else np.diagonal(g)
    scale = float(np.sum(diag)) / k
    if not scale > 0:
        raise ValueError("the calibration Gram is zero: the layer saw no (non-zero) inputs")
    if g.ndim == 1:
        h = g + damping * scale
        h[h <= 0] = 1.0
        return h
    h = g + damping * scale * np.eye(k)
    dead = np.diag(h) <= 0
    if np.any(dead):
        h[dead, dead] = 1.0
    return h


def objective(b64: np.ndarray, approx: np.ndarray, gram: np.ndarray | None) -> float:
    """``||L^T (B - B')||_F / ||L^T B||_F`` for ``G = L L^T`` (``tr(E^T G E)``; ``gram`` may be
    the vector of a diagonal ``G``), or the plain relative Frobenius error without a Gram."""
    e = b64 - approx
    if gram is None:
        return rel_norm(e, b64)
    if gram.ndim == 1:
        den = float(np.sum(gram[:, None] * b64 * b64))
        num = float(np.sum(gram[:, None] * e * e))
    else:
        den = float(np.sum((gram @ b64) * b64))
        num = float(np.sum((gram @ e) * e))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


def _topn_mask(score: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask of the ``n`` largest entries of ``score [G, m, N]`` along axis 1 (ties: the
    earlier row wins; stable)."""
    idx = np.argsort(-score, axis=1, kind="stable")[:, :n]
    mask = np.zeros(score.shape, bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def nm_top_mask(score: np.ndarray, n: int, m: int, order=None) -> np.ndarray:
    """Keep-mask of the ``n`` largest ``score`` entries in each N:M group of each column of
    ``score [K, N]`` (ties: the earlier row)."""
    k, cols = score.shape
    perm = group_order(k, m, order)
    mask_p = _topn_mask(score[perm].reshape(k // m, m, cols), n).reshape(k, cols)
    mask = np.empty_like(mask_p)
    mask[perm] = mask_p
    return mask


def nm_magnitude_mask(w: np.ndarray, n: int, m: int, order=None) -> np.ndarray:
    """Keep-mask of the ``n`` largest ``|w|`` in each N:M group of each column of ``w [K, N]``."""
    return nm_top_mask(w**2, n, m, order)


# ----------------------------------------------------------------------------- N:M pruning


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper ``U`` with ``H^-1 = U^T U``."""
    try:
        low = sla.cholesky(h, lower=True)
        hinv = sla.cho_solve((low, True), np.eye(h.shape[0]))
        return sla.cholesky(hinv, lower=False)
    except (np.linalg.LinAlgError, sla.LinAlgError) as exc:
        raise ValueError(
            "the Gram is not positive definite; pass damping > 0 (e.g. the default "
            f"{DEFAULT_DAMPING})"
        ) from exc


def _obs_sweep(
    w: np.ndarray,
    u: np.ndarray,
    block: int,
    *,
    nm: tuple[int, int] | None = None,
    count: int | None = None,
) -> np.ndarray:
    """The OBS sweep of the module docstring on ``w [K, N]`` (rows already in group order).

    The mask is chosen as the sweep reaches it, from the weights as updated so far: with
    ``nm = (n, m)`` per group of ``m`` rows (``block`` a multiple of ``m``); with ``count`` per
    block of rows, the ``count`` entries of ``w`` spread over the blocks in proportion to their
    size (SparseGPT's adaptive mask selection), the block keeping its largest ``w^2 / U_ii^2``.
    """
    k, cols = w.shape
    w = w.copy()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[i1:i2]  # a view: updated in place
        u1 = u[i1:i2, i1:i2]
        d = np.diag(u1)
        err = np.zeros_like(w1)
        if count is not None:  # this block's share, rounded so the shares add up to count
            quota = round(count * i2 / k) - round(count * i1 / k)
            score = (w1**2 / (d[:, None] ** 2)).ravel()
            keep_block = np.zeros(w1.shape, bool)
            if quota >= score.size:
                keep_block[:] = True
            elif quota > 0:
                keep_block.ravel()[np.argpartition(-score, quota - 1)[:quota]] = True
        for i in range(i2 - i1):
            if nm is not None:
                n, m = nm
                if i % m == 0:
                    score = w1[i : i + m] ** 2 / (d[i : i + m, None] ** 2)
                    keep_group = _topn_mask(score[None], n)[0]
                keep = keep_group[i % m]
            else:
                keep = keep_block[i]
            e = np.where(keep, 0.0, w1[i]) / d[i]
            err[i] = e
            if np.any(e):
                w1[i:] -= np.outer(u1[i, i:], e)
            w1[i][~keep] = 0.0  # exact zeros (the update leaves ~1e-17)
        if i2 < k:
            w[i2:] -= u[i1:i2, i2:].T @ err
    return w


def nm_prune(
    b: np.ndarray,
    n: int = 2,
    m: int = 4,
    gram: np.ndarray | None = None,
    *,
    order=None,
    damping: float = DEFAULT_DAMPING,
    block: int = 128,
    method: str = "obs",
) -> SparseFit:
    """N:M pruning of ``b [K, N]`` along the reduction axis ``K`` (module docstring).

    Args:
        b: the weight ``[K, N]``, used as ``X @ B``.
        n: weights kept in each group.
        m: group size (consecutive rows of ``B``, along ``order``).
        gram: ``G = X^T X [K, K]`` of the layer's inputs, or the vector ``[K]`` of a diagonal
            one (a diagonal matrix is detected too; then OBS reduces to keeping the largest
            ``G_ii w^2``, exactly, in ``O(K N)``). None: ``H = I``, so ``obs`` equals
            ``magnitude``.
        order: a permutation of ``range(K)`` whose consecutive runs of ``m`` form the groups
            (None: natural order).
        damping: ``lambda`` in ``G + lambda tr(G)/K I`` for the OBS steps.
        block: rows per lazy-update block (rounded down to a multiple of ``m``, at least ``m``).
        method: ``"obs"`` (second-order selection and refit) or ``"magnitude"`` (baseline).

    Returns:
        ``SparseFit(kind="nm", pattern=f"nm:{n}:{m}", s=pruned weight)``; ``info`` holds
        ``nonzeros``, ``damping``, ``block``, ``n``, ``m``.

    Raises:
        ValueError: bad ``n``/``m``/``method``, ``K`` not divisible by ``m``, bad ``order`` or
            ``gram``, a Gram that is not positive definite with ``damping=0``.
    """
    _check_nm(n, m)
    if method not in NM_METHODS:
        raise ValueError(f"unknown N:M method {method!r}; choose one of {', '.join(NM_METHODS)}")
    b64, dtype = _check_weight(b)
    k = b64.shape[0]
    perm = group_order(k, m, order)
    g = _check_gram(gram, k)
    block = max(m, (int(block) // m) * m)
    if method == "magnitude":
        pruned = np.where(nm_magnitude_mask(b64, n, m, perm), b64, 0.0)
    else:
        if g is not None and g.ndim == 1:
            # diagonal H: U = diag(H)^-1/2, no OBS update; the score w^2 H_ii is exact
            h = _damped(g, damping)
            pruned = np.where(nm_magnitude_mask(b64 * np.sqrt(h)[:, None], n, m, perm), b64, 0.0)
        else:
            if g is None:
                u = np.eye(k)
            else:
                h = _damped(g, damping)
                u = _inverse_cholesky_upper(h[np.ix_(perm, perm)])
            pruned = np.empty_like(b64)
            pruned[perm] = _obs_sweep(b64[perm], u, block, nm=(n, m))
    s = pruned.astype(dtype)
    s64 = s.astype(np.float64)
    return SparseFit(
        kind="nm",
        method=method,
        rel_error=rel_norm(b64 - s64, b64),
        objective_error=objective(b64, s64, g),
        s=s,
        pattern=f"nm:{n}:{m}",
        info={
            "nonzeros": int(np.count_nonzero(s)),
            "damping": float(damping) if g is not None else 0.0,
            "block": block,
            "n": int(n),
            "m": int(m),
            "gram": g is not None,
        },
    )


# ----------------------------------------------------------------------------- low rank + sparse


def _sparse_support(r: np.ndarray, pattern: str, nonzeros: int, n: int, m: int, perm) -> np.ndarray:
    """Keep-mask of the projection of ``r [K, N]`` on ``pattern`` (largest magnitudes)."""
    k, cols = r.shape
    if pattern == "nm":
        return nm_magnitude_mask(r, n, m, perm)
    mask = np.zeros(r.shape, bool)
    if pattern == "rows":
        rows = min(nonzeros // cols, k)
        if rows > 0:
            norms = np.sum(r * r, axis=1)
            keep = np.argsort(-norms, kind="stable")[:rows]
            mask[keep] = True
        return mask
    count = min(nonzeros, r.size)
    if count > 0:
        flat = np.abs(r).ravel()
        if count < flat.size:  # argpartition: deterministic for a given input, O(K N)
            mask.ravel()[np.argpartition(-flat, count - 1)[:count]] = True
        else:
            mask[:] = True
    return mask


def _values_in_metric(resid: np.ndarray, mask: np.ndarray, h: np.ndarray, pattern: str) -> np.ndarray:
    """Least-squares values of ``S`` on a fixed support in the metric ``h``:
    ``min ||R^T (resid - S)||_F`` over ``S`` with ``S = 0`` off ``mask`` (module docstring)."""
    s = np.zeros_like(resid)
    hr = h @ resid
    if pattern == "rows":
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size:
            s[rows] = sla.solve(h[np.ix_(rows, rows)], hr[rows], assume_a="pos")
        return s
    for j in range(resid.shape[1]):
        rows = np.flatnonzero(mask[:, j])
        if rows.size:
            s[rows, j] = sla.solve(h[np.ix_(rows, rows)], hr[rows, j], assume_a="pos")
    return s


def _lowrank_tracked(m: np.ndarray, rank: int, basis: np.ndarray | None, seed: int):
    """Rank-``rank`` SVD of ``m`` for the OATS loop, tracking its right subspace.

    The first call runs ``svd.truncated_svd`` for ``l = rank + OATS_OVERSAMPLE`` triplets (capped
    at ``min(K, N)``). Later calls, where ``m`` has moved little since the last one, take one block
    power step from the previous ``l`` right vectors ``basis``: ``Q = qr(m basis^T)``, then the
    exact SVD of the small ``Q^T m`` (Rayleigh-Ritz). That is a projection of ``m`` on an
    ``l``-dimensional subspace, so its error is never below the exact truncation's; at
    ``l = min(K, N)`` it is exact. Returns ``(U_r, s_r, Vt_r, basis)``.
    """
    k, n = m.shape
    ell = min(rank + OATS_OVERSAMPLE, k, n)
    if basis is None:
        u, s, vt = truncated_svd(m, ell, seed=seed)
    else:
        q, _ = np.linalg.qr(m @ basis.T)
        uz, s, vt = np.linalg.svd(q.T @ m, full_matrices=False)
        u = q @ uz
    return u[:, :rank], s[:rank], vt[:rank], vt


def lowrank_sparse(
    b: np.ndarray,
    rank: int,
    nonzeros: int = 0,
    gram: np.ndarray | None = None,
    *,
    pattern: str = "unstructured",
    n: int = 2,
    m: int = 4,
    order=None,
    iters: int = 20,
    refit_iters: int = DEFAULT_REFIT_ITERS,
    damping: float = DEFAULT_DAMPING,
    block: int = 128,
    seed: int = 0,
) -> SparseFit:
    """``B ~= A C + S``: OATS-scaled alternation, then (with a Gram) a refit in the input metric;
    the candidate with the lowest undamped objective is kept (module docstring).

    Args:
        b: the weight ``[K, N]``, used as ``X @ B``.
        rank: rank of ``A C`` (1 .. min(K, N)).
        nonzeros: the budget of ``S``: entries for ``"unstructured"``; ``rows * N`` for
            ``"rows"`` (``nonzeros // N`` whole rows); ignored for ``"nm"``.
        gram: ``G = X^T X [K, K]``, or the vector ``[K]`` of a diagonal one (a diagonal
            matrix is detected too: OATS with ``D^2 = H`` is then exact for the metric and no
            refit runs; nothing ``[K, K]`` is formed, so lookups of 30k rows are cheap). None:
            plain Frobenius objective, ``D = I``, no refit.
        pattern: ``"unstructured"``, ``"rows"`` or ``"nm"``.
        n: kept per group for ``"nm"``.
        m: group size for ``"nm"``.
        order: group order for ``"nm"`` (see ``nm_prune``).
        iters: maximum OATS iterations (stops early when the scaled error stalls).
        refit_iters: rounds of (low-rank step, sparse step) per refit chain (0: OATS only).
        damping: ``lambda`` in ``G + lambda tr(G)/K I`` (the scale ``D`` and the refit use it).
        block: rows per block of the refit's OBS sweeps (as ``nm_prune``).
        seed: seed of the randomized truncated SVD (``svd.truncated_svd``, solver ``auto``).

    Returns:
        ``SparseFit(kind="lowrank+sparse")`` with ``a [K, rank]``, ``c [rank, N]`` (orthonormal
        rows), ``s [K, N]`` exactly zero off ``pattern`` (``"nm:n:m"`` for N:M). ``info``:
        ``nonzeros`` (of ``s``), ``s_rows`` (``"rows"``), ``oats_iterations``,
        ``oats_objective``, ``source`` (``"oats"``, ``"refit-oats"`` or ``"refit-lowrank"``),
        ``objective_history`` (the objective of every candidate, in order), ``damping``.

    Raises:
        ValueError: bad rank, budget, pattern, ``n``/``m``/``order``, ``gram`` or ``damping``.
    """
    b64, dtype = _check_weight(b)
    k, cols = b64.shape
    if pattern not in PATTERNS:
        raise ValueError(f"unknown sparse pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    if not 1 <= int(rank) <= min(k, cols):
        raise ValueError(f"rank must be in 1..{min(k, cols)} for a {k}x{cols} weight, got {rank}")
    rank = int(rank)
    if pattern == "nm":
        _check_nm(n, m)
        perm = group_order(k, m, order)
    else:
        perm = None
        if nonzeros < 0:
            raise ValueError(f"nonzeros must be >= 0, got {nonzeros}")
    if iters < 1 or refit_iters < 0:
        raise ValueError(f"iters must be >= 1 and refit_iters >= 0, got {iters} and {refit_iters}")
    g = _check_gram(gram, k)
    h = _damped(g, damping) if g is not None else None
    block = max(m, (int(block) // m) * m) if pattern == "nm" else max(1, int(block))
    if h is None:
        d = np.ones(k)
    else:
        d = np.sqrt(h if h.ndim == 1 else np.diagonal(h))
    nonzeros = int(nonzeros)

    # OATS on B_s = D B
    bs = d[:, None] * b64
    s_scaled = np.zeros_like(bs)
    prev = np.inf
    history_scaled = []
    basis = None
    best_oats = None
    for it in range(1, iters + 1):
        u, sv, vt, basis = _lowrank_tracked(bs - s_scaled, rank, basis, seed)
        low = (u * sv) @ vt
        resid = bs - low
        s_scaled = np.where(_sparse_support(resid, pattern, nonzeros, n, m, perm), resid, 0.0)
        err = float(np.linalg.norm(resid - s_scaled))
        history_scaled.append(err)
        if best_oats is None or err < best_oats[0]:
            best_oats = (err, u * sv, vt, s_scaled)
        if np.isfinite(prev) and err >= prev * (1 - OATS_TOL):
            break
        prev = err
    oats_iters = it
    _, usv, vt, s_scaled = best_oats

    # every candidate is scored at once on the cast arrays; only the best is kept
    best = None
    history = []

    def consider(name, a, c, s):
        nonlocal best
        a_t, c_t, s_t = a.astype(dtype), c.astype(dtype), s.astype(dtype)
        approx = a_t.astype(np.float64) @ c_t.astype(np.float64) + s_t.astype(np.float64)
        obj = objective(b64, approx, g)
        history.append(obj)
        if best is None or obj < best[0]:
            best = (obj, name, a_t, c_t, s_t, approx)

    s_oats = s_scaled / d[:, None]
    consider("oats", usv / d[:, None], vt, s_oats)

    # a diagonal metric is D^2 itself: OATS is then the exact alternation and needs no refit
    refit = h is not None and h.ndim == 2 and refit_iters > 0
    if refit:
        root_t, root_t_solve, _ = sqrt_factor(h)
        policy = RankPolicy(rank=rank)

        def lowrank_step(target):
            a, c, _, _ = lowrank_in_metric(target, root_t, root_t_solve, policy, solver="auto", seed=seed)
            return a, c

        rows_order = perm if perm is not None else np.arange(k)
        u_inv = _inverse_cholesky_upper(h[np.ix_(rows_order, rows_order)])
        hinv_diag = np.empty(k)
        hinv_diag[rows_order] = np.sum(u_inv**2, axis=0)  # diag(H^-1), H^-1 = U^T U

        def sparse_step(resid):
            """The support chosen in the metric, then the values (module docstring)."""
            if pattern == "nm":
                out = np.empty_like(resid)
                out[rows_order] = _obs_sweep(resid[rows_order], u_inv, block, nm=(n, m))
                return out
            if pattern == "rows":
                mask = _sparse_support(resid / np.sqrt(hinv_diag)[:, None], pattern, nonzeros, n, m, perm)
            else:
                mask = _obs_sweep(resid, u_inv, block, count=min(nonzeros, resid.size)) != 0
            return _values_in_metric(resid, mask, h, pattern)

        # chain 1 from the OATS result, chain 2 from the pure whitened low rank (S = 0)
        a0, c0 = lowrank_step(b64)
        for name, s_cur in (("refit-oats", s_oats), ("refit-lowrank", None)):
            for _ in range(refit_iters):
                if s_cur is None:
                    a, c = a0, c0
                else:
                    a, c = lowrank_step(b64 - s_cur)
                s_cur = sparse_step(b64 - a @ c)
                consider(name, a, c, s_cur)

    obj, name, a_t, c_t, s_t, approx = best
    info = {
        "rank": rank,
        "nonzeros": int(np.count_nonzero(s_t)),
        "oats_iterations": oats_iters,
        "oats_objective": history[0],
        "oats_scaled_errors": history_scaled,
        "objective_history": history,
        "source": name,
        "refit_iters": refit_iters if refit else 0,
        "metric": "none" if g is None else ("diagonal" if g.ndim == 1 else "gram"),
        "damping": float(damping) if g is not None else 0.0,
    }
    if pattern == "rows":
        info["s_rows"] = int(np.count_nonzero(np.any(s_t != 0, axis=1)))
    return SparseFit(
        kind="lowrank+sparse",
        method="oats" if g is None else "oats+refit",
        rel_error=rel_norm(b64 - approx, b64),
        objective_error=obj,
        a=a_t,
        c=c_t,
        s=s_t,
        pattern=f"nm:{n}:{m}" if pattern == "nm" else pattern,
        info=info,
    )

