"""Convolution inputs as rows: im2col for calibration statistics of a Conv weight.

A 2-D Conv with weight ``W [O, I/g, kh, kw]`` is, per group, ``y = patches @ B_g`` where
``B_g = W_g.reshape(O/g, (I/g)*kh*kw).T`` and each row of ``patches`` is one receptive field
of that group's input channels, flattened in ``(channel, ky, kx)`` order. Those rows are the
"activations" of the weight: their second moment is what whitened SVD needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right (ONNX order)
    auto_pad: str = "NOTSET"
    group: int = 1

    def resolve_pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        if self.auto_pad in ("NOTSET", "VALID"):
            return self.pads if self.auto_pad == "NOTSET" else (0, 0, 0, 0)
        out = []
        for size, k, s, d in zip((h, w), self.kernel, self.strides, self.dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            out.append((small, big) if self.auto_pad == "SAME_UPPER" else (big, small))
        return (out[0][0], out[1][0], out[0][1], out[1][1])


def im2col(x: np.ndarray, geo: ConvGeometry) -> list[np.ndarray]:
    """Rows of receptive fields per group: ``[N*Ho*Wo, (C/g)*kh*kw]`` for each of the g groups."""
    n, c, h, w = x.shape
    t, l, b, r = geo.resolve_pads(h, w)
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.strides, geo.dilations
    win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, Ho, Wo, kh, kw]
    ho, wo = win.shape[2], win.shape[3]
    cg = c // geo.group
    rows = []
    for g in range(geo.group):
        part = win[:, g * cg:(g + 1) * cg].transpose(0, 2, 3, 1, 4, 5)  # [N, Ho, Wo, C/g, kh, kw]
        rows.append(part.reshape(n * ho * wo, cg * kh * kw))
    return rows
