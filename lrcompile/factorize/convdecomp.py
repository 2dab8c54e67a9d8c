"""Decompositions of one 2-D Conv group's weight ``W [O, I, kh, kw]`` (numpy only).

Layout: the weight as a matrix is ``B = W.reshape(O, I*kh*kw).T`` ``[K, O]`` (rows in
``(channel, ky, kx)`` order, the im2col order of ``factorize.patches``); a calibration Gram
``G [K, K]`` of the receptive fields makes the objective ``||L^T (B - B')||_F`` (``G = L L^T``),
the output error of the conv summed over pixels. An optional output Gram ``H [O, O]`` weights
output channels: ``||L^T (B - B') R||_F`` with ``H = R R^T``.

- Tucker-2 (Kim et al. 2016): ``W ~= core x_0 U_out x_1 U_in``, ``U_in [I, R_in]``,
  ``core [R_out, R_in, kh, kw]``, ``U_out [O, R_out]``. Data-free: HOSVD started HOOI. With ``G``:
  ``U_in`` spans the top left singular vectors of the mode-1 unfolding in the channel metric
  ``G_c = sum over taps of G's diagonal blocks`` (``L_c^-T`` of them), then ``(core, U_out)`` is
  the exact minimiser given ``U_in``: reduced-rank regression of ``B`` on ``P = U_in (x) I_taps``,
  ``Z = (P^T G P)^-1 P^T G B``, truncated to ``R_out`` in the metric ``S^T Z R`` (``P^T G P = S S^T``).
- CP (Lebedev et al. 2015): ``W[o,i,h,w] ~= sum_r a_out[o,r] a_in[i,r] a_h[h,r] a_w[w,r]`` by ALS
  from an SVD start; with ``G`` the last factor ``a_out`` is refit exactly in the metric.
- Spatial SVD (Jaderberg et al. 2014; AIMET's): ``M[(i,h),(o,w)] = W[o,i,h,w]`` truncated to rank
  ``r``: ``v [r, I, kh]`` (a ``kh x 1`` conv) and ``h [O, r, kw]`` (a ``1 x kw`` conv); with ``G``
  the ``1 x kw`` factor is refit exactly in the metric.
- VBMF (Nakajima et al. 2013): the rank the analytic empirical variational Bayes solution keeps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla
from scipy.optimize import minimize_scalar

#: Relative ridge on ``P^T G P`` in the metric refits (as whitening damps its Gram).
REFIT_DAMPING = 1e-10
#: HOOI sweeps of data-free Tucker-2, ALS sweeps of CP.
HOOI_ITERS = 3
CP_ITERS = 60


@dataclass(frozen=True)
class ConvFit:
    """One group's decomposition. ``parts`` by ``kind``: tucker2 ``(u_in [I, R_in], core [R_out,
    R_in, kh, kw], u_out [O, R_out])``; cp ``(a_in [I, R], a_h [kh, R], a_w [kw, R], a_out [O, R])``;
    spatial ``(v [r, I, kh], h [O, r, kw])``."""

    kind: str
    parts: tuple[np.ndarray, ...]
    ranks: tuple[int, ...]
    method: str
    rel_error: float
    objective_error: float
    info: dict = field(default_factory=dict)

    @property
    def weight(self) -> np.ndarray:
        """The reconstructed weight ``[O, I, kh, kw]``."""
        return reconstruct(self.kind, self.parts)

    @property
    def values(self) -> int:
        return int(sum(p.size for p in self.parts))


def reconstruct(kind: str, parts: tuple[np.ndarray, ...]) -> np.ndarray:
    """The weight ``[O, I, kh, kw]`` a decomposition stands for."""
    p = [np.asarray(x, np.float64) for x in parts]
    if kind == "tucker2":
        u_in, core, u_out = p
        return np.einsum("ia,bahw,ob->oihw", u_in, core, u_out, optimize=True)
    if kind == "cp":
        a_in, a_h, a_w, a_out = p
        return np.einsum("ir,hr,wr,or->oihw", a_in, a_h, a_w, a_out, optimize=True)
    if kind == "spatial":
        v, h = p
        return np.einsum("rih,orw->oihw", v, h, optimize=True)
    raise ValueError(f"unknown conv decomposition {kind!r}")


def as_matrix(w: np.ndarray) -> np.ndarray:
    """``B [I*kh*kw, O]`` of a weight ``[O, I, kh, kw]`` (the im2col layout)."""
    return w.reshape(w.shape[0], -1).T


def unfolding(w: np.ndarray, mode: int) -> np.ndarray:
    """Mode-``mode`` unfolding of ``w``: ``[w.shape[mode], everything else]``."""
    return np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)


def mode_spectrum(w: np.ndarray, mode: int) -> np.ndarray:
    """Singular values of the mode-``mode`` unfolding."""
    return np.linalg.svd(np.asarray(unfolding(w, mode), np.float64), compute_uv=False)


def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest rank keeping ``energy`` of ``sum s^2``."""
    e = np.cumsum(np.asarray(s, np.float64) ** 2)
    if e[-1] <= 0:
        return 1
    return int(min(len(s), np.searchsorted(e / e[-1], energy - 1e-12) + 1))


