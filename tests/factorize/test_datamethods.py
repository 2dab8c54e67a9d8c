"""Data-aware factorizers (whiten, asvd, fwsvd, afm) against their closed-form optima."""
from __future__ import annotations

import numpy as np
import pytest

from lrcompile.factorize import LayerStats, RankPolicy, factorize
from lrcompile.factorize.stats import StatsAccumulator
from lrcompile.factorize.whiten import mean_correction

K, N = 48, 32


def rank(r: int) -> RankPolicy:
    return RankPolicy(rank=r, multiple=1)


def acts(rows: int, k: int = K, seed: int = 0, mean: float = 0.0) -> np.ndarray:
    """Correlated activations ``Z @ M`` with an anisotropic spectrum (condition ~1e3)."""
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.standard_normal((k, k)))
    q2, _ = np.linalg.qr(rng.standard_normal((k, k)))
    mix = q1 @ np.diag(np.logspace(0, -3, k)) @ q2
    return rng.standard_normal((rows, k)) @ mix + mean * rng.standard_normal(k)


def weight(k: int = K, n: int = N, seed: int = 1) -> np.ndarray:
    """A weight with a slowly decaying, well-separated spectrum (float64 for tight checks)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((k, min(k, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(k, n))))
    return (u * (1.0 / np.sqrt(1.0 + np.arange(min(k, n))))) @ v.T


def stats_of(x: np.ndarray, b: np.ndarray | None = None, *, out_bias: np.ndarray | None = None) -> LayerStats:
    acc = StatsAccumulator(x.shape[1], None if b is None else b.shape[1], out_gram=b is not None)
    y = None if b is None else x @ b + (0 if out_bias is None else out_bias)
    acc.update(x, y)
    return acc.result()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def best_rank(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


# ----------------------------------------------------------------------------- whiten


@pytest.mark.parametrize("r", [1, 6, 20])
def test_whiten_reaches_the_brute_force_optimum(r):
    x, b = acts(400), weight()
    f = factorize(b, rank(r), "whiten", stats_of(x), damping=0.0)
    # closed form of min ||X(B - W)||_F over rank-r W, for full-column-rank X: W = pinv(X) (XB)_r
    w_opt = np.linalg.pinv(x) @ best_rank(x @ b, r)
    opt = rel(x @ w_opt, x @ b)
    assert f.rank == r and f.a.shape == (K, r) and f.c.shape == (r, N)
    assert abs(rel(x @ f.dense(), x @ b) - opt) <= 1e-6 * opt
    assert abs(f.objective_error - opt) <= 1e-6 * opt
    assert rel(x @ f.dense(), x @ w_opt) < 1e-6
    assert f.info["root"] == "cholesky" and f.info["damping"] == 0.0


def test_whiten_beats_plain_svd_in_the_activation_objective():
    x, b = acts(400), weight()
    w = factorize(b, rank(8), "whiten", stats_of(x))
    s = factorize(b, rank(8), "svd")
    assert rel(x @ w.dense(), x @ b) < 0.8 * rel(x @ s.dense(), x @ b)
    assert w.rel_error > s.rel_error  # ... at the price of the plain weight error
    assert w.rel_error == pytest.approx(rel(w.dense(), b), rel=1e-9)


def test_whiten_full_rank_reconstructs_and_keeps_dtype():
    x, b = acts(400), weight()
    f = factorize(b, rank(N), "whiten", stats_of(x))
    assert rel(f.dense(), b) < 1e-8 and f.objective_error < 1e-7
    f32 = factorize(b.astype(np.float32), rank(N), "whiten", stats_of(x))
    assert f32.a.dtype == np.float32 and rel(f32.dense(), b) < 1e-5


def test_whiten_singular_gram_uses_the_fallback():
    x, b = acts(12), weight()  # 12 rows < K = 48: G has rank 12
    f = factorize(b, rank(5), "whiten", stats_of(x), damping=0.0)
    opt = rel(best_rank(x @ b, 5), x @ b)
    assert f.info["root"] == "eigh" and f.info["clamped"] >= K - 12
    assert np.all(np.isfinite(f.a)) and np.all(np.isfinite(f.c))
    assert abs(rel(x @ f.dense(), x @ b) - opt) <= 1e-6 * opt
    full = factorize(b, rank(N), "whiten", stats_of(x), damping=0.0)
    assert rel(full.dense(), b) < 1e-6


def test_whiten_damping_and_rank_policy():
    x, b = acts(400), weight()
    st = stats_of(x)
    undamped = factorize(b, rank(8), "whiten", st, damping=0.0)
    damped = factorize(b, rank(8), "whiten", st)  # default damping
    assert undamped.objective_error <= damped.objective_error < 1.05 * undamped.objective_error
    assert damped.info["damping"] > 0 and damped.info["solver"] == "auto"
    f = factorize(b, RankPolicy(max_error=0.1, multiple=1), "whiten", st, damping=0.0)
    assert f.objective_error <= 0.1 + 1e-12
    assert factorize(b, rank(f.rank - 1), "whiten", st, damping=0.0).objective_error > 0.1
    with pytest.raises(ValueError):
        factorize(b, rank(4), "whiten", st, damping=-1.0)


def test_whiten_randomized_solver_is_close_to_exact():
    x, b = acts(400), weight()
    st = stats_of(x)
    exact = factorize(b, rank(6), "whiten", st, solver="exact")
    rand = factorize(b, rank(6), "whiten", st, solver="randomized", seed=3, power_iters=4)
    assert rand.info["solver"] == "randomized" and rand.info["power_iters"] == 4
    assert rand.objective_error == pytest.approx(exact.objective_error, rel=1e-3)
    with pytest.raises(TypeError):
        factorize(b, rank(6), "whiten", st, alpha=0.5)  # an option of another method


def test_whiten_bias_correction_is_jointly_optimal():
    x, b = acts(400, mean=2.0), weight()  # inputs with a large mean
    st = stats_of(x)
    plain = factorize(b, rank(6), "whiten", st, damping=0.0)
    f = factorize(b, rank(6), "whiten", st, damping=0.0, bias_correction=True)
    out = x @ f.dense() + f.bias
    # optimum over rank-6 W and a constant d: best rank-6 approximation of the centred X B
    xc = x - x.mean(0)
    opt = float(np.linalg.norm(xc @ b - best_rank(xc @ b, 6)) / np.linalg.norm(x @ b))
    assert abs(rel(out, x @ b) - opt) <= 1e-6 * opt
    assert f.objective_error == pytest.approx(opt, rel=1e-6)
    assert f.objective_error < plain.objective_error


def test_mean_correction_removes_the_error_mean():
    x, b = acts(300, mean=1.0), weight()
    st = stats_of(x)
    f = factorize(b, rank(6), "svd")
    d = mean_correction(b, f.a, f.c, st)
    resid = x @ (b - f.dense())
    assert np.abs((resid - d).mean(0)).max() < 1e-10 * np.abs(resid).max()
    assert np.linalg.norm(resid - d) < np.linalg.norm(resid)


# ----------------------------------------------------------------------------- asvd / fwsvd


def test_asvd_alpha_zero_is_plain_svd_and_full_rank_exact():
    x, b = acts(300, mean=0.5), weight()
    st = stats_of(x)
    a0 = factorize(b, rank(7), "asvd", st, alpha=0.0)
    assert rel(a0.dense(), factorize(b, rank(7), "svd").dense()) < 1e-6
    full = factorize(b, rank(N), "asvd", st)
    assert rel(full.dense(), b) < 1e-8
    assert full.info["alpha"] == 0.5 and "eps" in full.info


def test_asvd_minimises_the_scaled_error():
    x, b = acts(300, mean=0.5), weight()
    st = stats_of(x)
    f = factorize(b, rank(7), "asvd", st, bias_correction=True)
    s = np.sqrt(st.abs_sum / st.count)[:, None]
    s = s + 1e-6 * s.max()  # the documented zero guard (eps)
    svd = factorize(b, rank(7), "svd")
    assert f.objective_error == pytest.approx(rel(s * f.dense(), s * b), rel=1e-9)
    assert f.objective_error < rel(s * svd.dense(), s * b)
    np.testing.assert_allclose(f.bias, mean_correction(b, f.a, f.c, st), rtol=1e-10)


def test_fwsvd_uniform_fisher_is_plain_svd():
    b = weight()
    f = factorize(b, rank(9), "fwsvd", LayerStats(count=0, fisher=np.full((K, N), 3.0)))
    assert rel(f.dense(), factorize(b, rank(9), "svd").dense()) < 1e-6


def test_fwsvd_lowers_the_fisher_weighted_error():
    b = weight()
    rng = np.random.default_rng(7)
    fisher = rng.gamma(0.5, size=(K, N)) * np.logspace(0, 3, K)[:, None]  # a few rows dominate
    f = factorize(b, rank(9), "fwsvd", LayerStats(count=0, fisher=fisher))
    d = np.sqrt(fisher.sum(1))[:, None]
    d = d + 1e-6 * d.max()
    svd = factorize(b, rank(9), "svd")
    assert f.objective_error == pytest.approx(rel(d * f.dense(), d * b), rel=1e-9)
    assert f.objective_error < 0.8 * rel(d * svd.dense(), d * b)
    assert rel(factorize(b, rank(N), "fwsvd", LayerStats(count=0, fisher=fisher)).dense(), b) < 1e-8


# ----------------------------------------------------------------------------- afm


def test_afm_full_rank_is_exact_with_the_mean_correction():
    x, b = acts(300, mean=1.0), weight()
    f = factorize(b, rank(N), "afm", stats_of(x, b))
    assert rel(x @ f.a @ f.c + f.bias, x @ b) < 1e-6
    bias = np.linspace(-1, 1, N)  # statistics collected after the layer's bias
    g = factorize(b, rank(N), "afm", stats_of(x, b, out_bias=bias), bias=bias)
    assert rel(x @ g.a @ g.c + g.bias, x @ b) < 1e-6


@pytest.mark.parametrize("post_bias", [False, True])
def test_afm_error_is_the_discarded_variance(post_bias):
    x, b = acts(300, mean=1.0), weight()
    bias = np.linspace(-2, 3, N) if post_bias else None
    st = stats_of(x, b, out_bias=bias)
    f = factorize(b, rank(6), "afm", st, bias=bias)
    y = x @ b
    err = np.linalg.norm(x @ f.a @ f.c + f.bias - y) / np.linalg.norm(y - y.mean(0))
    lam = np.linalg.eigvalsh(np.cov(y.T, bias=True))[::-1]
    assert err == pytest.approx(np.sqrt(lam[6:].sum() / lam.sum()), rel=1e-6)
    assert f.objective_error == pytest.approx(err, rel=1e-6)
    assert f.a.shape == (K, 6) and f.c.shape == (6, N)
    np.testing.assert_allclose(f.c @ f.c.T, np.eye(6), atol=1e-10)


def test_afm_on_embedding_lookups_full_and_reduced_rank():
    """The pipeline's path for a Gather: AFM on the one-hot output statistics E^T diag(c) E."""
    from lrcompile.factorize.derive import onehot_output_stats

    def afm_embedding(table, k, counts=None):
        c = np.ones(table.shape[0]) if counts is None else counts
        st = onehot_output_stats(LayerStats(count=int(c.sum()), in_sum=c), table)
        return factorize(table, k if isinstance(k, RankPolicy) else RankPolicy(rank=k, multiple=1), "afm", st)

    rng = np.random.default_rng(3)
    table = acts(200, k=16, seed=3, mean=0.5).astype(np.float32)
    full = afm_embedding(table, 16)
    assert rel(full.a @ full.c + full.bias, table) < 1e-5
    counts = rng.integers(0, 50, size=200).astype(np.float64)
    f = afm_embedding(table, 4, counts=counts)
    w = counts / counts.sum()
    mu = w @ table.astype(np.float64)
    resid = table - (f.a @ f.c + f.bias)
    weighted = np.sqrt((w[:, None] * resid**2).sum() / (w[:, None] * (table - mu) ** 2).sum())
    assert f.objective_error == pytest.approx(weighted, rel=1e-4)
    assert f.a.shape == (200, 4) and f.c.shape == (4, 16) and f.bias.shape == (16,)
    assert afm_embedding(table, RankPolicy(energy=0.9, multiple=1)).rank < 16


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("method,needs", [
    ("whiten", {"gram"}), ("asvd", {"abs_sum"}), ("fwsvd", {"fisher"}), ("afm", {"out_sum", "out_gram"}),
])
def test_registry_reaches_each_method_and_checks_stats(method, needs):
    from lrcompile.factorize import METHODS

    x, b = acts(200, mean=0.5), weight()
    st = stats_of(x, b)
    st = LayerStats(**{**st.__dict__, "fisher": np.ones((K, N))})
    assert set(METHODS[method].needs) == needs
    f = factorize(b, RankPolicy(ratio=0.5, multiple=8), method, st)
    assert f.method == method and f.rank % 8 == 0 and f.rank <= 0.5 * K * N / (K + N)
    with pytest.raises(ValueError):
        factorize(b, rank(4), method, None)
    with pytest.raises(ValueError):
        factorize(b, rank(4), method, LayerStats(count=200))
