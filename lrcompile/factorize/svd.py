"""Truncated SVD of a weight: exact (LAPACK) and randomized (Halko-Martinsson-Tropp), rank policies.

Math. For ``B [K, N] = U S V^T`` (``s_1 >= s_2 >= ...``) the best rank-r approximation in the
Frobenius norm is ``U_r S_r V_r^T`` (Eckart-Young) with

    ||B - U_r S_r V_r^T||_F^2 = sum_{i>r} s_i^2 = ||B||_F^2 - sum_{i<=r} s_i^2 .

The factors are split in a balanced way, ``A = U_r S_r^(1/2)``, ``C = S_r^(1/2) V_r^T``, so both
have the same scale (kinder to fp16/int8 than ``A = U_r S_r``).

Randomized SVD (Halko, Martinsson, Tropp 2011, "Finding structure with randomness"). With a
Gaussian test matrix ``Omega [N, l]``, ``l = r + p`` (``p``: oversampling), the range of
``Y = (B B^T)^q B Omega`` approaches the leading left singular subspace as the power iterations
``q`` grow. Between iterations the basis is re-normalised by an LU factorization ``Y = P L U``
(the basis ``P L`` spans the same subspace, is well conditioned and costs a fraction of a QR).

Each iteration applies the *shifted* operator ``B B^T - alpha I`` (the acceleration of dashSVD,
Feng et al. 2024). For the tail eigenvalues ``s_j^2``, ``j > l``, the convergence factor
``s_{l+1}^2 / s_r^2`` becomes ``max(s_{l+1}^2 - alpha, alpha) / (s_r^2 - alpha)``, smallest at
``alpha = s_{l+1}^2 / 2``. We take ``alpha = theta_l / 2`` with ``theta_l`` the smallest Ritz value
of ``B B^T`` on the current subspace; Ritz values never exceed the true eigenvalues
(Courant-Fischer), so ``alpha <= s_l^2 / 2 <= s_r^2 / 2`` and the iteration always contracts.
The shift pays off on flat spectra (trained transformer weights, Gaussian matrices): the hard
case of randomized SVD, where the tail holds most of the energy.

Rayleigh-Ritz at the end: with the final basis ``L [K, l]``, ``Z = B^T L`` and the Cholesky factor
``L^T L = R^T R``, ``Q = L R^-1`` is orthonormal and ``Q^T B = R^-T Z^T``; the eigenpairs
``(t_i^2, w_i)`` of its ``l x l`` Gram ``H = R^-T Z^T Z R^-1`` (float64) give

    U = L R^-1 W,   s = t,   V^T = diag(1/t) W^T R^-T Z^T ,

with no QR of a tall matrix and no SVD of ``Q^T B``. (When ``t_r < 1e-3 t_1`` in float32,
``1e-6`` in float64, the Gram loses too much accuracy and a QR + SVD of ``Q^T B`` is used.)

Error. The randomized result is the orthogonal projection ``P B``, ``P = Q W_r W_r^T Q^T``, so its
error is ``||B||_F^2 - sum_{i<=r} t_i^2`` with computed values ``t_i <= s_i``: a rank chosen from
them for an ``energy``/``max_error`` policy keeps its promise for the randomized factors.
``factorize_svd`` nevertheless computes the randomized error from the factors (one GEMM).

Precision. The exact solver always runs in float64 (it is the reference). The randomized solver
runs its GEMMs in float32 for float16/float32 inputs (its error is dominated by the projection,
not by float32 rounding; float64 Grams in the final step; a matrix whose numerical rank fits in
the sketch ends in a float64 QR and SVD, so that its factors are exact) and in float64 otherwise.
Both return float64 arrays. Signs are fixed (the largest-magnitude entry of each column of ``U``
is positive), so results are byte-identical run to run.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import scipy.linalg as sla

from .types import Factorization, LayerStats, RankPolicy, round_rank

log = logging.getLogger(__name__)

SOLVERS = ("auto", "exact", "randomized")

#: power iterations of the randomized solver (shifted; see the module docstring).
DEFAULT_POWER_ITERS = 3

#: ``auto`` picks the randomized solver when ``K * N * min(K, N)`` (the exact SVD's work) is at
#: least this ...
AUTO_MIN_WORK = 512**3
#: ... and the sketch ``rank + oversample`` is at most this fraction of ``min(K, N)``.
AUTO_MAX_SKETCH_FRACTION = 0.5
# Why (float32, one core of the 2-core AMD EPYC dev box, OpenBLAS 0.3.31; exact = gesdd float64):
#   shape         exact    randomized speed-up at sketch = 0.125 / 0.25 / 0.4 / 0.5 of min(K, N)
#   256^2         0.017 s  7.9 / 4.7 / 1.6 / 1.6
#   512^2         0.12 s   17 / 6.5 / 2.9 / 2.0      (float64 input: 7.2 / 3.1 / 1.8 / 1.3)
#   1024^2        0.75 s   12 / 5.6 / 2.7 / 1.9      (float64 input: 6.4 / 3.1 / 1.7 / 1.2)
#   2048^2        6.3 s    17 / 7.3 / 3.6 / 2.5      (float64 input: 8.0 / 3.6 / 2.1 / 1.5)
#   3072 x 768    0.76 s   7.6 / 3.8 / 2.3 / 1.7
#   16384 x 256   0.48 s   4.4 / 2.7 / 1.7 / 1.4
#   30522 x 384   1.7 s    4.9 / 2.9 / 1.9 / 1.5
# Randomized wins up to half of min(K, N) for every shape (by more with 2 threads: its GEMMs
# scale better than gesdd), 0.6 is a toss-up for float64; below 512^3 the exact SVD takes
# <= 0.1 s, too little to trade its exactness for (randomized errors are up to ~0.6% larger).

_ROW_BLOCK_ELEMS = 1 << 22  # rows per block in norm/residual loops: about 4M elements


def default_oversample(rank: int) -> int:
    """The oversampling ``p`` used when none is given: ``max(16, rank // 8)``."""
    return max(16, rank // 8)


# ----------------------------------------------------------------------------- solvers


def truncated_svd(
    m: np.ndarray,
    rank: int,
    *,
    solver: str = "auto",
    seed: int = 0,
    oversample: int | None = None,
    power_iters: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading ``rank`` singular triplets of ``m [K, N]``.

    Args:
        m: a real 2-D matrix (any float or integer dtype).
        rank: number of triplets; capped at ``min(K, N)``.
        solver: ``"exact"`` (LAPACK gesdd in float64, gesvd if it fails to converge),
            ``"randomized"`` (shifted power iterations, see the module docstring) or
            ``"auto"`` (randomized when ``K N min(K, N) >= AUTO_MIN_WORK`` (512^3) and
            ``rank + oversample <= AUTO_MAX_SKETCH_FRACTION * min(K, N)`` (0.5), else exact;
            measurements in the source).
        seed: seed of the randomized solver's test matrix (``np.random.default_rng(seed)``).
        oversample: randomized oversampling ``p`` (None: ``default_oversample(rank)``).
        power_iters: randomized power iterations ``q`` (None: ``DEFAULT_POWER_ITERS``).

    Returns:
        ``(U [K, rank], s [rank], Vt [rank, N])`` in float64, ``s`` descending, the
        largest-magnitude entry of each column of ``U`` positive.

    Raises:
        ValueError: bad shape, rank, solver or non-finite entries.
    """
    u, s, vt, _ = _truncated_svd(m, rank, solver, seed, oversample, power_iters)
    return u, s[: u.shape[1]], vt


def singular_values(
    m: np.ndarray, *, solver: str = "auto", rank: int | None = None, seed: int = 0
) -> np.ndarray:
    """Singular values of ``m``, descending, float64.

    Args:
        m: a real 2-D matrix.
        solver: as in ``truncated_svd``; used only when ``rank`` is given.
        rank: None: all ``min(K, N)`` values, computed exactly (LAPACK, no vectors). Else the
            leading ``rank`` values from ``truncated_svd(m, rank, solver=solver)``; randomized
            values are lower bounds of the true ones.
        seed: seed of the randomized solver.
    """
    m = _check_matrix(m)
    if rank is not None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        rank = min(int(rank), *m.shape)
        if _pick_solver(solver, m.shape, rank + default_oversample(rank)) == "randomized":
            return _truncated_svd(m, rank, "randomized", seed, None, None)[1]
    a = _as_float(m, np.float64)
    try:
        s = sla.svdvals(a, check_finite=False)
    except np.linalg.LinAlgError:
        s = sla.svd(a, compute_uv=False, lapack_driver="gesvd", check_finite=False)
    return s if rank is None else s[:rank]


def _truncated_svd(m, rank, solver, seed, oversample, power_iters):
    """``truncated_svd``, but ``s`` holds every computed value (all of them for the exact
    solver), plus an info dict (solver used, parameters, seconds)."""
    m = _check_matrix(m)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    rank = min(int(rank), *m.shape)
    p = default_oversample(rank) if oversample is None else int(oversample)
    q = DEFAULT_POWER_ITERS if power_iters is None else int(power_iters)
    if p < 0 or q < 0:
        raise ValueError(f"oversample and power_iters must be >= 0, got {p} and {q}")
    chosen = _pick_solver(solver, m.shape, rank + p)
    t0 = time.perf_counter()
    if chosen == "exact":
        u, s, vt, info = _exact(m)
        u, vt = u[:, :rank], vt[:rank]
    else:
        u, s, vt, info = _randomized(m, rank, p, q, seed)
    u, vt = _fix_signs(u, vt)
    info["seconds"] = time.perf_counter() - t0
    return u, s, vt, info


def _pick_solver(solver: str, shape: tuple[int, int], sketch: int) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"unknown SVD solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if solver != "auto":
        return solver
    small = min(shape)
    if shape[0] * shape[1] * small >= AUTO_MIN_WORK and sketch <= AUTO_MAX_SKETCH_FRACTION * small:
        return "randomized"
    return "exact"


def _exact(m: np.ndarray):
    """Full thin SVD in float64: gesdd, gesvd when gesdd does not converge."""
    a = _as_float(m, np.float64)
    driver = "gesdd"
    try:
        u, s, vt = sla.svd(a, full_matrices=False, lapack_driver=driver, check_finite=False)
    except np.linalg.LinAlgError:
        driver = "gesvd"
        log.debug("gesdd did not converge on a %s matrix; retrying with gesvd", a.shape)
        u, s, vt = sla.svd(a, full_matrices=False, lapack_driver=driver, check_finite=False)
    return u, s, vt, {"solver": "exact", "lapack_driver": driver}


def _randomized(m: np.ndarray, rank: int, p: int, q: int, seed: int):
    """Randomized SVD with ``q`` shifted power iterations; see the module docstring."""
    dtype = np.float32 if m.dtype in (np.float16, np.float32) else np.float64
    a = _as_float(m, dtype)
    # (B B^T)^q overflows/underflows float32 for |entries| far from 1: scale by an exact 2^e
    top = max(float(a.max()), -float(a.min()))
    exp = 0 if top == 0 or 2.0**-40 < top < 2.0**40 else -math.frexp(top)[1]
    if exp:
        a = np.ldexp(a, exp).astype(dtype, copy=False)
    k, n = a.shape
    ell = min(rank + p, k, n)
    rng = np.random.default_rng(seed)
    y = a @ rng.standard_normal((n, ell), dtype=dtype)
    alpha = 0.0
    for i in range(q):
        basis = _lu_basis(y)
        z = a.T @ basis
        # the shift is updated in all but the last iteration (measured: updating it there too
        # gains < 0.05% of error at 4096^2, rank 1024, for one more eigenvalue problem)
        theta = _rayleigh_ritz(basis, z, vectors=False) if i < max(q - 1, 1) else None
        if theta is not None and theta[0] >= 1e-3 * theta[-1]:  # else within float32 noise
            alpha = max(alpha, 0.5 * float(theta[0]))
        y = a @ z
        if alpha > 0:
            y -= dtype(alpha) * basis
    basis = _lu_basis(y)
    z = a.T @ basis
    info = {"solver": "randomized", "oversample": p, "power_iters": q, "sketch": ell, "seed": seed,
            "shift": alpha, "dtype": np.dtype(dtype).name}
    rr = _rayleigh_ritz(basis, z, vectors=True)
    tol = 1e-3 if dtype == np.float32 else 1e-6
    if rr is not None and rr[1][rank - 1] > tol * rr[1][0]:
        x, s = rr[0][:, :rank], rr[1][:rank]
        u = basis @ x.astype(dtype)
        vt = (z @ x.astype(dtype)).T / s[:, None].astype(dtype)
    else:  # (numerically) rank-deficient within the sketch: orthonormal basis + direct SVD,
        # in float64: the sketch holds the whole range here, so the factors can be exact (a
        # float32 Q^T B would put its rounding into every row of the leading vectors)
        info["final"] = "qr+gesdd"
        qmat = sla.qr(basis.astype(np.float64), mode="economic", check_finite=False)[0]
        w, s, vt = _small_svd(_project_rows(qmat, a))
        u, s, vt = qmat @ w[:, :rank], s[:rank], vt[:rank]
    s = np.ldexp(np.asarray(s, np.float64), -exp)
    return u.astype(np.float64), s, vt.astype(np.float64), info


def _lu_basis(y: np.ndarray) -> np.ndarray:
    """A well-conditioned basis of ``range(y)``: the (row-permuted) unit lower trapezoidal L of
    ``y = P L U``."""
    return sla.lu(y, permute_l=True, overwrite_a=True, check_finite=False)[0]


def _rayleigh_ritz(basis: np.ndarray, z: np.ndarray, *, vectors: bool):
    """Ritz pairs of ``B B^T`` on ``span(basis)``, given ``z = B^T basis``.

    With ``basis^T basis = R^T R`` (Cholesky), ``Q = basis R^-1`` is orthonormal and
    ``Q^T B = R^-T z^T``, whose Gram ``H = R^-T (z^T z) R^-1`` has eigenpairs ``(t_i^2, w_i)``.

    Args:
        basis: ``[K, l]`` full column rank.
        z: ``B^T basis``, ``[N, l]``.
        vectors: False: return the eigenvalues of ``H`` ascending (Gram matrices in the working
            precision: enough for the shift). True: return ``(X, t)`` with ``X = R^-1 W``
            (``[l, l]``, so that ``U = basis X`` and ``V^T = diag(1/t) X^T z^T``) and ``t``
            descending, from float64 Grams.

    Returns:
        As above, or None when the Cholesky factorization or the eigensolver fails.
    """
    if vectors:
        basis, z = basis.astype(np.float64), z.astype(np.float64)
    try:
        r = sla.cholesky((basis.T @ basis).astype(np.float64), check_finite=False)
        h = sla.solve_triangular(r, (z.T @ z).astype(np.float64), trans="T", check_finite=False)
        h = sla.solve_triangular(r, h.T, trans="T", check_finite=False)
        if not vectors:
            return sla.eigvalsh(h, check_finite=False)
        lam, w = sla.eigh(h, check_finite=False, driver="evd")
    except (np.linalg.LinAlgError, ValueError):
        return None
    lam, w = lam[::-1], w[:, ::-1]
    return sla.solve_triangular(r, w, check_finite=False), np.sqrt(np.maximum(lam, 0.0))


def _small_svd(b: np.ndarray):
    try:
        return sla.svd(b, full_matrices=False, lapack_driver="gesdd", check_finite=False)
    except np.linalg.LinAlgError:
        return sla.svd(b, full_matrices=False, lapack_driver="gesvd", check_finite=False)


def _fix_signs(u: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip pairs ``(u_i, v_i)`` so that the largest-magnitude entry of each ``u_i`` is positive."""
    if u.shape[1] == 0:
        return u, vt
    idx = np.argmax(np.abs(u), axis=0)
    sign = np.where(u[idx, np.arange(u.shape[1])] < 0, -1.0, 1.0)
    return u * sign, vt * sign[:, None]


def _check_matrix(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m)
    if m.ndim != 2 or 0 in m.shape:
        raise ValueError(f"expected a non-empty 2-D matrix, got shape {m.shape}")
    if np.iscomplexobj(m) or not (np.issubdtype(m.dtype, np.floating) or np.issubdtype(m.dtype, np.integer)):
        raise ValueError(f"expected a real matrix, got dtype {m.dtype}")
    if np.issubdtype(m.dtype, np.floating) and not np.isfinite(m).all():
        raise ValueError("matrix has NaN or infinite entries")
    return m


def _as_float(m: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(m, dtype=dtype)


# ----------------------------------------------------------------------------- norms


def _row_blocks(rows: int, cols: int):
    step = max(1, _ROW_BLOCK_ELEMS // max(cols, 1))
    for i in range(0, rows, step):
        yield slice(i, min(i + step, rows))


def _project_rows(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``q^T x`` in float64 for a float64 ``q [K, l]``, over row blocks of ``x [K, N]`` (no full
    float64 copy of ``x``)."""
    out = np.zeros((q.shape[1], x.shape[1]), np.float64)
    for rows in _row_blocks(*x.shape):
        out += q[rows].T @ np.asarray(x[rows], np.float64)
    return out


def _sq_norm(x: np.ndarray) -> float:
    """``||x||_F^2`` accumulated in float64 (row blocks, no full float64 copy)."""
    total = 0.0
    for rows in _row_blocks(*x.shape):
        blk = np.asarray(x[rows], np.float64).ravel()
        total += float(blk @ blk)
    return total


def _residual_sq_norm(b: np.ndarray, a: np.ndarray, c: np.ndarray) -> float:
    """``||b - a c||_F^2`` in row blocks (no ``[K, N]`` temporary), summed in float64."""
    total = 0.0
    for rows in _row_blocks(*b.shape):
        r = b[rows] - a[rows] @ c
        r = np.asarray(r, np.float64).ravel()
        total += float(r @ r)
    return total


# ----------------------------------------------------------------------------- rank policy


def _tail_energies(s: np.ndarray, total_energy: float) -> np.ndarray:
    """``tail[r]`` = energy outside the leading ``r`` known values, for ``r = 0..len(s)``.

    The energy of the unknown values, ``total - sum(s^2)``, is added to every entry, so with a
    partial spectrum (or lower-bound values) the tails are upper bounds.
    """
    e = np.asarray(s, np.float64) ** 2
    suffix = np.concatenate([np.cumsum(e[::-1])[::-1], [0.0]])
    unknown = max(float(total_energy) - float(suffix[0]), 0.0)
    return suffix + unknown


def _criterion_rank(policy: RankPolicy, s: np.ndarray, total_energy: float) -> int | None:
    """Smallest ``r <= len(s)`` meeting ``energy``/``max_error`` (before rounding); None if none."""
    if total_energy <= 0:
        return 1
    allowed = (1.0 - policy.energy) if policy.energy is not None else policy.max_error**2
    tail = _tail_energies(s, total_energy)
    ok = np.nonzero(tail[1:] <= (allowed + 1e-12) * total_energy)[0]
    return int(ok[0]) + 1 if ok.size else None


def choose_rank(policy: RankPolicy, s: np.ndarray, total_energy: float, k: int, n: int) -> int:
    """Apply a rank policy to a weight ``[k, n]``.

    ``ratio`` gives ``floor(ratio * k n / (k + n))`` rounded down to ``policy.multiple``;
    ``energy`` the smallest ``r`` with ``sum(s[:r]^2) >= energy * total_energy`` and
    ``max_error`` the smallest ``r`` with ``sqrt(tail_r / total_energy) <= max_error``, both
    rounded up to ``policy.multiple``; ``rank`` is used as given. The result always lies in
    ``[1, min(k, n)]``. Energies below ``1e-12 * total_energy`` (float64 rounding) are ignored.

    Partial spectra: ``s`` may hold only the leading values (e.g. from a randomized SVD, whose
    values are lower bounds); the unknown tail energy is ``total_energy - sum(s^2)``. When the
    criterion is not met within the known values the result is ``len(s) + 1`` (capped), the
    smallest rank not yet proven sufficient: callers that need ``energy``/``max_error`` with a
    partial spectrum must check ``r > len(s)`` and compute more values (``factorize_svd`` does).

    Args:
        policy: the rank policy.
        s: known singular values, descending (unused for ``rank``/``ratio``).
        total_energy: ``||M||_F^2`` of the full matrix.
        k: rows of the weight.
        n: columns of the weight.

    Returns:
        The rank.
    """
    cap = min(k, n)
    if policy.rank is not None:
        return max(1, min(policy.rank, cap))
    if policy.ratio is not None:
        return round_rank(policy.ratio * k * n / (k + n), policy.multiple, up=False, cap=cap)
    s = np.asarray(s, np.float64)
    if len(s) >= cap:  # a complete spectrum holds all the energy: the total differs by rounding only
        total_energy = float(np.sum(s**2))
    r = _criterion_rank(policy, s, total_energy)
    if r is None:
        if len(s) >= cap:  # complete spectrum: only rounding kept it from being met
            return cap
        return min(len(s) + 1, cap)
    return round_rank(r, policy.multiple, up=True, cap=cap)


# ----------------------------------------------------------------------------- factorization


def factor_from_svd(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray, r: int, dtype, balanced: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Factors ``(A [K, r], C [r, N])`` of the rank-r truncation ``U_r S_r V_r^T``.

    Args:
        u: left singular vectors ``[K, >=r]``.
        s: singular values ``[>=r]``.
        vt: right singular vectors ``[>=r, N]``.
        r: the rank.
        dtype: dtype of the returned factors.
        balanced: ``A = U_r S_r^(1/2), C = S_r^(1/2) V_r^T``; else ``A = U_r S_r, C = V_r^T``.
    """
    s = np.asarray(s[:r], np.float64)
    left, right = (np.sqrt(s), np.sqrt(s)) if balanced else (s, np.ones_like(s))
    a = np.ascontiguousarray(u[:, :r] * left, dtype=dtype)
    c = np.ascontiguousarray(right[:, None] * vt[:r], dtype=dtype)
    return a, c


def factorize_svd(
    b: np.ndarray,
    policy: RankPolicy,
    stats: LayerStats | None = None,
    *,
    solver: str = "auto",
    seed: int = 0,
    **options,
) -> Factorization:
    """Plain truncated SVD of a weight ``b [K, N]`` (data-free; ``stats`` is ignored).

    Rank: ``rank``/``ratio`` fix it up front. ``energy``/``max_error`` read the spectrum: the
    exact solver computes all of it; the randomized one (``"auto"`` on large matrices) sketches
    ``min(K, N) / 8`` values (rounded up to ``policy.multiple``) and doubles the sketch until the
    criterion is proven from the computed values and ``||B||_F^2``, switching to the exact solver
    once ``auto`` would (deterministic for a given seed).

    Args:
        b: the weight ``[K, N]``, used as ``X @ B``.
        policy: the rank policy.
        stats: unused (plain SVD needs no calibration data).
        solver: ``"auto"``, ``"exact"`` or ``"randomized"`` (see ``truncated_svd``).
        seed: seed of the randomized solver.
        **options: ``oversample`` and ``power_iters`` (randomized solver, see
            ``truncated_svd``), ``balanced`` (default True: split ``S`` evenly, see
            ``factor_from_svd``).

    Returns:
        A ``Factorization``: factors in ``b``'s dtype (float64 for integer weights), ``rel_error``
        = ``objective_error`` = ``||B - A C||_F / ||B||_F`` (from the spectrum for the exact
        solver; computed from the factors for the randomized one), ``singular_values`` the
        computed spectrum (all values when exact, the sketch's leading ones when randomized).

    Raises:
        ValueError: bad matrix or solver.
        TypeError: unknown option.
    """
    unknown = sorted(set(options) - {"oversample", "power_iters", "balanced"})
    if unknown:
        raise TypeError(f"factorize_svd got unknown option(s) {unknown}; known: oversample, power_iters, balanced")
    oversample = options.get("oversample")
    power_iters = options.get("power_iters")
    balanced = bool(options.get("balanced", True))
    b = _check_matrix(b)
    if solver not in SOLVERS:
        raise ValueError(f"unknown SVD solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    k, n = b.shape
    cap = min(k, n)
    out_dtype = b.dtype if np.issubdtype(b.dtype, np.floating) else np.dtype(np.float64)
    t0 = time.perf_counter()
    total = _sq_norm(b)

    def run(rank: int, how: str):
        return _truncated_svd(b, rank, how, seed, oversample, power_iters)

    def exact_all():
        u, s, vt, info = run(cap, "exact")
        return u, s, vt, info, choose_rank(policy, s, total, k, n)

    if policy.rank is not None or policy.ratio is not None:
        r = choose_rank(policy, np.empty(0), total, k, n)
        u, s, vt, info = run(r, solver)
    elif solver == "exact":
        u, s, vt, info, r = exact_all()
    else:
        sketch = round_rank(cap / 8, policy.multiple, up=True, cap=cap)
        while True:
            p = default_oversample(sketch) if oversample is None else oversample
            if _pick_solver(solver, (k, n), sketch + p) == "exact":
                u, s, vt, info, r = exact_all()
                break
            u, s, vt, info = run(sketch, "randomized")
            r = choose_rank(policy, s, total, k, n)
            info["rank_search_sketch"] = sketch
            if r <= len(s):  # always once sketch == cap: choose_rank never exceeds a full spectrum
                break
            log.debug("rank search: criterion not met within %d randomized values; doubling", sketch)
            sketch = min(2 * sketch, cap)

    a, c = factor_from_svd(u, s, vt, r, out_dtype, balanced=balanced)
    if info["solver"] == "exact":
        tail = float(np.sum(s[r:] ** 2))
        err2 = tail / float(np.sum(s**2)) if total > 0 else 0.0
    else:
        err2 = _residual_sq_norm(b, a, c) / total if total > 0 else 0.0
    rel = math.sqrt(max(err2, 0.0))
    info.update(requested_solver=solver, svd_seconds=info.pop("seconds"), seconds=time.perf_counter() - t0,
                balanced=balanced)
    return Factorization(
        a=a,
        c=c,
        rank=r,
        method="svd",
        rel_error=rel,
        objective_error=rel,
        singular_values=np.asarray(s, np.float64),
        info=info,
    )
