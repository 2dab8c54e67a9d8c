"""Attention head-dimension reduction: Q.K and V.O compressed as pairs (A3; MoDeGPT's CR).

Layout: a projection ``y = x @ W + b`` with ``W [K, H d]``; head ``h`` owns columns
``h d : (h + 1) d``. Every head of a layer keeps the same new dimension ``r`` (the graph reshapes
to ``[B, T, H, r]``); ``r = d`` reproduces the layer exactly.

**QK.** Head ``h``'s pre-softmax score between query row ``x_i`` and key row ``x_j`` is
``x~_i M_h x~_j^T`` with ``x~ = [x, 1]`` and ``M_h = Wq~_h Wk~_h^T`` (``Wq~_h = [Wq_h; bq_h]``).
The term ``x~_i Wq~_h bk_h^T`` is the same for every key ``j``: softmax removes it, so ``bk`` is
dropped first (``M_h = Wq~_h [Wk_h; 0]^T``: exact). The rank-``r`` ``M'_h`` minimising the score
error ``sum_ij (x~_i (M_h - M'_h) x~_j^T)^2 = ||Rq^T (M_h - M'_h) Rk||_F^2`` (``G~ = R R^T``, the
augmented input Grams of the query and the key side; equal for self-attention) comes from the SVD
``Rq^T M_h Rk = U S V^T``: ``Wq~'_h = Rq^-T U_r S_r^(1/2)``, ``Wk~'_h = Rk^-T V_r S_r^(1/2)`` (last
rows: the new biases). The softmax scale stays the original ``1/sqrt(d)``.

**OV.** The softmax rows sum to one, so the value bias passes through them: ``bv_h`` becomes
``bv_h Wo_h`` on the output (folded into ``bo``, ``bv`` dropped: exact). Then head ``h``
contributes ``Z_h Wv_h Wo_h`` with ``Z_h = A_h X`` (attention probabilities times the value
projection's input): with ``G_h = Z_h^T Z_h = R_h R_h^T``, the SVD ``R_h^T Wv_h Wo_h = U S V^T``
gives ``Wv'_h = R_h^-T U_r S_r^(1/2)``, ``Wo'_h = S_r^(1/2) V_r^T``, minimising
``||Z_h (Wv_h Wo_h - Wv'_h Wo'_h)||_F``.

Grams are damped as for whitening (``+ lambda tr(G)/K I``). Each head's product has rank at most
``d``; the SVDs are taken through QR factors (``d x d`` cores), so a head costs ``O(K d^2)``.
The relative squared error of a layer at ``r`` is ``sum_h tail_h(r) / sum_h total_h`` (spectra).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .whiten import DEFAULT_DAMPING, sqrt_factor


@dataclass(frozen=True)
class HeadFit:
    """A head-reduced pair. QK: ``left``/``left_bias`` are the query projection ``[K, H r]`` /
    ``[H r]``, ``right``/``right_bias`` the key projection. OV: ``left``/``left_bias`` the value
    projection (bias None: folded away), ``right`` the output projection ``[H r, N]`` and
    ``right_bias`` its new bias ``[N]`` (None when neither side had one)."""

    kind: str
    left: np.ndarray
    left_bias: np.ndarray | None
    right: np.ndarray
    right_bias: np.ndarray | None
    heads: int
    head_dim: int
    rank: int
    rel_error: float  # predicted: sqrt(sum_h tail_h(r) / sum_h total_h) in the pair's metric

    @property
    def params(self) -> int:
        """Weight parameters of the two projections (biases not counted, as for the other forms)."""
        return int(self.left.size + self.right.size)


@dataclass(frozen=True)
class HeadSpectra:
    """Per head, the whitened SVD of the pair's product (everything a fit at any ``r`` needs)."""

    kind: str
    heads: int
    head_dim: int
    left_inv: list  # per head (or one for all): y -> R^-T y on the left side
    right_inv: list  # QK: the key side's R^-T; OV: unused
    u: list[np.ndarray]  # per head [K(+1), d]
    s: list[np.ndarray]  # per head [d]
    vt: list[np.ndarray]  # per head [d, K(+1)] (QK) or [d, N] (OV)
    bias_out: np.ndarray | None  # OV: the output bias with the value bias folded in
    dtype: np.dtype

    def err2(self, sizes) -> np.ndarray:
        """Relative squared error at each head dimension of ``sizes``."""
        total = sum(float(np.sum(s**2)) for s in self.s)
        if total <= 0:
            return np.zeros(len(np.atleast_1d(sizes)))
        return np.array([sum(float(np.sum(s[int(r):] ** 2)) for s in self.s) / total for r in np.atleast_1d(sizes)])

    def fit(self, r: int) -> HeadFit:
        """The pair at head dimension ``r`` (``1 <= r <= d``)."""
        if not 1 <= r <= self.head_dim:
            raise ValueError(f"head dimension {r} outside 1..{self.head_dim}")
        lefts, rights = [], []
        for h in range(self.heads):
            root = np.sqrt(self.s[h][:r])
            lefts.append(self.left_inv[h](self.u[h][:, :r] * root))
            if self.kind == "qk":
                rights.append(self.right_inv[h](self.vt[h][:r].T * root))
            else:
                rights.append(root[:, None] * self.vt[h][:r])
        left = np.concatenate(lefts, axis=1)
        rel = float(np.sqrt(self.err2([r])[0]))
        if self.kind == "qk":
            right = np.concatenate(rights, axis=1)
            lw, lb = left[:-1], left[-1]
            rw, rb = right[:-1], right[-1]
            return HeadFit("qk", lw.astype(self.dtype), lb.astype(self.dtype), rw.astype(self.dtype),
                           rb.astype(self.dtype), self.heads, self.head_dim, r, rel)
        right = np.concatenate(rights, axis=0)
        bo = None if self.bias_out is None else self.bias_out.astype(self.dtype)
        return HeadFit("ov", left.astype(self.dtype), None, right.astype(self.dtype), bo, self.heads,
                       self.head_dim, r, rel)


