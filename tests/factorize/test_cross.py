"""Target correction (sequential calibration): whitened SVD fitted to the original's outputs,
``min ||X' A C - X B||_F`` over rank-r ``A C``, against brute force."""
from __future__ import annotations

import numpy as np
import pytest

from lrcompile.factorize import RankPolicy, factorize
from lrcompile.factorize.derive import sum_stats
from lrcompile.factorize.stats import StatsAccumulator, merge

K, N = 48, 32


def acts(rows: int, k: int = K, seed: int = 0) -> np.ndarray:
    """Correlated activations with an anisotropic spectrum (as in test_datamethods)."""
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.standard_normal((k, k)))
    q2, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return rng.standard_normal((rows, k)) @ (q1 @ np.diag(np.logspace(0, -3, k)) @ q2)


def weight(k: int = K, n: int = N, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((k, min(k, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(k, n))))
    return (u * (1.0 / np.sqrt(1.0 + np.arange(min(k, n))))) @ v.T


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def best_rank(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def rank(r: int) -> RankPolicy:
    return RankPolicy(rank=r, multiple=1)


def paired(x_c: np.ndarray, x: np.ndarray):
    acc = StatsAccumulator(x.shape[1], cross=True)
    acc.update(x_c, ref=x)
    return acc.result()


def perturbed(x: np.ndarray, scale: float = 0.3, seed: int = 5) -> np.ndarray:
    """``X'``: the original inputs through a different (compressed) upstream: a mixed, noisy copy."""
    rng = np.random.default_rng(seed)
    return x @ (np.eye(x.shape[1]) + scale * rng.standard_normal((x.shape[1],) * 2) / np.sqrt(x.shape[1])) \
        + 0.05 * rng.standard_normal(x.shape)


def brute_force(x_c: np.ndarray, x: np.ndarray, b: np.ndarray, r: int) -> np.ndarray:
    """Rank-r minimiser of ||X' W - X B||: project the target on range(X'), truncate there."""
    q, rr = np.linalg.qr(x_c)  # X' = Q R, full column rank
    t = q.T @ (x @ b)           # the part of the target X' can reach, in Q's coordinates
    return np.linalg.solve(rr, best_rank(t, r))


@pytest.mark.parametrize("r", [1, 6, 20, N])
def test_corrected_whiten_equals_brute_force(r):
    x, b = acts(400), weight()
    xc = perturbed(x)
    f = factorize(b, rank(r), "whiten", paired(xc, x), damping=0.0)
    w = brute_force(xc, x, b, r)
    opt = rel(xc @ w, x @ b)
    got = rel(xc @ f.dense(), x @ b)
    assert f.info["target_correction"] is True
    assert abs(got - opt) <= 1e-6 * opt
    assert abs(f.objective_error - opt) <= 1e-5 * opt
    assert rel(xc @ f.dense(), xc @ w) < 1e-5
    # ... and it beats fitting X' A C to X' B (the old sequential objective)
    old = factorize(b, rank(r), "whiten", StatsAccumulator.result(_plain(xc)), damping=0.0)
    if r < N:
        assert got < rel(xc @ old.dense(), x @ b)


def _plain(x):
    acc = StatsAccumulator(x.shape[1])
    acc.update(x)
    return acc


def test_full_rank_is_the_least_squares_solution():
    x, b = acts(400), weight()
    xc = perturbed(x)
    f = factorize(b, rank(N), "whiten", paired(xc, x), damping=0.0)
    ls = np.linalg.lstsq(xc, x @ b, rcond=None)[0]
    assert rel(f.dense(), ls) < 1e-6


def test_identical_inputs_equal_plain_whitening():
    x, b = acts(400), weight()
    for damping in (0.0, 1e-2):
        f = factorize(b, rank(8), "whiten", paired(x, x), damping=damping)
        g = factorize(b, rank(8), "whiten", _plain(x).result(), damping=damping)
        assert rel(f.dense(), g.dense()) < 1e-8
        assert f.objective_error == pytest.approx(g.objective_error, rel=1e-6)


def test_damping_minimises_the_ridge_objective():
    """With damping, A C minimises ||X' M - X B||^2 + lam s ||M - B||^2 (the prior is B, not 0)."""
    x, b = acts(60), weight()  # few rows: damping matters
    xc = perturbed(x)
    st = paired(xc, x)
    lam = 0.1 * np.trace(st.gram) / K
    f = factorize(b, rank(6), "whiten", st, damping=0.1)
    aug_x = np.vstack([xc, np.sqrt(lam) * np.eye(K)])
    aug_t = np.vstack([x @ b, np.sqrt(lam) * b])
    w = brute_force(aug_x, np.eye(aug_x.shape[0]), aug_t, 6)

    def obj(m):
        return np.linalg.norm(aug_x @ m - aug_t)
    assert obj(f.dense()) == pytest.approx(obj(w), rel=1e-6)


def test_cross_streams_merges_and_masks_both():
    x = acts(300).astype(np.float32)
    xc = perturbed(x).astype(np.float32)
    mask = np.random.default_rng(3).random(300) > 0.3
    whole = paired(xc[mask], x[mask])
    parts = [StatsAccumulator(K, cross=True) for _ in range(3)]
    for acc, lo in zip(parts, (0, 100, 200)):
        for s in (slice(lo, lo + 37), slice(lo + 37, lo + 100)):
            acc.update(xc[s], mask=mask[s], ref=x[s])
    got = merge(merge(parts[0], parts[1]), parts[2]).result()
    np.testing.assert_allclose(got.cross, whole.cross, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.ref_gram, whole.ref_gram, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.cross, xc[mask].astype(np.float64).T @ x[mask].astype(np.float64), rtol=1e-10, atol=1e-10)
    assert got.count == whole.count == int(mask.sum())
    summed = sum_stats([paired(xc[:150], x[:150]), paired(xc[150:], x[150:])])
    np.testing.assert_allclose(summed.cross, xc.astype(np.float64).T @ x.astype(np.float64), rtol=1e-10, atol=1e-10)


def test_cross_needs_ref_and_matching_shapes():
    acc = StatsAccumulator(4, cross=True)
    with pytest.raises(ValueError, match="pass ref"):
        acc.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="reference inputs"):
        acc.update(np.ones((2, 4)), ref=np.ones((3, 4)))
