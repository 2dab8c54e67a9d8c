"""Convolution forms: ``tucker2``, ``cp`` and ``spatial`` (2-D Conv weights ``[O, I/g, kh, kw]``).

Each replaces, per group, the weight by a chain of convs (``factorize.convdecomp`` has the math):

- ``tucker2``: ``1 x 1 (I -> R_in)``, ``kh x kw (R_in -> R_out`` with the original strides, pads,
  dilations and auto_pad), ``1 x 1 (R_out -> O``, the original bias). Stores
  ``I R_in + R_out R_in kh kw + O R_out`` per group.
- ``cp``: ``1 x 1 (I -> R)``, ``kh x 1`` depthwise, ``1 x kw`` depthwise (the original geometry
  split by axis), ``1 x 1 (R -> O``, bias). Stores ``R (I + kh + kw + O)``.
- ``spatial``: ``kh x 1 (I -> r)`` then ``1 x kw (r -> O``, bias). Stores ``r (I kh + O kw)``.

Today's ``k x k (r) -> 1 x 1`` split is the ``lowrank`` form on a conv. Grouped convs are
decomposed per group, every group at the same ranks (groups stay groups in each emitted conv).
Depthwise convs have nothing to factorize (the conv pass declines them); 1 x 1 convs are matrices
(``lowrank`` and the sparse forms serve them); the conv forms take 2-D convs only.

Ranks (``--conv-ranks``): ``budget`` (default): the rank policy (``--ratio`` / ``--rank``, where
``--rank r`` buys what a rank-``r`` chain stores, ``r (K + N)``, as for the sparse forms) or the
planner's size gives each group a parameter budget; CP and spatial take the largest rank within
it; Tucker-2 takes the pair ``(R_in, R_out)`` within it that keeps the most energy of the two mode
unfoldings (``tail_in(R_in) + tail_out(R_out)``, the HOSVD error bound), so the pair is one size,
one knapsack choice of the planner. ``--energy e``: per mode, the smallest rank keeping ``e``.
``vbmf``: per mode, the rank empirical VBMF keeps (data-free; CP takes the larger of the two mode
ranks); ``R`` or ``RINxROUT``: fixed ranks. Under VBMF or fixed ranks a conv has one size.

Data: with the layer's im2col Gram (``--method whiten``, the default with ``--calib``) the input
side is whitened and the last factor refit exactly in the metric (module docstring of
``convdecomp``); kfac's output curvature, where a conv has it, weights Tucker-2's output factor.
Without statistics the fits are data-free (HOOI, ALS, SVD).
"""
from __future__ import annotations

import math

import numpy as np

from ..factorize import RankPolicy
from ..factorize.convdecomp import ConvFit, energy_rank, mode_spectrum, vbmf_rank
from ..ir import Candidate, RewriteContext
from .base import Storage, Stored
from .sparse import CURVE_POINTS, budget

#: --conv-ranks values that are not fixed ranks
RANK_RULES = ("budget", "vbmf")


def parse_ranks(text: str) -> tuple[int, int] | str | None:
    """``budget``/``vbmf`` as is; ``R`` -> ``(R, R)``; ``RINxROUT`` -> both; None if malformed."""
    text = str(text).strip().lower()
    if text in RANK_RULES:
        return text
    a, sep, b = text.partition("x")
    if a.isdigit() and (not sep or b.isdigit()):
        r_in, r_out = int(a), int(b) if sep else int(a)
        return (r_in, r_out) if r_in > 0 and r_out > 0 else None
    return None


