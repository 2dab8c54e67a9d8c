"""PNG plots of a benchmark: metric vs parameters (Pareto), per-layer ranks, singular-value spectra.

matplotlib is optional (``pip install 'lrcompile[plot]'``) and imported inside the functions; the
figures are drawn with ``matplotlib.figure.Figure`` directly (no pyplot, no global backend state).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import LrcError


def _figure(width: float = 7.0, height: float = 4.5):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise LrcError("plots need matplotlib: pip install 'lrcompile[plot]' (or pass --no-plots)") from None
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def pareto(rows: Sequence[dict], path: str | Path, *, metric: str, title: str,
           baseline: float | None = None, higher_is_better: bool = True) -> Path:
    """``metric`` against the kept fraction of parameters, one line per method.

    Two panels: x = parameters kept in the factorized layers, and x = parameters of the whole
    model. ``rows`` need ``method``, ``metric``, ``factorized_params_ratio`` and ``params_ratio``;
    the original model is drawn at x = 1 (``baseline``).
    """
    fig = _figure(11.0, 4.5)
    axes = fig.subplots(1, 2, sharey=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, key, xlabel in ((axes[0], "factorized_params_ratio", "params kept in the factorized layers"),
                            (axes[1], "params_ratio", "params of the whole model (vs original)")):
        for m in methods:
            pts = sorted((r[key], r[metric]) for r in rows if r["method"] == m
                         and r.get(key) is not None and r.get(metric) is not None)
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker="o", label=m)
        if baseline is not None:
            ax.scatter([1.0], [baseline], marker="*", s=160, color="black", zorder=5, label="original")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric + (" (higher is better)" if higher_is_better else " (lower is better)"))
    axes[0].legend(loc="best", fontsize=9)
    fig.suptitle(title)
    return _save(fig, path)


def rank_profile(layers: Sequence[dict], path: str | Path, *, title: str) -> Path:
    """Chosen rank per factorized layer, with each layer's full rank and break-even rank.

    ``layers`` need ``node``, ``rank``, ``full_rank`` and ``break_even`` (in graph order).
    """
    fig = _figure(max(7.0, 0.18 * len(layers) + 3.0), 4.8)
    ax = fig.subplots()
    x = np.arange(len(layers))
    ax.bar(x, [r["rank"] for r in layers], color="tab:blue", label="chosen rank")
    ax.plot(x, [r["full_rank"] for r in layers], "k_", markersize=10, mew=2, linestyle="none",
            label="full rank min(K, N)")
    ax.plot(x, [r["break_even"] for r in layers], "r_", markersize=10, mew=2, linestyle="none",
            label="break-even K*N/(K+N)")
    names = [_short(r["node"]) for r in layers]
    ax.set_xticks(x, names, rotation=90, fontsize=6 if len(layers) > 24 else 8)
    ax.set_ylabel("rank")
    ax.set_xlabel("factorized layer (graph order)")
    ax.set_ylim(0, 1.25 * max([r["full_rank"] for r in layers] + [1]))  # headroom for the legend
    ax.legend(loc="upper left", ncols=3, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    return _save(fig, path)


def spectra(curves: dict[str, np.ndarray], path: str | Path, *, title: str,
            ranks: dict[str, int] | None = None) -> Path:
    """Normalized singular values ``s_i / s_1`` of a few weights against ``i / min(K, N)``, log y;
    a dot marks the rank a configuration chose for that layer (``ranks``)."""
    fig = _figure()
    ax = fig.subplots()
    for label, s in curves.items():
        s = np.asarray(s, np.float64)
        if not s.size or s[0] <= 0:
            continue
        x = np.arange(1, s.size + 1) / s.size
        (line,) = ax.semilogy(x, s / s[0], label=f"{_short(label)} ({s.size})")
        r = (ranks or {}).get(label)
        if r and 0 < r <= s.size:
            ax.plot([r / s.size], [s[r - 1] / s[0]], "o", color=line.get_color())
    ax.set_xlabel("singular value index / min(K, N)   (dot: chosen rank)")
    ax.set_ylabel("sigma_i / sigma_1")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title)
    return _save(fig, path)


def plan_profile(layers: Sequence, plan: dict, path: str | Path, *, title: str) -> Path:
    """The planner's choices: per layer (graph order) the fraction of parameters kept and the
    measured sensitivity (log scale); with ``--max-drop`` a second panel shows the search it walked
    (parameters kept against the measured drop, the allowed drop as a line).

    ``layers`` are report ``LayerRecord``s; ``plan`` the report's ``plan`` section.
    """
    rows = [r for r in layers if r.predicted_loss is not None]
    search = plan.get("search")
    fig = _figure(max(8.0, 0.2 * len(rows) + 3.0) + (5.0 if search else 0.0), 4.8)
    axes = fig.subplots(1, 2, width_ratios=[max(2.0, 0.2 * len(rows)), 1.6]) if search else [fig.subplots()]
    ax = axes[0]
    x = np.arange(len(rows))
    kept = [(r.params_after / r.params_before) if r.decision == "factorized" and r.params_before else 1.0
            for r in rows]
    ax.bar(x, kept, color=["tab:blue" if r.decision == "factorized" else "tab:gray" for r in rows],
           label="params kept (grey: dense)")
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("fraction of the weight's parameters kept")
    ax.set_xticks(x, [_short(r.node) for r in rows], rotation=90, fontsize=6 if len(rows) > 24 else 8)
    ax.set_xlabel("layer (graph order)")
    ax.grid(axis="y", alpha=0.3)
    ax2 = ax.twinx()
    sens = np.array([r.sensitivity or 0.0 for r in rows], np.float64)
    if sens.size and np.all(sens > 0):  # measured (--allocation sensitivity)
        ax2.semilogy(x, sens, "o", color="tab:red", label="sensitivity (metric per unit error^2)")
        ax2.set_ylabel("sensitivity", color="tab:red")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8, ncols=2)
    ax.set_title(f"kept {plan.get('achieved_fraction', float('nan')):.3f} of the candidates' "
                 f"{plan.get('budget_kind', 'params')}")
    if search:
        ax = axes[1]
        pts = sorted((w["params_ratio"], w["drop"], w["passed"]) for w in search["walked"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color="0.6")
        for px, py, ok in pts:
            ax.plot([px], [py], "o", color="tab:green" if ok else "tab:red")
        ax.axhline(search["max_drop"], color="black", linestyle="--", label=f"--max-drop {search['max_drop']:g}")
        ax.set_xlabel("params kept (of the candidates)")
        ax.set_ylabel(f"measured drop in {search['evaluator']['metric']}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_title("search (green: within the budget)")
    fig.suptitle(title)
    return _save(fig, path)


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path)
    return path