def augmented_gram(gram: np.ndarray, in_sum: np.ndarray, count: int) -> np.ndarray:
    """``[X, 1]^T [X, 1]`` from a layer's streamed sums (bias as the last coordinate)."""
    k = gram.shape[0]
    g = np.empty((k + 1, k + 1), np.float64)
    g[:k, :k] = gram
    g[:k, k] = g[k, :k] = in_sum
    g[k, k] = float(count)
    return g


def _damped(g: np.ndarray, damping: float) -> np.ndarray:
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    tr = float(np.trace(g))
    if not np.isfinite(tr) or tr <= 0:
        raise ValueError("the Gram is empty (no calibration rows reached this attention block)")
    return g + damping * tr / g.shape[0] * np.eye(g.shape[0])


def _svd_of_product(p: np.ndarray, q: np.ndarray):
    """SVD of ``p @ q^T`` (``p [m, d]``, ``q [n, d]``) through the QR factors of both."""
    qp, rp = np.linalg.qr(p)
    qq, rq = np.linalg.qr(q)
    u, s, vt = np.linalg.svd(rp @ rq.T)
    return qp @ u, s, (qq @ vt.T).T


def _heads(w: np.ndarray, heads: int) -> int:
    if w.shape[1] % heads:
        raise ValueError(f"{w.shape[1]} columns do not split into {heads} heads")
    return w.shape[1] // heads


def qk_spectra(wq: np.ndarray, bq: np.ndarray | None, wk: np.ndarray, gram_q: np.ndarray,
               gram_k: np.ndarray | None = None, *, heads: int, damping: float = DEFAULT_DAMPING) -> HeadSpectra:
    """Whitened SVDs of every head's score matrix (module docstring, QK).

    Args:
        wq, bq: the query projection ``[Kq, H d]`` and its bias (None: none).
        wk: the key projection ``[Kk, H d]`` (its bias is softmax-invariant and dropped).
        gram_q, gram_k: augmented Grams ``[K+1, K+1]`` of the query and key projections' inputs
            (``augmented_gram``); ``gram_k`` None: the same input (self-attention).
    """
    d = _heads(wq, heads)
    if wk.shape[1] != wq.shape[1]:
        raise ValueError(f"query and key projections differ in width: {wq.shape[1]} vs {wk.shape[1]}")
    rq_t, rq_inv, _ = sqrt_factor(_damped(gram_q, damping))
    if gram_k is None:
        rk_t, rk_inv = rq_t, rq_inv
    else:
        rk_t, rk_inv, _ = sqrt_factor(_damped(gram_k, damping))
    wq64 = np.vstack([wq.astype(np.float64), (np.zeros(wq.shape[1]) if bq is None else bq.astype(np.float64))[None]])
    wk64 = np.vstack([wk.astype(np.float64), np.zeros((1, wk.shape[1]))])
    pq, pk = rq_t(wq64), rk_t(wk64)
    us, ss, vts = [], [], []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        u, s, vt = _svd_of_product(pq[:, cols], pk[:, cols])
        us.append(u), ss.append(s), vts.append(vt)
    return HeadSpectra("qk", heads, d, [rq_inv] * heads, [rk_inv] * heads, us, ss, vts, None, wq.dtype)


def ov_spectra(wv: np.ndarray, bv: np.ndarray | None, wo: np.ndarray, bo: np.ndarray | None, grams: list[np.ndarray],
               *, heads: int, damping: float = DEFAULT_DAMPING) -> HeadSpectra:
    """Whitened SVDs of every head's value-output product (module docstring, OV).

    Args:
        wv, bv: the value projection ``[K, H d]`` and its bias (None: none).
        wo, bo: the output projection ``[H d, N]`` and its bias (None: none; then ``bv`` must be
            None too, there being nowhere to fold it).
        grams: per head ``G_h = (A_h X)^T (A_h X)`` ``[K, K]``.
    """
    d = _heads(wv, heads)
    if wo.shape[0] != wv.shape[1]:
        raise ValueError(f"the output projection reads {wo.shape[0]} channels, the values have {wv.shape[1]}")
    if len(grams) != heads:
        raise ValueError(f"{len(grams)} head Grams for {heads} heads")
    bias_out = None
    if bv is not None:
        if bo is None:
            raise ValueError("a value bias needs an output bias to fold into")
        bias_out = bo.astype(np.float64) + bv.astype(np.float64) @ wo.astype(np.float64)
    elif bo is not None:
        bias_out = bo.astype(np.float64)
    invs, us, ss, vts = [], [], [], []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        r_t, r_inv, _ = sqrt_factor(_damped(grams[h], damping))
        u, s, vt = _svd_of_product(r_t(wv[:, cols].astype(np.float64)), wo[cols].astype(np.float64).T)
        invs.append(r_inv), us.append(u), ss.append(s), vts.append(vt)
    return HeadSpectra("ov", heads, d, invs, [], us, ss, vts, bias_out, wv.dtype)


__all__ = ["HeadFit", "HeadSpectra", "augmented_gram", "ov_spectra", "qk_spectra"]