def _corrected(form, w: np.ndarray, ranks, gram: np.ndarray, gy, st, options: dict) -> ConvFit:
    """Sequential calibration's target correction (``factorize.whiten``'s module docstring): the
    compressed layer is fitted to the original's outputs, ``min ||X' W' - X W||``, i.e. to the
    ridge least-squares target ``B* = (G' + lam I)^-1 (H B + lam B)`` in the metric ``G' + lam I``;
    the objective error reported is ``||X' W' - X W|| / ||X W||``."""
    from dataclasses import replace

    from ..factorize.convdecomp import as_matrix
    from ..factorize.whiten import DEFAULT_DAMPING, corrected_target

    b = as_matrix(np.asarray(w, np.float64))
    k = b.shape[0]
    lam = float(options.get("damping", DEFAULT_DAMPING)) * float(np.trace(gram)) / k
    gd = gram + lam * np.eye(k)
    target = corrected_target(b, gd, st, lam)
    f = form._fit(target.T.reshape(w.shape).astype(w.dtype), ranks, gd, gy, options)
    m = as_matrix(f.weight.astype(np.float64))
    den = float(np.sum((np.asarray(st.ref_gram, np.float64) @ b) * b))
    num = float(np.sum((gram @ m) * m)) - 2.0 * float(np.sum(m * (np.asarray(st.cross, np.float64) @ b))) + den
    rel = float(np.linalg.norm(b - m) / max(np.linalg.norm(b), 1e-300))
    obj = float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
    return replace(f, rel_error=rel, objective_error=obj, info={**f.info, "target_correction": True})


class _Inputs:
    """What ``fit_full`` returns: the fitting inputs (a conv form's curve needs fits per size)."""

    bias = None

    def __init__(self, cand, method, stats, options) -> None:
        self.cand, self.method, self.stats, self.options = cand, method, stats, options


