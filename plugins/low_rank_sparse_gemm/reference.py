"""NumPy reference of LowRankSparseGemm: ``(x a) c + x s`` over the last axis of ``x``.

Accumulated in float32 (float64 for float64 inputs); the intermediate ``x a`` rounded to the input
dtype (as the chain stores it); the two products summed before the one rounding to the output
dtype (the fused kernel adds them in its accumulator; the plain ONNX chain rounds each product
first: for fp16 the two differ by the last bit)."""
from __future__ import annotations

import numpy as np


def low_rank_sparse_gemm(x: np.ndarray, a: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    acc = np.float64 if x.dtype == np.float64 else np.float32
    xa = x.astype(acc)
    h = xa @ a.astype(acc)
    if x.dtype != acc:
        h = h.astype(x.dtype).astype(acc)
    return (h @ c.astype(acc) + xa @ s.astype(acc)).astype(x.dtype)
