"""LowRankGemm: ``Y = (X A) C``, the low-rank chain in one launch.

The ``[rows, r]`` intermediate ``X A`` never leaves the chip: one program per block of rows
computes it once, then loops over the output tiles of ``C``. A mean correction ``d`` (when a
method adds one) stays a plain ``Add`` after the call: TensorRT's ONNX parser keys a model-local
function by its name alone (overloads are ignored; tested with tensorrt-rtx 1.7), so the op has
one fixed arity.
"""
from __future__ import annotations

from ..contract import FLOATS, Contract, Port

CONTRACT = Contract(
    name="LowRankGemm",
    version="1",
    inputs=(
        Port("X", ("...", "K"), FLOATS, "activations, K features on the last axis"),
        Port("A", ("K", "r"), FLOATS, "first factor (a constant)"),
        Port("C", ("r", "N"), FLOATS, "second factor (a constant)"),
    ),
    outputs=(Port("Y", ("...", "N"), FLOATS, "(X A) C, the leading axes of X kept"),),
    doc=__doc__.split("\n\n")[0],
)
