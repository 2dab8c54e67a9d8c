#!/usr/bin/env python
"""ONNX Runtime CPU latency of every form against dense and against low rank of the same storage:
``python benchmarks/form_latency.py [--ratio 0.5] [--out benchmarks/results/forms/latency]``.

One MatMul ``x [rows, K] @ B [K, N]`` per shape of the test-bed models (MiniLM-L6's attention and
FFN weights at one sentence of 128 tokens and at 16 of them; DeepFM / DCN-v2's first MLP layer at a
batch of 1 and 512; a wide 1024 x 1024 layer), rewritten by each form at ``--ratio`` of the weight's
storage (the form's own accounting, indices included) with seeded random values of the form's
structure (``form.random``: latency does not depend on the values), emitted by the compiler's own
rewrite. Every variant of one shape runs interleaved in the same process (``latency.measure``:
seeded random order, the median of many samples), so the ratios are side by side; absolute times
on a shared 2-core machine are noise.

ONNX Runtime has no sparse GEMM: an N:M weight runs dense, an unstructured sparse part is
densified at load and costs a dense GEMM beside the chain. The table says where each form loses.
Writes ``latency.json`` and ``latency.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lrcompile.config import CompileConfig
from lrcompile.engine import Plan, analyze, apply, context, export
from lrcompile.forms import FORMS
from lrcompile.latency import measure
from lrcompile.sessions import session

#: (label, K, N, rows per inference)
SHAPES = [
    ("minilm attn 384x384, 1x128 tokens", 384, 384, 128),
    ("minilm attn 384x384, 16x128 tokens", 384, 384, 2048),
    ("minilm ffn-in 384x1536, 1x128", 384, 1536, 128),
    ("minilm ffn-in 384x1536, 16x128", 384, 1536, 2048),
    ("minilm ffn-out 1536x384, 16x128", 1536, 384, 2048),
    ("deepfm mlp 416x400, batch 1", 416, 400, 1),
    ("deepfm mlp 416x400, batch 512", 416, 400, 512),
    ("wide 1024x1024, batch 64", 1024, 1024, 64),
]
#: (label, form, options)
VARIANTS = [
    ("lowrank", "lowrank", {}),
    ("nm 2:4", "nm", {}),
    ("lowrank+sparse (unstructured)", "lowrank+sparse", {"sparse_pattern": "unstructured"}),
    ("lowrank+sparse (rows)", "lowrank+sparse", {"sparse_pattern": "rows"}),
    ("dense-nm 2:4", "dense-nm", {}),
    ("dictionary", "dictionary", {}),
]


def matmul_model(k: int, n: int, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "latency",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["rows", k])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["rows", n])],
                          [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def rewritten(model: onnx.ModelProto, form: str, size: int, options: dict, seed: int):
    """``model`` with its one weight in ``form`` at ``size`` (random values), and that value's storage."""
    a = analyze(model, CompileConfig(min_params=0, keep_unprofitable=True, verify=False))
    (cand,) = a.candidates
    f = FORMS[form]
    value = f.random(cand, size, seed=seed, **({"options": options} if form != "lowrank" else {}))
    p = Plan()
    p.put(cand, value, size, form=form)
    ctx = context(a.graph)
    apply(ctx, [cand], p)
    return export(a.graph, model, ctx.sparse), f.storage(value).params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5, help="storage of each form over the dense weight's")
    ap.add_argument("--budget-s", type=float, default=1.0, help="timing seconds per variant and shape")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/forms/latency"))
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, k, n, r in SHAPES:
            model = matmul_model(k, n, seed=0)
            size = int(args.ratio * k * n / (k + n))
            feed = {"x": np.random.default_rng(1).standard_normal((r, k)).astype(np.float32)}
            runs, storage = {"dense": (session(model, ["CPUExecutionProvider"], spinning=False, threads=args.threads,
                                               tmp=Path(tmp)), feed)}, {"dense": k * n}
            for vlabel, form, opts in VARIANTS:
                try:
                    m, st = rewritten(model, form, size, opts, seed=2)
                except ValueError as e:
                    print(f"{label}: {vlabel}: {e}", file=sys.stderr)
                    continue
                runs[vlabel] = (session(m, ["CPUExecutionProvider"], spinning=False, threads=args.threads,
                                        tmp=Path(tmp)), feed)
                storage[vlabel] = st
            ms = measure(runs, repeats=200, budget_s=args.budget_s)
            for v, t in ms.items():
                rows.append({"shape": label, "K": k, "N": n, "rows": r, "variant": v, "ms": round(t, 4),
                             "vs_dense": round(t / ms["dense"], 3),
                             "vs_lowrank": round(t / ms["lowrank"], 3) if "lowrank" in ms else None,
                             "storage": round(storage[v] / (k * n), 3)})
            print(f"{label}: " + ", ".join(f"{v} {t / ms['dense']:.2f}" for v, t in ms.items()), flush=True)
    import onnxruntime

    meta = {"command": "python benchmarks/form_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "ratio": args.ratio, "onnxruntime": onnxruntime.__version__, "machine": platform.processor() or
            platform.machine(), "cpus": __import__("os").cpu_count()}
    (args.out / "latency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"ONNX Runtime {meta['onnxruntime']} CPU, {meta['cpus']} cores; storage {args.ratio} of each weight; "
             f"`{meta['command']}`", "", "| shape | variant | storage | ms | vs dense | vs lowrank |", "|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['shape']} | {x['variant']} | {x['storage']:.2f} | {x['ms']:.3f} | {x['vs_dense']:.2f} | "
                     f"{x['vs_lowrank'] if x['vs_lowrank'] is not None else '-'} |")
    (args.out / "latency.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'latency.json'}, {args.out / 'latency.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
