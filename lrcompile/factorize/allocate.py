"""Rank allocation across layers under one global budget. Pure numpy: no graph here.

Each weight offers a few choices: keep it dense, or factorize it at one of a set of ranks. A choice
has a *cost* (parameters, or FLOPs at the user's shapes) and a predicted *loss* (the end-to-end
metric drop it is expected to cause). With the per-layer losses taken as additive (first order:
small, independent perturbations of different layers add up in the output's squared error), the
best allocation under a budget is a multiple-choice knapsack:

    minimise  sum_l loss_l(choice_l)   subject to   sum_l cost_l(choice_l) <= budget.

:func:`allocate` solves it by dynamic programming over the budget cut into ``units`` equal slices
(each choice's cost rounded *up* to whole slices, so the result always fits), then spends the
slack the rounding left with greedy upgrades (best loss saved per cost). The loss of a rank comes
from the factorization's own spectrum (:func:`tail_curve`: the relative error the method's
objective keeps at that rank, squared) times a per-layer sensitivity measured end to end.

:func:`allocate_threshold` is the data-free alternative from the spectra alone (WeLore, Jaiswal et
al. 2024): min-max normalise each layer's singular values, keep those at or above one global
threshold chosen for the budget, and factorize only layers whose reduction clears a minimum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

DENSE = 0  # the rank that stands for "keep the weight dense"


@dataclass(frozen=True)
class LayerOptions:
    """The choices for one weight.

    Attributes:
        key: the weight's identifier (one entry per distinct weight).
        ranks: ranks it may be factorized at, ascending (may be empty: dense only).
        cost: cost of each rank (same length as ``ranks``).
        loss: predicted loss of each rank (>= 0).
        dense_cost: cost of keeping it dense (loss 0).
        spectrum: the singular values the method decomposes, descending (for the threshold rule).
    """

    key: str
    ranks: np.ndarray
    cost: np.ndarray
    loss: np.ndarray
    dense_cost: float
    spectrum: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.ranks)
        if len(self.cost) != n or len(self.loss) != n:
            raise ValueError(f"{self.key}: ranks, cost and loss differ in length")
        if n and np.any(np.diff(self.ranks) <= 0):
            raise ValueError(f"{self.key}: ranks must be strictly ascending")

    def choices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ranks, cost, loss)`` with the dense choice (rank 0) first."""
        return (np.concatenate([[DENSE], np.asarray(self.ranks, np.int64)]),
                np.concatenate([[self.dense_cost], np.asarray(self.cost, np.float64)]),
                np.concatenate([[0.0], np.asarray(self.loss, np.float64)]))


@dataclass(frozen=True)
class Allocation:
    """The chosen rank (size) per weight (0: dense), with the totals it was chosen on; ``forms``
    names the chosen form of a weight whose choices spanned several forms (a caller's decoding)."""

    ranks: dict[str, int]
    cost: float
    loss: float
    budget: float
    info: dict = field(default_factory=dict)
    forms: dict[str, str] = field(default_factory=dict)


def tail_curve(spectra: list[np.ndarray], totals: list[float], ranks: np.ndarray) -> np.ndarray:
    """Relative squared error of the method's objective at each rank, over a layer's groups.

    ``err^2(r) = sum_g (total_g - sum_{i<r} s_gi^2) / sum_g total_g``: what a rank-``r``
    truncation of each group's decomposed matrix leaves out. ``totals`` are the groups' full
    energies ``||M_g||_F^2`` (so a partial spectrum still gives the right tail where it is known).
    """
    den = float(sum(totals))
    if den <= 0:
        return np.zeros(len(ranks))
    out = np.zeros(len(ranks))
    for s, tot in zip(spectra, totals):
        cum = np.concatenate([[0.0], np.cumsum(np.asarray(s, np.float64) ** 2)])
        idx = np.minimum(np.asarray(ranks, np.int64), len(s))
        out += np.maximum(float(tot) - cum[idx], 0.0)
    return out / den


def min_cost(options: list[LayerOptions]) -> float:
    """The smallest total cost any allocation reaches (every layer at its cheapest choice)."""
    return float(sum(o.choices()[1].min() for o in options))


