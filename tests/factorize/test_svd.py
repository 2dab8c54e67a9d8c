"""Truncated SVD (exact and randomized), rank policies and the "svd" factorizer against numpy."""
from __future__ import annotations

import numpy as np
import pytest

from lrcompile.factorize import METHODS, Factorization, RankPolicy, break_even_rank, factorize
from lrcompile.factorize.svd import (
    choose_rank,
    factor_from_svd,
    factorize_svd,
    singular_values,
    truncated_svd,
)


def weight(k: int, n: int, dtype=np.float32, seed: int = 0) -> np.ndarray:
    """A weight-like matrix: Gaussian noise (std 0.02) plus a decaying low-rank part."""
    rng = np.random.default_rng(seed)
    r = min(k, n) // 4
    low = (rng.standard_normal((k, r)) / np.arange(1, r + 1)) @ rng.standard_normal((r, n)) * 0.01
    return (0.02 * rng.standard_normal((k, n)) + low).astype(dtype)


def decaying(k: int, n: int, power: float = 0.5, seed: int = 1) -> np.ndarray:
    """Random orthogonal U, V with ``s_i = i^-power`` (a trained-weight-like spectrum)."""
    rng = np.random.default_rng(seed)
    m = min(k, n)
    u = np.linalg.qr(rng.standard_normal((k, m)))[0]
    v = np.linalg.qr(rng.standard_normal((n, m)))[0]
    return ((u * np.arange(1, m + 1) ** -power) @ v.T).astype(np.float32)


def rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref))


def exact_error(b: np.ndarray, r: int) -> float:
    s = np.linalg.svd(np.asarray(b, np.float64), compute_uv=False)
    return float(np.sqrt(np.sum(s[r:] ** 2) / np.sum(s**2)))


# ----------------------------------------------------------------------------- exact solver


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(60, 40), (40, 70)])
def test_exact_matches_numpy(dtype, shape):
    b = weight(*shape, dtype=dtype)
    b64 = b.astype(np.float64)
    nu, ns, nvt = np.linalg.svd(b64, full_matrices=False)
    r = 12
    u, s, vt = truncated_svd(b, r, solver="exact")
    assert u.shape == (shape[0], r) and s.shape == (r,) and vt.shape == (r, shape[1])
    assert u.dtype == s.dtype == vt.dtype == np.float64
    np.testing.assert_allclose(s, ns[:r], rtol=1e-10)
    np.testing.assert_allclose(np.abs(u), np.abs(nu[:, :r]), atol=1e-8)
    np.testing.assert_allclose(np.abs(vt), np.abs(nvt[:r]), atol=1e-8)
    assert rel((u * s) @ vt, (nu[:, :r] * ns[:r]) @ nvt[:r]) < 1e-10
    np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-10)
    np.testing.assert_allclose(singular_values(b), ns, rtol=1e-10)


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_sign_convention_largest_entry_of_u_positive(solver):
    u, _, _ = truncated_svd(weight(80, 64), 10, solver=solver)
    top = u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])]
    assert np.all(top > 0)


def test_rank_is_capped_and_validated():
    b = weight(30, 20)
    u, s, vt = truncated_svd(b, 100, solver="exact")
    assert s.shape == (20,)
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(b, 0)
    with pytest.raises(ValueError, match="solver"):
        truncated_svd(b, 4, solver="lanczos")
    bad = b.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        truncated_svd(bad, 4)
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd(b[0], 4)


# ----------------------------------------------------------------------------- randomized solver


