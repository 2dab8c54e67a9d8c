"""Conv decompositions (Tucker-2, CP, spatial SVD) and VBMF: exact at full rank, the metric fits
against brute force on real im2col rows of small convs, VBMF against known synthetic ranks."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from lrcompile.factorize.convdecomp import (as_matrix, cp, energy_rank, mode_spectrum, reconstruct, reduced_rank,
                                            refit_last, spatial, tucker2, unfolding, vbmf_rank)
from lrcompile.factorize.patches import ConvGeometry, im2col


def _weight(o=12, i=6, kh=3, kw=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((o, i, kh, kw)) * np.linspace(2, 0.2, i)[None, :, None, None]).astype(np.float32)


def _rows(i=6, kh=3, kw=3, n=3, hw=9, seed=1):
    """Real receptive-field rows of correlated feature maps (im2col of a padded 3 x 3 conv)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((i, i))
    x = np.einsum("ij,njhw->nihw", mix, rng.standard_normal((n, i, hw, hw)))
    x[:, 0] += 3.0  # a channel with a large mean
    return im2col(x, ConvGeometry(kernel=(kh, kw), pads=(1, 1, 1, 1)))[0]


def _data_error(x, b, approx):
    return np.linalg.norm(x @ (b - approx)) / np.linalg.norm(x @ b)


@pytest.mark.parametrize("gram", [False, True])
def test_tucker2_is_exact_at_full_ranks(gram):
    w = _weight()
    x = _rows()
    f = tucker2(w, 6, 12, x.T @ x if gram else None)
    assert f.ranks == (6, 12)
    assert f.rel_error < 1e-5
    np.testing.assert_allclose(f.weight, w, atol=1e-4)


def test_spatial_is_exact_at_full_rank_and_cp_at_the_tensors_rank():
    w = _weight(o=5, i=4, kh=3, kw=2)
    f = spatial(w, 10**6)
    assert f.ranks == (min(4 * 3, 5 * 2),)
    np.testing.assert_allclose(f.weight, w, atol=1e-5)
    rng = np.random.default_rng(3)
    fac = [rng.standard_normal((d, 4)) for d in (7, 3, 3, 9)]
    wc = np.einsum("ir,hr,wr,or->oihw", *fac).astype(np.float32)
    g = cp(wc, 4)
    assert g.rel_error < 1e-4
    np.testing.assert_allclose(g.weight, wc, atol=1e-3 * np.abs(wc).max())


def test_reduced_ranks_cost_error_monotonically_and_errors_match_the_reconstruction():
    w = _weight()
    errs = [tucker2(w, r, 2 * r).rel_error for r in (1, 2, 4, 6)]
    assert errs == sorted(errs, reverse=True) and errs[0] > 0.3
    for f in (tucker2(w, 3, 5), cp(w, 6), spatial(w, 7)):
        b = as_matrix(w.astype(np.float64))
        assert f.rel_error == pytest.approx(np.linalg.norm(b - as_matrix(f.weight)) / np.linalg.norm(b), rel=1e-6)


def test_metric_fits_report_the_output_error_on_the_data_and_beat_data_free():
    w = _weight()
    x = _rows()
    gram = x.T @ x
    b = as_matrix(w.astype(np.float64))
    for free, fitted in ((tucker2(w, 3, 5), tucker2(w, 3, 5, gram)), (cp(w, 6), cp(w, 6, gram)),
                         (spatial(w, 6), spatial(w, 6, gram))):
        err = _data_error(x, b, as_matrix(fitted.weight.astype(np.float64)))
        assert fitted.objective_error == pytest.approx(err, rel=1e-4)
        assert err < _data_error(x, b, as_matrix(free.weight.astype(np.float64)))


def test_tucker2_core_and_output_factor_are_the_least_squares_optimum_given_the_input_factor():
    """Brute force: with ``U_in`` fixed and ``R_out = O`` the fit is least squares of the conv's
    outputs on the data rows; ours must reach that optimum."""
    w = _weight()
    x = _rows()
    f = tucker2(w, 3, 12, x.T @ x)
    p = np.kron(f.parts[0].astype(np.float64), np.eye(9))
    b = as_matrix(w.astype(np.float64))
    z = np.linalg.lstsq(x @ p, x @ b, rcond=None)[0]
    best = _data_error(x, b, p @ z)
    assert _data_error(x, b, as_matrix(f.weight.astype(np.float64))) == pytest.approx(best, rel=1e-4)


