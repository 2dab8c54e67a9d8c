"""LowRankSparseGemm: ``Y = (X A) C + X S`` with ``S`` unstructured sparse, as one launch.

The ``lowrank+sparse`` form's emission (the chain, a branch ``X S``, their sum) in one op: no
runtime runs an unstructured sparse GEMM fast, so without the kernel ``S`` costs a dense GEMM. In
ONNX ``S`` is the graph's dense ``[K, N]`` tensor (the file stores it as a sparse Constant); the
kernel reads it compressed in bitmap tiles (``fmt.py``: per tile of ``S`` a bitmap of its
nonzeros and their values), decompresses each tile on chip and multiplies it densely, as Flash-LLM
does.
"""
from __future__ import annotations

from ..contract import FLOATS, Contract, Port

CONTRACT = Contract(
    name="LowRankSparseGemm",
    version="1",
    inputs=(
        Port("X", ("...", "K"), FLOATS, "activations, K features on the last axis"),
        Port("A", ("K", "r"), FLOATS, "first factor (a constant)"),
        Port("C", ("r", "N"), FLOATS, "second factor (a constant)"),
        Port("S", ("K", "N"), FLOATS, "the sparse part, dense in ONNX (a constant, mostly zeros)"),
    ),
    outputs=(Port("Y", ("...", "N"), FLOATS, "(X A) C + X S, the leading axes of X kept"),),
    doc=__doc__.split("\n\n")[0],
)
