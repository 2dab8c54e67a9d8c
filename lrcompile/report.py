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
    # the stored tensors that hold the weight: those it was read from in the input (name -> [values,
    # bytes]) and, once rewritten, the names of those that hold it in the written model
    stored_before: dict[str, list[int]] | None = None
    stored_after: list[str] | None = None


def layers_table(layers: list[LayerRecord], *, declined: bool = True) -> str:
    rows = []
    for r in layers:
        if r.decision != "factorized" and not declined:
            continue
        shape = "x".join(map(str, r.shape)) if r.shape else "-"
        if r.groups > 1:
            shape += f" (g={r.groups})"
        rows.append([
            r.node, r.op, shape, _size_label(r) if r.rank is not None else "-",
            r.params_before if r.params_before is not None else "-",
            r.params_after if r.params_after is not None else "-",
            f"{r.rel_error:.4f}" if r.rel_error is not None else "-",
            r.decision if not r.shared_with else f"shared ({r.shared_with})",
            r.reason,
        ])
    return tabulate(rows, headers=["node", "op", "weight [in x out]", "rank", "params", "after", "rel err",
                                   "decision", "reason"], tablefmt="simple")


def totals(layers: list[LayerRecord], output: str | Path | None = None, files: list | tuple = ()) -> dict:
    """Counts of the decisions, and the parameters (and bytes) of the compressed layers' weights.

    Before: the parameters of the weights the factorized and pruned layers compute with, each
    weight counted once however many nodes read it, in whichever orientation. After, with
    ``output`` (the written model): counted from that file, the tensors that hold those weights in
    it (factors, corrections, pruned weights, and any original still stored), each tensor counted
    once per graph that holds it; the model's size on disk (with its external data) and, from
    ``files``, the size of every file the compile wrote. Without ``output`` (nothing was written)
    after comes from the plan's records; ``counted_from`` says which."""
    done = [r for r in layers if r.decision in ("factorized", "pruned")]
    weights: dict[str, tuple[int, list[str]]] = {}  # weight -> (parameters, tensors holding it now)
    for r in done:
        key = f"{r.node}:{r.weight}" if r.decision == "pruned" else r.weight
        names = weights.setdefault(key, (r.params_before or 0, []))[1]
        names += [n for n in (r.stored_after or [r.weight]) if n not in names]
    before = sum(p for p, _ in weights.values())
    out = {
        "candidates": len(layers),
        "factorized": sum(r.decision == "factorized" for r in layers),
        "pruned": sum(r.decision == "pruned" for r in layers),
        "declined": sum(r.decision == "declined" for r in layers),
        "params_before": before,
    }
    if output is not None:
        stored, data_files = stored_tensors(output)
        held = {n: stored[n] for _, names in weights.values() for n in names if n in stored}
        out["params_after"] = sum(v for occ in held.values() for v, _ in occ)
        out["counted_from"] = "written model"
        # bytes before: each weight at the dtype it is written in (factors keep the weight's dtype)
        nbytes = 0
        for p, names in weights.values():
            sizes = [occ[0] for n in names for occ in [held.get(n)] if occ and occ[0][0]]
            nbytes = None if nbytes is None or not sizes else nbytes + p * (sizes[0][1] // sizes[0][0])
        out["bytes_before"] = nbytes
        out["bytes_after"] = sum(b for occ in held.values() for _, b in occ)
        model = Path(output)
        out["output_bytes"] = sum(f.stat().st_size for f in [model, *(model.parent / d for d in data_files)]
                                  if f.is_file())
        out["files"] = {str(f): Path(f).stat().st_size for f in files if Path(f).is_file()}
    else:
        out["counted_from"] = "records"
        out["params_after"] = sum(r.params_after or 0 for r in done if not r.shared_with)
    forms = [r for r in done if (r.info or {}).get("form") and "index_bytes" in r.info and not r.shared_with]
    if forms:  # sparse forms: what a runtime stores (values + index bytes as parameter-equivalents)
        out["storage_params_after"] = sum(r.params_after or 0 for r in done if not r.shared_with)
        out["index_bytes"] = sum(int(r.info.get("index_bytes", 0)) for r in forms)
        out["stored_values"] = sum(int(r.info.get("stored_values", 0)) for r in forms)
        out["ort_params_after"] = sum(int(r.info.get("ort_params", r.params_after or 0)) for r in done
                                      if not r.shared_with)
    a = out["params_after"]
    out["params_ratio"] = (a / before) if before else None
    keys = ["candidates", "factorized", "pruned", "declined", "params_before", "params_after", "params_ratio"]
    return {k: out[k] for k in keys} | {k: v for k, v in out.items() if k not in keys}


def stored_tensors(path: str | Path) -> tuple[dict[str, list[tuple[int, int]]], list[str]]:
    """What an ONNX file stores: tensor name -> (values, bytes) for each graph that holds it
    (initializers of the main graph and of every subgraph, Constant nodes' values), and the
    external-data files its tensors point to. Reads no external data."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    stored: dict[str, list[tuple[int, int]]] = {}
    files: dict[str, None] = {}

    def size(t) -> tuple[int, int]:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        if t.data_type == onnx.TensorProto.STRING:
            return n, sum(len(x) for x in t.string_data)
        return n, n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

    def sparse_size(t) -> tuple[int, int]:  # its nonzero values; bytes with their indices
        n = int(np.prod(t.values.dims)) if len(t.values.dims) else 1
        item = onnx.helper.tensor_dtype_to_np_dtype(t.values.data_type).itemsize
        idx = int(np.prod(t.indices.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.indices.data_type).itemsize
        return n, n * item + idx

    def walk(g) -> None:
        for t in g.initializer:
            stored.setdefault(t.name, []).append(size(t))
            files.update({e.value: None for e in t.external_data if e.key == "location"})
        for t in g.sparse_initializer:
            stored.setdefault(t.values.name, []).append(sparse_size(t))
        for node in g.node:
            for a in node.attribute:
                if node.op_type == "Constant" and a.name == "value" and node.output:
                    stored.setdefault(node.output[0], []).append(size(a.t))
                if node.op_type == "Constant" and a.name == "sparse_value" and node.output:
                    stored.setdefault(node.output[0], []).append(sparse_size(a.sparse_tensor))
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(model.graph)
    return stored, list(files)


def memory_line(report: dict) -> str | None:
    """One line for a summary: the peak resident memory of the compile and of its heaviest phases,
    e.g. ``peak RSS 412 MB (verify 412, factorize 230, rewrite 180)``; None without a memory section."""
    phases = {k: v["rss_peak_mb"] for k, v in ((report.get("memory") or {}).get("phases") or {}).items()
              if v.get("rss_peak_mb") is not None}
    if not phases:
        return None
    top = sorted(phases.items(), key=lambda kv: -kv[1])[:3]
    kids = [v["children_rss_peak_mb"] for v in report["memory"]["phases"].values() if v.get("children_rss_peak_mb")]
    return (f"peak RSS {max(phases.values()):.0f} MB (" + ", ".join(f"{k} {v:.0f}" for k, v in top) + ")"
            + (f"; workers {max(kids):.0f} MB" if kids else ""))


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


def _size_label(r: LayerRecord):
    """A record's size as the tables show it: the rank, or a conv form's name and ranks
    (``tucker2 32x23``: R_in x R_out)."""
    info = r.info or {}
    if info.get("form") and info.get("ranks"):
        return f"{info['form']} {info['ranks']}"
    return r.rank


def plan_summary(plan: dict, layers: list[LayerRecord]) -> str:
    """The planner's per-layer choices and its totals: predicted vs measured, and the search it walked."""
    lines = []
    rows = []
    for r in layers:
        if r.predicted_loss is None and not r.latency:
            continue
        cut = r.decision in ("factorized", "pruned")
        kept = (r.params_after / r.params_before) if cut and r.params_before else 1.0
        choice = _size_label(r) if r.decision == "factorized" else "dense" if r.decision != "pruned" else (
            f"head dim {r.info.get('kept')}/{r.info.get('head_dim')} ({r.info.get('kind', 'qkv').upper()})"
            if r.method == "heads" else f"width {r.info.get('kept')}/{r.info.get('channels')}")
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
