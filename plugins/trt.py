"""The plugins TensorRT can run, for an engine build (``lrcompile.targets.trt``).

``prepare(trt, parser, onnx_path)`` decides, for a model written with ``--plugins``, whether
TensorRT runs the fused kernels or inlines the functions' bodies, and says which and why:
the kernels need the full ``tensorrt`` package with ``tensorrt.plugin`` (TensorRT 10.7 and later)
and Triton; ``tensorrt_rtx`` rejects custom plugin layers, so there the bodies are inlined.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from .contract import NAMESPACE


def plugin_calls(onnx_path: Path) -> list[str]:
    """The plugin ops a model calls (its model-local functions in the ``lrcompile`` domain); none for
    a file ONNX cannot read (the TensorRT parser then says what is wrong with it)."""
    try:
        m = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError, OSError...
        return []
    return sorted({f.name for f in m.functions if f.domain == NAMESPACE})


def prepare(trt, parser, onnx_path: Path) -> dict | None:
    """Register what the model calls and set the parser's override flag; None for a model
    without plugin calls."""
    calls = plugin_calls(onnx_path)
    if not calls:
        return None
    if trt.__name__ != "tensorrt":
        return {"calls": calls, "registered": [], "inlined": calls,
                "why": f"{trt.__name__} rejects custom plugin layers: the functions' bodies are inlined"}
    from importlib.util import find_spec

    missing = [m for m in ("tensorrt.plugin", "triton") if find_spec(m) is None]  # tensorrt.plugin: TensorRT >= 10.7
    if missing:
        return {"calls": calls, "registered": [], "inlined": calls,
                "why": f"{missing[0]} is not installed: the functions' bodies are inlined"}
    from .low_rank_gemm import trt as low_rank_gemm

    glue = {"LowRankGemm": low_rank_gemm}
    registered = [glue[c].register() for c in calls if c in glue]
    flags = low_rank_gemm.parser_flags(trt, parser)
    inlined = [c for c in calls if c not in glue]
    return {"calls": calls, "registered": registered, "inlined": inlined, "parser_flags": flags,
            "why": "no TensorRT glue yet for " + ", ".join(inlined) if inlined else None}
