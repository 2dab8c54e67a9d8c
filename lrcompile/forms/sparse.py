"""Sparse and sparse + dense forms: ``nm``, ``lowrank+sparse``, ``dense-nm``, ``dictionary``.

Each replaces one candidate's weight ``B [K, N]`` (per group) by a fit from
``lrcompile.factorize.sparse`` / ``.sparsedense`` (a ``SparseFit``: ``B ~= A C + S``):

- ``nm``: ``S`` keeps ``N`` of every ``M`` consecutive weights along the reduction axis (a Conv's
  groups run over ``M`` input channels at one kernel position, as TensorRT's sparse kernels
  want), chosen and refitted by second-order (OBS) pruning in the layer's metric. Emitted as the
  op itself with the pruned weight (``whole``): ONNX Runtime runs it dense (no saving there);
  TensorRT runs it on sparse tensor cores with ``--sparse-weights``.
- ``lowrank+sparse``: ``A C + S`` (OATS-style alternation): the low-rank chain plus a branch for
  ``S``, added. ``S`` unstructured (stored as a sparse initializer in the file: values and int64
  indices; every runtime densifies it, so it costs a dense GEMM at run time: no kernel runs
  unstructured sparse GEMMs here, the plugin issue takes that), whole input rows (``rows``: a
  Gather of those input channels and a small MatMul, cheap everywhere; on an embedding table the
  hot rows, kept exact where the lookup counts weigh them: a lookup in ``S``) or N:M.
- ``dense-nm``: ``D S`` with ``S`` N:M along the inner axis: the low-rank chain's emission, its
  second weight N:M (TensorRT's sparse kernels can run the second op).
- ``dictionary``: ``D C`` with ``C`` holding ``s`` nonzeros per column (s atoms per output):
  the chain's emission, ``C`` stored as a sparse initializer.

The metric each fit minimises, ``||L^T (B - B')||_F`` with ``G = L L^T``, comes from the layer's
method and statistics (:func:`metric`): the input Gram for whiten / kfac (its input side),
``diag(mean |x|)^2`` for asvd, the Fisher row importance for fwsvd, lookup counts for an
embedding, none (plain weight error) for svd.

Storage is what a runtime stores, counted honestly (``Stored.index_bytes``): N:M keeps ``N/M`` of
the values plus ``ceil(log2 M)`` bits of metadata per kept value (TensorRT's 2:4: 2 bits);
unstructured values carry an int32 column index each plus int32 row pointers (CSR); whole rows
carry one int64 index per row (the Gather's indices); a dictionary's codes carry an int16 atom
index each (int32 past 32767 atoms). The parameter-equivalent (``Storage.params``: values plus
index bytes in units of the values' dtype) is what budgets count, so no sparse form looks
cheaper than it is. The file may store a part otherwise (an ONNX sparse initializer's indices are
int64; N:M stays dense in the file): the report's byte totals are read from the written file.

Sizes: a rank policy (``--ratio`` / ``--rank``) or the planner gives each layer a parameter
budget ``P`` (``--rank r`` means ``r (K + N)``, what the chain would store); each form spends it
(``lowrank+sparse``: ``--sparse-share`` of it on ``S``; ``dictionary``: ``--dictionary-share``
on ``D``). ``nm``'s size is its pattern.
"""
from __future__ import annotations

import math

import numpy as np

from ..factorize import LayerStats, RankPolicy
from ..factorize.types import SparseFit
from ..factorize.whiten import DEFAULT_DAMPING
from ..ir import Candidate, RewriteContext, Wiring
from .base import Storage, Stored

#: An int32 index of a CSR column / row pointer, an int64 Gather index, an int16 atom index.
CSR_INDEX_BYTES, ROW_INDEX_BYTES = 4, 8


