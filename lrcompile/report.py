"""Per-layer records, totals, terminal tables and the JSON report."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tabulate import tabulate


@dataclass
class LayerRecord:
    """One candidate node's fate."""

    node: str
    op: str
    shape: list[int] | None
    decision: str  # "factorized" | "declined"
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
    done = [r for r in layers if r.decision == "factorized" and not r.shared_with]
    before = sum(r.params_before or 0 for r in done)
    after = sum(r.params_after or 0 for r in done)
    return {
        "candidates": len(layers),
        "factorized": sum(r.decision == "factorized" for r in layers),
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
