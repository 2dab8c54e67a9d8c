"""Head-dimension reduction math (``lrcompile.factorize.heads``): exact at the full head dimension,
the per-head optimum (checked against alternating least squares), biases folded exactly, and the
errors it reports equal to the errors measured on the calibration rows."""
from __future__ import annotations

import numpy as np
import pytest

from lrcompile.factorize.heads import augmented_gram, ov_spectra, qk_spectra

H, D, K, T = 3, 6, 14, 9


def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def block():
    rng = np.random.default_rng(7)
    mix = rng.normal(size=(K, K)) * np.linspace(1.5, 0.2, K)  # anisotropic inputs, as real activations are
    x = rng.normal(size=(5, T, K)) @ mix + rng.normal(size=K)  # [B, T, K], a mean offset too
    w = {n: rng.normal(size=(K, H * D)) / np.sqrt(K) for n in "qkv"}
    b = {n: rng.normal(size=H * D) * 0.3 for n in "qkv"}
    wo, bo = rng.normal(size=(H * D, K)) / np.sqrt(H * D), rng.normal(size=K) * 0.3
    return x, w, b, wo, bo


def _scores(x, wq, bq, wk, bk):
    q = (x @ wq + bq).reshape(*x.shape[:2], H, -1).transpose(0, 2, 1, 3)
    k = (x @ wk + (0 if bk is None else bk)).reshape(*x.shape[:2], H, -1).transpose(0, 2, 1, 3)
    return q @ k.transpose(0, 1, 3, 2)  # [B, H, T, T], unscaled


def _gram_aug(x):
    rows = x.reshape(-1, x.shape[-1])
    return augmented_gram(rows.T @ rows, rows.sum(0), rows.shape[0])


def _head_grams(x, a):
    return [sum(z.T @ z for z in (a[:, h] @ x)) for h in range(H)]


def _ov_out(x, a, wv, bv, wo, bo):
    v = (x @ wv + (0 if bv is None else bv)).reshape(*x.shape[:2], H, -1).transpose(0, 2, 1, 3)
    ctx = (a @ v).transpose(0, 2, 1, 3).reshape(*x.shape[:2], -1)
    return ctx @ wo + (0 if bo is None else bo)


def test_qk_is_exact_at_full_head_dimension_and_drops_the_key_bias(block):
    x, w, b, _, _ = block
    fit = qk_spectra(w["q"], b["q"], w["k"], _gram_aug(x), heads=H, damping=0.0).fit(D)
    before = _softmax(_scores(x, w["q"], b["q"], w["k"], b["k"]))
    after = _softmax(_scores(x, fit.left, fit.left_bias, fit.right, fit.right_bias))
    np.testing.assert_allclose(after, before, atol=1e-10)
    assert fit.rel_error < 1e-7


def test_ov_is_exact_at_full_head_dimension_with_the_value_bias_folded(block):
    x, w, b, wo, bo = block
    a = _softmax(np.random.default_rng(1).normal(size=(x.shape[0], H, T, T)))
    fit = ov_spectra(w["v"], b["v"], wo, bo, _head_grams(x, a), heads=H, damping=0.0).fit(D)
    assert fit.left_bias is None  # folded into the output bias
    np.testing.assert_allclose(_ov_out(x, a, fit.left, None, fit.right, fit.right_bias),
                               _ov_out(x, a, w["v"], b["v"], wo, bo), atol=1e-10)


