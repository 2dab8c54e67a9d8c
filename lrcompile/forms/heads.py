"""Attention head-dimension reduction: a QK or an OV pair of one attention block keeps head
dimension ``r`` of ``d`` in every head (``lrcompile.factorize.heads``, ``passes.attention``).

The site is a head pair (``lrcompile.attention.HeadPair``), two projections of one block: the
query and key projections (QK, against the pre-softmax scores) or the value and output
projections (OV, against the block's output). No node is added: both projections get thinner
(``[K, H d] -> [K, H r]``; the output projection ``[H d, N] -> [H r, N]``) and the reshapes to
heads follow. Stores ``r H (K_left + K_right)`` weight values (QK: both input widths; OV: the
value input and the output width; biases counted with neither form), and costs
``2 r H (K_left + K_right)`` FLOPs per row for the projections (the score or context MatMul
shrinks too: not counted, so the FLOPs saved are a lower bound). Sizes: head dimensions below
``d`` in steps of ``min(--multiple, d / 8)``; the error at each is read off the pair's spectra.
"""
from __future__ import annotations

import numpy as np

from ..ir import RewriteContext
from .base import Storage, Stored


class HeadsForm:
    """Reduce a QK or OV pair's head dimension (see the module docstring)."""

    name = "heads"
    ops = ("attention",)
    priced_by_default = False  # priced for attention blocks under --attention auto (lrcompile.attention)

    def step(self, pair, multiple: int) -> int:
        return int(max(1, min(max(1, multiple), pair.width // 8)))

    def sizes(self, pair, multiple: int) -> np.ndarray:
        step = self.step(pair, multiple)
        return np.arange(step, pair.width, step, dtype=np.int64)

    def _sides(self, pair) -> int:
        return int(pair.up.weight.shape[0] + (pair.down.weight.shape[0] if pair.kind == "qk"
                                              else pair.down.weight.shape[1]))

    def params(self, pair, sizes: np.ndarray) -> np.ndarray:
        return np.asarray(sizes) * float(pair.heads * self._sides(pair))

    def flops(self, pair, sizes: np.ndarray, rows: float) -> tuple[float, np.ndarray]:
        """Dense FLOPs and FLOPs at each head dimension of the two projections (on the first
        projection's rows)."""
        per = 2.0 * rows * pair.heads * self._sides(pair)
        return per * pair.width, per * np.asarray(sizes, np.float64)

    def probe_scale(self, pair) -> float:
        """The size a budget fraction of 1 corresponds to: the whole head dimension."""
        return float(pair.width)

    def curve(self, pair, spectra, sizes: np.ndarray) -> np.ndarray:
        """Relative squared error at each head dimension (``spectra``: ``factorize.heads.HeadSpectra``)."""
        return spectra.err2(sizes)

    def fit(self, pair, spectra, width: int):
        """The pair at head dimension ``width`` (``factorize.heads.HeadFit``)."""
        return spectra.fit(int(width))

    def layer_params(self, pair, width: int) -> tuple[int, int]:
        """Weight parameters of the two projections at head dimension ``width``."""
        hr = pair.heads * width
        right = pair.down.weight.shape[0] if pair.kind == "qk" else pair.down.weight.shape[1]
        return pair.up.weight.shape[0] * hr, hr * right

    def storage(self, pair, width: int) -> Storage:
        hr = pair.heads * width
        right = (pair.down.weight.shape[0], hr) if pair.kind == "qk" else (hr, pair.down.weight.shape[1])
        return Storage((Stored("left", (pair.up.weight.shape[0], hr), str(pair.up.weight.dtype)),
                        Stored("right", right, str(pair.down.weight.dtype))))

    def emit(self, ctx: RewriteContext, pair, value, consts=None) -> None:
        """Write the thinner projections and every head shape of the pair's block (``value``: a
        ``HeadFit``)."""
        from lrcompile.ir import ConstantResolver
        from lrcompile.passes import attention

        consts = consts if consts is not None else ConstantResolver(ctx.graph)
        (attention.rewrite_qk if pair.kind == "qk" else attention.rewrite_ov)(pair.block, value, ctx, consts)
