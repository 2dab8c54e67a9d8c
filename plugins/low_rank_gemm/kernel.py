"""LowRankGemm in Triton: ``Y [M, N] = (X [M, K] A [K, r]) C [r, N]`` in one launch.

One program per block of ``BLOCK_M`` rows. It first computes that block's intermediate
``H = X A`` (``[BLOCK_M, R]``, ``R`` the rank padded to a power of two, masked) by looping over
``K`` in tiles of ``BLOCK_K``, accumulating in float32; ``H`` stays on chip (registers / shared
memory) and is rounded once to the input dtype, as the two-GEMM chain stores it. Then it loops over
the output in tiles of ``BLOCK_N`` columns: ``Y[:, tile] = H C[:, tile]``. ``H`` is computed once
per row block, never written to global memory, and ``X`` is read once. Ragged ``M``, ``K``, ``N``
and a rank that is not a power of two are masked (padding lanes load 0).

Runs on a GPU, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``), where the tests
check it against ``reference.low_rank_gemm``. The interpreter's ``tl.dot`` on bfloat16 operands
returns garbage (Triton 3.9), so there bf16 tiles are widened to fp32 before the dot
(``DOT_F32``): the same products (a bf16 product is exact in fp32) and fp32 accumulation, as the
tensor cores do. Triton and torch are imported here only.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_block_h(x_ptr, a_ptr, rows, row_ok, K, R, sxm, sxk, sak, sar,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_F32: tl.constexpr):
    """``H = X[rows] A`` (``[BLOCK_M, BLOCK_R]``, fp32 accumulation) rounded to X's dtype, on chip."""
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * sxm + ks[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptr + ks[:, None] * sak + ranks[None, :] * sar, mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
        if DOT_F32:  # the interpreter's bf16 dot is wrong: the same products in fp32 (exact for bf16)
            x, a = x.to(tl.float32), a.to(tl.float32)
        h += tl.dot(x, a)
    return h.to(x_ptr.dtype.element_ty)  # the chain's intermediate in the input precision


@triton.jit
def tile_hc(h_in, c_ptr, ns, n_ok, R, scr, scn, BLOCK_R: tl.constexpr, DOT_F32: tl.constexpr):
    """``H C[:, ns]`` in fp32 for one output tile."""
    ranks = tl.arange(0, BLOCK_R)
    c = tl.load(c_ptr + ranks[:, None] * scr + ns[None, :] * scn, mask=(ranks < R)[:, None] & n_ok[None, :], other=0.0)
    if DOT_F32:
        return tl.dot(h_in.to(tl.float32), c.to(tl.float32))
    return tl.dot(h_in, c)


@triton.jit
def _low_rank_gemm(x_ptr, a_ptr, c_ptr, y_ptr, M, K, R, N,
                   sxm, sxk, sak, sar, scr, scn, sym, syn,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   DOT_F32: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    h_in = row_block_h(x_ptr, a_ptr, rows, row_ok, K, R, sxm, sxk, sak, sar, BLOCK_M, BLOCK_K, BLOCK_R, DOT_F32)
    for n0 in range(0, N, BLOCK_N):  # H is reused for every output tile
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        y = tile_hc(h_in, c_ptr, ns, n_ok, R, scr, scn, BLOCK_R, DOT_F32)
        tl.store(y_ptr + rows[:, None] * sym + ns[None, :] * syn, y.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


def interpreted() -> bool:
    """Whether kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def blocks(m: int, k: int, r: int, n: int) -> dict[str, int]:
    """Tile sizes: the rank padded to a power of two (at least 16, what ``tl.dot`` takes), row and
    column tiles of 16 to 64 by size (``autotune`` in the TensorRT glue picks among more)."""
    br = max(16, triton.next_power_of_2(r))
    bm = 16 if m <= 16 else 32 if m <= 256 or br > 128 else 64
    return {"BLOCK_M": bm, "BLOCK_K": 32 if k >= 32 else 16, "BLOCK_N": 64 if n >= 64 else 32 if n >= 32 else 16,
            "BLOCK_R": br}


def low_rank_gemm(x, a, c, *, out=None, **tiles):
    """``(x @ a) @ c`` for torch tensors on one device (``x [..., K]``: the leading axes are
    flattened into rows); ``tiles`` override :func:`blocks`. Returns ``[..., N]`` in ``x``'s dtype."""
    import torch

    if not (x.dtype == a.dtype == c.dtype):
        raise ValueError(f"X, A and C must share one dtype, got {x.dtype}, {a.dtype}, {c.dtype}")
    k, r = a.shape
    r2, n = c.shape
    if x.shape[-1] != k or r2 != r:
        raise ValueError(f"shapes do not chain: X {tuple(x.shape)}, A {tuple(a.shape)}, C {tuple(c.shape)}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    cfg = {**blocks(m, k, r, n), **tiles}
    cfg.setdefault("DOT_F32", x.dtype == torch.bfloat16 and interpreted())
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
    _low_rank_gemm[grid](x2, a, c, y, m, k, r, n, x2.stride(0), x2.stride(1), a.stride(0), a.stride(1),
                         c.stride(0), c.stride(1), y.stride(0), y.stride(1), **cfg)
    return y.reshape(*x.shape[:-1], n)


@triton.jit
def low_rank_gemm_aot(x_ptr, a_ptr, c_ptr, M, K, R, N, y_ptr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The entry TensorRT's ahead-of-time plugin launches: its arguments in the order TensorRT passes
    them (input pointers, the extra scalars, output pointers), tensors contiguous (LINEAR)."""
    _low_rank_gemm(x_ptr, a_ptr, c_ptr, y_ptr, M, K, R, N, K, 1, R, 1, N, 1, N, 1,
                   BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R, False)
