"""Statistics derived from others, without another pass over the data.

For a layer ``y = x @ B``: ``sum y = (sum x) @ B`` and ``Y^T Y = B^T (X^T X) B``, so the output
statistics that output-side methods (AFM) need follow exactly from the input statistics.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .types import LayerStats


def with_output_stats(stats: LayerStats, b: np.ndarray) -> LayerStats:
    """``stats`` plus ``out_sum``/``out_gram`` of ``y = x @ b`` (needs ``in_sum`` and ``gram``)."""
    if stats.gram is None or stats.in_sum is None:
        raise ValueError("output statistics need the input gram and in_sum")
    b64 = np.asarray(b, np.float64)
    out_gram = b64.T @ stats.gram @ b64
    return replace(stats, out_sum=stats.in_sum @ b64, out_gram=0.5 * (out_gram + out_gram.T))


def onehot_output_stats(stats: LayerStats, table: np.ndarray) -> LayerStats:
    """Output statistics of an embedding lookup ``y = E[idx]``: ``stats.in_sum`` holds the lookup
    counts ``c``, so ``sum y = c @ E`` and ``Y^T Y = E^T diag(c) E``."""
    if stats.in_sum is None:
        raise ValueError("embedding output statistics need the lookup counts (in_sum)")
    e = np.asarray(table, np.float64)
    c = np.asarray(stats.in_sum, np.float64)
    out_gram = e.T @ (c[:, None] * e)
    return replace(stats, out_sum=c @ e, out_gram=0.5 * (out_gram + out_gram.T))


def sum_stats(parts: list[LayerStats]) -> LayerStats:
    """Statistics of the union of several activation sets (sums add): the input statistics of a
    weight that several layers share, each seeing its own inputs."""
    if len(parts) == 1:
        return parts[0]
    fields = ("gram", "abs_sum", "in_sum", "out_sum", "out_gram", "fisher", "cross", "ref_gram", "grad_gram")
    merged = {f: None if any(getattr(p, f) is None for p in parts) else sum(getattr(p, f) for p in parts)
              for f in fields}
    return LayerStats(count=sum(p.count for p in parts), **merged)
