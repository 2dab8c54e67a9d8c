#!/usr/bin/env python
"""Dense vs 2:4 semi-structured sparse vs low-rank GEMMs at the test-bed shapes:
``python benchmarks/gpu_sparse.py [--out benchmarks/results/forms/gpu_sparse.json]``.

For each weight shape of the test-bed models (``[out, in]`` as ``torch.nn.functional.linear``
takes it: MiniLM-L6's attention and FFN weights, DeepFM / DCN-v2's first MLP layers, the digits
CNN's fully connected layer) and each batch of rows (1 to 512), in fp16 on a GPU:

- ``dense``: ``x W^T``;
- ``2:4``: the same weight pruned to 2 of every 4 along the reduction axis by
  ``lrcompile.factorize.sparse.nm_prune`` (the form ``nm`` emits), run by torch's semi-structured
  sparse tensor (``to_sparse_semi_structured``: cuSPARSELt / CUTLASS) and, for reference, as the
  dense masked weight;
- ``lowrank``: ``(x A) C`` with ``A, C`` at the storage of the 2:4 weight (0.53 of dense in fp32's
  accounting, values + metadata).

Numerics are checked against fp32 products of the same (pruned or factorized) weights: the largest
relative L2 error per variant is reported and must stay under 1e-2 (fp16). Times are medians of CUDA
event timings after warm-up, interleaved per shape. Without a GPU it runs on the CPU in fp32 for
correctness only (torch has no semi-structured kernel there): the 2:4 pattern, the products, and
the relative errors; its times are not the point and are labelled as CPU. Under 5 minutes on one
GPU.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lrcompile.factorize.sparse import nm_mask_ok, nm_prune

#: (label, out, in)
SHAPES = [
    ("minilm attn", 384, 384),
    ("minilm ffn-in", 1536, 384),
    ("minilm ffn-out", 384, 1536),
    ("deepfm mlp1", 400, 416),
    ("dcnv2 mlp1", 256, 320),
    ("digits fc", 128, 2048),
]
BATCHES = [1, 16, 64, 256, 512]


def weights(out: int, inp: int, seed: int):
    """A trained-like weight ``[out, in]``, its 2:4 pruned copy and low-rank factors at 2:4's storage."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((out, min(out, inp))))
    v, _ = np.linalg.qr(rng.standard_normal((inp, min(out, inp))))
    s = np.arange(1, min(out, inp) + 1) ** -0.5
    w = ((u * s) @ v.T).astype(np.float32)
    pruned = nm_prune(w.T, 2, 4).s.T  # B = W^T [in, out]: N:M along the reduction axis `in`
    assert nm_mask_ok(pruned.T, 2, 4)
    r = int(0.53125 * out * inp / (out + inp))
    uu, ss, vt = np.linalg.svd(w, full_matrices=False)
    c, a = (uu[:, :r] * ss[:r]).astype(np.float32), vt[:r].astype(np.float32)  # W ~= C A: x W^T = (x A^T) C^T
    return w, pruned, a, c


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/forms/gpu_sparse.json"))
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    dev, dt = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)
    semi = None
    if gpu:
        try:
            from torch.sparse import to_sparse_semi_structured as semi
        except ImportError:
            semi = None
    rows = []
    t_start = time.time()
    for i, (label, out, inp) in enumerate(SHAPES):
        w, pruned, a, c = weights(out, inp, seed=i)
        tw, tp = torch.tensor(w, device=dev, dtype=dt), torch.tensor(pruned, device=dev, dtype=dt)
        ta, tc = torch.tensor(a, device=dev, dtype=dt), torch.tensor(c, device=dev, dtype=dt)
        ts = None
        if semi is not None:
            try:
                ts = semi(tp)
            except Exception as e:  # noqa: BLE001 - an unsupported shape/arch: record why
                rows.append({"shape": label, "error": f"to_sparse_semi_structured: {type(e).__name__}: {e}"})
        for b in BATCHES:
            x = np.random.default_rng(100 + b).standard_normal((b, inp)).astype(np.float32)
            tx = torch.tensor(x, device=dev, dtype=dt)
            ref = {"dense": x @ w.T, "2:4 masked": x @ pruned.T, "2:4 sparse": x @ pruned.T, "lowrank": (x @ a.T) @ c.T}
            fns = {"dense": lambda: torch.nn.functional.linear(tx, tw),
                   "2:4 masked": lambda: torch.nn.functional.linear(tx, tp),
                   "lowrank": lambda: torch.nn.functional.linear(torch.nn.functional.linear(tx, ta), tc)}
            if ts is not None:
                fns["2:4 sparse"] = lambda: torch.nn.functional.linear(tx, ts)
            res = {}
            for name, fn in fns.items():
                try:
                    y = fn().float().cpu().numpy()
                except Exception as e:  # noqa: BLE001
                    res[name] = {"error": f"{type(e).__name__}: {e}"}
                    continue
                err = float(np.linalg.norm(y - ref[name]) / np.linalg.norm(ref[name]))
                res[name] = {"rel_l2": err}
            for _ in range(5):
                for fn in fns.values():
                    fn()
            times = {n: [] for n in fns}
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    if "error" in res[name]:
                        continue
                    if gpu:
                        s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s0.record()
                        fn()
                        s1.record()
                        torch.cuda.synchronize()
                        times[name].append(s0.elapsed_time(s1))
                    else:
                        t0 = time.perf_counter()
                        fn()
                        times[name].append((time.perf_counter() - t0) * 1e3)
            dense_ms = float(np.median(times["dense"]))
            for name in fns:
                if times[name]:
                    res[name]["ms"] = float(np.median(times[name]))
                    res[name]["vs_dense"] = res[name]["ms"] / dense_ms
            rows.append({"shape": label, "out": out, "in": inp, "batch": b, **{k: v for k, v in res.items()}})
            ok = all(v.get("rel_l2", 0) < 1e-2 for v in res.values() if isinstance(v, dict) and "rel_l2" in v)
            print(f"{label} [{out}x{inp}] batch {b}: " + ", ".join(
                f"{k} {v['ms']:.3f} ms ({v['vs_dense']:.2f}x, err {v['rel_l2']:.1e})" if "ms" in v else f"{k} {v}"
                for k, v in res.items()) + ("" if ok else "  NUMERICS FAILED"), flush=True)
    meta = {"device": torch.cuda.get_device_name(0) if gpu else "cpu (no GPU: correctness only, times are CPU fp32)",
            "dtype": str(dt), "torch": torch.__version__, "semi_structured": semi is not None,
            "seconds": round(time.time() - t_start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    bad = [r for r in rows if any(isinstance(v, dict) and v.get("rel_l2", 0) >= 1e-2 for v in r.values())]
    print(f"wrote {args.out} ({meta['device']}); {len(bad)} rows with numerics over 1e-2")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
