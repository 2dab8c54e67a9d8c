"""Graph rewrite passes (installed as ``lrcompile.passes``).

The explicit registry: a new pass adds one import and one entry in ``PASSES``.
"""
from __future__ import annotations

from .conv import ConvPass
from .gather import GatherPass
from .gemm import GemmPass
from .matmul import MatMulPass

PASSES = {p.name: p for p in (MatMulPass(), GemmPass(), ConvPass(), GatherPass())}
#: op type -> pass
BY_OP = {op: p for p in PASSES.values() for op in p.op_types}

__all__ = ["PASSES", "BY_OP", "MatMulPass", "GemmPass", "ConvPass", "GatherPass"]
