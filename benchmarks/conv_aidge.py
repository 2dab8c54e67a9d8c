#!/usr/bin/env python
"""One honest try of Eclipse Aidge's aidge_compression (the ONNX-in, ONNX-out Tucker-2 / VBMF
peer) on our digits CNN, run ONLY from its own venv (never a dependency of lrcompile):

    python3 -m venv /work/venv-aidge
    /work/venv-aidge/bin/pip install aidge-compression aidge-onnx aidge-backend-cpu
    /work/venv-aidge/bin/python benchmarks/conv_aidge.py artifacts/cnn-digits/model.onnx /tmp/aidge.onnx

Prints each step and where it fails (the step, the exception type and its first line)."""
from __future__ import annotations

import sys
import traceback


def step(name, fn):
    try:
        out = fn()
        print(f"ok    {name}")
        return out
    except BaseException as e:  # report the failure where it happens, then stop
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"FAIL  {name}: {type(e).__name__}: {first}")
        traceback.print_exc(limit=3)
        sys.exit(1)


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    import aidge_backend_cpu  # noqa: F401  (registers the CPU kernels)
    del aidge_backend_cpu
    import aidge_compression
    import aidge_core
    import aidge_onnx

    print("versions:", {m.__name__: getattr(m, "__version__", "?") for m in (aidge_core, aidge_onnx, aidge_compression)})
    graph = step("aidge_onnx.load_onnx", lambda: aidge_onnx.load_onnx(src))
    step("graph.set_backend('cpu')", lambda: graph.set_backend("cpu"))
    comp = step("Compressor(rank_compression_factor=0.5)", lambda: aidge_compression.Compressor(0.5))
    step("Compressor.compress(graph)", lambda: comp.compress(graph))
    step("aidge_onnx.export_onnx", lambda: aidge_onnx.export_onnx(graph, dst))
    print("wrote", dst)


if __name__ == "__main__":
    main()
