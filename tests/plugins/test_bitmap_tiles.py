"""The bitmap-tile format of LowRankSparseGemm's sparse part (pure NumPy)."""
from __future__ import annotations

import numpy as np
import pytest

from lrcompile.plugins.low_rank_sparse_gemm.fmt import decode, encode


def _sparse(k, n, density, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, n)) * (rng.random((k, n)) < density)).astype(np.float32)


@pytest.mark.parametrize("tile", [(32, 32), (16, 64), (64, 16)])
def test_format_round_trips_and_counts_its_bytes(tile):
    s = _sparse(70, 50, 0.07)
    s[:, 20:40] = 0  # whole empty tiles
    t = encode(s, tile)
    assert np.array_equal(decode(t), s)
    assert t.values.size == np.count_nonzero(s) and t.offsets[-1] == t.values.size
    assert t.bitmaps.shape == (t.grid[0] * t.grid[1], tile[0] * tile[1] // 32)
    assert t.nbytes < s.nbytes / 3  # 7% dense: values + 1 bit per position + offsets


def test_format_refuses_partial_words():
    with pytest.raises(ValueError, match="32-bit words"):
        encode(np.eye(8, dtype=np.float32), (3, 5))