def test_rank_constrained_fit_with_an_output_metric_beats_a_general_optimizer():
    """``min ||L^T (B - P X Y) R||`` over rank-2 ``X Y``: a BFGS search from several starts (and
    from ours, perturbed) finds nothing lower than the closed form."""
    rng = np.random.default_rng(5)
    k, p_, n, r = 10, 5, 6, 2
    xr = rng.standard_normal((200, k)) @ rng.standard_normal((k, k))
    g = xr.T @ xr
    h_root = rng.standard_normal((n, n))
    h = h_root @ h_root.T + np.eye(n)
    p = rng.standard_normal((k, p_))
    b = rng.standard_normal((k, n))
    lg, lh = np.linalg.cholesky(g), np.linalg.cholesky(h)

    def obj(v):
        xx, yy = v[:p_ * r].reshape(p_, r), v[p_ * r:].reshape(r, n)
        return float(np.sum((lg.T @ (b - p @ xx @ yy) @ lh) ** 2))

    x0, y0 = reduced_rank(p, b, r, g, h)
    ours = obj(np.concatenate([x0.ravel(), y0.ravel()]))
    starts = [rng.standard_normal(p_ * r + r * n) for _ in range(4)]
    starts.append(np.concatenate([x0.ravel(), y0.ravel()]) + 0.1 * rng.standard_normal(p_ * r + r * n))
    found = min(minimize(obj, s, method="BFGS", options={"gtol": 1e-10, "maxiter": 5000}).fun for s in starts)
    assert ours <= found * (1 + 1e-6) + 1e-9
    # and the output metric matters: the unweighted solution is worse in the weighted objective
    xu, yu = reduced_rank(p, b, r, g)
    assert obj(np.concatenate([xu.ravel(), yu.ravel()])) > ours * 1.001


def test_last_factor_refits_are_least_squares_on_the_data():
    x = _rows()
    rng = np.random.default_rng(2)
    p = rng.standard_normal((x.shape[1], 7))
    b = rng.standard_normal((x.shape[1], 4))
    z = refit_last(p, b, x.T @ x)
    np.testing.assert_allclose(z, np.linalg.lstsq(x @ p, x @ b, rcond=None)[0], rtol=1e-4, atol=1e-6)


def test_vbmf_recovers_a_known_rank_and_keeps_nothing_of_noise():
    rng = np.random.default_rng(0)
    for (big_l, big_m, r) in ((60, 120, 7), (120, 60, 4), (50, 50, 10)):
        y = rng.standard_normal((big_l, r)) @ rng.standard_normal((r, big_m)) + rng.standard_normal((big_l, big_m))
        assert vbmf_rank(y) == r
    assert vbmf_rank(rng.standard_normal((40, 90))) == 0


def test_vbmf_per_mode_finds_a_tucker_weights_mode_ranks():
    rng = np.random.default_rng(4)
    core = rng.standard_normal((5, 3, 3, 3)) * 4
    w = np.einsum("bahw,ia,ob->oihw", core, np.linalg.qr(rng.standard_normal((24, 3)))[0] * 6,
                  np.linalg.qr(rng.standard_normal((32, 5)))[0] * 6)
    w = w + 0.05 * rng.standard_normal(w.shape)
    assert (vbmf_rank(unfolding(w, 1)), vbmf_rank(unfolding(w, 0))) == (3, 5)
    assert energy_rank(mode_spectrum(w, 0), 0.999) == 5


def test_decompositions_are_deterministic_and_keep_the_dtype():
    w = _weight()
    for make in (lambda: tucker2(w, 3, 5), lambda: cp(w, 5, seed=0), lambda: spatial(w, 4)):
        a, b = make(), make()
        assert all(p.dtype == np.float32 for p in a.parts)
        assert all(np.array_equal(p, q) for p, q in zip(a.parts, b.parts))
    np.testing.assert_allclose(reconstruct("tucker2", tucker2(w, 6, 12).parts), w, atol=1e-4)
