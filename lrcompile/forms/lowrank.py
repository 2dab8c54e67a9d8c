"""The low-rank chain: ``B [K, N] ~= A [K, r] @ C [r, N]`` (+ a mean-correction bias ``d [N]``).

Per op (through the op's primitives, ``ir.RewritePass``): MatMul ``x @ A @ C`` (a weight on the
left: ``C^T @ (A^T @ x)``), Gemm ``Gemm(Gemm(x, A, transA), C, bias, alpha, beta)``, Conv a
``k x k`` conv to ``r`` channels then a ``1 x 1`` conv (per group, all groups at one rank), Gather
a lookup in the thin table ``A`` then ``@ C``. ``d`` is added after the chain (folded into a
Conv's bias). Lossless at full rank; at rank ``r`` the output error is ``x (B - A C)``.

Stores ``r (K + N)`` values per group (+ ``N`` for ``d``); costs ``2 r (K + N)`` FLOPs per row
(a lookup: ``2 r N``) against ``2 K N`` dense (a lookup: free). Sizes: ranks on the grid of
``factorize.allocate.rank_grid`` (multiples of ``--multiple`` below break-even). The error at every
rank comes from one full decomposition by the layer's method (the tail of its spectrum).

One value serves every node that reads the weight, in either orientation: a use that reads
``W^T`` (Gemm ``transB``, MatMul with the weight on the left) gets ``W^T ~= C^T A^T``
(:meth:`LowRankForm.transpose`), and the rewrite stores ``A`` and ``C`` once (``RewriteContext``).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..factorize import Factorization, LayerStats, RankPolicy, break_even_rank, factorize
from ..factorize.allocate import rank_grid, tail_curve
from ..ir import Candidate, RewriteContext
from .base import Storage, Stored

#: Below this many weight elements BLAS runs single-threaded: small SVDs gain little from threads,
#: and on a busy machine OpenBLAS's spinning threads made them tens of times slower (measured).
SINGLE_THREAD_BELOW = 2048 * 2048
#: The policy of a full decomposition (the whole spectrum, an exact SVD whatever the solver).
FULL = RankPolicy(energy=1.0, multiple=1)


class LowRankForm:
    """``B ~= A C (+ d)``: a chain of two thin ops (see the module docstring)."""

    name = "lowrank"
    ops = ("matmul", "gemm", "conv", "gather")
    priced_by_default = True

    # ------------------------------------------------------------------ fitting (numpy, factorize/)

    def fit(self, cand: Candidate, policy: RankPolicy, method: str, stats: list[LayerStats | None],
            options: dict) -> list[Factorization]:
        """One factorization per group; the groups share one rank (the largest any group needs)."""
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1 if cand.matrices[0].size < SINGLE_THREAD_BELOW else None, user_api="blas"):
            facts = [factorize(m, policy, method, s, **options) for m, s in zip(cand.matrices, stats)]
            r = max(f.rank for f in facts)
            if any(f.rank != r for f in facts):  # groups share one rank: refit the others at it
                fixed = RankPolicy(rank=r, multiple=1)
                facts = [f if f.rank == r else factorize(m, fixed, method, s, **options)
                         for f, m, s in zip(facts, cand.matrices, stats)]
        return facts

    def fit_full(self, cand: Candidate, method: str, stats: list[LayerStats | None], options: dict
                 ) -> list[Factorization]:
        """The full decomposition whose spectrum gives the error at every rank (:meth:`curve`)."""
        return self.fit(cand, FULL, method, stats, options)

    # ------------------------------------------------------------------ what the planner prices

    def sizes(self, cand: Candidate, multiple: int) -> np.ndarray:
        k, n = cand.matrices[0].shape
        return rank_grid(k, n, multiple)

    def params(self, cand: Candidate, sizes: np.ndarray, *, bias: bool) -> np.ndarray:
        """Stored parameters at each rank of ``sizes``, all groups."""
        out = np.zeros(len(sizes))
        for m in cand.matrices:
            out += sizes * (m.shape[0] + m.shape[1]) + (m.shape[1] if bias else 0)
        return out

    def curve(self, full: list[Factorization], sizes: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Relative squared objective error at each rank of ``sizes`` from a full decomposition,
        and the spectra it came from."""
        spectra = [np.asarray(f.singular_values, np.float64) for f in full]
        totals = [float(np.sum(s**2)) for s in spectra]
        return tail_curve(spectra, totals, sizes), spectra

    def flops(self, cand: Candidate, sizes: np.ndarray, rows: float) -> tuple[float, np.ndarray]:
        """Dense FLOPs and FLOPs at each rank of ``sizes`` for ``rows`` rows per inference."""
        ranks = np.asarray(sizes, np.float64)
        if cand.details.get("lookup"):  # Gather: a free lookup dense; factorized, a MatMul [r, N] follows
            return 0.0, 2.0 * rows * ranks * sum(m.shape[1] for m in cand.matrices)
        kn = sum(m.shape[0] * m.shape[1] for m in cand.matrices)
        return 2.0 * rows * kn, 2.0 * rows * ranks * sum(m.shape[0] + m.shape[1] for m in cand.matrices)

    def break_even(self, cand: Candidate) -> float:
        """The rank at which the chain stores as much as the weight (one group)."""
        return break_even_rank(*cand.matrices[0].shape)

    def probe_scale(self, cand: Candidate) -> float:
        """The size a budget fraction of 1 corresponds to: the break-even rank."""
        return self.break_even(cand)

    # ------------------------------------------------------------------ a fitted value

    def size(self, facts: list[Factorization]) -> int:
        return facts[0].rank

    def method(self, facts: list[Factorization]) -> str:
        """The method that made the value (after any fallback)."""
        return facts[0].method

    def info(self, facts: list[Factorization]) -> dict:
        """The method's scalar details, for the report."""
        return {k: v for k, v in facts[0].info.items() if isinstance(v, (int, float, str, bool))}

    def storage(self, facts: list[Factorization]) -> Storage:
        tensors = []
        for g, f in enumerate(facts):
            tensors += [Stored(f"A{g}", tuple(f.a.shape), str(f.a.dtype)), Stored(f"C{g}", tuple(f.c.shape), str(f.c.dtype))]
            if f.bias is not None:
                tensors.append(Stored(f"d{g}", tuple(f.bias.shape), str(f.a.dtype)))
        return Storage(tuple(tensors))

    def declines(self, facts: list[Factorization]) -> str | None:
        """Why this value saves nothing (None: it pays off)."""
        if all(f.pays_off() for f in facts):
            return None
        f0 = facts[0]
        return (f"rank {f0.rank} >= break-even {break_even_rank(*f0.shape):.1f} "
                f"for [{f0.shape[0]} x {f0.shape[1]}]: saves nothing")

    def transpose(self, facts: list[Factorization]) -> list[Factorization] | str:
        """The value for a use that reads the weight transposed: ``B^T ~= C^T A^T`` (same factors,
        same errors), or why it cannot serve it (a mean correction is added after ``x A C``: it
        has no place in ``x C^T A^T``)."""
        if any(f.bias is not None for f in facts):
            return "its mean correction (bias d) cannot serve a transposed use"
        if len(facts) != 1:
            return "a grouped weight has no transposed use"
        return [replace(f, a=f.c.T, c=f.a.T) for f in facts]

    def errors(self, cand: Candidate, facts: list[Factorization]) -> tuple[float, float]:
        """The weight's relative error and the method's objective error, over all groups."""
        return _combined(cand, facts, "rel_error"), _combined(cand, facts, "objective_error")

    def random(self, cand: Candidate, rank: int, *, seed: int = 0) -> list[Factorization]:
        """Seeded random factors at ``rank``, one per group, scaled like a trained factorization
        (entries ~ N(0, 1/K) and N(0, 1/r)): for timing, where values do not matter."""
        rng = np.random.default_rng(seed)
        out = []
        for m in cand.matrices:
            k, n = m.shape
            a = (rng.standard_normal((k, rank)) / math.sqrt(k)).astype(m.dtype)
            c = (rng.standard_normal((rank, n)) / math.sqrt(rank)).astype(m.dtype)
            out.append(Factorization(a=a, c=c, rank=rank, method="timing", rel_error=float("nan"),
                                     objective_error=float("nan")))
        return out

    # ------------------------------------------------------------------ emission

    def emit(self, ctx: RewriteContext, cand: Candidate, facts: list[Factorization]) -> None:
        from lrcompile.passes import PASSES

        op = PASSES[cand.pass_name]
        w = op.detach(cand)
        h = op.first(ctx, cand, w, [f.a for f in facts], "lr")
        bias = [f.bias for f in facts] if any(f.bias is not None for f in facts) else None
        op.last(ctx, cand, w, h, [f.c for f in facts], bias, "lr")


def _combined(cand: Candidate, facts: list[Factorization], attr: str) -> float:
    num = sum((getattr(f, attr) * float(np.linalg.norm(m))) ** 2 for f, m in zip(facts, cand.matrices))
    den = sum(float(np.linalg.norm(m)) ** 2 for m in cand.matrices)
    return float(np.sqrt(num / den)) if den > 0 else 0.0
