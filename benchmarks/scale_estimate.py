#!/usr/bin/env python
"""Estimates for models past this machine (docs/scale.md): ``python benchmarks/scale_estimate.py
[--measure] [--out DIR]``.

``--measure`` times the units on one core here (randomized SVD, the whitening eigendecomposition,
float64 Gram accumulation, ONNX Runtime's fp32 MatMul) and writes ``unit_costs.json``; without it
the last measurement is read. Then, for Llama-2-shaped 7B and 70B models at half of each weight's
parameters, it multiplies the costs out over the layers and prints a markdown table: core-hours of
each kind of unit, hours on a Ray cluster of N nodes x c cores, and the bytes each kind of unit
moves. First-order: it ignores start-up, scheduling and the serial parts, which it states.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "scale"

#: (name, blocks, [(m, n, shares its input with the previous weight)] per block)
MODELS = {
    "7B": (32, [(4096, 4096, False), (4096, 4096, True), (4096, 4096, True), (4096, 4096, False),
                (4096, 11008, False), (4096, 11008, True), (11008, 4096, False)]),
    "70B": (80, [(8192, 8192, False), (8192, 1024, True), (8192, 1024, True), (8192, 8192, False),
                 (8192, 28672, False), (8192, 28672, True), (28672, 8192, False)]),
}
CALIB_TOKENS = 256 * 512  # 256 calibration samples of 512 tokens
TRIAL_TOKENS = 64 * 512  # --sensitivity-samples 64 of 512 tokens
PROBES = 2  # sensitivity trials per weight


def measure() -> dict:
    from threadpoolctl import threadpool_limits

    from lrcompile.factorize import RankPolicy, factorize

    rng = np.random.default_rng(0)
    out = {}
    with threadpool_limits(1, user_api="blas"):
        for m, n, r in [(2048, 2048, 512), (2048, 5504, 746)]:
            w = rng.standard_normal((m, n)).astype(np.float32)
            t = time.perf_counter()
            factorize(w, RankPolicy(rank=r, multiple=1), "svd", None, solver="randomized", seed=0)
            out[f"randomized {m}x{n} r{r}"] = (time.perf_counter() - t) / (m * n * r) * 1e9
        for k in (2048, 4096):
            x = rng.standard_normal((4096, k))
            t = time.perf_counter()
            g = x.T @ x
            out[f"gram k{k}"] = (time.perf_counter() - t) / (4096 * k * k) * 1e9
            t = time.perf_counter()
            np.linalg.eigh(g)
            out[f"eigh k{k}"] = (time.perf_counter() - t) / k**3 * 1e9
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    k = 4096
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", 1, [512, k])],
                          [helper.make_tensor_value_info("y", 1, [512, k])],
                          [numpy_helper.from_array(rng.standard_normal((k, k)).astype(np.float32), "W")])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                             so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((512, k)).astype(np.float32)
    s.run(None, {"x": x})
    t = time.perf_counter()
    for _ in range(3):
        s.run(None, {"x": x})
    out["ort matmul gflops"] = 2 * 512 * k * k / ((time.perf_counter() - t) / 3) / 1e9
    return {"ns per unit (one core)": out, "machine": "2 cores, AMD EPYC, OpenBLAS SkylakeX, one thread"}


def estimate(costs: dict, name: str, nodes: int, cores: int) -> dict:
    c = costs["ns per unit (one core)"]
    rand = max(v for k, v in c.items() if k.startswith("randomized"))  # ns per m n r
    eigh, gram = c["eigh k4096"], c["gram k4096"]  # ns per k^3, per row k^2
    gflops = c["ort matmul gflops"]
    blocks, shapes = MODELS[name]
    weights = blocks * sum(m * n for m, n, _ in shapes)
    fit = eig = gram_entries = 0.0
    for m, n, shared in shapes:
        r = m * n // (2 * (m + n))
        fit += rand * m * n * r
        eig += eigh * m**3  # whiten: one eigendecomposition of the input's Gram per weight
        if not shared:
            gram_entries += m * m
    fit, eig, gram_entries = fit * blocks / 1e9, eig * blocks / 1e9, gram_entries * blocks
    forward = 2 * weights / (gflops * 1e9)  # seconds per token, one core
    calib = CALIB_TOKENS * (forward + gram * gram_entries / 1e9)
    trials = PROBES * blocks * len(shapes) * TRIAL_TOKENS * forward
    workers = nodes * cores
    h = 3600
    return {
        "weights": weights, "fit_core_h": fit / h, "whiten_core_h": eig / h, "calib_core_h": calib / h,
        "trials_core_h": trials / h, "trials": PROBES * blocks * len(shapes),
        "cluster_h": {k: v / h / workers for k, v in (("fit", fit), ("whiten", eig), ("calibration", calib),
                                                      ("trials", trials))},
        "gram_gb_per_shard": gram_entries * 8 / 1e9, "weights_gb_fp16": weights * 2 / 1e9,
        "trial_model_gb": weights * 2 / 1e9, "nodes": nodes, "cores": cores,
    }


def table(costs: dict, nodes: int, cores: int) -> str:
    rows = ["| | 7B | 70B |", "|---|---:|---:|"]
    e = {m: estimate(costs, m, nodes, cores) for m in MODELS}

    def row(label, f):
        rows.append(f"| {label} | {f(e['7B'])} | {f(e['70B'])} |")

    row("weights", lambda x: f"{x['weights'] / 1e9:.1f}e9")
    row("fits, randomized SVD (core-hours)", lambda x: f"{x['fit_core_h']:.1f}")
    row("+ whitening eigendecompositions (core-hours)", lambda x: f"{x['whiten_core_h']:.1f}")
    row(f"calibration, {CALIB_TOKENS:,} tokens: forward + float64 Grams (core-hours)", lambda x: f"{x['calib_core_h']:.0f}")
    row(f"sensitivity trials: {PROBES} per weight x {TRIAL_TOKENS:,} tokens (core-hours)",
        lambda x: f"{x['trials_core_h']:.0f} ({x['trials']} trials)")
    for k in ("fit", "whiten", "calibration", "trials"):
        row(f"{k} on {nodes} nodes x {cores} cores (hours)", lambda x, k=k: f"{x['cluster_h'][k]:.2f}")
    row("Grams of one calibration shard, float64 (GB; each shard's result, and each worker's memory)",
        lambda x: f"{x['gram_gb_per_shard']:.0f}")
    row("weights read by the fits (GB, fp16; by path from a shared file system)", lambda x: f"{x['weights_gb_fp16']:.0f}")
    row("one trial model, read by a worker (GB, fp16: the dense weights by path, the new factors inline)", lambda x: f"{x['trial_model_gb']:.0f}")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", action="store_true", help="time the units here first (a few minutes)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--cores", type=int, default=16)
    a = ap.parse_args()
    path = a.out / "unit_costs.json"
    if a.measure:
        a.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(measure(), indent=1) + "\n")
    costs = json.loads(path.read_text())
    print(json.dumps(costs["ns per unit (one core)"], indent=1))
    print(table(costs, a.nodes, a.cores))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
