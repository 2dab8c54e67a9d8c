"""NumPy reference of LowRankGemm: what the kernel and the TensorRT plugin must compute."""
from __future__ import annotations

import numpy as np


def low_rank_gemm(x: np.ndarray, a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``(x a) c`` over the last axis of ``x``, accumulated in float32 (float64 for float64
    inputs), returned in ``x``'s dtype; leading axes kept."""
    acc = np.float64 if x.dtype == np.float64 else np.float32
    h = x.astype(acc) @ a.astype(acc)
    if x.dtype != acc:  # the kernel keeps the intermediate in the input precision between its two GEMMs
        h = h.astype(x.dtype).astype(acc)
    return (h @ c.astype(acc)).astype(x.dtype)