class _ConvForm:
    """What the conv forms share (see the module docstring)."""

    name = ""
    ops = ("conv",)
    priced_by_default = False
    knobs = ("conv_ranks",)

    # ------------------------------------------------------------------ which convs

    def refuses(self, cand: Candidate, options: dict) -> str | None:
        wshape = cand.details.get("wshape", ())
        if len(wshape) != 4 or cand.details.get("geometry") is None:
            return f"{self.name}: a {max(len(wshape) - 2, 0)}-D conv (the conv forms take 2-D convs)"
        if wshape[2] * wshape[3] == 1:
            return f"{self.name}: a 1 x 1 conv is a matrix (lowrank and the sparse forms serve it)"
        return None

    # ------------------------------------------------------------------ layout: ranks from a size

    def _dims(self, cand: Candidate) -> tuple[int, int, int, int, int]:
        o, ig, kh, kw = cand.details["wshape"]
        g = cand.details["group"]
        return o // g, ig, kh, kw, g

    def _weights(self, cand: Candidate) -> list[np.ndarray]:
        og, ig, kh, kw, _ = self._dims(cand)
        return [m.T.reshape(og, ig, kh, kw) for m in cand.matrices]

    def ranks(self, cand: Candidate, policy: RankPolicy | None, options: dict) -> tuple[int, ...]:
        """The ranks a fit takes under ``policy`` / ``--conv-ranks``; ValueError when a budget is
        too small for the form."""
        rule = parse_ranks(options.get("conv_ranks", "budget"))
        if rule is None:
            raise ValueError(f"--conv-ranks {options.get('conv_ranks')!r}: expected budget, vbmf, R or RINxROUT")
        if rule == "vbmf":
            return self._vbmf(cand)
        if isinstance(rule, tuple):
            return self._fixed(cand, rule)
        if policy is not None and policy.energy is not None:
            return self._energy(cand, policy.energy)
        if policy is None:
            raise ValueError("no size")
        p = min(budget(cand, policy, m) for m in cand.matrices)
        return self._within(cand, p)

    def _mode_ranks(self, cand: Candidate, pick) -> tuple[int, int]:
        r_in = r_out = 1
        for w in self._weights(cand):
            r_in = max(r_in, pick(w, 1))
            r_out = max(r_out, pick(w, 0))
        return r_in, r_out

    def _vbmf(self, cand: Candidate) -> tuple[int, ...]:
        from ..factorize.convdecomp import unfolding

        return self._from_modes(cand, *self._mode_ranks(cand, lambda w, m: max(1, vbmf_rank(unfolding(w, m)))))

    def _energy(self, cand: Candidate, e: float) -> tuple[int, ...]:
        return self._from_modes(cand, *self._mode_ranks(cand, lambda w, m: energy_rank(mode_spectrum(w, m), e)))

    def _from_modes(self, cand, r_in, r_out) -> tuple[int, ...]:
        raise NotImplementedError

    def _fixed(self, cand, pair) -> tuple[int, ...]:
        raise NotImplementedError

    def _within(self, cand: Candidate, p: float) -> tuple[int, ...]:
        raise NotImplementedError

    def _values(self, cand: Candidate, ranks: tuple[int, ...]) -> int:
        """Values stored per group at ``ranks``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ fitting

    def fit(self, cand: Candidate, policy: RankPolicy, method: str, stats: list, options: dict) -> list[ConvFit]:
        from threadpoolctl import threadpool_limits

        ranks = self.ranks(cand, policy, options)
        size = self._size_of(cand, ranks)
        if policy is not None and policy.rank is not None and parse_ranks(options.get("conv_ranks", "budget")) == "budget":
            size = int(policy.rank)
        out = []
        for w, st in zip(self._weights(cand), stats):
            gram = np.asarray(st.gram, np.float64) if st is not None and st.gram is not None else None
            gy = getattr(st, "grad_gram", None) if st is not None else None
            gy = np.asarray(gy, np.float64) if gy is not None and np.shape(gy) == (w.shape[0],) * 2 else None
            with threadpool_limits(limits=1, user_api="blas"):  # small dense algebra: threads only spin
                if gram is not None and getattr(st, "cross", None) is not None and st.ref_gram is not None:
                    f = _corrected(self, w, ranks, gram, gy, st, options)
                else:
                    f = self._fit(w, ranks, gram, gy, options)
            used = "svd" if gram is None else method
            out.append(ConvFit(f.kind, f.parts, f.ranks, f.method, f.rel_error, f.objective_error,
                               {**f.info, "fit": f.method, "layer_method": used, "size": int(size),
                                "dense": int(w.size)}))
        return out

    def _fit(self, w, ranks, gram, out_gram, options) -> ConvFit:
        raise NotImplementedError

    def fit_full(self, cand: Candidate, method: str, stats: list, options: dict) -> list:
        """The fitting inputs (``curve`` fits at a few sizes); no mean-correction bias."""
        return [_Inputs(cand, method, stats, options)]

    def _size_of(self, cand: Candidate, ranks: tuple[int, ...]) -> int:
        """The size on the chain's scale whose budget these ranks fit in."""
        k, n = cand.matrices[0].shape
        return max(1, math.ceil(self._values(cand, ranks) / (k + n)))

    # ------------------------------------------------------------------ what the planner prices

    def sizes(self, cand: Candidate, multiple: int, options: dict | None = None) -> np.ndarray:
        from ..factorize.allocate import rank_grid

        k, n = cand.matrices[0].shape
        rule = parse_ranks((options or {}).get("conv_ranks", "budget"))
        if rule != "budget":  # vbmf / fixed ranks: one size
            try:
                s = self._size_of(cand, self.ranks(cand, None, options or {}))
            except ValueError:
                return np.zeros(0, np.int64)
            return np.array([s] if s < k * n / (k + n) else [], np.int64)
        grid = rank_grid(k, n, multiple)
        keep = []
        for s in grid:
            try:
                self._within(cand, float(s) * (k + n))
                keep.append(s)
            except ValueError:
                continue
        return np.asarray(keep, np.int64)

    def params(self, cand: Candidate, sizes: np.ndarray, *, bias: bool) -> np.ndarray:
        """Stored values at each size (what the ranks the size buys store), all groups."""
        g = len(cand.matrices)
        k, n = cand.matrices[0].shape
        return np.array([g * self._values(cand, self._within(cand, float(s) * (k + n))) for s in sizes], np.float64)

    def curve(self, full: list, sizes: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Relative squared objective error at each size: fitted at up to ``CURVE_POINTS`` sizes,
        log-interpolated between them."""
        d = full[0]
        cand, method, stats, options = d.cand, d.method, d.stats, d.options
        sizes = np.asarray(sizes)
        if not len(sizes):
            return np.zeros(0), []
        at = sorted(set(np.linspace(0, len(sizes) - 1, min(CURVE_POINTS, len(sizes))).round().astype(int)))
        err2 = []
        for i in at:
            try:
                fits = self.fit(cand, RankPolicy(rank=int(sizes[i]), multiple=1), method, stats, options)
                err2.append(max(self.errors(cand, fits)[1] ** 2, 1e-30))
            except ValueError:
                err2.append(1.0)
        return np.exp(np.interp(np.arange(len(sizes)), at, np.log(err2))), []

    def flops(self, cand: Candidate, sizes: np.ndarray, rows: float) -> tuple[float, np.ndarray]:
        """Dense FLOPs and the chain's at each size, ``rows`` output pixels per inference (a stage
        before a stride runs at the finer resolution)."""
        kn = sum(m.shape[0] * m.shape[1] for m in cand.matrices)
        k, n = cand.matrices[0].shape
        sh, sw = cand.details["geometry"].strides
        g = len(cand.matrices)
        out = np.array([g * self._flops(cand, self._within(cand, float(s) * (k + n)), rows, sh, sw) for s in sizes])
        return 2.0 * rows * kn, out

    def _flops(self, cand, ranks, rows, sh, sw) -> float:
        raise NotImplementedError

    def probe_scale(self, cand: Candidate) -> float:
        return self.break_even(cand)

    def break_even(self, cand: Candidate) -> float:
        k, n = cand.matrices[0].shape
        return k * n / (k + n)

    # ------------------------------------------------------------------ a fitted value

    def size(self, fits: list[ConvFit]) -> int:
        return int(fits[0].info["size"])

    def method(self, fits: list[ConvFit]) -> str:
        return str(fits[0].info.get("layer_method", "svd"))

    def info(self, fits: list[ConvFit]) -> dict:
        info = {k: v for k, v in fits[0].info.items() if isinstance(v, (int, float, str, bool))}
        info["ranks"] = "x".join(map(str, fits[0].ranks))
        info["stored_values"] = int(sum(f.values for f in fits))
        return info

    def storage(self, fits: list[ConvFit]) -> Storage:
        tensors = []
        for g, f in enumerate(fits):
            for j, p in enumerate(f.parts):
                tensors.append(Stored(f"{self.name}{g}_{j}", tuple(p.shape), str(p.dtype)))
        return Storage(tuple(tensors))

    def errors(self, cand: Candidate, fits: list[ConvFit]) -> tuple[float, float]:
        out = []
        for attr in ("rel_error", "objective_error"):
            num = sum((getattr(f, attr) * float(np.linalg.norm(m))) ** 2 for f, m in zip(fits, cand.matrices))
            den = sum(float(np.linalg.norm(m)) ** 2 for m in cand.matrices)
            out.append(float(np.sqrt(num / den)) if den > 0 else 0.0)
        return out[0], out[1]

    def declines(self, fits: list[ConvFit]) -> str | None:
        p = self.storage(fits).params
        dense = sum(int(f.info.get("dense", 0)) for f in fits)
        if p >= dense:
            return (f"{self.name} at ranks {'x'.join(map(str, fits[0].ranks))} stores {p} values >= {dense} of the "
                    "dense conv: saves nothing")
        return None

    def transpose(self, fits: list[ConvFit]) -> str:
        return f"a {self.name} conv serves one orientation"

    def random(self, cand: Candidate, size: int, *, seed: int = 0, options: dict | None = None) -> list[ConvFit]:
        """Seeded random parts of the structure the form has at ``size``: for timing."""
        options = {"conv_ranks": "budget", **(options or {})}
        policy = RankPolicy(rank=max(1, int(size)), multiple=1)
        ranks = self.ranks(cand, policy, options)
        rng = np.random.default_rng(seed)
        dt = cand.matrices[0].dtype
        out = []
        for w in self._weights(cand):
            parts = tuple((rng.standard_normal(s) / math.sqrt(max(s[-1], 1))).astype(dt)
                          for s in self._shapes(w.shape, ranks))
            out.append(ConvFit(self.name, parts, ranks, "timing", float("nan"), float("nan"),
                               {"size": int(size), "layer_method": "timing", "dense": int(w.size)}))
        return out

    def _shapes(self, wshape, ranks) -> list[tuple[int, ...]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ emission

    def emit(self, ctx: RewriteContext, cand: Candidate, fits: list[ConvFit]) -> None:
        from lrcompile.passes import PASSES

        op = PASSES[cand.pass_name]
        w = op.detach(cand)
        op.sequence(ctx, cand, w, self._stages(w.extra["attrs"], fits), self._tag)

    _tag = ""

    def _stages(self, attrs: dict, fits: list[ConvFit]) -> list:
        raise NotImplementedError


#: mode tails per weight (their SVDs are asked for at every size the planner prices)
_TAILS: dict = {}


def _tail(s: np.ndarray) -> np.ndarray:
    """``tail[r]`` = energy beyond the first ``r`` values (r = 0..len)."""
    e = np.asarray(s, np.float64) ** 2
    return np.concatenate([[e.sum()], e.sum() - np.cumsum(e)])


class Tucker2Form(_ConvForm):
    """``1 x 1 -> k x k -> 1 x 1`` (see the module docstring)."""

    name = "tucker2"
    _tag = "t2"

    def _from_modes(self, cand, r_in, r_out):
        og, ig, kh, kw, _ = self._dims(cand)
        r_in, r_out = min(r_in, ig), min(r_out, og)
        return (min(r_in, r_out * kh * kw), min(r_out, r_in * kh * kw))

    def _fixed(self, cand, pair):
        return self._from_modes(cand, *pair)

    def _values(self, cand, ranks):
        og, ig, kh, kw, _ = self._dims(cand)
        return _tucker_values(ig, og, kh * kw, *ranks)

    def _within(self, cand, p):
        og, ig, kh, kw, _ = self._dims(cand)
        tin, tout = self._tails(cand)
        best = None
        taps = kh * kw
        for r_in in range(1, ig + 1):
            top = min(og, r_in * taps)  # the core's rank caps R_out (and R_in below)
            if _tucker_values(ig, og, taps, r_in, top) <= p:
                r_out = top  # (a full-rank output side folds into the core: cheaper than og - 1)
            else:
                r_out = min(top - 1, int((p - (ig * r_in if r_in < ig else 0)) // (r_in * taps + og)))
            if r_out < 1 or r_in > r_out * taps:
                continue
            est = tin[r_in] + tout[r_out]
            if best is None or est < best[0] - 1e-12 * (tin[0] + tout[0]):
                best = (est, (r_in, r_out))
        if best is None:
            raise ValueError(f"a budget of {p:.0f} values per group buys no Tucker-2 ranks")
        return best[1]

    def _tails(self, cand) -> tuple[np.ndarray, np.ndarray]:
        """Tail energies of the two mode unfoldings, summed over groups (cached by the weight's bytes)."""
        import hashlib

        h = hashlib.sha1()
        for m in cand.matrices:
            h.update(np.ascontiguousarray(m).tobytes())
        key = (tuple(cand.details["wshape"]), h.hexdigest())
        if key not in _TAILS:
            ws = self._weights(cand)
            if len(_TAILS) > 256:
                _TAILS.clear()
            _TAILS[key] = (sum(_tail(mode_spectrum(w, 1)) for w in ws), sum(_tail(mode_spectrum(w, 0)) for w in ws))
        return _TAILS[key]

    def _fit(self, w, ranks, gram, out_gram, options):
        from ..factorize.convdecomp import tucker2

        return tucker2(w, ranks[0], ranks[1], gram, out_gram)

    def _flops(self, cand, ranks, rows, sh, sw):
        og, ig, kh, kw, _ = self._dims(cand)
        r_in, r_out = ranks
        return 2.0 * rows * ((sh * sw * ig * r_in if r_in < ig else 0) + r_out * r_in * kh * kw
                             + (r_out * og if r_out < og else 0))

    def storage(self, fits: list[ConvFit]) -> Storage:
        """What the emitted convs hold: a full-rank side is folded into the core (no 1 x 1 conv)."""
        tensors = []
        for g, f in enumerate(fits):
            for j, p in enumerate(_folded(f)):
                if p is not None:
                    tensors.append(Stored(f"{self.name}{g}_{j}", tuple(p.shape), str(p.dtype)))
        return Storage(tuple(tensors))

    def _shapes(self, wshape, ranks):
        o, i, kh, kw = wshape
        return [(i, ranks[0]), (ranks[1], ranks[0], kh, kw), (o, ranks[1])]

    def _stages(self, attrs, fits):
        from lrcompile.passes.conv import axis_attrs, pointwise

        g = len(fits)
        kh, kw = fits[0].parts[1].shape[2:]
        folded = [_folded(f) for f in fits]
        u_in, core, u_out = ([x[j] for x in folded] for j in range(3))
        stages = [] if u_in[0] is None else [("in", np.concatenate([u.T[:, :, None, None] for u in u_in]),
                                             pointwise(g))]
        stages.append(("core", np.concatenate(core), axis_attrs(attrs, (kh, kw), None, g)))
        if u_out[0] is not None:
            stages.append(("out", np.concatenate([u[:, :, None, None] for u in u_out]), pointwise(g)))
        return stages


def _tucker_values(ig: int, og: int, taps: int, r_in: int, r_out: int) -> int:
    """Values Tucker-2 stores per group; a side at full rank folds into the core (its 1 x 1 conv
    would be an invertible map: the chain is then today's split, or its mirror)."""
    return (ig * r_in if r_in < ig else 0) + r_out * r_in * taps + (og * r_out if r_out < og else 0)


def _folded(f: ConvFit) -> tuple:
    """``(u_in | None, core, u_out | None)`` as emitted: a full-rank factor multiplied into the core."""
    u_in, core, u_out = f.parts
    dt = core.dtype
    if u_in.shape[1] >= u_in.shape[0]:
        core = np.einsum("bahw,ia->bihw", core.astype(np.float64), u_in.astype(np.float64), optimize=True).astype(dt)
        u_in = None
    if u_out.shape[1] >= u_out.shape[0]:
        core = np.einsum("bahw,ob->oahw", core.astype(np.float64), u_out.astype(np.float64), optimize=True).astype(dt)
        u_out = None
    return u_in, core, u_out


class CPForm(_ConvForm):
    """``1 x 1 -> k x 1 depthwise -> 1 x k depthwise -> 1 x 1`` (see the module docstring)."""

    name = "cp"
    _tag = "cp"

    def _from_modes(self, cand, r_in, r_out):
        return (max(r_in, r_out),)

    def _fixed(self, cand, pair):
        return (max(pair),)

    def _values(self, cand, ranks):
        og, ig, kh, kw, _ = self._dims(cand)
        return ranks[0] * (ig + kh + kw + og)

    def _within(self, cand, p):
        og, ig, kh, kw, _ = self._dims(cand)
        r = int(p // (ig + kh + kw + og))
        if r < 1:
            raise ValueError(f"a budget of {p:.0f} values per group buys no CP rank")
        return (r,)

    def _fit(self, w, ranks, gram, out_gram, options):
        from ..factorize.convdecomp import cp

        return cp(w, ranks[0], gram, seed=int(options.get("seed", 0)))

    def _flops(self, cand, ranks, rows, sh, sw):
        og, ig, kh, kw, _ = self._dims(cand)
        r = ranks[0]
        return 2.0 * rows * (sh * sw * ig * r + sw * r * kh + r * kw + r * og)

    def _shapes(self, wshape, ranks):
        o, i, kh, kw = wshape
        r = ranks[0]
        return [(i, r), (kh, r), (kw, r), (o, r)]

    def _stages(self, attrs, fits):
        from lrcompile.passes.conv import axis_attrs, pointwise

        g = len(fits)
        r = fits[0].ranks[0]
        kh, kw = fits[0].parts[1].shape[0], fits[0].parts[2].shape[0]
        first = np.concatenate([f.parts[0].T[:, :, None, None] for f in fits])
        vert = np.concatenate([f.parts[1].T[:, None, :, None] for f in fits])
        horiz = np.concatenate([f.parts[2].T[:, None, None, :] for f in fits])
        last = np.concatenate([f.parts[3][:, :, None, None] for f in fits])
        return [("in", first, pointwise(g)), ("kh", vert, axis_attrs(attrs, (kh, 1), 0, g * r)),
                ("kw", horiz, axis_attrs(attrs, (1, kw), 1, g * r)), ("out", last, pointwise(g))]


class SpatialForm(_ConvForm):
    """``k x 1 -> 1 x k`` (see the module docstring)."""

    name = "spatial"
    _tag = "sp"

    def _cap(self, cand) -> int:
        og, ig, kh, kw, _ = self._dims(cand)
        return min(ig * kh, og * kw)

    def _from_modes(self, cand, r_in, r_out):
        return (min(max(r_in, r_out), self._cap(cand)),)

    def _vbmf(self, cand):
        og, ig, kh, kw, _ = self._dims(cand)
        r = max(max(1, vbmf_rank(w.transpose(1, 2, 0, 3).reshape(ig * kh, og * kw))) for w in self._weights(cand))
        return (min(r, self._cap(cand)),)

    def _energy(self, cand, e):
        og, ig, kh, kw, _ = self._dims(cand)
        r = max(energy_rank(np.linalg.svd(w.transpose(1, 2, 0, 3).reshape(ig * kh, og * kw).astype(np.float64),
                                          compute_uv=False), e) for w in self._weights(cand))
        return (min(r, self._cap(cand)),)

    def _fixed(self, cand, pair):
        return (min(max(pair), self._cap(cand)),)

    def _values(self, cand, ranks):
        og, ig, kh, kw, _ = self._dims(cand)
        return ranks[0] * (ig * kh + og * kw)

    def _within(self, cand, p):
        og, ig, kh, kw, _ = self._dims(cand)
        r = min(int(p // (ig * kh + og * kw)), self._cap(cand))
        if r < 1:
            raise ValueError(f"a budget of {p:.0f} values per group buys no spatial rank")
        return (r,)

    def _fit(self, w, ranks, gram, out_gram, options):
        from ..factorize.convdecomp import spatial

        return spatial(w, ranks[0], gram)

    def _flops(self, cand, ranks, rows, sh, sw):
        og, ig, kh, kw, _ = self._dims(cand)
        r = ranks[0]
        return 2.0 * rows * (sw * r * ig * kh + r * og * kw)

    def _shapes(self, wshape, ranks):
        o, i, kh, kw = wshape
        return [(ranks[0], i, kh), (o, ranks[0], kw)]

    def _stages(self, attrs, fits):
        from lrcompile.passes.conv import axis_attrs

        g = len(fits)
        kh, kw = fits[0].parts[0].shape[2], fits[0].parts[1].shape[2]
        vert = np.concatenate([f.parts[0][..., None] for f in fits])
        horiz = np.concatenate([f.parts[1][:, :, None, :] for f in fits])
        return [("kh", vert, axis_attrs(attrs, (kh, 1), 0, g)), ("kw", horiz, axis_attrs(attrs, (1, kw), 1, g))]


#: the conv forms' names (config allows --energy for them: per mode)
CONV_FORMS = ("tucker2", "cp", "spatial")
