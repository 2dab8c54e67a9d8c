"""Rank allocation under a global budget: the knapsack against brute force, the budget as a hard
limit, rank going where the error is, and the data-free threshold rule."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from lrcompile.factorize.allocate import (LayerOptions, allocate, allocate_threshold, min_cost, rank_grid,
                                          tail_curve)


def _layer(key, k, n, spectrum, multiple=8, weight=1.0):
    ranks = rank_grid(k, n, multiple)
    s = np.asarray(spectrum, np.float64)
    loss = weight * tail_curve([s], [float(np.sum(s**2))], ranks)
    return LayerOptions(key, ranks, ranks * (k + n), loss, float(k * n), spectrum=s)


def _brute(options, budget):
    best = (np.inf, None)
    tables = [o.choices() for o in options]
    for combo in itertools.product(*[range(len(t[0])) for t in tables]):
        cost = sum(t[1][j] for t, j in zip(tables, combo))
        if cost <= budget:
            loss = sum(t[2][j] for t, j in zip(tables, combo))
            if loss < best[0] - 1e-15:
                best = (loss, combo)
    return best


def test_tail_curve_matches_truncation_error():
    rng = np.random.default_rng(0)
    m = rng.standard_normal((40, 30))
    s = np.linalg.svd(m, compute_uv=False)
    u, sv, vt = np.linalg.svd(m, full_matrices=False)
    ranks = np.array([1, 5, 17, 30])
    want = [np.linalg.norm(m - (u[:, :r] * sv[:r]) @ vt[:r]) ** 2 / np.linalg.norm(m) ** 2 for r in ranks]
    np.testing.assert_allclose(tail_curve([s], [float(np.sum(m * m))], ranks), want, atol=1e-12)
    # a partial spectrum with the true total gives the same tails where it is known
    np.testing.assert_allclose(tail_curve([s[:20]], [float(np.sum(m * m))], ranks[:3]), want[:3], atol=1e-12)
    # two groups pool their energies
    s2 = np.linalg.svd(2 * m[:, :20], compute_uv=False)
    both = tail_curve([s, s2], [float(np.sum(s**2)), float(np.sum(s2**2))], np.array([5]))
    num = np.sum(s[5:] ** 2) + np.sum(s2[5:] ** 2)
    assert both[0] == pytest.approx(num / (np.sum(s**2) + np.sum(s2**2)))


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    options = []
    for i in range(4):
        ranks = np.sort(rng.choice(np.arange(1, 30), size=4, replace=False))
        cost = ranks * rng.integers(5, 20) + rng.random(4)
        loss = np.sort(rng.random(4))[::-1] * rng.random()
        options.append(LayerOptions(f"w{i}", ranks, cost, loss, float(cost[-1] + rng.integers(1, 50))))
    total_dense = sum(o.dense_cost for o in options)
    for frac in (0.3, 0.55, 0.8):
        budget = max(frac * total_dense, min_cost(options))
        got = allocate(options, budget)
        want_loss, _ = _brute(options, budget)
        assert got.cost <= budget + 1e-9
        assert got.loss == pytest.approx(want_loss, rel=1e-9, abs=1e-12)


def test_budget_is_respected_exactly_and_used():
    rng = np.random.default_rng(1)
    options = [_layer(f"l{i}", 384, 1536, np.sort(rng.random(384))[::-1] ** (1 + i % 3)) for i in range(12)]
    dense = sum(o.dense_cost for o in options)
    for frac in (0.2, 0.5, 0.7):
        a = allocate(options, frac * dense)
        cost = sum(r * (384 + 1536) if r else 384 * 1536 for r in a.ranks.values())
        assert cost == pytest.approx(a.cost)
        assert cost <= frac * dense
        # the greedy fill leaves less than the smallest step of any layer unspent
        assert frac * dense - cost < 8 * (384 + 1536)


def test_rank_goes_where_the_error_is():
    # a fast-decaying (low-rank) spectrum and a flat one, same shape: at half the budget the flat
    # layer needs the rank; the low-rank layer gets little and loses almost nothing
    k = n = 256
    steep = 0.5 ** np.arange(k)
    flat = np.ones(k)
    opts = [_layer("steep", k, n, steep), _layer("flat", k, n, flat)]
    a = allocate(opts, 0.5 * 2 * k * n)
    assert a.ranks["steep"] <= 16
    assert a.ranks["flat"] == 0 or a.ranks["flat"] >= 100
    # uniform would put the same rank on both: the knapsack's predicted loss is lower
    r_uniform = int(0.5 * k * n / (k + n)) // 8 * 8
    uniform_loss = sum(float(tail_curve([s], [float(np.sum(s**2))], np.array([r_uniform]))[0])
                       for s in (steep, flat))
    assert a.loss < uniform_loss
    # sensitivity weights move rank the other way round
    opts = [_layer("a", k, n, flat, weight=100.0), _layer("b", k, n, flat, weight=1.0)]
    a = allocate(opts, 0.75 * 2 * k * n)
    ra, rb = (a.ranks[x] or k for x in "ab")  # dense counts as full rank
    assert ra > rb


def test_infeasible_budget_raises():
    opts = [_layer("x", 64, 64, np.ones(64))]
    with pytest.raises(ValueError, match="below the smallest reachable"):
        allocate(opts, 0.5 * min_cost(opts))


def test_rank_grid():
    assert list(rank_grid(64, 64, 8)) == [8, 16, 24]  # break-even 32: rank 32 saves nothing
    assert list(rank_grid(10, 6, 8)) == [1, 2, 3]  # break-even 3.75: too small for one multiple
    assert rank_grid(1, 1, 8).size == 0
    g = rank_grid(8192, 8192, 8, max_options=64)
    assert len(g) <= 64 and g[0] % 8 == 0 and g[-1] < 4096


def test_threshold_rule_meets_the_budget_and_follows_the_spectra():
    k = n = 128
    steep = 0.7 ** np.arange(k)
    flat = np.linspace(1.0, 0.5, k)
    opts = [_layer("steep", k, n, steep), _layer("flat", k, n, flat)]
    budget = 0.6 * 2 * k * n
    a = allocate_threshold(opts, budget)
    assert a.cost <= budget
    assert 0 < a.ranks["steep"] < 32  # heavy tail: most values fall under the threshold
    assert a.ranks["flat"] == 0  # a flat spectrum keeps nearly all its values: not worth factorizing
    with pytest.raises(ValueError, match="cannot reach"):
        allocate_threshold([_layer("flat", k, n, flat)], 1000.0)  # rank 8 costs 2048
