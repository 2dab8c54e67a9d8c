"""Dense x sparse factorizations of a weight: ``B ~= D C`` with a dense ``D [K, k]`` and a sparse
``C [k, N]`` (pure numpy/scipy; the result type is ``types.SparseFit``).

Two forms, both fitted in the (damped) activation metric of whitened SVD (see ``whiten``): with
``G = X^T X`` and ``G + lambda tr(G)/K I = L L^T`` (identity without a Gram),

    ||X (B - D C)||_F ~= ||L^T (B - D C)||_F = ||B' - D' C||_F,   B' = L^T B,  D' = L^T D,

so every fit runs on ``B'`` and maps back with ``D = L^-T D'`` (a triangular solve). ``L`` is
invertible, so ``D <-> D'`` is a bijection and minimising over ``D'`` is minimising over ``D``.
``objective_error`` is reported for the *undamped* Gram, ``||L0^T E|| / ||L0^T B||`` with
``G = L0 L0^T``, from ``tr(E^T G E)``.

``dense_nm`` (DSFormer-style, post-training): ``C`` is N:M sparse along ``k`` (the reduction axis
of the second GEMM, what TensorRT's 2:4 sparse kernels need). Alternating least squares:

* D-step: for fixed ``C``, ``min_D ||L^T (B - D C)||_F``. With ``D' = L^T D`` this is
  ``min_D' ||B' - D' C||_F``, solved by ``D' = B' C^+``, i.e. ``D = L^-T L^T B C^+ = B C^+``:
  the whitening cancels, the D-step is the same in every metric (for any invertible ``L``; when
  ``C C^T`` is singular ``C^+`` gives the minimum-norm minimiser, equally valid). We compute it
  as the least-squares solve ``C^T D'^T = B'^T``.
* C-step: for fixed ``D'``, the columns separate: ``min ||b'_j - D' c_j||`` over N:M ``c_j``.
  On a fixed support ``T`` it is least squares, ``c_T = (H_TT)^-1 r_T`` with ``H = D'^T D'``,
  ``r = D'^T b'_j`` (batched over columns). The support is re-chosen from the unrestricted
  solution ``c = H^-1 r`` (a tiny ridge when ``k > K``), keeping in every ``m`` consecutive
  coordinates the ``n`` with the largest contribution ``|c_i| ||d'_i||`` (plain ``|c_i|`` would
  depend on the arbitrary scale of each atom), then refitting on that support.
  ``rule="obs"`` ranks by the OBS saliency ``c_i^2 / [H^-1]_ii`` instead: the exact increase of
  the error when coordinate ``i`` alone is dropped and the others refitted, which accounts for
  correlated atoms (the two agree when ``D'`` has orthogonal columns). Measured on MiniLM
  (a 384x384 and a 384x1536 weight, with and without a Gram, 30 iterations) the two end within
  0.001 of each other with ``magnitude`` marginally ahead in all four cases, so it is the
  default: dropping 2 of 4 at once is not the single-removal problem OBS answers.
  A column keeps its previous coefficients when the new support does not lower its error, so
  the objective never increases (with a fixed support as well, where the refit is exact).
* Init: whitened truncated SVD ``B' = U S V^T``, ``D' = U_k S_k^(1/2)``; the components are
  interleaved over the N:M groups (component ``i`` goes to group ``i mod k/m``) so that each
  group mixes strong and weak components, instead of the top ``m`` competing in one group.
  Columns beyond the rank of ``B'`` start as random unit vectors. Atoms that no column uses
  are re-seeded with the worst-fitted residual columns (this leaves ``D C`` unchanged).

``dictionary``: ``C`` has at most ``s`` nonzeros per column (any rows), or N:M along ``k``.

* ``orthogonal=True`` (COMPOT): ``D'`` has orthonormal columns (``k <= K``). For such ``D'``,
  ``||B' - D' C||^2 = ||(I - D'D'^T) B'||^2 + ||D'^T B' - C||^2`` (Pythagoras), so the best
  sparse ``C`` keeps the ``s`` largest ``|entries|`` per column of ``D'^T B'`` (or their N:M
  projection): exact. For fixed ``C``, ``||B' - D'C||^2 = const - 2 tr(D'^T B' C^T)``, maximised
  over orthonormal ``D'`` by ``D' = U V^T`` from the thin SVD ``B' C^T = U S V^T`` (orthogonal
  Procrustes): exact. Both steps minimise, so the objective never increases.
* ``orthogonal=False`` (CoSpaDi; overcomplete allowed, ``k > K``): unit-norm atoms; ``C`` by
  batched orthogonal matching pursuit (all columns at once: residual correlations from the Gram
  ``H = D'^T D'`` and a sparse ``C``, the inverse of ``H_TT`` grown by Schur complements, a
  final batched least-squares refit on the chosen supports). Dictionary update: MOD
  (Engan et al.), ``D' = B' C^+`` (exact for fixed ``C``), then the atoms are normalised and
  ``C``'s rows rescaled so ``D' C`` is unchanged; unused atoms are re-seeded with the
  worst-fitted residual columns. MOD rather than K-SVD: one vectorised solve instead of a
  sequential loop over the atoms, and every step is then an exact minimiser or a guarded
  greedy step. A column keeps its previous (refitted) support when OMP's does not lower its
  error, so the objective never increases.

Both return the best iterate (the lowest damped objective seen).

Storage (for the planner's accounting; not computed here): ``dense-nm`` holds ``K k + k N n/m``
values plus 2 bits of metadata per kept value (TensorRT 2:4); ``dictionary`` holds ``K k + s N``
values plus one index per nonzero (int16 while ``k < 32768``).

Measured on all-MiniLM-L6-v2 (layer 2's FFN up-projection [384, 1536] and an attention
projection [384, 384]) at about 50% of the weight's storage in fp32 equivalents (2:4 metadata
as 1/16 value, an int16 index as 1/2 value), default iterations; relative Frobenius error
without a Gram / undamped objective error with a synthetic correlated Gram (4,096 rows, a few
loud channels):

    [384, 1536]                     stored  no Gram   Gram      [384, 384]           no Gram  Gram
    truncated (whitened) SVD r=153  0.498   0.507     0.179     r=96                 0.481    0.219
    dense-nm 2:4 k=244              0.496   0.357     0.129     k=124                0.409    0.186
    compot k=256 s=85               0.499   0.387     0.157     k=128 s=42           0.432    0.213
    cospadi k=384 s=64 (MOD)        0.500   0.335     0.143     k=128 s=42           0.414    0.196

Single-threaded time per call: dense-nm 19 s / 1.8 s, compot 3 s / 0.4 s, cospadi 41 s / 1.8 s
(a loaded 2-core machine with 2 BLAS threads was up to 50x slower: set OPENBLAS_NUM_THREADS=1).
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sps

from .sparse import nm_top_mask
from .types import SparseFit
from .whiten import DEFAULT_DAMPING, out_dtype, rel_norm, sqrt_factor

log = logging.getLogger(__name__)

Matrix = Callable[[np.ndarray], np.ndarray]

# Relative ridge (to the mean diagonal of H = D'^T D') of the restricted least-squares solves:
# keeps them defined when a support holds dependent atoms, far below any error we report.
_RIDGE = 1e-12
# Relative ridge of the unrestricted solve that only ranks coordinates (k may exceed K).
_RANK_RIDGE = 1e-8
# Stop when an iteration lowers the objective by less than this fraction.
_TOL = 1e-10
# Batched solves work on chunks of about this many float64 entries (32 MB).
_CHUNK = 1 << 22


def dense_nm(
    b: np.ndarray,
    inner: int,
    gram: np.ndarray | None = None,
    *,
    n: int = 2,
    m: int = 4,
    iters: int = 30,
    damping: float = DEFAULT_DAMPING,
    seed: int = 0,
    update_support: bool = True,
    rule: str = "magnitude",
) -> SparseFit:
    """Dense x N:M sparse factorization ``B ~= D S`` (DSFormer-style, post-training ALS).

    Minimises ``||L^T (B - D S)||_F`` (``G + lambda tr(G)/K I = L L^T``; plain Frobenius without
    a Gram) with ``S`` keeping ``n`` of every ``m`` consecutive entries along ``inner`` in each
    column. See the module docstring for the steps and why the D-step ignores ``L``.

    Args:
        b: the weight ``[K, N]``, used as ``X @ B``.
        inner: the inner dimension ``k`` (``D [K, k]``, ``S [k, N]``); a multiple of ``m``.
        gram: the input Gram ``X^T X [K, K]`` (None: unweighted).
        n: kept entries per group.
        m: group length along ``inner``.
        iters: maximum ALS iterations (each a D-step and an S-step).
        damping: ``lambda`` in ``G + lambda tr(G)/K I`` (relative; 0 disables).
        seed: seed of the random initial atoms (beyond the rank of ``L^T B``).
        update_support: re-choose each column's support in every S-step (False: keep the
            support of the initial S-step and only refit values).
        rule: support rule, ``"magnitude"`` (``|c_i| ||d'_i||``) or ``"obs"`` (saliency
            ``c_i^2 / [H^-1]_ii``), both from the unrestricted least-squares ``c``.

    Returns:
        ``SparseFit`` of kind ``"dense-nm"``: ``a = D [K, k]``, ``c = S [k, N]`` with exact zeros
        off the pattern, ``c_pattern = "nm:n:m"``; ``info["history"]`` holds the damped relative
        objective after the init and after each iteration.

    Raises:
        ValueError: a bad shape, ``inner`` not a multiple of ``m``, ``n`` not in ``[1, m]``,
            a Gram of the wrong shape or all zero, negative damping, an unknown rule.
    """
    b64, dtype = _weight(b)
    k_in, n_out = b64.shape
    _check_nm(n, m)
    if inner < 1 or inner % m:
        raise ValueError(
            f"inner={inner} is not a positive multiple of m={m}: the {n}:{m} groups run along "
            f"the inner dimension; use e.g. inner={max(m, inner - inner % m)}"
        )
    if rule not in ("obs", "magnitude"):
        raise ValueError(f"rule must be 'obs' or 'magnitude', got {rule!r}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    root_t, root_t_solve, g, winfo = _whitening(k_in, gram, damping)
    bw = root_t(b64)
    rng = np.random.default_rng(seed)

    dw = _svd_init(bw, inner, rng, interleave=inner // m)
    score = _Scorer(n, m, rule)
    mask = score.support(bw, dw)
    s = _refit_dense(dw, bw, mask)
    obj = _sq(bw - dw @ s)
    total = _sq(bw)
    history = [obj]
    best = (obj, dw, s, 0)
    changes = 0
    it = 0
    for it in range(1, iters + 1):
        dw = _d_step(bw, s)
        dw = _reseed_unused(dw, bw, s, rng, unit=False)
        new_mask = score.support(bw, dw) if update_support else mask
        cand = _refit_dense(dw, bw, new_mask)
        s, mask, changed = _keep_better(bw, dw, (s, mask), (cand, new_mask))
        changes += changed
        prev, obj = obj, _sq(bw - dw @ s)
        history.append(obj)
        if obj < best[0]:
            best = (obj, dw, s, it)
        if prev - obj <= _TOL * prev:
            break

    obj, dw, s, best_it = best
    a = root_t_solve(dw)
    info = {
        **winfo,
        "damping": damping,
        "iterations": it,
        "best_iteration": best_it,
        "rule": rule,
        "update_support": update_support,
        "support_changes": int(changes),
        "damped_objective": _rel(obj, total),
        "history": [_rel(v, total) for v in history],
        "nonzeros": int(np.count_nonzero(s)),
    }
    return _result("dense-nm", "dense-nm", b64, g, a, s, dtype, f"nm:{n}:{m}", info)


def dictionary(
    b: np.ndarray,
    atoms: int,
    sparsity: int | None,
    gram: np.ndarray | None = None,
    *,
    iters: int = 20,
    orthogonal: bool = True,
    nm: tuple[int, int] | None = None,
    damping: float = DEFAULT_DAMPING,
    seed: int = 0,
) -> SparseFit:
    """Sparse dictionary factorization ``B ~= D C`` in the whitened metric (COMPOT / CoSpaDi).

    Args:
        b: the weight ``[K, N]``, used as ``X @ B``.
        atoms: the number of atoms ``k`` (``D [K, k]``); at most ``K`` when ``orthogonal``.
        sparsity: nonzeros per column of ``C`` (at most ``atoms``); None when ``nm`` is given.
        gram: the input Gram ``X^T X [K, K]`` (None: unweighted).
        iters: maximum alternations (coefficient step + dictionary step).
        orthogonal: True: orthonormal whitened atoms, exact hard-threshold coefficients and a
            Procrustes update (COMPOT); False: unit atoms, batched OMP and MOD (CoSpaDi).
        nm: ``(n, m)``: ``C`` is N:M along ``atoms`` instead of ``sparsity`` per column
            (``atoms`` a multiple of ``m``).
        damping: ``lambda`` in ``G + lambda tr(G)/K I`` (relative; 0 disables).
        seed: seed of the random atoms (beyond the rank of ``L^T B``, and re-seeding).

    Returns:
        ``SparseFit`` of kind ``"dictionary"``, method ``"compot"`` or ``"cospadi"``:
        ``a = D [K, k]``, ``c = C [k, N]``, ``c_pattern`` ``"cols:s"`` or ``"nm:n:m"``;
        ``info["history"]`` holds the damped relative objective after each coefficient step.

    Raises:
        ValueError: bad shapes or sizes (``atoms > K`` with ``orthogonal``, ``sparsity`` not in
            ``[1, atoms]``, both or neither of ``sparsity`` and ``nm``), a bad Gram or damping.
    """
    b64, dtype = _weight(b)
    k_in, n_out = b64.shape
    if atoms < 1:
        raise ValueError(f"atoms must be >= 1, got {atoms}")
    if orthogonal and atoms > k_in:
        raise ValueError(
            f"an orthogonal dictionary holds at most K={k_in} atoms, got atoms={atoms}; "
            "use orthogonal=False for an overcomplete dictionary"
        )
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity (nonzeros per column) and nm=(n, m)")
    if nm is not None:
        n, m = nm
        _check_nm(n, m)
        if atoms % m:
            raise ValueError(f"atoms={atoms} is not a multiple of m={m}: the {n}:{m} groups run along the atoms")
        pattern = f"nm:{n}:{m}"
    else:
        if not 1 <= sparsity <= atoms:
            raise ValueError(f"sparsity must be in [1, atoms={atoms}], got {sparsity}")
        pattern = f"cols:{sparsity}"
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    root_t, root_t_solve, g, winfo = _whitening(k_in, gram, damping)
    bw = root_t(b64)
    total = _sq(bw)
    rng = np.random.default_rng(seed)
    fit = _compot if orthogonal else _cospadi
    obj, dw, c, history, it, best_it = fit(bw, atoms, sparsity, nm, iters, rng)
    a = root_t_solve(dw)
    info = {
        **winfo,
        "damping": damping,
        "iterations": it,
        "best_iteration": best_it,
        "dictionary_update": "procrustes" if orthogonal else "mod",
        "damped_objective": _rel(obj, total),
        "history": [_rel(v, total) for v in history],
        "nonzeros": int(np.count_nonzero(c)),
    }
    method = "compot" if orthogonal else "cospadi"
    return _result("dictionary", method, b64, g, a, c, dtype, pattern, info)


# --- the two dictionary solvers (on the whitened weight) ---------------------------------------


def _compot(bw, atoms, sparsity, nm, iters, rng):
    """Orthonormal atoms: exact hard thresholding, then Procrustes (module docstring)."""
    u = np.linalg.svd(bw, full_matrices=True)[0]
    dw = u[:, :atoms]
    history, best, obj, it = [], None, None, 0
    for it in range(iters + 1):
        proj = dw.T @ bw
        c = np.where(_keep(proj, sparsity, nm), proj, 0.0)
        prev, obj = obj, _sq(bw - dw @ c)
        history.append(obj)
        if best is None or obj < best[0]:
            best = (obj, dw, c, it)
        if it == iters or (prev is not None and prev - obj <= _TOL * prev):
            break
        uu, _, vt = np.linalg.svd(bw @ c.T, full_matrices=False)
        dw = uu @ vt
    obj, dw, c, best_it = best
    return obj, dw, c, history, it, best_it


def _cospadi(bw, atoms, sparsity, nm, iters, rng):
    """Unit atoms, overcomplete allowed: OMP (or N:M least squares), then MOD."""
    dw = _svd_init(bw, atoms, rng, interleave=None if nm is None else atoms // nm[1])
    dw = dw / np.linalg.norm(dw, axis=0)
    if nm is not None:
        scorer = _Scorer(nm[0], nm[1], "magnitude")
        mask = scorer.support(bw, dw)
        c = _refit_dense(dw, bw, mask)
    else:
        c, mask = _scatter(*_omp(bw, dw, sparsity), atoms)
    history, best, obj, it = [], None, None, 0
    obj = _sq(bw - dw @ c)
    history.append(obj)
    best = (obj, dw, c, 0)
    for it in range(1, iters + 1):
        dw = _d_step(bw, c)
        dw = _reseed_unused(dw, bw, c, rng, unit=True)
        norms = np.linalg.norm(dw, axis=0)
        dw = dw / norms
        c = c * norms[:, None]
        if nm is not None:
            new_mask = scorer.support(bw, dw)
            cand = _refit_dense(dw, bw, new_mask)
        else:
            cand, new_mask = _scatter(*_omp(bw, dw, sparsity), atoms)
        old = _refit_dense(dw, bw, mask)
        c, mask, _ = _keep_better(bw, dw, (old, mask), (cand, new_mask))
        prev, obj = obj, _sq(bw - dw @ c)
        history.append(obj)
        if obj < best[0]:
            best = (obj, dw, c, it)
        if prev - obj <= _TOL * prev:
            break
    obj, dw, c, best_it = best
    return obj, dw, c, history, it, best_it


# --- coefficient steps -------------------------------------------------------------------------


class _Scorer:
    """Chooses an N:M support per column from the unrestricted least-squares solution."""

    def __init__(self, n: int, m: int, rule: str):
        self.n, self.m, self.rule = n, m, rule

    def support(self, bw: np.ndarray, dw: np.ndarray) -> np.ndarray:
        h = dw.T @ dw
        k = h.shape[0]
        ridge = _RANK_RIDGE * _scale(h)
        low = sla.cholesky(h + ridge * np.eye(k), lower=True)
        full = sla.cho_solve((low, True), dw.T @ bw)
        if self.rule == "obs":
            p_diag = np.sum(sla.solve_triangular(low, np.eye(k), lower=True) ** 2, axis=0)
            score = full**2 / p_diag[:, None]
        else:
            score = np.abs(full) * np.sqrt(np.diag(h))[:, None]
        return nm_top_mask(score, self.n, self.m)


def _keep(x: np.ndarray, sparsity: int | None, nm: tuple[int, int] | None) -> np.ndarray:
    """The mask of the largest ``|x|``: ``sparsity`` per column, or N:M along rows."""
    if nm is not None:
        return nm_top_mask(np.abs(x), *nm)
    order = np.argsort(-np.abs(x), axis=0, kind="stable")[:sparsity]
    mask = np.zeros(x.shape, bool)
    np.put_along_axis(mask, order, True, axis=0)
    return mask


def _refit_dense(dw: np.ndarray, bw: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-column least squares of ``bw`` on the atoms in ``mask`` (equal count per column)."""
    idx = np.nonzero(mask.T)[1].reshape(mask.shape[1], -1)
    return _refit_idx(dw, bw, idx)[0]


