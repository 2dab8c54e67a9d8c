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
        if c.weight_key not in seen or "conv" not in seen[c.weight_key]:
            conv = conv_summary(c, ratio)
            if conv:
                seen[c.weight_key]["conv"] = conv
        if seen[c.weight_key].get("conv"):
            row["conv"] = seen[c.weight_key]["conv"]
        if row["ratio_rank"] >= row["break_even"]:
            row["decision"], row["reason"] = "would decline", f"rank at ratio {ratio} >= break-even"
        rows.append(row)
    for d in analysis.declines:
        rows.append({"node": d.label, "op": d.node.op, "shape": list(d.shape) if d.shape else None,
                     "decision": "declined", "reason": d.reason})
    return rows


def conv_summary(cand, ratio: float) -> dict | None:
    """For a 2-D k x k conv: the VBMF ranks of its two mode unfoldings (data-free) and each conv
    form's relative weight error at ``ratio`` of its parameters (data-free fits), beside the
    low-rank chain's; None for any other candidate."""
    from .forms import CONV_FORMS, FORMS

    t2 = FORMS["tucker2"]
    if t2.refuses(cand, {"conv_ranks": "budget"}):
        return None
    r_in, r_out = t2.ranks(cand, None, {"conv_ranks": "vbmf"})
    out = {"vbmf_rank_in": int(r_in), "vbmf_rank_out": int(r_out), "errors": {}}
    policy = RankPolicy(ratio=ratio, multiple=1)
    none = [None] * len(cand.matrices)
    for name in ("lowrank",) + CONV_FORMS:
        form = FORMS[name]
        opts = {"seed": 0, "solver": "exact", **({"conv_ranks": "budget"} if name in CONV_FORMS else {})}
        try:
            value = form.fit(cand, policy, "svd", none, opts)
        except ValueError:
            out["errors"][name] = None
            continue
        out["errors"][name] = round(float(form.errors(cand, value)[0]), 6)
    return out


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
    table = tabulate(out, headers=["node", "op", "weight", "sigma max..min", "r90%", "r99%", "break-even",
                                   "r@ratio", "err@ratio", "decision", "reason"], tablefmt="simple")
    convs = [r for r in rows if r.get("conv")]
    if not convs:
        return table
    names = list(convs[0]["conv"]["errors"])
    crow = [[r["node"], f"{r['conv']['vbmf_rank_in']}x{r['conv']['vbmf_rank_out']}"]
            + [f"{e:.4f}" if e is not None else "-" for e in (r["conv"]["errors"][n] for n in names)] for r in convs]
    return (table + "\n\nconvs: VBMF ranks (R_in x R_out, data-free) and each form's weight error at the ratio "
            "(data-free fits)\n" + tabulate(crow, headers=["node", "vbmf"] + [f"err {n}" for n in names],
                                             tablefmt="simple"))
