"""``lrcompile inspect``: candidates, a singular-value summary per weight, and declines, read-only."""
from __future__ import annotations

import numpy as np
from tabulate import tabulate
from tqdm.auto import tqdm

from .config import CompileConfig
from .factorize import RankPolicy, break_even_rank
from .io import load_model
from .engine import analyze


def spectrum_summary(m: np.ndarray, ratio: float, multiple: int = RankPolicy.multiple) -> dict:
    """Energy ranks, the rank a ratio policy gives and its relative error, from the full spectrum."""
    from .factorize.svd import choose_rank, singular_values

    s = singular_values(m.astype(np.float64, copy=False), solver="exact")
    e = np.cumsum(s**2)
    total = float(e[-1]) if e.size else 0.0
    k, n = m.shape
    r = choose_rank(RankPolicy(ratio=ratio, multiple=multiple), s, total, k, n)
    tail = max(total - float(e[r - 1]), 0.0) if r >= 1 else total
    return {
        "s_max": float(s[0]) if s.size else 0.0,
        "s_min": float(s[-1]) if s.size else 0.0,
        "rank90": int(np.searchsorted(e, 0.90 * total) + 1) if total else 0,
        "rank99": int(np.searchsorted(e, 0.99 * total) + 1) if total else 0,
        "full_rank": int(min(k, n)),
        "break_even": round(break_even_rank(k, n), 1),
        "ratio_rank": int(r),
        "ratio_rel_error": float(np.sqrt(tail / total)) if total else 0.0,
    }


def inspect_model(path, *, ratio: float | None = None, min_params: int | None = None,
                  progress: bool = False) -> list[dict]:
    """One row per candidate (its spectrum summary at ``ratio``) and per declined node.

    ``ratio`` and ``min_params`` are the compile options of those names; None means their default."""
    model = load_model(path)
    config = CompileConfig(ratio=ratio, min_params=min_params)
    ratio = config.policy().ratio
    analysis = analyze(model, config)
    rows, seen = [], {}
    for c in tqdm(analysis.candidates, desc="spectra", disable=None if progress else True, leave=False):
        row = {"node": c.label, "op": c.node.op, "shape": list(c.matrices[0].shape), "groups": len(c.matrices),
               "weight": c.weight_key, "decision": "candidate", "reason": ""}
        if c.weight_key in seen:
            row.update(seen[c.weight_key], reason="shares its weight with an earlier node")
        else:
            summ = spectrum_summary(c.matrices[0], ratio, config.multiple)
            seen[c.weight_key] = summ
            row.update(summ)
        if row["ratio_rank"] >= row["break_even"]:
            row["decision"], row["reason"] = "would decline", f"rank at ratio {ratio} >= break-even"
        rows.append(row)
    for d in analysis.declines:
        rows.append({"node": d.label, "op": d.node.op, "shape": list(d.shape) if d.shape else None,
                     "decision": "declined", "reason": d.reason})
    return rows


def inspect_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        shape = "x".join(map(str, r["shape"])) if r.get("shape") else "-"
        if r.get("groups", 1) > 1:
            shape += f" (g={r['groups']})"
        spec = (f"{r['s_max']:.3g}..{r['s_min']:.3g}" if "s_max" in r else "-")
        out.append([r["node"], r["op"], shape, spec, r.get("rank90", "-"), r.get("rank99", "-"),
                    r.get("break_even", "-"), r.get("ratio_rank", "-"),
                    f"{r['ratio_rel_error']:.4f}" if "ratio_rel_error" in r else "-", r["decision"], r["reason"]])
    return tabulate(out, headers=["node", "op", "weight", "sigma max..min", "r90%", "r99%", "break-even",
                                  "r@ratio", "err@ratio", "decision", "reason"], tablefmt="simple")
