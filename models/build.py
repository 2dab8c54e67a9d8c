#!/usr/bin/env python
"""Build an example model into a folder: ``python models/build.py NAME --out DIR [--fast]``.

``python models/build.py --list`` lists the names. Each family lives in its own module
(synthetic, minilm, ctr, cnn), imported only when one of its models is built, so the synthetic
models need nothing beyond numpy and onnx (and use onnxruntime when it is installed). See
common.py for the folder layout and metrics.py for scoring a model against a build folder.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see _one_blas_thread

from common import BuildError, data_dir, write_build  # noqa: E402

#: name -> (module, function, needs the data folder, one-line description)
BUILDERS = {
    "tiny-mlp": ("synthetic", "tiny_mlp", False, "MLP 256-512-512-256-10, trained-like spectra (numpy only)"),
    "tiny-transformer": ("synthetic", "tiny_transformer", False, "one encoder block, [batch, seq, 64] (numpy only)"),
    "tiny-cnn": ("synthetic", "tiny_cnn", False, "strided, dilated, grouped, depthwise convs + Gemm head (numpy only)"),
    "minilm-l6": ("minilm", "minilm_l6", True, "all-MiniLM-L6-v2 sentence embeddings on product reviews (torch)"),
    "minilm-l6-dynamo": ("minilm", "minilm_l6_dynamo", True,
                         "minilm-l6 through torch's dynamo exporter: opset 18, weights in model.onnx.data (torch)"),
    "deepfm-ml100k": ("ctr", "deepfm", True, "DeepFM CTR model trained on MovieLens-100K (torch)"),
    "dcnv2-ml100k": ("ctr", "dcnv2", True, "DCN-V2 CTR model trained on MovieLens-100K (torch)"),
    "cnn-digits": ("cnn", "cnn_digits", False, "small CNN trained on sklearn digits (torch)"),
    "synthetic-transformer": ("big", "synthetic_transformer", False,
                              "80 encoder blocks d=1024, 4.0 GB external data, streamed (numpy only)"),
    "ctr-embedding": ("big", "ctr_embedding", False,
                      "CTR: 12M x 64 shared embedding table (3.1 GB external data) + MLP head (numpy only)"),
}


def _one_blas_thread():
    """Single-threaded numpy BLAS where threadpoolctl is installed: threads only slow these small
    builds (badly so on a busy machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def build(name: str, out: Path, *, fast: bool = False, seed: int = 0, data: str | Path | None = None) -> dict:
    """Build model ``name`` into ``out``; returns its meta.json content."""
    if name not in BUILDERS:
        raise BuildError(f"unknown model {name!r}; choose one of: {', '.join(BUILDERS)}")
    module, func, needs_data, _ = BUILDERS[name]
    kwargs = {"data": data_dir(data)} if needs_data else {}
    try:
        builder = getattr(importlib.import_module(module), func)
        if "scratch" in inspect.signature(builder).parameters:  # writes its weights into the folder as it goes
            kwargs["scratch"] = Path(out)
        with _one_blas_thread():
            built = builder(seed=seed, fast=fast, **kwargs)
    except ModuleNotFoundError as e:
        if (Path(__file__).parent / f"{e.name}.py").exists():
            raise  # one of ours: a bug, keep the traceback
        raise BuildError(f"{name} needs the {e.name} package: pip install -e '.[models]' "
                         "(install torch==2.13.0, the CPU build, first)") from None
    return write_build(built, Path(out), name=name, seed=seed, options={"fast": fast})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="model to build (see --list)")
    parser.add_argument("--out", type=Path, help="output folder (created)")
    parser.add_argument("--fast", action="store_true", help="small feeds / short training, for tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", help="data folder (default: $LRCOMPILE_DATA or <repo>/../shared/data)")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (*_, desc) in BUILDERS.items():
            print(f"{name:22s} {desc}")
        return 0
    if not args.name or not args.out:
        parser.error("NAME and --out are required (or --list)")
    t0 = time.perf_counter()
    try:
        meta = build(args.name, args.out, fast=args.fast, seed=args.seed, data=args.data)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir()) if p.is_file()}
    print(f"built {args.name} in {time.perf_counter() - t0:.1f} s -> {args.out}")
    print("baseline:", json.dumps(meta["baseline"]))
    print("files:", ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
