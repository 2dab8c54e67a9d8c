"""MLP hidden-channel pruning: a pair ``up -> channel-wise activation -> down`` keeps ``w`` of its
hidden channels, and ``down`` is refitted by least squares on the calibration statistics.

The site is an MLP pair (``passes.mlp.MlpPair``), not one weight: ``B_up [K, H] -> B_up[:, keep]``,
``b_up -> b_up[keep]``, ``B_down [H, N] -> W [w, N]`` (and its bias) refitted so that
``h[:, keep] W (+ b)`` best matches ``h B_down (+ b_down)`` (``factorize.channels``). No node is
added: both layers only get thinner. Stores ``w (K + N)`` weight values (the biases are counted
with neither form); costs ``2 w (K + N)`` FLOPs per row against ``2 H (K + N)``. Sizes: widths
below ``H`` in multiples of ``--multiple``; the error at each width is the refit's along one
elimination path (``channels.prune_curve``).
"""
from __future__ import annotations

import numpy as np

from ..factorize import LayerStats
from ..ir import RewriteContext
from .base import Storage, Stored


class ChannelsForm:
    """Prune an MLP pair's hidden channels and refit its second layer (see the module docstring)."""

    name = "channels"
    ops = ("mlp",)
    priced_by_default = False  # priced for MLP pairs under --prune-mlp auto (lrcompile.pruning)

    def sizes(self, pair, multiple: int) -> np.ndarray:
        m = max(1, multiple)
        return np.arange(m, pair.width, m, dtype=np.int64)

    def params(self, pair, sizes: np.ndarray) -> np.ndarray:
        k, n = pair.up.weight.shape[0], pair.down.weight.shape[1]
        return np.asarray(sizes) * float(k + n)

    def flops(self, pair, sizes: np.ndarray, rows: float) -> tuple[float, np.ndarray]:
        """Dense FLOPs and FLOPs at each width (both layers run on the up layer's rows)."""
        per = 2.0 * rows * (pair.up.weight.shape[0] + pair.down.weight.shape[1])
        return per * pair.width, per * np.asarray(sizes, np.float64)

    def probe_scale(self, pair) -> float:
        """The size a budget fraction of 1 corresponds to: the whole width."""
        return float(pair.width)

    def curve(self, pair, stats: LayerStats, sizes: np.ndarray) -> np.ndarray:
        """Estimated relative squared refit error at each width of ``sizes``."""
        from ..factorize.channels import prune_curve

        smallest = int(sizes[0]) if len(sizes) else pair.width
        widths, err2 = prune_curve(stats.gram, stats.in_sum, stats.count, pair.down.weight, pair.down.bias,
                                   smallest=smallest)
        return np.interp(sizes, widths, err2)

    def fit(self, pair, stats: LayerStats, width: int):
        """The channels kept and the refitted second layer (``channels.ChannelPrune``)."""
        from ..factorize.channels import prune_channels

        return prune_channels(stats.gram, stats.in_sum, stats.count, pair.down.weight, pair.down.bias, width)

    def layer_params(self, pair, width: int) -> tuple[int, int]:
        """Weight parameters of the up and the down layer at ``width``."""
        return pair.up.weight.shape[0] * width, width * pair.down.weight.shape[1]

    def storage(self, pair, width: int) -> Storage:
        k, n = pair.up.weight.shape[0], pair.down.weight.shape[1]
        return Storage((Stored("up", (k, width), str(pair.up.weight.dtype)),
                        Stored("down", (width, n), str(pair.down.weight.dtype))))

    def emit(self, ctx: RewriteContext, pair, value) -> None:
        """Write the thinner constants into the pair's two nodes (``value``: a ``ChannelPrune``)."""
        from lrcompile.passes import mlp

        mlp.rewrite(pair, value.keep, value.weight, value.bias, ctx)
