"""Per-layer records, totals, terminal tables and the JSON report."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tabulate import tabulate


@dataclass
class LayerRecord:
    """One candidate node's fate."""

    node: str
    op: str
    shape: list[int] | None
    decision: str  # "factorized" | "pruned" (--prune-mlp) | "declined"
    reason: str = ""
    weight: str = ""
    groups: int = 1
    rank: int | None = None
    break_even: float | None = None
    params_before: int | None = None
    params_after: int | None = None
    rel_error: float | None = None
    objective_error: float | None = None
    method: str | None = None
    shared_with: str | None = None
    seconds: float | None = None
    info: dict = field(default_factory=dict)
    # set by the planner (lrcompile.planner) under a global budget or latency-aware planning
    sensitivity: float | None = None
    predicted_loss: float | None = None
    probes: list[dict] | None = None
    flops_before: float | None = None
    flops_after: float | None = None
    latency: list[dict] | None = None


def layers_table(layers: list[LayerRecord], *, declined: bool = True) -> str:
    rows = []
    for r in layers:
        if r.decision != "factorized" and not declined:
            continue
        shape = "x".join(map(str, r.shape)) if r.shape else "-"
        if r.groups > 1:
            shape += f" (g={r.groups})"
        rows.append([
            r.node, r.op, shape, r.rank if r.rank is not None else "-",
            r.params_before if r.params_before is not None else "-",
            r.params_after if r.params_after is not None else "-",
            f"{r.rel_error:.4f}" if r.rel_error is not None else "-",
            r.decision if not r.shared_with else f"shared ({r.shared_with})",
            r.reason,
        ])
    return tabulate(rows, headers=["node", "op", "weight [in x out]", "rank", "params", "after", "rel err",
                                   "decision", "reason"], tablefmt="simple")


def totals(layers: list[LayerRecord]) -> dict:
    done = [r for r in layers if r.decision in ("factorized", "pruned") and not r.shared_with]
    before = sum(r.params_before or 0 for r in done)
    after = sum(r.params_after or 0 for r in done)
    return {
        "candidates": len(layers),
        "factorized": sum(r.decision == "factorized" for r in layers),
        "pruned": sum(r.decision == "pruned" for r in layers),
        "declined": sum(r.decision == "declined" for r in layers),
        "params_before": before,
        "params_after": after,
        "params_ratio": (after / before) if before else None,
    }


def verification_table(diffs: list[dict]) -> str:
    rows = [[d["name"], "x".join(map(str, d["shape"])), f"{d['max_abs']:.3e}", f"{d['max_rel']:.3e}",
             f"{d['rel_l2']:.3e}", f"{d['cosine']:.6f}",
             f"{d['sample_cosine_min']:.6f}" if d.get("sample_cosine_min") is not None else "-"] for d in diffs]
    return tabulate(rows, headers=["output", "shape", "max abs", "max rel", "rel L2", "cosine", "min sample cos"],
                    tablefmt="simple")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_json(obj) -> str:
    def default(o):
        if hasattr(o, "tolist"):
            return o.tolist()
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serializable: {type(o)}")

    return json.dumps(obj, indent=2, default=default, allow_nan=True)


def _latency_at(t: dict, rank: int | None) -> float | None:
    """A timing row's factorized latency at ``rank`` (linear between the timed ranks)."""
    if not rank or not t.get("ranks"):
        return None
    return float(np.interp(rank, t["ranks"], t["factorized_ms"]))


def plan_summary(plan: dict, layers: list[LayerRecord]) -> str:
    """The planner's per-layer choices and its totals: predicted vs measured, and the search it walked."""
    lines = []
    rows = []
    for r in layers:
        if r.predicted_loss is None and not r.latency:
            continue
        cut = r.decision in ("factorized", "pruned")
        kept = (r.params_after / r.params_before) if cut and r.params_before else 1.0
        choice = r.rank if r.decision == "factorized" else (
            f"width {r.info.get('kept')}/{r.info.get('channels')}" if r.decision == "pruned" else "dense")
        lat = "; ".join(f"b{t['batch']}: {t['dense_ms']:.3f}->{_latency_at(t, r.rank):.3f}"
                        if r.decision == "factorized" and _latency_at(t, r.rank) is not None
                        else f"b{t['batch']}: {t['dense_ms']:.3f} dense" for t in (r.latency or []))
        rows.append([r.node, choice, f"{kept:.2f}",
                     f"{r.sensitivity:.3g}" if r.sensitivity is not None else "-",
                     f"{r.predicted_loss:.3g}" if r.predicted_loss is not None else "-",
                     f"{r.flops_after / r.flops_before:.2f}" if r.flops_before else "-", lat or "-"])
    if rows:
        lines.append(tabulate(rows, headers=["node", "rank / width", "params kept", "sensitivity", "predicted",
                                             "FLOPs kept", "latency ms (dense->factorized)"], tablefmt="simple"))
    if plan.get("budget"):
        kind = plan.get("budget_kind", plan["budget"])
        lines.append(f"\nbudget: {plan['budget']} ({plan['allocation']} allocation); {kind} "
                     f"{plan['cost']:,.0f} of limit {plan['limit']:,.0f} "
                     f"(kept {plan['achieved_fraction']:.4f} of the candidates' {kind}); "
                     f"predicted loss {plan['predicted_loss']:.4g}")
    final = plan.get("final")
    if final:
        lines.append(f"measured {final['metric']['metric']} on {final['samples']} samples: {final['value']:.6g} "
                     f"(drop {final['drop']:.4g}; relative L2^2 {final['rel_l2_sq']:.4g})")
    search = plan.get("search")
    if search:
        lines.append(f"\n--max-drop {search['max_drop']:g} search (metric {search['evaluator']['metric']}):")
        lines.append(tabulate([[f"{w['fraction']:.4f}", f"{w['params_ratio']:.4f}", f"{w['predicted_loss']:.4g}",
                                f"{w['metric']:.6g}", f"{w['drop']:.4g}", "yes" if w["passed"] else "no"]
                               for w in search["walked"]],
                              headers=["budget", "params kept", "predicted", "metric", "drop", "within"],
                              tablefmt="simple"))
    lat = plan.get("latency")
    if lat:
        lines.append(f"latency-aware: timed on {lat['target']} at batches {lat['batches']} in {lat['seconds']:.1f} s "
                     f"(cache {lat['cache']}: {lat['cache_hits']} hits, {lat['cache_misses']} misses)")
    return "\n".join(lines)