def test_randomized_within_one_percent_of_exact():
    b = decaying(512, 384, power=0.5)
    r = 64
    f = factorize_svd(b, RankPolicy(rank=r, multiple=1), solver="randomized")
    assert f.info["solver"] == "randomized"
    assert f.rel_error <= 1.01 * exact_error(b, r)
    s_exact = np.linalg.svd(b.astype(np.float64), compute_uv=False)
    s_rand = singular_values(b, solver="randomized", rank=r)
    np.testing.assert_allclose(s_rand[: r // 2], s_exact[: r // 2], rtol=1e-3)
    assert np.all(s_rand <= s_exact[:r] * (1 + 1e-6))  # Ritz values are lower bounds


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_randomized_tall_and_wide(shape):
    b = weight(*shape)
    u, s, vt = truncated_svd(b, 20, solver="randomized")
    assert u.shape == (shape[0], 20) and vt.shape == (20, shape[1])
    np.testing.assert_allclose(u.T @ u, np.eye(20), atol=1e-5)
    np.testing.assert_allclose(vt @ vt.T, np.eye(20), atol=1e-5)
    assert rel((u * s) @ vt, b) <= 1.01 * exact_error(b, 20)


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_deterministic_byte_identical(solver):
    b = weight(256, 192, seed=3)
    one = factorize_svd(b, RankPolicy(rank=32), solver=solver)
    two = factorize_svd(b.copy(), RankPolicy(rank=32), solver=solver)
    assert one.a.tobytes() == two.a.tobytes() and one.c.tobytes() == two.c.tobytes()
    assert one.rel_error == two.rel_error
    u1, s1, v1 = truncated_svd(b, 32, solver=solver, seed=5)
    u2, s2, v2 = truncated_svd(b, 32, solver=solver, seed=5)
    assert u1.tobytes() == u2.tobytes() and s1.tobytes() == s2.tobytes() and v1.tobytes() == v2.tobytes()


@pytest.mark.parametrize("solver", ["exact", "randomized"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_full_rank_reconstructs(solver, dtype):
    b = weight(96, 64, dtype=dtype)
    f = factorize_svd(b, RankPolicy(rank=64), solver=solver)
    assert f.a.dtype == f.c.dtype == dtype
    assert rel(f.dense(), b.astype(np.float64)) < 1e-5
    assert f.rel_error < 1e-5


@pytest.mark.parametrize("solver", ["exact", "randomized"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rel_error_is_the_direct_error(solver, dtype):
    b = weight(120, 90, dtype=dtype, seed=2)
    f = factorize_svd(b, RankPolicy(rank=17, multiple=1), solver=solver)
    direct = rel(f.a.astype(np.float64) @ f.c.astype(np.float64), b.astype(np.float64))
    assert f.rel_error == pytest.approx(direct, rel=1e-5)
    assert f.objective_error == f.rel_error
    assert f.rel_error <= 1.01 * exact_error(b, 17)


def test_randomized_factors_of_a_constant_weight_are_constant():
    """A weight filled with one value (ONNX's backend test models: ConstantOfShape) has rank 1 and
    is exact in the sketch: its factors are exact too, every column of the product bit-equal, so a
    Softmax over logits of 1e12 stays uniform (float32 noise in the factors made one class 0)."""
    b = np.full((1024, 1000), 0.01, np.float32)
    f = factorize_svd(b, RankPolicy(energy=1.0, multiple=8), solver="randomized")
    assert f.rank == 8 and f.info["final"] == "qr+gesdd"
    assert len(np.unique(f.a[:, 0])) == 1 and len(np.unique(f.c[0])) == 1
    x = np.random.default_rng(0).standard_normal((2, 1024)).astype(np.float32) * 1e9
    y = (x @ f.a) @ f.c
    assert (y == y[:, :1]).all()
    assert rel(y, x.astype(np.float64) @ b.astype(np.float64)) < 1e-6


# ----------------------------------------------------------------------------- rank policies


S2 = np.array([50.0, 30.0, 10.0, 5.0, 3.0, 2.0])  # squared singular values, total 100
S = np.sqrt(S2)


def test_ratio_rounds_down_to_multiple():
    assert choose_rank(RankPolicy(ratio=0.5, multiple=1), S, 100.0, 64, 64) == 16
    assert choose_rank(RankPolicy(ratio=0.3, multiple=1), S, 100.0, 64, 64) == 9
    assert choose_rank(RankPolicy(ratio=0.3, multiple=8), S, 100.0, 64, 64) == 8
    assert choose_rank(RankPolicy(ratio=0.01, multiple=8), S, 100.0, 64, 64) == 1  # never 0
    # a budget under one multiple (small layer) keeps floor(budget): never over budget
    assert choose_rank(RankPolicy(ratio=0.2, multiple=8), S, 100.0, 64, 64) == 6
    assert choose_rank(RankPolicy(ratio=0.01, multiple=1), S, 100.0, 64, 64) == 1


@pytest.mark.parametrize("k,n,mult", [(64, 64, 8), (768, 3072, 8), (100, 7, 1), (1000, 999, 1)])
def test_ratio_stays_within_break_even(k, n, mult):
    r = choose_rank(RankPolicy(ratio=1.0, multiple=mult), np.empty(0), 1.0, k, n)
    assert 1 <= r <= break_even_rank(k, n)
    r = choose_rank(RankPolicy(ratio=0.9, multiple=mult), np.empty(0), 1.0, k, n)
    assert r < break_even_rank(k, n)


def test_energy_and_max_error_round_up():
    assert choose_rank(RankPolicy(energy=0.8, multiple=1), S, 100.0, 64, 64) == 2
    assert choose_rank(RankPolicy(energy=0.81, multiple=1), S, 100.0, 64, 64) == 3
    assert choose_rank(RankPolicy(energy=0.81, multiple=4), S, 100.0, 64, 64) == 4
    # tails after r = 1..: 50, 20, 10, 5, 2, 0
    assert choose_rank(RankPolicy(max_error=0.3, multiple=1), S, 100.0, 64, 64) == 4
    assert choose_rank(RankPolicy(max_error=np.sqrt(0.1), multiple=1), S, 100.0, 64, 64) == 3
    assert choose_rank(RankPolicy(max_error=0.0, multiple=1), S, 100.0, 6, 6) == 6
    assert choose_rank(RankPolicy(energy=1.0, multiple=1), S, 100.0, 6, 6) == 6


def test_caps():
    assert choose_rank(RankPolicy(rank=1000), S, 100.0, 64, 32) == 32
    assert choose_rank(RankPolicy(rank=5), S, 100.0, 64, 32) == 5
    assert choose_rank(RankPolicy(energy=0.99, multiple=8), S, 100.0, 6, 6) == 6
    assert choose_rank(RankPolicy(ratio=1.0, multiple=1), S, 100.0, 6, 6) == 3
    assert choose_rank(RankPolicy(energy=0.5), np.zeros(6), 0.0, 6, 6) >= 1  # zero matrix


def test_partial_spectrum():
    s = S[:2]  # only the leading values are known; total energy 100
    assert choose_rank(RankPolicy(energy=0.8, multiple=1), s, 100.0, 64, 64) == 2
    assert choose_rank(RankPolicy(energy=0.85, multiple=1), s, 100.0, 64, 64) == 3  # not proven
    assert choose_rank(RankPolicy(max_error=0.1, multiple=8), s, 100.0, 64, 64) == 3
    assert choose_rank(RankPolicy(max_error=0.1, multiple=8), s, 100.0, 2, 64) == 2  # capped


# ----------------------------------------------------------------------------- factorize_svd


@pytest.mark.parametrize("solver", ["exact", "randomized"])
@pytest.mark.parametrize("policy", [RankPolicy(energy=0.9), RankPolicy(max_error=0.4)])
def test_spectral_policies_keep_their_promise(solver, policy):
    b = decaying(600, 520, power=0.6, seed=4)
    f = factorize_svd(b, policy, solver=solver)
    ref = factorize_svd(b, policy, solver="exact")
    limit = np.sqrt(1 - policy.energy) if policy.energy is not None else policy.max_error
    assert f.rel_error <= limit + 1e-6
    assert f.rank % 8 == 0 and ref.rank <= f.rank <= ref.rank + 8
    assert rel(f.dense(), b.astype(np.float64)) == pytest.approx(f.rel_error, rel=1e-5)
    if solver == "randomized":
        assert f.info["solver"] == "randomized" and f.info["rank_search_sketch"] >= f.rank


def test_spectral_policy_doubles_the_sketch():
    b = decaying(600, 520, power=0.3, seed=5)  # flat: the first sketch (72 values) is too small
    f = factorize_svd(b, RankPolicy(max_error=0.5), solver="randomized")
    assert f.info["rank_search_sketch"] > 72 and f.rel_error <= 0.5
    assert len(f.singular_values) == f.info["rank_search_sketch"]


def test_factorization_fields():
    b = weight(80, 60)
    f = factorize_svd(b, RankPolicy(rank=10), solver="exact")
    assert isinstance(f, Factorization) and f.method == "svd" and f.rank == 10
    assert f.a.shape == (80, 10) and f.c.shape == (10, 60) and f.bias is None
    assert f.a.flags.c_contiguous and f.c.flags.c_contiguous
    assert f.singular_values.dtype == np.float64 and f.singular_values.shape == (60,)
    assert f.info["solver"] == "exact" and f.info["seconds"] >= 0
    # balanced split: column i of A and row i of C both have norm sqrt(s_i)
    np.testing.assert_allclose(np.linalg.norm(f.a, axis=0), np.linalg.norm(f.c, axis=1), rtol=1e-5)
    g = factorize_svd(b, RankPolicy(rank=10), solver="exact", balanced=False)
    np.testing.assert_allclose(np.linalg.norm(g.c, axis=1), 1.0, rtol=1e-5)
    assert rel(g.dense(), f.dense().astype(np.float64)) < 1e-5


def test_factor_from_svd():
    b = weight(50, 40, dtype=np.float64)
    u, s, vt = np.linalg.svd(b, full_matrices=False)
    a, c = factor_from_svd(u, s, vt, 7, np.float32)
    assert a.dtype == c.dtype == np.float32 and a.shape == (50, 7) and c.shape == (7, 40)
    assert rel(a @ c, (u[:, :7] * s[:7]) @ vt[:7]) < 1e-6


def test_zero_float16_and_integer_weights():
    z = factorize_svd(np.zeros((40, 30), np.float32), RankPolicy(energy=0.9))
    assert z.rel_error == 0.0 and 1 <= z.rank <= 30 and np.all(z.dense() == 0)
    h = factorize_svd(weight(64, 48, dtype=np.float16), RankPolicy(rank=48), solver="randomized")
    assert h.a.dtype == np.float16 and h.rel_error < 1e-2
    i = factorize_svd(np.arange(12).reshape(4, 3), RankPolicy(rank=3))
    assert i.a.dtype == np.float64 and i.rel_error < 1e-12


def test_registry_entry():
    assert METHODS["svd"].load() is factorize_svd
    assert METHODS["svd"].needs == frozenset()
    b = weight(700, 600, seed=7)
    f = factorize(b, RankPolicy(ratio=0.25), "svd")  # auto: randomized at this size
    assert f.method == "svd" and f.info["solver"] == "randomized"
    assert f.rank == 80 and f.rel_error <= 1.01 * exact_error(b, 80)
    g = factorize(b, RankPolicy(ratio=0.25), solver="exact", seed=3)
    assert g.info["solver"] == "exact" and g.rank == 80
    h = factorize(b, RankPolicy(rank=16), solver="randomized", oversample=8, power_iters=1)
    assert h.info["oversample"] == 8 and h.info["power_iters"] == 1
    with pytest.raises(TypeError, match="unknown option"):
        factorize(b, RankPolicy(rank=8), "svd", oversampling=4)
