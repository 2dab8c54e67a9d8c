"""LowRankSparseGemm in Triton: ``Y = (X A) C + X S`` in one launch, ``S`` read compressed.

One program per block of ``BLOCK_M`` rows. ``H = X A`` is computed once and kept on chip (the
LowRankGemm kernel's ``row_block_h``). For each output tile of ``tile_n`` columns the accumulator
starts as ``H C[:, tile]``; then, for every tile of ``S`` in that column band that holds a
nonzero (an empty tile costs one pair of offset loads), the tile's bitmap words and its values
are loaded (``fmt.BitmapTiles``: load as sparse), each set bit's value is found by the count of
set bits before it (a prefix sum over the tile), the dense ``tile_k x tile_n`` tile is rebuilt
on chip, and ``X[rows, ktile] S_tile`` is added on the tensor cores (compute as dense, as
Flash-LLM does). One rounding to the output dtype at the end.

Tested on the CPU under ``TRITON_INTERPRET=1`` against ``reference.low_rank_sparse_gemm``;
bf16 dots are widened to fp32 there (see the LowRankGemm kernel).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..low_rank_gemm.kernel import blocks, interpreted, row_block_h, tile_hc
from .fmt import BitmapTiles


@triton.jit
def _low_rank_sparse_gemm(x_ptr, a_ptr, c_ptr, v_ptr, bm_ptr, off_ptr, y_ptr, M, K, R, N, GN,
                          sxm, sxk, sak, sar, scr, scn, sym, syn,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                          TILE_K: tl.constexpr, TILE_N: tl.constexpr, DOT_F32: tl.constexpr):
    WORDS: tl.constexpr = TILE_K * TILE_N // 32
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    h_in = row_block_h(x_ptr, a_ptr, rows, row_ok, K, R, sxm, sxk, sak, sar, BLOCK_M, BLOCK_K, BLOCK_R, DOT_F32)
    ti = tl.arange(0, TILE_K)
    tj = tl.arange(0, TILE_N)
    pos = ti[:, None] * TILE_N + tj[None, :]  # a position's bit inside its tile
    for n0 in range(0, N, TILE_N):
        ns = n0 + tj
        n_ok = ns < N
        acc = tile_hc(h_in, c_ptr, ns, n_ok, R, scr, scn, BLOCK_R, DOT_F32)
        nt = n0 // TILE_N
        for k0 in range(0, K, TILE_K):
            t = (k0 // TILE_K) * GN + nt
            start = tl.load(off_ptr + t)
            end = tl.load(off_ptr + t + 1)
            if end > start:
                words = tl.load(bm_ptr + t * WORDS + pos // 32)
                bit = (words >> (pos % 32)) & 1
                flat = tl.reshape(bit, (TILE_K * TILE_N,))
                before = tl.reshape(tl.cumsum(flat, 0) - flat, (TILE_K, TILE_N))
                s = tl.load(v_ptr + start + before, mask=bit != 0, other=0.0)
                ks = k0 + ti
                x = tl.load(x_ptr + rows[:, None] * sxm + ks[None, :] * sxk,
                            mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
                if DOT_F32:
                    x, s = x.to(tl.float32), s.to(tl.float32)
                acc += tl.dot(x, s)
        tl.store(y_ptr + rows[:, None] * sym + ns[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


class DeviceTiles:
    """A ``BitmapTiles`` on a torch device (bitmaps as int32: the kernel only tests single bits)."""

    def __init__(self, tiles: BitmapTiles, dtype, device) -> None:
        import numpy as np
        import torch

        self.tiles = tiles
        self.values = torch.from_numpy(np.ascontiguousarray(tiles.values)).to(device=device, dtype=dtype)
        if self.values.numel() == 0:  # a valid pointer for an all-zero S (never read: every tile is empty)
            self.values = torch.zeros(1, dtype=dtype, device=device)
        self.bitmaps = torch.from_numpy(tiles.bitmaps.view(np.int32).copy()).to(device)
        self.offsets = torch.from_numpy(tiles.offsets).to(device)


def low_rank_sparse_gemm(x, a, c, s: DeviceTiles, *, out=None, BLOCK_M: int | None = None):
    """``(x @ a) @ c + x @ S`` for torch tensors on one device, ``S`` as :class:`DeviceTiles`;
    ``x [..., K]`` (leading axes flattened into rows). Returns ``[..., N]`` in ``x``'s dtype."""
    import torch

    if not (x.dtype == a.dtype == c.dtype == s.values.dtype):
        raise ValueError(f"X, A, C and S must share one dtype, got {x.dtype}, {a.dtype}, {c.dtype}, {s.values.dtype}")
    k, r = a.shape
    n = c.shape[1]
    if x.shape[-1] != k or c.shape[0] != r or s.tiles.shape != (k, n):
        raise ValueError(f"shapes do not chain: X {tuple(x.shape)}, A {tuple(a.shape)}, C {tuple(c.shape)}, "
                         f"S {s.tiles.shape}")
    tk, tn = s.tiles.tile
    if tk < 16 or tn < 16 or tk & (tk - 1) or tn & (tn - 1):
        raise ValueError(f"tiles of {tk} x {tn}: the kernel takes powers of two >= 16")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    cfg = blocks(m, k, r, n)
    bm = BLOCK_M or cfg["BLOCK_M"]
    grid = (triton.cdiv(m, bm),)
    _low_rank_sparse_gemm[grid](x2, a, c, s.values, s.bitmaps, s.offsets, y, m, k, r, n, s.tiles.grid[1],
                                x2.stride(0), x2.stride(1), a.stride(0), a.stride(1), c.stride(0), c.stride(1),
                                y.stride(0), y.stride(1), BLOCK_M=bm, BLOCK_K=cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"],
                                TILE_K=tk, TILE_N=tn, DOT_F32=x.dtype == torch.bfloat16 and interpreted())
    return y.reshape(*x.shape[:-1], n)
