"""Hidden-channel pruning math (lrcompile.factorize.channels) against brute-force least squares."""
import itertools

import numpy as np
import pytest

from lrcompile.factorize.channels import keep_count, prune_channels


def _hidden(rows=600, n=24, m=10, seed=0):
    """Correlated, non-negative-ish hidden activations (like post-GELU) and a down layer."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 8))
    h = np.maximum(x @ rng.standard_normal((8, n)) + 0.3 * rng.standard_normal((rows, n)), 0) + 0.05
    h[:, 3] *= 1e-3  # a nearly dead channel
    return h, rng.standard_normal((n, m)), rng.standard_normal(m)


def _stats(h):
    return h.T @ h, h.sum(0), len(h)


def test_full_keep_is_the_original_exactly():
    h, w, b = _hidden()
    cp = prune_channels(*_stats(h), w, b, keep=h.shape[1])
    assert np.array_equal(cp.keep, np.arange(h.shape[1]))
    assert np.array_equal(cp.weight, w) and np.array_equal(cp.bias, b) and cp.rel_error == 0.0


@pytest.mark.parametrize("with_bias", [True, False])
def test_refit_is_the_least_squares_optimum_and_its_error_is_reported(with_bias):
    h, w, b = _hidden()
    b = b if with_bias else None
    cp = prune_channels(*_stats(h), w, b, keep=12, damping=0.0)
    target = h @ w + (b if with_bias else 0)
    design = h[:, cp.keep]
    if with_bias:
        design = np.hstack([design, np.ones((len(h), 1))])
    sol = np.linalg.lstsq(design, target, rcond=None)[0]
    np.testing.assert_allclose(cp.weight, sol[:12], rtol=1e-6, atol=1e-8)
    if with_bias:
        np.testing.assert_allclose(cp.bias, sol[12], rtol=1e-6, atol=1e-8)
    else:
        assert cp.bias is None
    got = h[:, cp.keep] @ cp.weight + (cp.bias if with_bias else 0)
    measured = np.linalg.norm(got - target) / np.linalg.norm(target)
    assert cp.rel_error == pytest.approx(measured, rel=1e-6)
    assert list(cp.keep) == sorted(cp.keep) and len(set(cp.keep)) == 12


def test_selection_beats_most_subsets_and_drops_the_dead_channel():
    h, w, b = _hidden(n=12, m=6, seed=3)
    cp = prune_channels(*_stats(h), w, b, keep=6, damping=0.0)
    assert 3 not in cp.keep
    errs = []
    target = h @ w + b
    for s in itertools.combinations(range(12), 6):
        d = np.hstack([h[:, s], np.ones((len(h), 1))])
        r = d @ np.linalg.lstsq(d, target, rcond=None)[0] - target
        errs.append(np.linalg.norm(r) / np.linalg.norm(target))
    errs = np.sort(errs)
    assert cp.rel_error <= errs[int(0.02 * len(errs))]  # within the best 2% of all 924 subsets


def test_keep_count_and_bad_arguments():
    assert keep_count(1536, 0.5, 8) == 768
    assert keep_count(100, 0.55, 8) == 48
    assert keep_count(10, 0.01, 8) == 8 and keep_count(10, 0.01) == 1
    h, w, b = _hidden()
    with pytest.raises(ValueError, match="keep"):
        prune_channels(*_stats(h), w, b, keep=0)
    with pytest.raises(ValueError, match="in_sum"):
        prune_channels(h.T @ h, None, len(h), w, b, keep=4)


def test_prune_curve_matches_refits_on_its_path():
    """The curve's errors are the exact refit errors of prune_channels at the sizes the path passes
    through (where the step is not cut), falling to 0 at full width and rising as channels go."""
    from lrcompile.factorize.channels import prune_channels, prune_curve

    rng = np.random.default_rng(3)
    h = np.maximum(rng.standard_normal((400, 48)) @ rng.standard_normal((48, 48)), 0)
    w, b = rng.standard_normal((48, 10)), rng.standard_normal(10)
    g, s = h.T @ h, h.sum(0)
    sizes, err2 = prune_curve(g, s, len(h), w, b, smallest=4)
    assert sizes[-1] == 48 and err2[-1] == 0 and sizes[0] == 4
    assert np.all(np.diff(sizes) > 0) and np.all(np.diff(err2) <= 1e-12)  # more channels, less error
    for k in sizes[:-1][::5]:
        direct = prune_channels(g, s, len(h), w, b, int(k)).rel_error ** 2
        assert np.isclose(err2[list(sizes).index(k)], direct, rtol=1e-3, atol=1e-9)
