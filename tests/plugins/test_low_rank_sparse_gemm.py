"""LowRankSparseGemm: the fused Triton kernel (Triton's interpreter on the CPU) matches the NumPy
reference on ragged shapes, empty tiles, fp32/fp16/bf16."""
from __future__ import annotations

import numpy as np
import pytest

from lrcompile.plugins.low_rank_sparse_gemm.fmt import encode
from lrcompile.plugins.low_rank_sparse_gemm.reference import low_rank_sparse_gemm as reference


def _case(m, k, r, n, density=0.1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    a = (rng.standard_normal((k, r)) / np.sqrt(k)).astype(np.float32)
    c = (rng.standard_normal((r, n)) / np.sqrt(r)).astype(np.float32)
    s = (rng.standard_normal((k, n)) * (rng.random((k, n)) < density)).astype(np.float32)
    return x, a, c, s


torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from lrcompile.plugins.low_rank_sparse_gemm.kernel import DeviceTiles, low_rank_sparse_gemm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: ragged (rows, K, rank, N); ranks 7 and 19 are no power of two
SHAPES = [(5, 37, 7, 23), (33, 70, 19, 50), (1, 96, 16, 64)]


def _run(x, a, c, s, dtype, tile=(32, 32), **kw):
    t = [torch.from_numpy(v).to(device=DEVICE, dtype=dtype) for v in (x, a, c)]
    return low_rank_sparse_gemm(*t, DeviceTiles(encode(s, tile), dtype, DEVICE), **kw)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_the_reference(shape):
    x, a, c, s = _case(*shape)
    s[: min(32, shape[1]), :] *= (np.arange(shape[3]) >= 32)  # some tiles empty, some not
    y = _run(x, a, c, s, torch.float32).cpu().numpy()
    want = reference(x, a, c, s)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    # the sparse part matters: without it the answer is measurably different
    assert np.abs(want - reference(x, a, c, np.zeros_like(s))).max() > 0.1


@pytest.mark.parametrize("tile", [(16, 16), (16, 64)])
def test_other_tiles_and_leading_axes(tile):
    x, a, c, s = _case(2 * 9, 40, 11, 70, seed=4)
    x3 = x.reshape(2, 9, 40)
    t = [torch.from_numpy(v).to(DEVICE) for v in (x3, a, c)]
    y = low_rank_sparse_gemm(*t, DeviceTiles(encode(s, tile), torch.float32, DEVICE), BLOCK_M=16).cpu().numpy()
    assert y.shape == (2, 9, 70)
    np.testing.assert_allclose(y, reference(x3, a, c, s), rtol=1e-5, atol=1e-5)


def test_fp16_matches_the_reference():
    x, a, c, s = (v.astype(np.float16) for v in _case(33, 70, 19, 50, seed=1))
    y = _run(x, a, c, s, torch.float16).cpu().numpy()
    want = reference(x, a, c, s)
    np.testing.assert_allclose(y.astype(np.float32), want.astype(np.float32), rtol=2e-3,
                               atol=2e-3 * float(np.abs(want).max()))


def test_bf16_matches_the_reference():
    x, a, c, s = _case(33, 70, 19, 50, seed=2)
    xt, at, ct, stt = (torch.from_numpy(v).to(torch.bfloat16) for v in (x, a, c, s))
    xr, ar, cr, sr = (v.float().numpy() for v in (xt, at, ct, stt))
    y = _run(xr, ar, cr, sr, torch.bfloat16).float().cpu().numpy()
    h = torch.from_numpy(xr @ ar).to(torch.bfloat16).float().numpy()
    want = h @ cr + xr @ sr
    np.testing.assert_allclose(y, want, rtol=1e-2, atol=1e-2 * float(np.abs(want).max()))


def test_all_zero_sparse_part_is_the_low_rank_product():
    x, a, c, s = _case(6, 40, 8, 30, seed=5)
    y = _run(x, a, c, np.zeros_like(s), torch.float32).cpu().numpy()
    np.testing.assert_allclose(y, reference(x, a, c, np.zeros_like(s)), rtol=1e-5, atol=1e-5)


def test_bad_tiles_are_refused():
    x, a, c, s = _case(4, 32, 8, 32)
    with pytest.raises(ValueError, match="powers of two"):
        _run(x, a, c, s, torch.float32, tile=(8, 32))