def metric(method: str, stats: LayerStats | None) -> tuple[np.ndarray | None, str]:
    """The input-side Gram a sparse fit minimises ``||L^T (B - B')||`` in, for the layer's
    ``method`` and its statistics: ``G [K, K]``, or its diagonal ``[K]`` where the metric is
    diagonal (never a dense ``diag``: a 30,522-row vocabulary would make it 7 GB); and the name of
    that metric (None: the weight error)."""
    if stats is None:
        return None, "weight"
    if stats.gram is not None:
        return np.asarray(stats.gram, np.float64), "gram"
    if stats.fisher is not None:  # FWSVD's row importance d_i^2 = sum_j F_ij
        return np.asarray(stats.fisher, np.float64).sum(axis=1) + 1e-12, "fisher-rows"
    if stats.abs_sum is not None and stats.count:  # ASVD's per-channel scale, squared
        return (np.asarray(stats.abs_sum, np.float64) / stats.count) ** 2 + 1e-12, "mean-abs"
    if stats.in_sum is not None:  # lookups: one-hot rows, G = diag(counts)
        return np.asarray(stats.in_sum, np.float64), "lookups"
    return None, "weight"


def diagonal_metric_fit(fit, b: np.ndarray, gram: np.ndarray, damping: float) -> SparseFit:
    """``fit(b', None)`` on ``b' = diag(s) b`` with ``s^2`` the damped diagonal metric ``gram [K]``
    (``g + damping mean(g)``, as whitening damps), unscaled after: ``D = diag(1/s) D'``. Exact
    for a diagonal metric, and it never forms ``diag(g)``; errors recomputed for ``b``."""
    from dataclasses import replace

    g = np.asarray(gram, np.float64)
    s = np.sqrt(g + damping * max(float(g.mean()), 1e-300))
    f = fit(np.asarray(b * s[:, None].astype(b.dtype), b.dtype), None)
    a = (f.a.astype(np.float64) / s[:, None]).astype(f.a.dtype)
    approx = a.astype(np.float64) @ f.c.astype(np.float64)
    b64 = b.astype(np.float64)
    rel = float(np.linalg.norm(b64 - approx) / max(np.linalg.norm(b64), 1e-300))
    gs_ = np.sqrt(g)[:, None]
    obj = float(np.linalg.norm(gs_ * (b64 - approx)) / max(np.linalg.norm(gs_ * b64), 1e-300))
    return replace(f, a=a, rel_error=rel, objective_error=obj)


def budget(cand: Candidate, policy: RankPolicy, m: np.ndarray) -> float:
    """The parameter budget of one group's weight ``m [K, N]`` under ``policy``: ``ratio * K N``,
    or what the chain would store at ``rank`` (``r (K + N)``)."""
    k, n = m.shape
    if policy.ratio is not None:
        return policy.ratio * k * n
    if policy.rank is not None:
        return float(policy.rank * (k + n))
    raise ValueError("sparse forms take --ratio or --rank (or a global budget), not --energy or --max-error")


def conv_order(cand: Candidate, m: int) -> tuple[np.ndarray | None, str | None]:
    """The order of a Conv's reduction axis whose runs of ``m`` are ``m`` input channels at one
    kernel position (TensorRT's N:M layout), or why there is none."""
    if cand.pass_name != "conv":
        return None, None
    wshape = cand.details["wshape"]
    ch, taps = wshape[1], int(np.prod(wshape[2:]))
    if ch % m:
        return None, f"{ch} input channels per group are not a multiple of M={m}"
    return np.arange(ch * taps).reshape(ch, taps).T.ravel(), None


def _bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def nm_stored(name: str, shape: tuple[int, int], n: int, m: int, dtype: str) -> Stored:
    """An N:M tensor of ``shape`` (pattern along axis 0): its kept values and their metadata."""
    kept = shape[0] * shape[1] * n // m
    return Stored(name, (kept,), dtype, index_bytes=math.ceil(kept * _bits(m) / 8))


