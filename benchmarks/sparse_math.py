#!/usr/bin/env python
"""N:M pruning and low rank + sparse on real MiniLM weights: ``python benchmarks/sparse_math.py``.

Weights: three MatMuls of layer 2 of the test bed's all-MiniLM-L6-v2 (``../testbed/full/minilm-l6``,
or ``--build``): the attention query ``[384, 384]``, the FFN up ``[384, 1536]`` and the FFN down
``[1536, 384]``. Gram ``G = X^T X`` of each layer's real inputs over the build's calibration set
(padding rows dropped by the attention mask); the held-out objective uses the Gram of the build's
eval set (other reviews). Objective: ``||X (B - B')||_F / ||X B||_F`` (undamped).

Storage in fp32 parameter-equivalents (values + index bytes / 4), relative to ``K N``:
    2:4          0.5 K N values + 2 bits of metadata per kept value = 0.53125 K N
    unstructured 2 per nonzero (value + int32 index)
    rows         N + 1 per kept row (values + one index)
    low rank r   r (K + N)
Rows: magnitude 2:4, obs 2:4, whitened low rank at the 2:4 storage and at 50%, and
``lowrank_sparse`` at 50% with 10/20/30% of the budget in S (unstructured and rows; plus
``refit_iters=0``, OATS alone, for comparison). Each call is timed (one run; the machine is shared,
so times are indicative; run with ``OPENBLAS_NUM_THREADS=1`` on a busy 2-core machine: threaded
BLAS slowed the small SVDs and QRs of ``lowrank_sparse`` down 10x there). Writes JSON to
``--out`` (default ``benchmarks/results/sparse_math.json``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from lrcompile.calibrate import StatRequest, collect_stats
from lrcompile.factorize import LayerStats, RankPolicy
from lrcompile.factorize.sparse import DEFAULT_REFIT_ITERS, lowrank_sparse, nm_prune, objective
from lrcompile.factorize.whiten import factorize_whiten

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "query[384x384]": "/encoder/encoder/layer.2/attention/self/query/MatMul",
    "ffn_up[384x1536]": "/encoder/encoder/layer.2/intermediate/dense/MatMul",
    "ffn_down[1536x384]": "/encoder/encoder/layer.2/output/dense/MatMul",
}


def grams(model, nodes, npz: Path, samples: int) -> dict[str, np.ndarray]:
    data = dict(np.load(npz))
    data = {k: v[:samples] for k, v in data.items()}
    reqs = {name: StatRequest(node.input[0], k) for name, (node, k) in nodes.items()}
    batches = ({k: v[i:i + 32] for k, v in data.items()} for i in range(0, samples, 32))
    stats, _ = collect_stats(model, reqs, batches, mask_input="attention_mask")
    return {name: s[0].gram for name, s in stats.items()}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, default=ROOT.parent / "testbed" / "full" / "minilm-l6")
    ap.add_argument("--samples", type=int, default=256, help="calibration (and eval) sequences")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sparse_math.json")
    args = ap.parse_args()

    model = onnx.load(args.build / "model.onnx")
    inits = {i.name: i for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    nodes, weights = {}, {}
    for label, node_name in LAYERS.items():
        node = by_name[node_name]
        weights[label] = numpy_helper.to_array(inits[node.input[1]])
        nodes[label] = (node, weights[label].shape[0])
    g_cal = grams(model, nodes, args.build / "calib.npz", args.samples)
    g_eval = grams(model, nodes, args.build / "eval.npz", args.samples)

    rows = []
    for label, b in weights.items():
        k, n = b.shape
        g, ge = g_cal[label], g_eval[label]
        b64 = b.astype(np.float64)

        def row(method, storage, fit, seconds, **extra):
            approx = fit.dense() if hasattr(fit, "kind") else fit.a.astype(np.float64) @ fit.c.astype(np.float64)
            r = {"layer": label, "method": method, "storage": round(storage, 4),
                 "objective": fit.objective_error, "heldout": objective(b64, approx, ge),
                 "rel_error": fit.rel_error, "seconds": round(seconds, 3), **extra}
            rows.append(r)
            print(f"{label:20s} {method:34s} storage {storage:.3f}  obj {r['objective']:.4f}  "
                  f"held-out {r['heldout']:.4f}  weight {r['rel_error']:.4f}  {seconds:6.2f} s", flush=True)

        nm_storage = 0.5 * (1 + 2 / 32)
        for method in ("magnitude", "obs"):
            fit, sec = timed(lambda: nm_prune(b, 2, 4, g, method=method))
            row(f"2:4 {method}", nm_storage, fit, sec)
        stats = LayerStats(count=1, gram=g)
        for frac in (nm_storage, 0.5):
            r = int(frac * k * n // (k + n))
            fit, sec = timed(lambda: factorize_whiten(b, RankPolicy(rank=r), stats))
            row(f"whitened low rank r={r}", r * (k + n) / (k * n), fit, sec, rank=r)
        budget = 0.5 * k * n
        for pattern in ("unstructured", "rows"):
            for share in (0.1, 0.2, 0.3):
                if pattern == "unstructured":
                    nnz = int(share * budget // 2)
                    spent = 2 * nnz
                else:
                    kept = int(share * budget // (n + 1))
                    nnz, spent = kept * n, kept * (n + 1)
                r = int((budget - spent) // (k + n))
                storage = (r * (k + n) + spent) / (k * n)
                for refit in ((DEFAULT_REFIT_ITERS, 0) if share == 0.2 else (DEFAULT_REFIT_ITERS,)):
                    fit, sec = timed(lambda: lowrank_sparse(b, r, nnz, g, pattern=pattern, refit_iters=refit))
                    tag = "" if refit else " (OATS only)"
                    row(f"lr+sparse {pattern} {int(share * 100)}% r={r}{tag}", storage, fit, sec, rank=r,
                        nonzeros=fit.info["nonzeros"], source=fit.info["source"],
                        oats_iterations=fit.info["oats_iterations"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"build": str(args.build), "samples": args.samples, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
