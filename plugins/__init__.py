"""TensorRT plugin sources, one folder per plugin (installed as ``lrcompile.plugins``).

The contracts (``Contract``: name, namespace ``lrcompile``, version, inputs, outputs, attributes)
are the single source of truth the ONNX emission (``lrcompile.engine.functions``) and the TensorRT
glue read. Kernels need Triton (and torch for their tensors); the glue needs TensorRT; both are
imported only inside their own modules.
"""
from __future__ import annotations

from .contract import NAMESPACE, Contract
from .low_rank_gemm.contract import CONTRACT as LOW_RANK_GEMM
from .low_rank_sparse_gemm.contract import CONTRACT as LOW_RANK_SPARSE_GEMM

#: Every plugin's contract by name.
CONTRACTS: dict[str, Contract] = {c.name: c for c in (LOW_RANK_GEMM, LOW_RANK_SPARSE_GEMM)}

__all__ = ["CONTRACTS", "NAMESPACE", "Contract", "LOW_RANK_GEMM", "LOW_RANK_SPARSE_GEMM"]
