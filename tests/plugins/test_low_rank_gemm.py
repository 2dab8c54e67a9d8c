"""LowRankGemm's Triton kernel against its NumPy reference (Triton's interpreter on the CPU):
ragged shapes, ranks that are not a multiple of the block, leading batch axes, fp32/fp16/bf16."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from lrcompile.plugins.low_rank_gemm.kernel import blocks, low_rank_gemm  # noqa: E402
from lrcompile.plugins.low_rank_gemm.reference import low_rank_gemm as reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: (rows, K, rank, N): ragged everywhere; ranks 7, 19, 33 are no power of two (the block pads them)
SHAPES = [(1, 16, 16, 16), (5, 37, 7, 23), (33, 64, 19, 70), (70, 100, 33, 130)]


def _factors(m, k, r, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    a = (rng.standard_normal((k, r)) / np.sqrt(k)).astype(np.float32)
    c = (rng.standard_normal((r, n)) / np.sqrt(r)).astype(np.float32)
    return x, a, c


def _t(a, dtype):
    return torch.from_numpy(a).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_the_reference(shape):
    x, a, c = _factors(*shape)
    y = low_rank_gemm(_t(x, torch.float32), _t(a, torch.float32), _t(c, torch.float32)).cpu().numpy()
    want = reference(x, a, c)
    assert y.shape == want.shape == (shape[0], shape[3])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert np.abs(want).max() > 0.5  # a real signal, not zeros


@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_fp16_matches_the_reference(shape):
    x, a, c = (v.astype(np.float16) for v in _factors(*shape, seed=1))
    y = low_rank_gemm(*(_t(v, torch.float16) for v in (x, a, c))).cpu().numpy()
    want = reference(x, a, c)  # fp32 accumulation, the intermediate rounded to fp16 as the chain stores it
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float32), want.astype(np.float32), rtol=2e-3,
                               atol=2e-3 * float(np.abs(want).max()))


@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_bf16_matches_the_reference(shape):
    x, a, c = _factors(*shape, seed=2)
    xt, at, ct = (_t(v, torch.bfloat16) for v in (x, a, c))
    y = low_rank_gemm(xt, at, ct).float().cpu().numpy()
    # the reference on the bf16-rounded values, the intermediate rounded to bf16 (numpy has no bf16)
    xr, ar, cr = (v.float().cpu().numpy() for v in (xt, at, ct))
    h = torch.from_numpy(xr @ ar).to(torch.bfloat16).float().numpy()
    want = h @ cr
    np.testing.assert_allclose(y, want, rtol=1e-2, atol=1e-2 * float(np.abs(want).max()))


def test_leading_axes_and_small_tiles_loop_over_k_and_n():
    """Tiles of 16 force several K steps, several output tiles and several row programs."""
    x, a, c = _factors(2 * 3 * 7, 50, 9, 45, seed=3)
    x3 = x.reshape(2, 3 * 7, 50)
    y = low_rank_gemm(_t(x3, torch.float32), _t(a, torch.float32), _t(c, torch.float32),
                      BLOCK_M=16, BLOCK_K=16, BLOCK_N=16).cpu().numpy()
    assert y.shape == (2, 21, 45)
    np.testing.assert_allclose(y, reference(x3, a, c), rtol=1e-5, atol=1e-5)


def test_blocks_pad_the_rank_to_a_power_of_two():
    assert blocks(5, 37, 7, 23)["BLOCK_R"] == 16
    assert blocks(5, 37, 19, 23)["BLOCK_R"] == 32
    assert blocks(5, 37, 33, 23)["BLOCK_R"] == 64


def test_mismatched_inputs_are_refused():
    x, a, c = _factors(4, 16, 8, 16)
    with pytest.raises(ValueError, match="share one dtype"):
        low_rank_gemm(_t(x, torch.float32), _t(a, torch.float16), _t(c, torch.float32))
    with pytest.raises(ValueError, match="do not chain"):
        low_rank_gemm(_t(x, torch.float32), _t(a.T.copy(), torch.float32), _t(c, torch.float32))


def test_the_tensorrt_entry_point_takes_tensorrt_s_argument_order():
    """``low_rank_gemm_aot`` (what the AOT plugin launches: inputs, the scalars M K R N, output;
    contiguous tensors) computes the same as the reference."""
    import triton

    from lrcompile.plugins.low_rank_gemm.kernel import low_rank_gemm_aot

    m, k, r, n = 37, 50, 13, 70
    x, a, c = _factors(m, k, r, n, seed=6)
    xt, at, ct = (_t(v, torch.float32) for v in (x, a, c))
    y = torch.empty((m, n), dtype=torch.float32, device=DEVICE)
    low_rank_gemm_aot[(triton.cdiv(m, 16),)](xt, at, ct, m, k, r, n, y, BLOCK_M=16, BLOCK_K=32, BLOCK_N=32,
                                              BLOCK_R=16)
    np.testing.assert_allclose(y.cpu().numpy(), reference(x, a, c), rtol=1e-5, atol=1e-5)