def _errors(cand: Candidate, fits: list[SparseFit]) -> tuple[float, float]:
    out = []
    for attr in ("rel_error", "objective_error"):
        num = sum((getattr(f, attr) * float(np.linalg.norm(m))) ** 2 for f, m in zip(fits, cand.matrices))
        den = sum(float(np.linalg.norm(m)) ** 2 for m in cand.matrices)
        out.append(float(np.sqrt(num / den)) if den > 0 else 0.0)
    return out[0], out[1]


#: Fits per error curve (the planner's curve for a sparse form).
CURVE_POINTS = 6


class _Deferred:
    """What ``fit_full`` returns for a sparse form: the fitting inputs, fitted per size by ``curve``."""

    bias = None

    def __init__(self, form, cand, method, stats, options) -> None:
        self.form, self.cand, self.method, self.stats, self.options = form, cand, method, stats, options


class _SparseBase:
    """What the sparse forms share: fitting per group in the layer's metric, reporting, declining."""

    name = ""
    ops: tuple[str, ...] = ()
    priced_by_default = False
    #: the config fields ``fit`` reads (``engine.plan.factorize_layer`` passes them in ``options``)
    knobs: tuple[str, ...] = ()

    def refuses(self, cand: Candidate, options: dict) -> str | None:
        """Why this form cannot serve ``cand`` with these knobs (None: it can)."""
        return None

    def fit(self, cand: Candidate, policy: RankPolicy, method: str, stats: list, options: dict) -> list[SparseFit]:
        from threadpoolctl import threadpool_limits

        from .lowrank import SINGLE_THREAD_BELOW

        out = []
        for m, st in zip(cand.matrices, stats):
            gram, name = metric(method, st)
            # the fits' many small SVDs, solves and QRs: threaded BLAS made them 10-50x slower on
            # a busy 2-core machine (measured), as for the low-rank form
            with threadpool_limits(limits=1 if m.size < SINGLE_THREAD_BELOW else None, user_api="blas"):
                f = self._fit(cand, m, policy, gram, options)
            size = budget(cand, policy, m) / sum(m.shape) if policy.ratio is not None or policy.rank is not None else 0
            out.append(_with(f, method=f"{method}:{name}" if gram is not None else method,
                             info={**f.info, "size": int(round(size))}))
        return out

    # ------------------------------------------------------------------ what the planner prices
    # Sizes are on the chain's scale: size s buys the storage of a rank-s chain, s (K + N) per
    # group, spent the form's way. Its error at a size needs a fit there: ``curve`` fits at up to
    # CURVE_POINTS sizes of the grid and interpolates log error^2 between them.

    def fit_full(self, cand: Candidate, method: str, stats: list, options: dict) -> list:
        return [_Deferred(self, cand, method, stats, options)]

    def sizes(self, cand: Candidate, multiple: int, options: dict | None = None) -> np.ndarray:
        from ..factorize.allocate import rank_grid

        k, n = cand.matrices[0].shape
        return rank_grid(k, n, multiple)

    def params(self, cand: Candidate, sizes: np.ndarray, *, bias: bool) -> np.ndarray:
        return np.asarray(sizes, np.float64) * sum(m.shape[0] + m.shape[1] for m in cand.matrices)

    def curve(self, full: list, sizes: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        d = full[0]
        sizes = np.asarray(sizes)
        if not len(sizes):
            return np.zeros(0), []
        at = sorted(set(np.linspace(0, len(sizes) - 1, min(CURVE_POINTS, len(sizes))).round().astype(int)))
        err2 = []
        for i in at:
            try:
                fits = self.fit(d.cand, RankPolicy(rank=int(sizes[i]), multiple=1), d.method, d.stats, d.options)
                err2.append(max(self.errors(d.cand, fits)[1] ** 2, 1e-30))
            except ValueError:  # the size cannot host the form (e.g. no rank left beside S)
                err2.append(1.0)
        return np.exp(np.interp(np.arange(len(sizes)), at, np.log(err2))), []

    def flops(self, cand: Candidate, sizes: np.ndarray, rows: float) -> tuple[float, np.ndarray]:
        """Dense FLOPs and the form's multiply-adds on its stored values at each size (what
        kernels that skip zeros execute; a runtime that runs the sparse part dense does more)."""
        if cand.details.get("lookup"):
            return 0.0, 2.0 * rows * np.asarray(sizes, np.float64) * sum(m.shape[1] for m in cand.matrices)
        kn = sum(m.shape[0] * m.shape[1] for m in cand.matrices)
        return 2.0 * rows * kn, 2.0 * rows * self.params(cand, sizes, bias=False)

    def probe_scale(self, cand: Candidate) -> float:
        return self.break_even(cand)

    def _fit(self, cand, m, policy, gram, options) -> SparseFit:
        raise NotImplementedError

    def random(self, cand: Candidate, size: int, *, seed: int = 0, options: dict | None = None) -> list[SparseFit]:
        """Seeded random values with the structure the form has at ``size`` (its parts' shapes,
        patterns and nonzero counts), one per group: for timing, where values do not matter."""
        options = {"nm": "2:4", "sparse_share": 0.25, "sparse_pattern": "unstructured", "dictionary_share": 0.5,
                   "dictionary_kind": "orthogonal", **(options or {})}
        rng = np.random.default_rng(seed)
        policy = RankPolicy(rank=max(1, int(size)), multiple=1)
        return [_with(self._random(cand, m, policy, options, rng), info={"size": int(size)}) for m in cand.matrices]

    def _random(self, cand, m, policy, options, rng) -> SparseFit:
        raise NotImplementedError

    def method(self, fits: list[SparseFit]) -> str:
        return fits[0].method.split(":")[0]

    def size(self, fits: list[SparseFit]) -> int:
        """The size on the chain's scale that the fit spent (its budget over ``K + N``)."""
        return int(fits[0].info["size"])

    def info(self, fits: list[SparseFit]) -> dict:
        info = {k: v for k, v in fits[0].info.items() if isinstance(v, (int, float, str, bool))}
        info["metric"] = fits[0].method.partition(":")[2] or "weight"
        st = self.storage_of(fits)
        info["stored_values"] = int(sum(t.values for t in st.tensors))
        info["index_bytes"] = int(sum(t.index_bytes for t in st.tensors))
        info["storage_bytes"] = int(st.nbytes)
        info["ort_params"] = int(self.ort_params(fits))
        return info

    def ort_params(self, fits: list[SparseFit]) -> int:
        """What ONNX Runtime holds at run time: every sparse part densified (it has no sparse
        GEMM; N:M runs dense), whole rows as stored."""
        total = 0
        for f in fits:
            for part, pattern in ((f.a, None), (f.c, f.c_pattern), (f.s, f.pattern)):
                if part is None:
                    continue
                if pattern == "rows":
                    total += int(np.count_nonzero(np.any(part != 0, axis=1))) * part.shape[1]
                else:
                    total += part.size
        return total

    def storage_of(self, fits: list[SparseFit]) -> Storage:
        return self.storage(fits)

    def errors(self, cand: Candidate, fits: list[SparseFit]) -> tuple[float, float]:
        return _errors(cand, fits)

    def declines(self, fits: list[SparseFit]) -> str | None:
        k, n = fits[0].shape
        p = self.storage(fits).params
        dense = k * n * len(fits)
        if p >= dense:
            return f"{self.name} stores {p} parameter-equivalents >= {dense} of the dense [{k} x {n}] weight: saves nothing"
        return None

    def transpose(self, fits: list[SparseFit]) -> str:
        return f"a {self.name} weight serves one orientation"

    def break_even(self, cand: Candidate) -> float:
        k, n = cand.matrices[0].shape
        return k * n / (k + n)


def _with(f: SparseFit, **kw) -> SparseFit:
    from dataclasses import replace

    return replace(f, **kw)


class NMForm(_SparseBase):
    """N of every M weights along the reduction axis, refitted by OBS (see the module docstring)."""

    name = "nm"
    ops = ("matmul", "gemm", "conv")
    knobs = ("nm",)

    def refuses(self, cand: Candidate, options: dict) -> str | None:
        n, m = _nm(options)
        why = conv_order(cand, m)[1]
        if why:
            return f"nm: {why}"
        if cand.pass_name != "conv" and cand.matrices[0].shape[0] % m:
            return f"nm: the reduction axis ({cand.matrices[0].shape[0]}) is not a multiple of M={m}"
        return None

    def _fit(self, cand, b, policy, gram, options) -> SparseFit:
        from ..factorize.sparse import nm_prune

        n, m = _nm(options)
        order = conv_order(cand, m)[0]
        return nm_prune(b, n, m, gram, order=order, **_damping(options))

    def _random(self, cand, b, policy, options, rng) -> SparseFit:
        n, m = _nm(options)
        s = _random_nm(b.shape, n, m, conv_order(cand, m)[0], rng).astype(b.dtype)
        return SparseFit(kind="nm", method="timing", rel_error=float("nan"), objective_error=float("nan"), s=s,
                         pattern=f"nm:{n}:{m}")

    def size(self, fits: list[SparseFit]) -> int:
        """The rank-equivalent of its storage (its pattern sets it)."""
        k, n = fits[0].shape
        return math.ceil(self.storage(fits).params / (len(fits) * (k + n)))

    def sizes(self, cand: Candidate, multiple: int, options: dict | None = None) -> np.ndarray:
        """One size: the pattern's (the planner passes it back; ``fit`` ignores it)."""
        k, n = cand.matrices[0].shape
        nn, mm = _nm(options or {})
        s = math.ceil(nm_stored("S", (k, n), nn, mm, str(cand.matrices[0].dtype)).nbytes
                      / cand.matrices[0].dtype.itemsize / (k + n))
        return np.array([s] if s < k * n / (k + n) else [], np.int64)

    def storage(self, fits: list[SparseFit]) -> Storage:
        tensors = []
        for g, f in enumerate(fits):
            _, n, m = f.pattern.split(":")
            tensors.append(nm_stored(f"S{g}", f.shape, int(n), int(m), str(f.s.dtype)))
        return Storage(tuple(tensors))

    def emit(self, ctx: RewriteContext, cand: Candidate, fits: list[SparseFit]) -> None:
        from lrcompile.passes import PASSES

        op = PASSES[cand.pass_name]
        op.whole(ctx, cand, op.detach(cand), [f.s for f in fits], "nm")


class LowRankSparseForm(_SparseBase):
    """``A C + S``: the chain plus a sparse branch (see the module docstring)."""

    name = "lowrank+sparse"
    ops = ("matmul", "gemm", "conv", "gather")
    knobs = ("nm", "sparse_share", "sparse_pattern")

    def _fit(self, cand, b, policy, gram, options) -> SparseFit:
        from ..factorize.sparse import lowrank_sparse

        rank, nnz, pattern, nn, mm = self._layout(cand, b, policy, options)
        order = conv_order(cand, mm)[0] if pattern == "nm" else None
        return lowrank_sparse(b, rank, nnz, gram, pattern=pattern, n=nn, m=mm, order=order,
                              seed=int(options.get("seed", 0)), **_damping(options))

    def _random(self, cand, b, policy, options, rng) -> SparseFit:
        rank, nnz, pattern, nn, mm = self._layout(cand, b, policy, options)
        k, n = b.shape
        s = np.zeros((k, n))
        if pattern == "nm":
            s = _random_nm((k, n), nn, mm, conv_order(cand, mm)[0], rng)
        elif pattern == "rows":
            s[np.sort(rng.choice(k, nnz // n, replace=False))] = rng.standard_normal((nnz // n, n))
        else:
            s.flat[np.sort(rng.choice(k * n, nnz, replace=False))] = rng.standard_normal(nnz)
        return SparseFit(kind="lowrank+sparse", method="timing", rel_error=float("nan"), objective_error=float("nan"),
                         a=(rng.standard_normal((k, rank)) / math.sqrt(k)).astype(b.dtype),
                         c=(rng.standard_normal((rank, n)) / math.sqrt(rank)).astype(b.dtype),
                         s=s.astype(b.dtype), pattern=pattern if pattern != "nm" else f"nm:{nn}:{mm}")

    def _layout(self, cand, b, policy, options) -> tuple[int, int, str, int, int]:
        """``(rank, nonzeros of S, pattern, N, M)`` that spend the layer's budget."""
        k, n = b.shape
        p = budget(cand, policy, b)
        share, pattern = float(options["sparse_share"]), options["sparse_pattern"]
        nn, mm = _nm(options)
        item = b.dtype.itemsize
        if pattern == "unstructured":
            ps = share * p - (k + 1) * CSR_INDEX_BYTES / item
            nnz = max(0, int(ps // (1 + CSR_INDEX_BYTES / item)))
            spent = nnz * (1 + CSR_INDEX_BYTES / item) + ((k + 1) * CSR_INDEX_BYTES / item if nnz else 0)
        elif pattern == "rows":
            rows = max(0, int(share * p // (n + ROW_INDEX_BYTES / item)))
            nnz, spent = rows * n, rows * (n + ROW_INDEX_BYTES / item)
        else:  # nm: its size is its pattern
            nnz = k * n * nn // mm
            spent = nm_stored("S", (k, n), nn, mm, str(b.dtype)).nbytes / item
        rank = max(0, min(int((p - spent) // (k + n)), min(k, n)))
        if rank < 1:
            raise ValueError(f"the budget ({p:.0f} parameters) leaves no rank beside S ({spent:.0f})")
        return rank, nnz, pattern, nn, mm

    def refuses(self, cand: Candidate, options: dict) -> str | None:
        pattern = options["sparse_pattern"]
        if pattern == "nm":
            why = NMForm().refuses(cand, options)
            if why:
                return why.replace("nm:", "lowrank+sparse with an N:M part:")
        if pattern == "rows" and not (cand.pass_name in ("gemm", "gather") or
                                      (cand.pass_name == "matmul" and cand.details.get("side") == "right")):
            return "lowrank+sparse with rows applies to MatMul (weight on the right), Gemm and Gather"
        if pattern == "nm" and cand.pass_name == "gather":
            return "lowrank+sparse with an N:M part does not apply to lookups"
        return None

    def storage(self, fits: list[SparseFit]) -> Storage:
        tensors = []
        for g, f in enumerate(fits):
            dt = str(f.a.dtype)
            tensors += [Stored(f"A{g}", tuple(f.a.shape), dt), Stored(f"C{g}", tuple(f.c.shape), dt)]
            k, n = f.shape
            if f.pattern == "rows":
                rows = int(np.count_nonzero(np.any(f.s != 0, axis=1)))
                tensors.append(Stored(f"S{g}", (rows, n), dt, index_bytes=rows * ROW_INDEX_BYTES))
            elif f.pattern.startswith("nm:"):
                _, nn, mm = f.pattern.split(":")
                tensors.append(nm_stored(f"S{g}", f.shape, int(nn), int(mm), dt))
            else:
                nnz = int(np.count_nonzero(f.s))
                idx = nnz * CSR_INDEX_BYTES + ((k + 1) * CSR_INDEX_BYTES if nnz else 0)
                tensors.append(Stored(f"S{g}", (nnz,), dt, index_bytes=idx))
        return Storage(tuple(tensors))

    def emit(self, ctx: RewriteContext, cand: Candidate, fits: list[SparseFit]) -> None:
        """``y = chain(x) + branch(x)``: the chain keeps the op's own bias, the branch adds ``x S``."""
        from lrcompile.passes import PASSES

        op = PASSES[cand.pass_name]
        w = op.detach(cand)
        base = cand.label
        low, part = ctx.var(base, "ls_low", w.out.dtype), ctx.var(base, "ls_sparse", w.out.dtype)
        wl = Wiring(x=w.x, out=low, extra=w.extra)
        h = op.first(ctx, cand, wl, [f.a for f in fits], "ls")
        op.last(ctx, cand, wl, h, [f.c for f in fits], None, "ls")
        pattern = fits[0].pattern
        if pattern == "rows" and cand.pass_name != "gather":
            (f,) = fits
            rows = np.flatnonzero(np.any(f.s != 0, axis=1)).astype(np.int64)
            ws = op.select_inputs(ctx, cand, Wiring(x=w.x, out=part, extra=w.extra), rows, "ls")
            op.whole(ctx, cand, ws, [np.ascontiguousarray(f.s[rows])], "ls_rows", bias=False)
        else:
            op.whole(ctx, cand, Wiring(x=w.x, out=part, extra=w.extra), [f.s for f in fits], "ls_S", bias=False,
                     sparse=pattern != "nm")  # a table's rows: a lookup in S, written sparse
        ctx.node("Add", base, "ls_add", [low, part], [w.out])


class DenseNMForm(_SparseBase):
    """``D S``, ``S`` N:M along the inner axis: the chain with a sparse second weight."""

    name = "dense-nm"
    ops = ("matmul", "gemm", "conv", "gather")
    knobs = ("nm",)

    def _fit(self, cand, b, policy, gram, options) -> SparseFit:
        from ..factorize.sparsedense import dense_nm

        inner, nn, mm = self._layout(cand, b, policy, options)

        def fit(w, g):
            return dense_nm(w, inner, g, n=nn, m=mm, seed=int(options.get("seed", 0)), **_damping(options))

        if gram is not None and gram.ndim == 1:
            return diagonal_metric_fit(fit, b, gram, float(options.get("damping", DEFAULT_DAMPING)))
        return fit(b, gram)

    def _layout(self, cand, b, policy, options) -> tuple[int, int, int]:
        """``(inner width, N, M)`` that spend the layer's budget."""
        k, n = b.shape
        nn, mm = _nm(options)
        per_inner = k + n * nn / mm * (1 + _bits(mm) / (8 * b.dtype.itemsize))
        inner = int(budget(cand, policy, b) // per_inner) // mm * mm
        if inner < mm:
            raise ValueError(f"the budget leaves an inner width under M={mm}")
        return inner, nn, mm

    def _random(self, cand, b, policy, options, rng) -> SparseFit:
        inner, nn, mm = self._layout(cand, b, policy, options)
        k, n = b.shape
        return SparseFit(kind="dense-nm", method="timing", rel_error=float("nan"), objective_error=float("nan"),
                         a=(rng.standard_normal((k, inner)) / math.sqrt(k)).astype(b.dtype),
                         c=_random_nm((inner, n), nn, mm, None, rng).astype(b.dtype), c_pattern=f"nm:{nn}:{mm}")

    def storage(self, fits: list[SparseFit]) -> Storage:
        tensors = []
        for g, f in enumerate(fits):
            _, nn, mm = f.c_pattern.split(":")
            dt = str(f.a.dtype)
            tensors += [Stored(f"D{g}", tuple(f.a.shape), dt), nm_stored(f"S{g}", tuple(f.c.shape), int(nn), int(mm), dt)]
        return Storage(tuple(tensors))

    def emit(self, ctx: RewriteContext, cand: Candidate, fits: list[SparseFit]) -> None:
        _chain(ctx, cand, fits, "dnm", sparse=False)


class DictionaryForm(_SparseBase):
    """``D C``, ``C`` with ``s`` nonzeros per column: the chain with sparse codes."""

    name = "dictionary"
    ops = ("matmul", "gemm", "conv", "gather")
    knobs = ("dictionary_share", "dictionary_kind")

    def _fit(self, cand, b, policy, gram, options) -> SparseFit:
        from ..factorize.sparsedense import dictionary

        atoms, s = self._layout(cand, b, policy, options)

        def fit(w, g):
            return dictionary(w, atoms, s, g, orthogonal=options.get("dictionary_kind", "orthogonal") == "orthogonal",
                              seed=int(options.get("seed", 0)), **_damping(options))

        if gram is not None and gram.ndim == 1:
            return diagonal_metric_fit(fit, b, gram, float(options.get("damping", DEFAULT_DAMPING)))
        return fit(b, gram)

    def _layout(self, cand, b, policy, options) -> tuple[int, int]:
        """``(atoms, codes per column)`` that spend the layer's budget."""
        k, n = b.shape
        p = budget(cand, policy, b)
        atoms = int(float(options["dictionary_share"]) * p // k)
        if options.get("dictionary_kind", "orthogonal") == "orthogonal":
            atoms = min(k, atoms)  # orthonormal atoms: at most K
        idx = 2 if atoms < 32768 else 4
        s = min(atoms, int((p - atoms * k) // (n * (1 + idx / b.dtype.itemsize))))
        if atoms < 1 or s < 1:
            raise ValueError(f"the budget ({p:.0f} parameters) leaves {atoms} atoms and {s} codes per column")
        return atoms, s

    def _random(self, cand, b, policy, options, rng) -> SparseFit:
        atoms, s = self._layout(cand, b, policy, options)
        k, n = b.shape
        c = np.zeros((atoms, n))
        for j in range(n):
            c[rng.choice(atoms, s, replace=False), j] = rng.standard_normal(s)
        return SparseFit(kind="dictionary", method="timing", rel_error=float("nan"), objective_error=float("nan"),
                         a=(rng.standard_normal((k, atoms)) / math.sqrt(k)).astype(b.dtype), c=c.astype(b.dtype),
                         c_pattern=f"cols:{s}")

    def storage(self, fits: list[SparseFit]) -> Storage:
        tensors = []
        for g, f in enumerate(fits):
            dt = str(f.a.dtype)
            nnz = int(np.count_nonzero(f.c))
            idx = 2 if f.a.shape[1] < 32768 else 4
            tensors += [Stored(f"D{g}", tuple(f.a.shape), dt), Stored(f"C{g}", (nnz,), dt, index_bytes=nnz * idx)]
        return Storage(tuple(tensors))

    def emit(self, ctx: RewriteContext, cand: Candidate, fits: list[SparseFit]) -> None:
        _chain(ctx, cand, fits, "dict", sparse=True)


def _chain(ctx: RewriteContext, cand: Candidate, fits: list[SparseFit], tag: str, *, sparse: bool) -> None:
    """``x D`` then ``. C`` through the op's primitives (the op's bias kept)."""
    from lrcompile.passes import PASSES

    op = PASSES[cand.pass_name]
    w = op.detach(cand)
    h = op.first(ctx, cand, w, [f.a for f in fits], tag)
    op.last(ctx, cand, w, h, [f.c for f in fits], None, tag)
    if sparse:  # the codes: the last Constant this weight stored
        ctx.sparse.add(ctx.stored[cand.weight_key][-1].name)


def _random_nm(shape: tuple[int, int], n: int, m: int, order, rng) -> np.ndarray:
    """Random values keeping ``n`` of every ``m`` along axis 0 (in ``order``)."""
    k, cols = shape
    keep = np.argsort(rng.random((k // m, m, cols)), axis=1) < n
    out = np.where(keep, rng.standard_normal((k // m, m, cols)), 0.0).reshape(k, cols)
    if order is not None:
        placed = np.empty_like(out)
        placed[np.asarray(order)] = out
        out = placed
    return out


def _nm(options: dict) -> tuple[int, int]:
    n, _, m = str(options.get("nm", "2:4")).partition(":")
    return int(n), int(m)


def _damping(options: dict) -> dict:
    return {"damping": float(options["damping"])} if "damping" in options else {}