# ---------------------------------------------------------------------------------------------- VBMF


def vbmf_rank(m: np.ndarray) -> int:
    """The rank empirical VBMF keeps for ``m`` (Nakajima, Sugiyama, Babacan, Tomioka 2013,
    Theorem 2 with the noise variance estimated by minimising the free energy): singular values
    above ``sqrt(M sigma^2 (1 + tau) (1 + alpha / tau))`` (``alpha = L / M``, ``L <= M``, ``tau``
    the root of the threshold equation, 2.5129 sqrt(alpha)) survive."""
    y = np.asarray(m, np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    big_l, big_m = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    h = big_l
    alpha = big_l / big_m
    tau_bar = 2.5129 * np.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = max(float(np.sum(y**2) - np.sum(s**2)), 0.0)
    total = float(np.sum(s**2))
    if total <= 0:
        return 0
    eh_ub = int(min(np.ceil(big_l / (1 + alpha)) - 1, h)) - 1
    upper = (total + residual) / (big_l * big_m)
    lower = max(s[eh_ub + 1] ** 2 / (big_m * x_bar) if eh_ub + 1 < len(s) else 0.0,
                float(np.mean(s[eh_ub + 1:] ** 2)) / big_m if eh_ub + 1 < len(s) else 0.0)
    lower = max(lower, upper * 1e-12)

    def free_energy(sigma2: float) -> float:
        x = s**2 / (big_m * sigma2)
        z1, z2 = x[x > x_bar], x[x <= x_bar]
        tau = 0.5 * (z1 - (1 + alpha) + np.sqrt(np.maximum((z1 - (1 + alpha)) ** 2 - 4 * alpha, 0.0)))
        obj = (np.sum(z2 - np.log(z2)) + np.sum(z1 - tau) + np.sum(np.log((tau + 1) / z1))
               + alpha * np.sum(np.log(tau / alpha + 1)))
        return float(obj + residual / (big_m * sigma2) + (big_l - h) * np.log(sigma2))

    if lower >= upper:
        sigma2 = upper
    else:
        sigma2 = float(minimize_scalar(free_energy, bounds=(lower, upper), method="bounded",
                                       options={"xatol": upper * 1e-10}).x)
    threshold = np.sqrt(big_m * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return int(np.sum(s > threshold))


# ---------------------------------------------------------------------------------------------- metric


def _objective(b: np.ndarray, approx: np.ndarray, gram: np.ndarray | None) -> tuple[float, float]:
    """Relative weight error and relative objective error of ``approx`` for ``b`` (both [K, O])."""
    e = b - approx
    nb = float(np.linalg.norm(b))
    rel = float(np.linalg.norm(e)) / nb if nb > 0 else 0.0
    if gram is None:
        return rel, rel
    num = float(np.einsum("ij,ik,kj->", e, gram, e, optimize=True))
    den = float(np.einsum("ij,ik,kj->", b, gram, b, optimize=True))
    return rel, float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


def _chol(m: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of a symmetric PSD ``m``, ridged by ``REFIT_DAMPING`` of its mean
    diagonal (and more if needed)."""
    scale = max(float(np.trace(m)) / max(m.shape[0], 1), 1e-300)
    for ridge in (REFIT_DAMPING, 1e-8, 1e-6, 1e-4, 1e-2):
        try:
            return np.linalg.cholesky(m + ridge * scale * np.eye(m.shape[0]))
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("metric is not positive definite even when damped")


def refit_last(p: np.ndarray, b: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
    """``Z = argmin ||L^T (B - P Z)||_F`` (least squares in the metric ``G``; plain without it)."""
    if gram is None:
        return np.linalg.lstsq(p, b, rcond=None)[0]
    m = p.T @ gram @ p
    low = _chol(m)
    return sla.cho_solve((low, True), p.T @ gram @ b)


def reduced_rank(p: np.ndarray, b: np.ndarray, rank: int, gram: np.ndarray | None,
                 out_gram: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``min ||L^T (B - P X Y) R||_F`` over ``X [p, rank]``, ``Y [rank, O]`` (reduced-rank
    regression in the metric; ``H = R R^T`` weights outputs). Returns ``(X, Y)``."""
    g = np.eye(p.shape[0]) if gram is None else gram
    m = p.T @ g @ p
    low = _chol(m)  # m = S S^T, S = low
    z = sla.cho_solve((low, True), p.T @ g @ b)  # the unconstrained minimiser
    if out_gram is not None:
        r_out = _chol(out_gram)
        t = low.T @ z @ r_out
    else:
        r_out = None
        t = low.T @ z
    u, sv, vt = np.linalg.svd(t, full_matrices=False)
    u, sv, vt = _signs(u, sv, vt)
    u, sv, vt = u[:, :rank], sv[:rank], vt[:rank]
    x = sla.solve_triangular(low.T, u * sv, lower=False)
    y = vt if r_out is None else sla.solve_triangular(r_out, vt.T, lower=True, trans="T").T
    return x, y


def _signs(u, s, vt):
    """Deterministic signs: each left vector's largest entry positive."""
    idx = np.argmax(np.abs(u), axis=0)
    sg = np.sign(u[idx, np.arange(u.shape[1])])
    sg[sg == 0] = 1
    return u * sg, s, vt * sg[:, None]


def _top(m: np.ndarray, r: int) -> np.ndarray:
    """The top ``r`` left singular vectors of ``m`` (from the eigenvectors of ``m m^T`` when ``m``
    is wide: a mode unfolding is ``[I, O kh kw]``, and its Gram is 5-10x cheaper than an SVD)."""
    if m.shape[0] * 2 <= m.shape[1]:
        val, vec = np.linalg.eigh(m @ m.T)
        u = vec[:, ::-1][:, :r]
        u, _, _ = _signs(u, val[::-1][:r], u.T)
        return u
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    u, _, _ = _signs(u, s, vt)
    return u[:, :r]


def channel_gram(gram: np.ndarray, channels: int, taps: int) -> np.ndarray:
    """``G_c [I, I]``: the input-channel second moment per tap, summed over taps."""
    g4 = gram.reshape(channels, taps, channels, taps)
    return np.einsum("itjt->ij", g4)


# ---------------------------------------------------------------------------------------------- Tucker-2


def tucker2(w: np.ndarray, r_in: int, r_out: int, gram: np.ndarray | None = None,
            out_gram: np.ndarray | None = None, iters: int = HOOI_ITERS) -> ConvFit:
    """Tucker-2 of one group's weight ``w [O, I, kh, kw]`` at ranks ``(r_in, r_out)`` (see the
    module docstring); exact when ``r_in = I`` and ``r_out = O`` (up to the metric's ridge)."""
    w64 = np.asarray(w, np.float64)
    o, i, kh, kw = w64.shape
    taps = kh * kw
    r_in, r_out = int(min(max(r_in, 1), i)), int(min(max(r_out, 1), o))
    # the core [R_out, R_in kh kw] has rank <= either side: a wider rank than that would be zeros
    r_out, r_in = min(r_out, r_in * taps), min(r_in, r_out * taps)
    b = as_matrix(w64)
    if gram is None and out_gram is None:
        u_in = _top(unfolding(w64, 1), r_in)
        for _ in range(max(iters, 1)):
            u_out = _top(unfolding(np.einsum("oihw,ia->oahw", w64, u_in, optimize=True), 0), r_out)
            u_in = _top(unfolding(np.einsum("oihw,ob->bihw", w64, u_out, optimize=True), 1), r_in)
        u_out = _top(unfolding(np.einsum("oihw,ia->oahw", w64, u_in, optimize=True), 0), r_out)
        core = np.einsum("oihw,ia,ob->bahw", w64, u_in, u_out, optimize=True)
        method = "hooi"
    else:
        g = np.asarray(gram, np.float64) if gram is not None else None
        if g is not None:
            lc = _chol(channel_gram(g, i, taps))
            u_in = sla.solve_triangular(lc.T, _top(lc.T @ unfolding(w64, 1), r_in), lower=False)
            u_in = np.linalg.qr(u_in)[0]  # the span is what counts; orthonormal keeps P well conditioned
        else:
            u_in = _top(unfolding(w64, 1), r_in)
        p = np.kron(u_in, np.eye(taps))  # [K, r_in * taps]
        x, y = reduced_rank(p, b, r_out, g, out_gram)  # B ~= P X Y
        core = x.reshape(r_in, kh, kw, r_out).transpose(3, 0, 1, 2)
        u_out = y.T
        method = "metric"
    parts = (u_in, core, u_out)
    rel, obj = _objective(b, as_matrix(reconstruct("tucker2", parts)), gram)
    dt = w.dtype if np.issubdtype(w.dtype, np.floating) else np.float32
    return ConvFit("tucker2", tuple(np.ascontiguousarray(a, dt) for a in parts), (r_in, r_out), method, rel, obj,
                   {"rank_in": r_in, "rank_out": r_out})


# ---------------------------------------------------------------------------------------------- CP


def cp(w: np.ndarray, rank: int, gram: np.ndarray | None = None, iters: int = CP_ITERS, seed: int = 0) -> ConvFit:
    """Rank-``rank`` CP of one group's weight by ALS (SVD start, seeded completion where a mode
    has fewer vectors than ``rank``); with ``gram`` the output factor is refit in the metric."""
    w64 = np.asarray(w, np.float64)
    o, i, kh, kw = w64.shape
    rank = int(max(rank, 1))
    rng = np.random.default_rng(seed)
    t = w64.transpose(1, 2, 3, 0)  # modes: in, h, w, out
    dims = t.shape
    factors = []
    for mode, d in enumerate(dims):
        u = _top(unfolding(t, mode), min(rank, d))
        if u.shape[1] < rank:
            u = np.concatenate([u, rng.standard_normal((d, rank - u.shape[1])) / np.sqrt(d)], axis=1)
        factors.append(u)
    norm = float(np.linalg.norm(t))
    for _ in range(iters):
        for mode in range(4):
            others = [factors[m] for m in range(4) if m != mode]
            kr = _khatri_rao(others)  # rows: the other modes in order
            gram_ = np.ones((rank, rank))
            for f in others:
                gram_ *= f.T @ f
            rhs = unfolding(t, mode) @ kr
            ridge = 1e-10 * max(float(np.trace(gram_)) / rank, 1e-300)
            factors[mode] = np.linalg.solve(gram_ + ridge * np.eye(rank), rhs.T).T
        # ||T - [[A]]||^2 = ||T||^2 - 2 <T, [[A]]> + ||[[A]]||^2, from the last mode's products
        # (no reconstruction of the tensor per sweep)
        last = factors[3]
        resid2 = norm**2 - 2.0 * float(np.sum(last * rhs)) + float(np.sum(gram_ * (last.T @ last)))
        # balance the column norms across modes (keeps ALS well scaled; the product is unchanged)
        norms = [np.linalg.norm(f, axis=0) + 1e-300 for f in factors]
        scale = np.prod(norms, axis=0) ** 0.25
        factors = [f / n * scale for f, n in zip(factors, norms)]
        if norm > 0 and max(resid2, 0.0) < (1e-7 * norm) ** 2:
            break
    a_in, a_h, a_w, a_out = factors
    method = "als"
    b = as_matrix(w64)
    if gram is not None:
        p = np.einsum("ir,hr,wr->ihwr", a_in, a_h, a_w, optimize=True).reshape(-1, rank)
        a_out = refit_last(p, b, np.asarray(gram, np.float64)).T
        method = "als+metric"
    parts = (a_in, a_h, a_w, a_out)
    rel, obj = _objective(b, as_matrix(reconstruct("cp", parts)), gram)
    dt = w.dtype if np.issubdtype(w.dtype, np.floating) else np.float32
    return ConvFit("cp", tuple(np.ascontiguousarray(a, dt) for a in parts), (rank,), method, rel, obj, {"rank": rank})


def _khatri_rao(mats: list[np.ndarray]) -> np.ndarray:
    out = mats[0]
    for m in mats[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, out.shape[1])
    return out


# ---------------------------------------------------------------------------------------------- spatial SVD


def spatial(w: np.ndarray, rank: int, gram: np.ndarray | None = None) -> ConvFit:
    """Spatial SVD of one group's weight at ``rank`` (see the module docstring); exact at
    ``min(I kh, O kw)``."""
    w64 = np.asarray(w, np.float64)
    o, i, kh, kw = w64.shape
    rank = int(min(max(rank, 1), i * kh, o * kw))
    m = w64.transpose(1, 2, 0, 3).reshape(i * kh, o * kw)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    u, s, vt = _signs(u, s, vt)
    root = np.sqrt(s[:rank])
    v = (u[:, :rank] * root).T.reshape(rank, i, kh)
    h = (root[:, None] * vt[:rank]).reshape(rank, o, kw).transpose(1, 0, 2)
    method = "svd"
    b = as_matrix(w64)
    if gram is not None:
        # B'[(i,y,x), o] = sum_r v[r,i,y] h[o,r,x]: linear in h through P[(i,y,x), (r,x')]
        p = np.einsum("riy,xz->iyxrz", v, np.eye(kw), optimize=True).reshape(i * kh * kw, rank * kw)
        hm = refit_last(p, b, np.asarray(gram, np.float64))  # [(r, x), o]
        h = hm.reshape(rank, kw, o).transpose(2, 0, 1)
        method = "svd+metric"
    parts = (v, h)
    rel, obj = _objective(b, as_matrix(reconstruct("spatial", parts)), gram)
    dt = w.dtype if np.issubdtype(w.dtype, np.floating) else np.float32
    return ConvFit("spatial", tuple(np.ascontiguousarray(a, dt) for a in parts), (rank,), method, rel, obj,
                   {"rank": rank, "singular_values": int(len(s))})


__all__ = ["ConvFit", "as_matrix", "channel_gram", "cp", "energy_rank", "mode_spectrum", "reconstruct",
           "reduced_rank", "refit_last", "spatial", "tucker2", "unfolding", "vbmf_rank"]
