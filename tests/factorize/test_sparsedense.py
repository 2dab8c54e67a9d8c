"""Dense x sparse factorizations (factorize.sparsedense): dense x N:M (DSFormer-style ALS) and
sparse dictionaries (COMPOT orthogonal, CoSpaDi overcomplete), against the math they claim."""
from __future__ import annotations

import numpy as np
import pytest

from lrcompile.factorize.sparsedense import _omp, dense_nm, dictionary
from lrcompile.factorize.types import SparseFit


def weight(k: int, n: int, seed: int = 0, dtype=np.float64) -> np.ndarray:
    """A trained-weight-like matrix: a decaying spectrum plus noise."""
    rng = np.random.default_rng(seed)
    r = min(k, n)
    u = np.linalg.qr(rng.standard_normal((k, r)))[0]
    v = np.linalg.qr(rng.standard_normal((n, r)))[0]
    b = (u * np.arange(1, r + 1) ** -0.5) @ v.T + 0.01 * rng.standard_normal((k, n))
    return b.astype(dtype)


def inputs(k: int, rows: int = 400, seed: int = 1) -> np.ndarray:
    """Correlated inputs with a few loud channels (like a transformer's), ``[rows, K]``."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    scale = np.ones(k)
    scale[:3] = [8.0, 5.0, 3.0]
    return (rng.standard_normal((rows, k)) @ mix) * scale


def union_of_subspaces(k: int, n: int, groups: int, dim: int, seed: int = 2, orthogonal: bool = False):
    """Columns each drawn from one of ``groups`` random ``dim``-dimensional subspaces."""
    rng = np.random.default_rng(seed)
    if orthogonal:
        basis = np.linalg.qr(rng.standard_normal((k, groups * dim)))[0].reshape(k, groups, dim)
    else:
        basis = rng.standard_normal((k, groups, dim))
        basis /= np.linalg.norm(basis, axis=0)
    which = np.arange(n) % groups
    coef = rng.standard_normal((dim, n))
    return np.stack([basis[:, which[j], :] @ coef[:, j] for j in range(n)], axis=1)


def objective(b: np.ndarray, approx: np.ndarray, x: np.ndarray | None) -> float:
    """``||X (B - B')|| / ||X B||`` by hand (the Frobenius ratio without inputs)."""
    b = np.asarray(b, np.float64)
    if x is None:
        return float(np.linalg.norm(b - approx) / np.linalg.norm(b))
    return float(np.linalg.norm(x @ (b - approx)) / np.linalg.norm(x @ b))


def whitened_svd_error(b: np.ndarray, r: int, x: np.ndarray | None) -> float:
    """The best rank-r error in ``||X E||`` (undamped): the tail of the spectrum of ``R^T B``."""
    m = np.asarray(b, np.float64) if x is None else np.linalg.qr(x, mode="r") @ b
    s = np.linalg.svd(m, compute_uv=False)
    return float(np.sqrt(np.sum(s[r:] ** 2) / np.sum(s**2)))


def assert_nm(c: np.ndarray, n: int, m: int) -> None:
    k, cols = c.shape
    per_group = np.count_nonzero(c.reshape(k // m, m, cols), axis=1)
    assert per_group.max() <= n


# --- dense x N:M -------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_dense_nm_pattern_and_shapes(n, m):
    b = weight(24, 40)
    fit = dense_nm(b, 16, n=n, m=m, iters=5)
    assert isinstance(fit, SparseFit)
    assert (fit.kind, fit.method, fit.c_pattern, fit.pattern, fit.s) == ("dense-nm", "dense-nm", f"nm:{n}:{m}", None, None)
    assert fit.a.shape == (24, 16) and fit.c.shape == (16, 40) and fit.shape == (24, 40)
    assert_nm(fit.c, n, m)
    # the pattern is used, not left mostly empty
    assert np.count_nonzero(fit.c) >= 0.9 * 16 * 40 * n / m


def test_dense_nm_inner_must_be_a_multiple_of_m():
    with pytest.raises(ValueError, match="inner=18 is not a positive multiple of m=4"):
        dense_nm(weight(16, 16), 18)
    with pytest.raises(ValueError, match="n <= m"):
        dense_nm(weight(16, 16), 16, n=5, m=4)


@pytest.mark.parametrize("with_gram", [False, True])
def test_dense_nm_exact_when_the_kept_atoms_span_the_input_space(with_gram):
    # inner = 2K with 2:4 keeps K atoms per column: any K generic atoms span R^K, so B = D S
    # exactly for any B.
    k, n = 16, 40
    b = weight(k, n, seed=3)
    x = inputs(k) if with_gram else None
    fit = dense_nm(b, 2 * k, None if x is None else x.T @ x, iters=5)
    assert_nm(fit.c, 2, 4)
    assert fit.rel_error < 1e-8
    assert fit.objective_error < 1e-8


def test_dense_nm_error_falls_as_inner_grows():
    b = weight(32, 48, seed=4)
    errors = [dense_nm(b, inner, iters=10).rel_error for inner in (8, 16, 24, 32, 48)]
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]


def test_dense_nm_objective_is_the_undamped_whitened_error():
    k, n = 24, 32
    b = weight(k, n, seed=5)
    x = inputs(k)
    fit = dense_nm(b, 12, x.T @ x, iters=8)
    approx = fit.dense()
    assert fit.objective_error == pytest.approx(objective(b, approx, x), rel=1e-9)
    assert fit.rel_error == pytest.approx(objective(b, approx, None), rel=1e-9)
    # and the fit used the metric: the whitened error beats the unweighted fit's whitened error
    plain = dense_nm(b, 12, iters=8)
    assert fit.objective_error < objective(b, plain.dense(), x)
    # without a Gram the two errors are one
    assert plain.objective_error == plain.rel_error


@pytest.mark.parametrize("update_support,rule", [(False, "magnitude"), (True, "magnitude"), (True, "obs")])
def test_dense_nm_als_objective_never_increases(update_support, rule):
    b = weight(24, 40, seed=6)
    x = inputs(24)
    fit = dense_nm(b, 16, x.T @ x, iters=15, update_support=update_support, rule=rule)
    assert_nm(fit.c, 2, 4)
    h = np.array(fit.info["history"])
    assert len(h) > 3
    assert np.all(np.diff(h) <= 1e-12 * h[:-1]), h
    assert h[-1] < h[0]  # the alternation does something
    # the best iterate is returned; its damped objective is the smallest seen
    assert fit.info["damped_objective"] == pytest.approx(h.min(), rel=1e-12)


def test_dense_nm_fixed_support_keeps_the_support():
    b = weight(24, 40, seed=7)
    fixed = dense_nm(b, 16, iters=6, update_support=False)
    assert fixed.info["support_changes"] == 0
    moving = dense_nm(b, 16, iters=6)
    assert moving.info["support_changes"] > 0
    assert moving.rel_error <= fixed.rel_error


def test_dense_nm_d_step_ignores_the_whitening():
    # min_D ||L^T (B - D S)|| is solved by D = B S^+ for any invertible L (module docstring).
    rng = np.random.default_rng(8)
    b, s = rng.standard_normal((12, 30)), rng.standard_normal((6, 30))
    low = np.linalg.cholesky(inputs(12).T @ inputs(12))
    d_plain = b @ np.linalg.pinv(s)
    d_white = np.linalg.solve(low.T, np.linalg.lstsq(s.T, (low.T @ b).T, rcond=None)[0].T)
    np.testing.assert_allclose(d_white, d_plain, atol=1e-10)


def test_dense_nm_beats_truncated_svd_at_equal_storage():
    # K*inner + inner*N/2 values (+ 2 bits per kept value) against r (K + N): with a spectrum
    # that decays slowly, choosing atoms per column wins.
    k, n = 32, 96
    b = weight(k, n, seed=9)
    inner = 24
    stored = k * inner + inner * n // 2 + inner * n / 2 / 16
    r = int(stored // (k + n))
    fit = dense_nm(b, inner, iters=15)
    assert fit.rel_error < whitened_svd_error(b, r, None)


# --- dictionaries ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_gram", [False, True])
def test_orthogonal_dictionary_is_exact_with_every_atom_kept(with_gram):
    k = 20
    b = weight(k, 36, seed=10)
    x = inputs(k) if with_gram else None
    fit = dictionary(b, k, k, None if x is None else x.T @ x, iters=3)
    assert (fit.kind, fit.method, fit.c_pattern) == ("dictionary", "compot", f"cols:{k}")
    assert fit.rel_error < 1e-10 and fit.objective_error < 1e-10


@pytest.mark.parametrize("orthogonal,atoms", [(True, 16), (False, 16), (False, 40)])
def test_dictionary_keeps_at_most_s_per_column(orthogonal, atoms):
    b = weight(24, 40, seed=11)
    fit = dictionary(b, atoms, 5, iters=4, orthogonal=orthogonal)
    assert fit.a.shape == (24, atoms) and fit.c.shape == (atoms, 40)
    assert np.count_nonzero(fit.c, axis=0).max() <= 5
    assert fit.c_pattern == "cols:5"
    assert fit.method == ("compot" if orthogonal else "cospadi")


@pytest.mark.parametrize("orthogonal", [True, False])
def test_dictionary_nm_option(orthogonal):
    b = weight(24, 40, seed=12)
    fit = dictionary(b, 16, None, iters=4, orthogonal=orthogonal, nm=(2, 4))
    assert fit.c_pattern == "nm:2:4"
    assert_nm(fit.c, 2, 4)
    with pytest.raises(ValueError, match="exactly one"):
        dictionary(b, 16, 4, nm=(2, 4))
    with pytest.raises(ValueError, match="multiple of m=4"):
        dictionary(b, 18, None, nm=(2, 4), orthogonal=False)


def test_orthogonal_atoms_are_orthonormal_in_the_whitened_space():
    k = 16
    b = weight(k, 30, seed=13)
    x = inputs(k)
    fit = dictionary(b, 10, 3, x.T @ x, damping=0.0, iters=5)
    low = np.linalg.cholesky(x.T @ x)
    dw = low.T @ fit.a
    np.testing.assert_allclose(dw.T @ dw, np.eye(10), atol=1e-10)


def test_dictionary_validation():
    b = weight(16, 20)
    with pytest.raises(ValueError, match="at most K=16 atoms"):
        dictionary(b, 20, 4)
    with pytest.raises(ValueError, match="sparsity must be in"):
        dictionary(b, 8, 9)
    with pytest.raises(ValueError, match="gram is"):
        dictionary(b, 8, 2, np.eye(15))


@pytest.mark.parametrize("orthogonal", [True, False])
def test_dictionary_objective_never_increases_and_matches_by_hand(orthogonal):
    k = 24
    b = weight(k, 48, seed=14)
    x = inputs(k)
    fit = dictionary(b, 32 if not orthogonal else 16, 4, x.T @ x, iters=10, orthogonal=orthogonal)
    h = np.array(fit.info["history"])
    assert len(h) > 2 and h[-1] < h[0]
    assert np.all(np.diff(h) <= 1e-12 * h[:-1]), h
    assert fit.objective_error == pytest.approx(objective(b, fit.dense(), x), rel=1e-9)
    assert fit.rel_error == pytest.approx(objective(b, fit.dense(), None), rel=1e-9)


def test_dictionary_beats_svd_on_a_union_of_subspaces():
    # 6 subspaces of dimension 3 in R^32: 18 atoms with 3 per column describe every column,
    # while a truncated SVD with the same stored values (indices counted as half a value)
    # gets rank 6 of a rank-18 matrix.
    k, n, groups, dim = 32, 240, 6, 3
    b = union_of_subspaces(k, n, groups, dim)
    atoms, s = groups * dim, dim
    r = int((k * atoms + 1.5 * s * n) // (k + n))
    svd = whitened_svd_error(b, r, None)
    assert svd > 0.3
    over = dictionary(b, atoms, s, iters=20, orthogonal=False)
    assert over.rel_error < 0.25 * svd
    # mutually orthogonal subspaces: the orthogonal dictionary finds them (near) exactly
    b_orth = union_of_subspaces(k, n, groups, dim, orthogonal=True)
    orth = dictionary(b_orth, atoms, s, iters=20)
    assert orth.rel_error < 1e-6 < whitened_svd_error(b_orth, r, None)


def test_dictionary_beats_whitened_svd_on_a_whitened_union_of_subspaces():
    # B = L^-T U where U is a union of subspaces: the whitened weight is U.
    k, n = 24, 180
    x = inputs(k)
    low = np.linalg.cholesky(x.T @ x)
    u = union_of_subspaces(k, n, 5, 3, seed=15)
    b = np.linalg.solve(low.T, u)
    r = int((k * 15 + 1.5 * 3 * n) // (k + n))
    fit = dictionary(b, 15, 3, x.T @ x, damping=0.0, iters=20, orthogonal=False)
    # MOD from the SVD init stops in a local minimum here (0.145 against 0.579), not at 0
    assert fit.objective_error < 0.5 * whitened_svd_error(b, r, x)


def test_batched_omp_matches_a_plain_omp():
    rng = np.random.default_rng(16)
    k, atoms, n, s = 12, 30, 25, 4
    d = rng.standard_normal((k, atoms))
    d /= np.linalg.norm(d, axis=0)
    b = rng.standard_normal((k, n))
    got, got_coef = _omp(b, d, s)
    for j in range(n):
        chosen, res = [], b[:, j].copy()
        for _ in range(s):
            corr = np.abs(d.T @ res)
            corr[chosen] = -1
            chosen.append(int(np.argmax(corr)))
            coef = np.linalg.lstsq(d[:, chosen], b[:, j], rcond=None)[0]
            res = b[:, j] - d[:, chosen] @ coef
        assert list(got[j]) == chosen
        np.testing.assert_allclose(got_coef[j], np.linalg.lstsq(d[:, chosen], b[:, j], rcond=None)[0], atol=1e-10)


# --- both --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda b, g: dense_nm(b, 8, g, iters=4),
        lambda b, g: dictionary(b, 8, 3, g, iters=4),
        lambda b, g: dictionary(b, 24, 3, g, iters=4, orthogonal=False),
    ],
    ids=["dense-nm", "compot", "cospadi"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_deterministic_and_dtype_preserved(call, dtype):
    b = weight(16, 28, seed=17, dtype=dtype)
    x = inputs(16)
    one, two = call(b, x.T @ x), call(b, x.T @ x)
    assert one.a.dtype == dtype and one.c.dtype == dtype
    assert one.a.tobytes() == two.a.tobytes() and one.c.tobytes() == two.c.tobytes()
    assert one.objective_error == two.objective_error


def test_zero_weight_gives_zero_factors():
    z = np.zeros((16, 20), np.float32)
    for fit in (dense_nm(z, 8, iters=3), dictionary(z, 8, 2, iters=3), dictionary(z, 24, 2, iters=3, orthogonal=False)):
        assert not np.any(fit.dense())
        assert fit.rel_error == 0.0 and fit.objective_error == 0.0
