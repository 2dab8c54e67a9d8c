"""Streaming calibration statistics equal the all-at-once float64 ones."""
from __future__ import annotations

import numpy as np
import pytest

from lrcompile.factorize.stats import FisherAccumulator, StatsAccumulator, merge

K, N = 24, 10


def _data(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((K, K)) * np.logspace(0, -3, K)[:, None]
    x = (rng.standard_normal((rows, K)) @ mix + 0.3).astype(np.float32)  # correlated, non-zero mean
    b = rng.standard_normal((K, N)).astype(np.float32)
    return x, x @ b, b


def _reference(x: np.ndarray, y: np.ndarray) -> dict:
    x, y = x.astype(np.float64), y.astype(np.float64)
    return {
        "count": x.shape[0], "gram": x.T @ x, "abs_sum": np.abs(x).sum(0), "in_sum": x.sum(0),
        "out_sum": y.sum(0), "out_gram": y.T @ y,
    }


def _check(stats, ref: dict) -> None:
    assert stats.count == ref["count"]
    for name, want in ref.items():
        if name != "count":
            got = getattr(stats, name)
            assert np.linalg.norm(got - want) <= 1e-10 * np.linalg.norm(want), name


def test_uneven_batches_equal_all_at_once():
    x, y, _ = _data(1000)
    acc = StatsAccumulator(K, N, out_gram=True)
    cuts = [0, 1, 8, 9, 250, 251, 700, 1000]
    for lo, hi in zip(cuts, cuts[1:]):
        acc.update(x[lo:hi], y[lo:hi])
    _check(acc.result(), _reference(x, y))
    assert acc.nbytes == 8 * (K * K + 2 * K + N + N * N)


def test_mask_drops_rows_exactly_3d():
    x, y, _ = _data(6 * 20, seed=1)
    x3, y3 = x.reshape(6, 20, K), y.reshape(6, 20, N)
    lengths = np.array([20, 3, 17, 1, 9, 12])
    mask = (np.arange(20)[None, :] < lengths[:, None]).astype(np.int64)  # [batch, seq] padding mask
    x3p = np.where(mask[..., None] == 1, x3, 1e3)  # garbage in the padding must not leak in
    acc = StatsAccumulator(K, N, out_gram=True)
    acc.update(x3p[:2], y3[:2], mask=mask[:2])
    acc.update(x3p[2:], y3[2:], mask=mask[2:])
    keep = mask.reshape(-1) == 1
    _check(acc.result(), _reference(x[keep], y[keep]))


def test_broadcast_mask_and_merge():
    x, y, _ = _data(400, seed=2)
    a, b = StatsAccumulator(K, N, out_gram=True), StatsAccumulator(K, N, out_gram=True)
    x3, y3 = x.reshape(4, 100, K), y.reshape(4, 100, N)
    seq_mask = (np.arange(100) < 60)[None, :]  # [1, seq]: broadcast over the batch
    a.update(x3[:3], y3[:3], mask=seq_mask)
    b.update(x3[3:], y3[3:], mask=seq_mask)
    both = merge(a, b)
    _check(both.result(), _reference(x3[:, :60].reshape(-1, K), y3[:, :60].reshape(-1, N)))
    assert a.count == 180  # merge leaves its inputs alone
    with pytest.raises(ValueError):
        merge(a, StatsAccumulator(K, N))


def test_result_is_a_snapshot_and_symmetric():
    x, _, _ = _data(50, seed=3)
    acc = StatsAccumulator(K)
    acc.update(x)
    first = acc.result()
    acc.update(x)
    assert first.count == 50 and acc.result().count == 100
    assert np.array_equal(first.gram, first.gram.T)
    assert first.out_gram is None and first.fisher is None


def test_chunked_update_matches(monkeypatch):
    import lrcompile.factorize.stats as stats_mod

    x, y, _ = _data(300, seed=4)
    monkeypatch.setattr(stats_mod, "_CHUNK_ELEMENTS", 7 * N)  # force many small chunks
    acc = StatsAccumulator(K, N, out_gram=True)
    acc.update(x, y)
    _check(acc.result(), _reference(x, y))


def test_fisher_sums_squared_gradients():
    rng = np.random.default_rng(5)
    grads = rng.standard_normal((7, K, N))
    acc = FisherAccumulator(K, N)
    acc.add_grad(grads[0])
    acc.add_grad(grads[1:])  # per-sample gradients, each squared separately
    stats = acc.result()
    np.testing.assert_allclose(stats.fisher, (grads**2).sum(0), rtol=1e-12)
    assert acc.grad_batches == 7 and stats.gram is None
    both = merge(acc, acc)
    np.testing.assert_allclose(both.result().fisher, 2 * (grads**2).sum(0), rtol=1e-12)


def test_bad_shapes_raise():
    acc = StatsAccumulator(K, N, out_gram=True)
    with pytest.raises(ValueError):
        acc.update(np.ones((3, K + 1)))
    with pytest.raises(ValueError):
        acc.update(np.ones((3, K)))  # outputs missing
    with pytest.raises(ValueError):
        StatsAccumulator(K, out_gram=True)
    with pytest.raises(ValueError):
        StatsAccumulator(K, N).add_grad(np.ones((K, N)))
