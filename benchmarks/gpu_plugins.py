#!/usr/bin/env python
"""The plugins' Triton kernels against cuBLAS at the test-bed shapes, for a GPU machine:
``python benchmarks/gpu_plugins.py [--out benchmarks/results/plugins/gpu_plugins.json]``.

For each weight shape of the test-bed models (``[in, out]``: MiniLM-L6's attention and FFN weights,
DeepFM / DCN-v2's first MLP layers, the digits CNN's fully connected layer) and each batch of rows
(1 to 512), in fp16:

- ``dense``: ``x W`` (one cuBLAS GEMM, torch);
- ``chain``: ``(x A) C`` as two cuBLAS GEMMs (torch), ``A, C`` at rank ``r = K N / (2 (K + N))``
  (half the dense storage);
- ``LowRankGemm``: the Triton kernel (``plugins/low_rank_gemm/kernel.py``), one launch;
- ``chain+S``: ``(x A) C + x S`` with torch (two GEMMs, a dense GEMM for ``S``, an add), ``S``
  unstructured at 5% density;
- ``LowRankSparseGemm``: the fused Triton kernel, ``S`` in bitmap tiles.

Each kernel's output is checked against the NumPy reference (fp32 products of the same fp16
values); the largest relative L2 error must stay under 1e-2. Times are medians of CUDA-event
timings after warm-up. Without a GPU it refuses (the CPU interpreter is for the tests, not for
timing). Written for a lent GPU machine; it has NOT been run by its author (no GPU was lent).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (label, K, N) in the [in, out] layout
SHAPES = [
    ("minilm attn", 384, 384),
    ("minilm ffn-in", 384, 1536),
    ("minilm ffn-out", 1536, 384),
    ("deepfm mlp1", 416, 400),
    ("dcnv2 mlp1", 320, 256),
    ("digits fc", 2048, 128),
]
BATCHES = [1, 16, 64, 256, 512]
DENSITY = 0.05


def factors(k: int, n: int, seed: int):
    """Trained-like ``W [K, N]``, its rank-``r`` factors at half the storage, and a sparse ``S``."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((k, min(k, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(k, n))))
    s = np.arange(1, min(k, n) + 1) ** -0.5
    w = ((u * s) @ v.T).astype(np.float32)
    r = max(1, k * n // (2 * (k + n)))
    uu, ss, vt = np.linalg.svd(w, full_matrices=False)
    a, c = (uu[:, :r] * ss[:r]).astype(np.float32), vt[:r].astype(np.float32)
    sp = (rng.standard_normal((k, n)) * (rng.random((k, n)) < DENSITY) * 0.05).astype(np.float32)
    return w, a, c, sp, r


def time_ms(fn, repeats: int) -> float:
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return float(np.median(out))


def rel_l2(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def main(argv: list[str] | None = None) -> int:
    import torch

    from lrcompile.plugins.low_rank_gemm.kernel import low_rank_gemm
    from lrcompile.plugins.low_rank_gemm.reference import low_rank_gemm as lr_ref
    from lrcompile.plugins.low_rank_sparse_gemm.fmt import encode
    from lrcompile.plugins.low_rank_sparse_gemm.kernel import DeviceTiles, low_rank_sparse_gemm
    from lrcompile.plugins.low_rank_sparse_gemm.reference import low_rank_sparse_gemm as lrs_ref

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/plugins/gpu_plugins.json")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_plugins: no CUDA device; this benchmark times GPU kernels (the kernels' CPU checks are the "
              "tests under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    dev, dt = "cuda", torch.float16
    rows, t0, worst = [], time.time(), 0.0
    for i, (label, k, n) in enumerate(SHAPES):
        w, a, c, sp, r = factors(k, n, seed=i)
        w16, a16, c16, s16 = (torch.from_numpy(v).to(dev, dt) for v in (w, a, c, sp))
        tiles = DeviceTiles(encode(s16.cpu().numpy(), (32, 32)), dt, dev)
        for b in BATCHES:
            x = torch.randn(b, k, device=dev, dtype=dt)
            xn, an, cn, sn = (v.cpu().numpy() for v in (x, a16, c16, s16))
            y_lr = low_rank_gemm(x, a16, c16)
            y_lrs = low_rank_sparse_gemm(x, a16, c16, tiles)
            e_lr = rel_l2(y_lr.cpu().numpy(), lr_ref(xn, an, cn))
            e_lrs = rel_l2(y_lrs.cpu().numpy(), lrs_ref(xn, an, cn, sn))
            worst = max(worst, e_lr, e_lrs)
            row = {"shape": label, "K": k, "N": n, "rank": r, "batch": b, "density": DENSITY,
                   "rel_l2_lowrankgemm": e_lr, "rel_l2_lowranksparsegemm": e_lrs,
                   "dense_ms": time_ms(lambda: x @ w16, args.repeats),
                   "chain_ms": time_ms(lambda: (x @ a16) @ c16, args.repeats),
                   "lowrankgemm_ms": time_ms(lambda: low_rank_gemm(x, a16, c16), args.repeats),
                   "chain_sparse_ms": time_ms(lambda: (x @ a16) @ c16 + x @ s16, args.repeats),
                   "lowranksparsegemm_ms": time_ms(lambda: low_rank_sparse_gemm(x, a16, c16, tiles), args.repeats)}
            rows.append(row)
            print(f"{label:15s} b={b:4d} r={r:4d}  dense {row['dense_ms']:.4f}  chain {row['chain_ms']:.4f}  "
                  f"LowRankGemm {row['lowrankgemm_ms']:.4f}  chain+S {row['chain_sparse_ms']:.4f}  "
                  f"LowRankSparseGemm {row['lowranksparsegemm_ms']:.4f} ms  (rel L2 {e_lr:.1e}, {e_lrs:.1e})")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "float16",
           "seconds": round(time.time() - t0, 1), "worst_rel_l2": worst, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}; worst rel L2 {worst:.2e}")
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
