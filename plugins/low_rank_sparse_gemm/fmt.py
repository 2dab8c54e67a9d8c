"""The kernel's compressed form of ``S [K, N]``: bitmap tiles (pure NumPy).

``S`` is cut into tiles of ``tile_k x tile_n`` (row-major tile order: ``t = kt * n_tiles + nt``;
the edge tiles padded with zeros). Per tile: a bitmap of its nonzeros (bit ``p = i * tile_n + j``
of the tile's ``tile_k * tile_n / 32`` 32-bit words), and its nonzero values in the order of ``p``,
stored back to back in ``values`` from ``offsets[t]``. A kernel loads a tile's words and values
(``nnz`` values plus 1 bit per position: 1/16 of a dense fp16 tile in bits), finds each nonzero's
value by the number of set bits before it (a prefix sum), and rebuilds the dense tile on chip.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BitmapTiles:
    shape: tuple[int, int]
    tile: tuple[int, int]
    values: np.ndarray   # [nnz], S's dtype
    bitmaps: np.ndarray  # [tiles, tile_k * tile_n // 32] uint32
    offsets: np.ndarray  # [tiles + 1] int32

    @property
    def grid(self) -> tuple[int, int]:
        (k, n), (tk, tn) = self.shape, self.tile
        return -(-k // tk), -(-n // tn)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.bitmaps.nbytes + self.offsets.nbytes


def encode(s: np.ndarray, tile: tuple[int, int] = (32, 32)) -> BitmapTiles:
    """``s [K, N]`` as bitmap tiles of ``tile`` (``tile_k * tile_n`` a multiple of 32)."""
    k, n = s.shape
    tk, tn = tile
    if (tk * tn) % 32:
        raise ValueError(f"a tile of {tk} x {tn} is not a whole number of 32-bit words")
    gk, gn = -(-k // tk), -(-n // tn)
    padded = np.zeros((gk * tk, gn * tn), s.dtype)
    padded[:k, :n] = s
    tiles = padded.reshape(gk, tk, gn, tn).transpose(0, 2, 1, 3).reshape(gk * gn, tk * tn)  # [t, p]
    nz = tiles != 0
    bits = nz.reshape(gk * gn, -1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
    bitmaps = bits.sum(axis=2).astype(np.uint32)
    counts = nz.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return BitmapTiles((k, n), (tk, tn), np.ascontiguousarray(tiles[nz]), bitmaps, offsets)


def decode(t: BitmapTiles) -> np.ndarray:
    """The dense ``S`` back (what the kernel rebuilds tile by tile)."""
    (k, n), (tk, tn) = t.shape, t.tile
    gk, gn = t.grid
    words = t.bitmaps.astype(np.uint64)[:, :, None] >> np.arange(32, dtype=np.uint64)
    nz = (words & 1).astype(bool).reshape(gk * gn, tk * tn)
    tiles = np.zeros((gk * gn, tk * tn), t.values.dtype)
    tiles[nz] = t.values
    return tiles.reshape(gk, gn, tk, tn).transpose(0, 2, 1, 3).reshape(gk * tk, gn * tn)[:k, :n]