def allocate(options: list[LayerOptions], budget: float, *, units: int | None = None) -> Allocation:
    """Minimise the summed loss with the summed cost at most ``budget`` (see the module docstring).

    Args:
        options: one entry per weight.
        budget: the most the chosen costs may add up to.
        units: slices of the budget for the dynamic program (None: by problem size, up to 100,000;
            each layer's rounding can waste at most one slice before the greedy fill).

    Returns:
        The allocation; its ``cost`` is the exact (unrounded) total, never above ``budget``.

    Raises:
        ValueError: the budget is below :func:`min_cost`.
    """
    floor = min_cost(options)
    if floor > budget * (1 + 1e-12):
        raise ValueError(f"budget {budget:.6g} is below the smallest reachable cost {floor:.6g}")
    if not options:
        return Allocation({}, 0.0, 0.0, budget)
    n_layers = len(options)
    if units is None:  # about 3e8 cell updates at most: fine slices for few layers, coarser for many
        work = sum(len(o.ranks) + 1 for o in options)
        units = int(np.clip(3e8 // work, 4096, 100_000))
    unit = budget / units if budget > 0 else 1.0
    inf = np.inf
    best = np.full(units + 1, inf)
    best[0] = 0.0
    picks = np.zeros((n_layers, units + 1), np.int32)
    for li, opt in enumerate(options):
        _, cost, loss = opt.choices()
        cu = np.ceil(cost / unit - 1e-9).astype(np.int64)
        new = np.full(units + 1, inf)
        arg = np.zeros(units + 1, np.int32)
        for j in range(len(cost)):
            c = int(cu[j])
            if c > units:
                continue
            trial = np.full(units + 1, inf)
            trial[c:] = best[: units + 1 - c] + loss[j]
            better = trial < new
            new[better] = trial[better]
            arg[better] = j
        best, picks[li] = new, arg
    if not np.isfinite(best).any():  # rounding up pushed the cheapest choices over the budget
        choice = [int(np.argmin(o.choices()[1])) for o in options]
    else:
        u = int(np.argmin(best))  # first index of the least loss: the cheapest such solution
        choice = [0] * n_layers
        for li in range(n_layers - 1, -1, -1):
            j = int(picks[li, u])
            choice[li] = j
            u -= int(np.ceil(options[li].choices()[1][j] / unit - 1e-9))
    choice = _greedy_fill(options, choice, budget)
    return _result(options, choice, budget, {"solver": "dp", "units": units})


def _greedy_fill(options: list[LayerOptions], choice: list[int], budget: float) -> list[int]:
    """Spend the slack: repeatedly take the upgrade (any choice of one layer with less loss) that
    saves the most loss per extra cost and still fits."""
    tables = [o.choices() for o in options]
    spent = sum(t[1][j] for t, j in zip(tables, choice))
    while True:
        slack = budget - spent
        best_gain, best = 0.0, None
        for li, (_, cost, loss) in enumerate(tables):
            j0 = choice[li]
            extra = cost - cost[j0]
            saved = loss[j0] - loss
            ok = (saved > 0) & (extra <= slack + 1e-9 * max(budget, 1.0))
            if not ok.any():
                continue
            rate = np.where(ok, saved / np.maximum(extra, 1e-300), -np.inf)
            j = int(np.argmax(rate))
            if rate[j] > best_gain:
                best_gain, best = float(rate[j]), (li, j)
        if best is None:
            return choice
        li, j = best
        spent += tables[li][1][j] - tables[li][1][choice[li]]
        choice[li] = j


def _result(options: list[LayerOptions], choice: list[int], budget: float, info: dict) -> Allocation:
    ranks, cost, loss = {}, 0.0, 0.0
    for o, j in zip(options, choice):
        r, c, l_ = o.choices()
        ranks[o.key] = int(r[j])
        cost += float(c[j])
        loss += float(l_[j])
    return Allocation(ranks, cost, loss, budget, info)


def allocate_threshold(options: list[LayerOptions], budget: float, *, min_saving: float = 0.1,
                       iters: int = 60) -> Allocation:
    """Data-free allocation from the spectra (WeLore-style heavy-tail threshold).

    Each layer's singular values are min-max normalised to ``[0, 1]``; at a global threshold
    ``tau`` a layer keeps the values at or above it, rounded up to the next allowed rank, and stays
    dense when that rank is not allowed or saves less than ``min_saving`` of its dense cost. The
    smallest ``tau`` (the most rank) whose allocation fits the budget is found by bisection; the
    total cost only falls as ``tau`` rises.

    Raises:
        ValueError: even ``tau = 1`` does not fit (the budget is too small for this rule), or an
            option has no spectrum.
    """
    norm = []
    for o in options:
        if o.spectrum is None:
            raise ValueError(f"{o.key}: the threshold rule needs the layer's spectrum")
        s = np.sort(np.asarray(o.spectrum, np.float64))[::-1]
        lo, hi = float(s[-1]) if s.size else 0.0, float(s[0]) if s.size else 0.0
        norm.append((s - lo) / (hi - lo) if hi > lo else np.ones_like(s))

    def pick(tau: float) -> list[int]:
        choice = []
        for o, s in zip(options, norm):
            ranks, cost, _ = o.choices()
            keep = int(np.sum(s >= tau))
            j = int(np.searchsorted(ranks[1:], keep)) + 1  # first allowed rank >= keep
            if j >= len(ranks) or cost[j] > (1.0 - min_saving) * o.dense_cost:
                j = 0
            choice.append(j)
        return choice

    def total(choice: list[int]) -> float:
        return float(sum(o.choices()[1][j] for o, j in zip(options, choice)))

    top = pick(1.0 + 1e-12)
    if total(top) > budget:
        raise ValueError(f"the threshold rule cannot reach budget {budget:.6g}: its smallest model costs "
                         f"{total(top):.6g} (layers whose reduction saves under {min_saving:.0%} stay dense)")
    lo, hi = 0.0, 1.0 + 1e-12
    if total(pick(lo)) <= budget:
        hi = lo
    for _ in range(iters):
        if hi - lo < 1e-9:
            break
        mid = 0.5 * (lo + hi)
        if total(pick(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    return _result(options, pick(hi), budget, {"solver": "threshold", "tau": hi, "min_saving": min_saving})


def rank_grid(k: int, n: int, multiple: int, *, max_options: int = 256) -> np.ndarray:
    """The ranks a ``[k, n]`` weight may take: multiples of ``multiple`` below the break-even rank
    ``k n / (k + n)`` (a rank at or above it saves nothing); every rank below it for weights too
    small for one multiple; at most ``max_options`` of them (coarser steps on huge weights)."""
    be = k * n / (k + n)
    top = math.ceil(be) - 1
    if top < 1:
        return np.zeros(0, np.int64)
    step = multiple if top >= multiple else 1
    step *= max(1, math.ceil((top // step) / max_options))
    return np.arange(step, top + 1, step, dtype=np.int64)


__all__ = ["Allocation", "DENSE", "LayerOptions", "allocate", "allocate_threshold", "min_cost", "rank_grid",
           "tail_curve"]
