"""kfac (two-sided weighted SVD) against a brute-force minimisation of its objective."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lrcompile.factorize import METHODS, LayerStats, RankPolicy, factorize
from lrcompile.factorize.stats import StatsAccumulator


def rank(r: int) -> RankPolicy:
    return RankPolicy(rank=r, multiple=1)


def mixed(rows: int, dim: int, seed: int, cond: float = 2.0) -> np.ndarray:
    """Correlated rows with an anisotropic spectrum (10^cond condition)."""
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    q2, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return rng.standard_normal((rows, dim)) @ (q1 @ np.diag(np.logspace(0, -cond, dim)) @ q2)


def stats_of(x: np.ndarray, g: np.ndarray | None) -> LayerStats:
    acc = StatsAccumulator(x.shape[1])
    acc.update(x)
    st = acc.result()
    return st if g is None else replace(st, grad_gram=g.T @ g)


def cost(b: np.ndarray, w: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> float:
    e = b - w
    return float(np.sum((gx @ e) * (e @ gy)))


def sym_sqrt(g: np.ndarray) -> np.ndarray:
    w, q = np.linalg.eigh(g)
    return (q * np.sqrt(w)) @ q.T


def brute_force(b: np.ndarray, gx: np.ndarray, gy: np.ndarray, r: int, starts: int = 4, iters: int = 300) -> float:
    """min over rank-r W of tr((B-W)^T Gx (B-W) Gy) by alternating least squares in the vectorized
    (Kronecker) form ``||(Gy^1/2 (x) Gx^1/2) vec(B - A C)||``, best of several random starts."""
    k, n = b.shape
    wh = np.kron(sym_sqrt(gy), sym_sqrt(gx))  # acts on column-major vec
    vb = wh @ b.reshape(-1, order="F")
    best = np.inf
    for s in range(starts):
        rng = np.random.default_rng(100 + s)
        c = rng.standard_normal((r, n))
        for _ in range(iters):
            # vec(A C) = (C^T (x) I_k) vec(A)
            a = np.linalg.lstsq(wh @ np.kron(c.T, np.eye(k)), vb, rcond=None)[0].reshape(k, r, order="F")
            # vec(A C) = (I_n (x) A) vec(C)
            c = np.linalg.lstsq(wh @ np.kron(np.eye(n), a), vb, rcond=None)[0].reshape(r, n, order="F")
        best = min(best, cost(b, a @ c, gx, gy))
    return best


def test_registered_with_its_needs():
    assert METHODS["kfac"].needs == frozenset({"gram", "grad_gram"})


@pytest.mark.parametrize("k,n,r", [(6, 5, 1), (6, 5, 2), (5, 7, 3)])
def test_kfac_reaches_the_brute_force_optimum(k, n, r):
    rng = np.random.default_rng(k * 10 + n)
    x, g = mixed(60, k, 1), mixed(80, n, 2)
    b = rng.standard_normal((k, n))
    st = stats_of(x, g)
    f = factorize(b, rank(r), "kfac", st, damping=0.0, out_damping=0.0)
    got = cost(b, f.dense(), st.gram, st.grad_gram)
    opt = brute_force(b, st.gram, st.grad_gram, r)
    assert got <= opt * (1 + 1e-6) + 1e-12
    assert got == pytest.approx(opt, rel=1e-4)
    # the closed form with symmetric roots gives the same optimum
    sx, sy = sym_sqrt(st.gram), sym_sqrt(st.grad_gram)
    u, s, vt = np.linalg.svd(sx @ b @ sy)
    w = np.linalg.solve(sx, (u[:, :r] * s[:r]) @ vt[:r]) @ np.linalg.inv(sy)
    assert got == pytest.approx(cost(b, w, st.gram, st.grad_gram), rel=1e-8)
    # and the reported objective error is the undamped two-sided one
    den = cost(b, np.zeros_like(b), st.gram, st.grad_gram)
    assert f.objective_error == pytest.approx(np.sqrt(got / den), rel=1e-8)
    assert f.method == "kfac" and f.rank == r


def test_kfac_beats_whiten_and_svd_in_its_metric():
    k, n, r = 32, 24, 6
    x, g = mixed(300, k, 3, cond=3), mixed(300, n, 4, cond=3)
    b = np.random.default_rng(5).standard_normal((k, n))
    st = stats_of(x, g)
    opts = {"kfac": {"damping": 0.0, "out_damping": 0.0}, "whiten": {"damping": 0.0}, "svd": {}}
    costs = {m: cost(b, factorize(b, rank(r), m, st, **o).dense(), st.gram, st.grad_gram) for m, o in opts.items()}
    assert costs["kfac"] < 0.9 * costs["whiten"] and costs["kfac"] < costs["svd"]


@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_identity_output_gram_is_whiten(damping):
    k, n, r = 20, 12, 5
    x = mixed(200, k, 6)
    b = np.random.default_rng(7).standard_normal((k, n)).astype(np.float32)
    st = replace(stats_of(x, None), grad_gram=3.7 * np.eye(n))
    fk = factorize(b, rank(r), "kfac", st, damping=damping, out_damping=0.5)
    fw = factorize(b, rank(r), "whiten", st, damping=damping)
    np.testing.assert_allclose(fk.dense(), fw.dense(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fk.singular_values / fk.singular_values[0],
                               fw.singular_values / fw.singular_values[0], rtol=1e-8)
    assert fk.objective_error == pytest.approx(fw.objective_error, rel=1e-5)
    assert fk.a.dtype == np.float32 and fk.c.dtype == np.float32


def test_full_rank_is_lossless():
    k, n = 16, 10
    x, g = mixed(100, k, 8), mixed(100, n, 9)
    b = np.random.default_rng(10).standard_normal((k, n))
    f = factorize(b, rank(n), "kfac", stats_of(x, g))
    np.testing.assert_allclose(f.dense(), b, atol=1e-9)
    assert f.objective_error < 1e-7 and f.rel_error < 1e-7


def test_policies_read_the_two_sided_spectrum():
    k, n = 24, 16
    x, g = mixed(200, k, 11), mixed(200, n, 12)
    b = np.random.default_rng(13).standard_normal((k, n))
    st = stats_of(x, g)
    f = factorize(b, RankPolicy(max_error=0.3, multiple=1), "kfac", st, damping=0.0, out_damping=0.0)
    assert f.objective_error <= 0.3 + 1e-9
    lower = factorize(b, rank(f.rank - 1), "kfac", st, damping=0.0, out_damping=0.0)
    assert lower.objective_error > 0.3
    full = factorize(b, RankPolicy(energy=1.0, multiple=1), "kfac", st)
    assert len(full.singular_values) == n


def test_singular_output_gram_falls_back_to_eigh():
    k, n, r = 12, 10, 3
    x = mixed(100, k, 14)
    g = mixed(4, n, 15)  # 4 rows: Gy has rank 4 < n
    b = np.random.default_rng(16).standard_normal((k, n))
    st = stats_of(x, g)
    f = factorize(b, rank(r), "kfac", st, damping=0.0, out_damping=0.0)
    assert f.info["out_root"] == "eigh" and np.all(np.isfinite(f.dense()))
    # directions the gradients never visit cost nothing, and the factors stay bounded there
    assert np.linalg.norm(f.dense()) < 10 * np.linalg.norm(b)
    assert f.objective_error <= factorize(b, rank(r), "whiten", st, damping=0.0).objective_error + 1e-9


def test_target_correction_with_identity_output_gram_is_whiten():
    k, n, r = 16, 12, 4
    x = mixed(150, k, 17)
    xp = x + 0.05 * mixed(150, k, 18)
    acc = StatsAccumulator(k, cross=True)
    acc.update(xp, ref=x)
    st = replace(acc.result(), grad_gram=np.eye(n))
    b = np.random.default_rng(19).standard_normal((k, n))
    fk = factorize(b, rank(r), "kfac", st)
    fw = factorize(b, rank(r), "whiten", st)
    np.testing.assert_allclose(fk.dense(), fw.dense(), rtol=1e-7, atol=1e-9)
    assert fk.objective_error == pytest.approx(fw.objective_error, rel=1e-7)
    assert fk.info["target_correction"]


def test_bad_statistics_are_refused():
    b = np.random.default_rng(0).standard_normal((8, 6))
    x = mixed(50, 8, 1)
    with pytest.raises(ValueError, match="grad_gram"):
        factorize(b, rank(2), "kfac", stats_of(x, None))
    with pytest.raises(ValueError, match="grad_gram is"):
        factorize(b, rank(2), "kfac", replace(stats_of(x, None), grad_gram=np.eye(5)))
    with pytest.raises(ValueError, match="zero"):
        factorize(b, rank(2), "kfac", replace(stats_of(x, None), grad_gram=np.zeros((6, 6))))