@pytest.mark.parametrize("r", [1, 3, 5])
def test_reported_errors_are_the_errors_on_the_calibration_rows(block, r):
    x, w, b, wo, bo = block
    qk = qk_spectra(w["q"], b["q"], w["k"], _gram_aug(x), heads=H, damping=0.0).fit(r)
    # the score error over every (query row, key row) pair of the calibration rows, batches mixed,
    # against the scores without the key bias (softmax-invariant, dropped exactly)
    rows = x.reshape(-1, K)
    full0 = np.stack([(rows @ w["q"][:, h * D:(h + 1) * D] + b["q"][h * D:(h + 1) * D])
                      @ (rows @ w["k"][:, h * D:(h + 1) * D]).T for h in range(H)])
    full1 = np.stack([(rows @ qk.left[:, h * r:(h + 1) * r] + qk.left_bias[h * r:(h + 1) * r])
                      @ (rows @ qk.right[:, h * r:(h + 1) * r] + qk.right_bias[h * r:(h + 1) * r]).T
                      for h in range(H)])
    assert np.linalg.norm(full1 - full0) / np.linalg.norm(full0) == pytest.approx(qk.rel_error, rel=1e-6)
    a = _softmax(np.random.default_rng(2).normal(size=(x.shape[0], H, T, T)) * 2)
    ov = ov_spectra(w["v"], b["v"], wo, bo, _head_grams(x, a), heads=H, damping=0.0).fit(r)
    # per head, the output error of that head's contribution, summed over heads (the math's metric)
    err = tot = 0.0
    for h in range(H):
        cols, new = slice(h * D, (h + 1) * D), slice(h * r, (h + 1) * r)
        z = (a[:, h] @ x).reshape(-1, K)
        ref = z @ w["v"][:, cols] @ wo[cols]
        err += np.linalg.norm(z @ ov.left[:, new] @ ov.right[new] - ref) ** 2
        tot += np.linalg.norm(ref) ** 2
    assert np.sqrt(err / tot) == pytest.approx(ov.rel_error, rel=1e-6)


def _als(z, m, r, iters=150, seed=0):
    """Brute force: min over rank-r B C of ||Z (M - B C)||_F by alternating least squares from a
    random start (no spurious local minima for this problem; run to convergence)."""
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(m.shape[0], r))
    target = z @ m
    for _ in range(iters):
        c = np.linalg.lstsq(z @ b, target, rcond=None)[0]
        b = np.linalg.lstsq(np.kron(c.T, z), target.T.reshape(-1), rcond=None)[0].reshape(m.shape[0], r, order="F")
    c = np.linalg.lstsq(z @ b, target, rcond=None)[0]
    return np.linalg.norm(z @ (m - b @ c))


@pytest.mark.parametrize("r", [1, 2, 4])
def test_each_head_matches_a_brute_force_least_squares_optimum(block, r):
    x, w, _, wo, _ = block
    a = _softmax(np.random.default_rng(3).normal(size=(x.shape[0], H, T, T)))
    grams = _head_grams(x, a)
    sp = ov_spectra(w["v"], None, wo, None, grams, heads=H, damping=0.0)
    fit = sp.fit(r)
    for h in range(H):
        cols, new = slice(h * D, (h + 1) * D), slice(h * r, (h + 1) * r)
        z = (a[:, h] @ x).reshape(-1, K)
        m = w["v"][:, cols] @ wo[cols]
        ours = np.linalg.norm(z @ (m - fit.left[:, new] @ fit.right[new]))
        brute = min(_als(z, m, r, seed=s) for s in range(2))
        assert ours <= brute * (1 + 1e-6) + 1e-9, f"head {h}: {ours} > brute force {brute}"
        assert ours >= brute * (1 - 1e-3) - 1e-9  # and the brute force finds the same optimum


def test_error_curve_is_monotone_and_zero_at_full(block):
    x, w, b, _, _ = block
    sp = qk_spectra(w["q"], b["q"], w["k"], _gram_aug(x), heads=H)
    e = sp.err2(np.arange(1, D + 1))
    assert np.all(np.diff(e) <= 1e-12) and e[-1] < 1e-12 and e[0] > 0.01


def test_bad_shapes_are_refused(block):
    x, w, b, wo, bo = block
    with pytest.raises(ValueError, match="heads"):
        qk_spectra(w["q"], b["q"], w["k"], _gram_aug(x), heads=4)
    with pytest.raises(ValueError, match="output bias"):
        ov_spectra(w["v"], b["v"], wo, None, [np.eye(K)] * H, heads=H)
    with pytest.raises(ValueError, match="head dimension"):
        qk_spectra(w["q"], b["q"], w["k"], _gram_aug(x), heads=H).fit(D + 1)