def _refit_idx(dw: np.ndarray, bw: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batched least squares: column ``j`` of ``C`` on the atoms ``idx[j]`` (``[N, t]``)."""
    h = dw.T @ dw
    r = dw.T @ bw
    k, cols = r.shape
    t = idx.shape[1]
    reg = _RIDGE * _scale(h) * np.eye(t)
    vals = np.empty((cols, t))
    step = max(1, _CHUNK // max(1, t * t))
    for lo in range(0, cols, step):
        ii = idx[lo : lo + step]
        hs = h[ii[:, :, None], ii[:, None, :]] + reg
        rs = np.take_along_axis(r[:, lo : lo + step].T, ii, axis=1)
        vals[lo : lo + step] = _solve_pd(hs, rs)
    return _scatter(idx, vals, k)


def _scatter(idx: np.ndarray, vals: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``C [k, N]`` and its support mask from per-column atoms ``idx`` and values (``[N, t]``)."""
    cols = idx.shape[0]
    c = np.zeros((k, cols))
    mask = np.zeros((k, cols), bool)
    col = np.arange(cols)[:, None]
    c[idx, col] = vals
    mask[idx, col] = True
    return c, mask


def _solve_pd(h: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Solve the batch ``h[j] x[j] = r[j]`` of positive definite systems (``[B, t, t]``, ``[B, t]``).

    Batched Cholesky, then forward and back substitution vectorised over the batch (numpy has
    no batched triangular solve; its batched LU ``solve`` is several times slower here). Falls
    back to least squares per system if a factorization fails.
    """
    try:
        low = np.linalg.cholesky(h)
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(hj, rj, rcond=None)[0] for hj, rj in zip(h, r)])
    t = h.shape[1]
    y = np.empty_like(r)
    for i in range(t):
        y[:, i] = (r[:, i] - np.einsum("bj,bj->b", low[:, i, :i], y[:, :i])) / low[:, i, i]
    x = np.empty_like(r)
    for i in range(t - 1, -1, -1):
        x[:, i] = (y[:, i] - np.einsum("bj,bj->b", low[:, i + 1 :, i], x[:, i + 1 :])) / low[:, i, i]
    return x


def _omp(bw: np.ndarray, dw: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Batched orthogonal matching pursuit: ``s`` atoms per column and their least-squares
    coefficients, both ``[N, s]``.

    All columns advance together. Residual correlations come from the Gram,
    ``D'^T (b - D'_T c_T) = r - H[:, T] c_T``, with ``c`` held as a sparse matrix; the inverse
    of ``H_TT`` grows by one Schur-complement step per atom. A column whose residual is already
    explained (the new atom's Schur complement under ``1e-10 H_ii``) still takes a distinct atom,
    with coefficient 0, so every column lists ``s`` atoms.
    """
    h = dw.T @ dw
    r = (dw.T @ bw).T  # [N, k]
    cols, k = r.shape
    diag = np.diag(h).copy()
    inv_norm = 1.0 / np.sqrt(np.maximum(diag, np.finfo(np.float64).tiny))
    idx = np.zeros((cols, s), np.int64)
    hinv = np.zeros((cols, s, s))
    coef = np.zeros((cols, s))
    corr = r.copy()
    for t in range(s):
        score = np.abs(corr) * inv_norm
        if t:
            np.put_along_axis(score, idx[:, :t], -np.inf, axis=1)
        new = np.argmax(score, axis=1)
        idx[:, t] = new
        hk = h[idx[:, :t], new[:, None]]  # [N, t]
        w = np.einsum("nij,nj->ni", hinv[:, :t, :t], hk)
        d = diag[new] - np.einsum("ni,ni->n", hk, w)
        live = d > 1e-10 * diag[new]
        dd = np.where(live, d, 1.0)
        upd = np.where(live[:, None], w, 0.0)
        # the block inverse gives the new least-squares coefficients in O(t):
        # a = (r_k - h_k . c) / d on the new atom, c -= a w on the others
        a = np.where(live, (r[np.arange(cols), new] - np.einsum("ni,ni->n", hk, coef[:, :t])) / dd, 0.0)
        coef[:, :t] -= upd * a[:, None]
        coef[:, t] = a
        if t + 1 < s:
            scaled = upd / dd[:, None]
            hinv[:, :t, :t] += upd[:, :, None] * scaled[:, None, :]
            hinv[:, :t, t] = -scaled
            hinv[:, t, :t] = -scaled
            hinv[:, t, t] = np.where(live, 1.0 / dd, 0.0)
            sparse = sps.csr_matrix(
                (coef[:, : t + 1].ravel(), idx[:, : t + 1].ravel(), np.arange(0, cols * (t + 1) + 1, t + 1)),
                shape=(cols, k),
            )
            corr = r - np.asarray(sparse @ h)
    return idx, coef


def _keep_better(bw, dw, old, new):
    """Per column, the candidate ``(C, mask)`` with the lower error (ties keep the old one)."""
    c_old, m_old = old
    c_new, m_new = new
    e_old = np.sum((bw - dw @ c_old) ** 2, axis=0)
    e_new = np.sum((bw - dw @ c_new) ** 2, axis=0)
    take = e_new < e_old
    c = np.where(take[None, :], c_new, c_old)
    mask = np.where(take[None, :], m_new, m_old)
    changed = int(np.sum(np.any(m_new != m_old, axis=0) & take))
    return c, mask, changed


# --- dictionary / dense-factor steps ----------------------------------------------------------


def _d_step(bw: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``D' = B' C^+``: the least-squares dense factor for fixed ``C``.

    Normal equations ``(C C^T) D'^T = C B'^T`` on the rows of ``C`` that are used (Cholesky;
    several times faster than a QR/SVD least-squares solve here); unused rows get zero atoms
    (re-seeded by the caller). Falls back to the minimum-norm solve when ``C C^T`` is singular.
    """
    live = np.flatnonzero(np.any(c != 0, axis=1))
    dw = np.zeros((bw.shape[0], c.shape[0]))
    cl = c[live]
    try:
        low = sla.cholesky(cl @ cl.T, lower=True)
        dw[:, live] = sla.cho_solve((low, True), cl @ bw.T).T
    except (np.linalg.LinAlgError, sla.LinAlgError):
        dw[:, live] = sla.lstsq(cl.T, bw.T)[0].T
    return dw


def _reseed_unused(dw, bw, c, rng, *, unit: bool):
    """Atoms that no column uses become the worst-fitted residual columns (``D' C`` unchanged)."""
    dead = np.flatnonzero(~np.any(c != 0, axis=1))
    if dead.size == 0:
        return dw
    dw = dw.copy()
    res = bw - dw @ c
    err = np.sum(res**2, axis=0)
    worst = np.argsort(-err, kind="stable")
    size = 1.0 if unit else float(np.sqrt(np.mean(np.sum(dw**2, axis=0)))) or 1.0
    for i, atom in enumerate(dead):
        j = worst[i] if i < worst.size else None
        v = res[:, j] if j is not None and err[j] > 0 else rng.standard_normal(dw.shape[0])
        dw[:, atom] = v / np.linalg.norm(v) * size
    return dw


def _svd_init(bw: np.ndarray, k: int, rng, *, interleave: int | None) -> np.ndarray:
    """``k`` atoms from the leading ``U_i s_i^(1/2)`` of ``bw`` (random beyond its rank).

    With ``interleave = g`` (the number of N:M groups) component ``i`` goes to column
    ``(i mod g) m + i // g`` so each group holds components from the whole spectrum.
    """
    k_in = bw.shape[0]
    u, sv, _ = np.linalg.svd(bw, full_matrices=False)
    tol = max(bw.shape) * np.finfo(np.float64).eps * (sv[0] if sv.size else 0.0)
    rank = int(np.sum(sv > tol))
    r0 = min(k, rank)
    atoms = np.empty((k_in, k))
    atoms[:, :r0] = u[:, :r0] * np.sqrt(sv[:r0])
    if k > r0:
        extra = rng.standard_normal((k_in, k - r0))
        size = np.sqrt(sv[r0 - 1]) if r0 else 1.0
        atoms[:, r0:] = extra / np.linalg.norm(extra, axis=0) * size
    if interleave:
        m = k // interleave
        i = np.arange(k)
        pos = (i % interleave) * m + i // interleave
        out = np.empty_like(atoms)
        out[:, pos] = atoms
        atoms = out
    return atoms


# --- shared helpers ----------------------------------------------------------------------------


def _weight(b) -> tuple[np.ndarray, np.dtype]:
    arr = np.asarray(b)
    if arr.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("weight holds non-finite values")
    return arr.astype(np.float64), out_dtype(arr)


def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer)) and 1 <= n <= m):
        raise ValueError(f"N:M needs integers 1 <= n <= m, got n={n}, m={m}")


def _whitening(k: int, gram, damping: float) -> tuple[Matrix, Matrix, np.ndarray | None, dict]:
    """``R^T`` and ``R^-T`` for the damped Gram (identity without one), the undamped Gram."""
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if gram is None:
        return (lambda x: x), (lambda x: x), None, {"root": "identity"}
    g = np.asarray(gram, np.float64)
    if g.shape != (k, k):
        raise ValueError(f"gram is {g.shape}, weight needs ({k}, {k})")
    scale = float(np.trace(g)) / k
    if not scale > 0:
        raise ValueError("the calibration Gram is zero: the layer saw no (non-zero) inputs")
    root_t, root_t_solve, info = sqrt_factor(g + damping * scale * np.eye(k))
    return root_t, root_t_solve, g, info


def _result(kind, method, b64, g, a, c, dtype, c_pattern, info) -> SparseFit:
    a_out, c_out = a.astype(dtype), c.astype(dtype)
    approx = a_out.astype(np.float64) @ c_out.astype(np.float64)
    e = b64 - approx
    rel = rel_norm(e, b64)
    if g is None:
        obj = rel
    else:
        den = float(np.sum((g @ b64) * b64))
        obj = float(np.sqrt(max(float(np.sum((g @ e) * e)), 0.0) / den)) if den > 0 else 0.0
    return SparseFit(
        kind=kind,
        method=method,
        rel_error=rel,
        objective_error=obj,
        a=a_out,
        c=c_out,
        c_pattern=c_pattern,
        info=info,
    )


def _scale(h: np.ndarray) -> float:
    return max(float(np.mean(np.diag(h))), np.finfo(np.float64).tiny)


def _sq(x: np.ndarray) -> float:
    return float(np.sum(x * x))


def _rel(v: float, total: float) -> float:
    return float(np.sqrt(max(v, 0.0) / total)) if total > 0 else 0.0
