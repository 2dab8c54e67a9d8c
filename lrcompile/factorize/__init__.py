"""Weight factorization math: pure numpy/scipy.

This package never imports onnx, onnx_graphsurgeon, onnxruntime or tensorrt (a test checks it):
the math never sees a graph. Every method is a function

    fn(b: np.ndarray [K, N], policy: RankPolicy, stats: LayerStats | None = None,
       *, solver: str = "auto", seed: int = 0, **options) -> Factorization

registered in ``METHODS`` with the calibration statistics it needs (``NEEDS``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .types import Factorization, LayerStats, RankPolicy, break_even_rank, round_rank


@dataclass(frozen=True)
class MethodInfo:
    """A registered factorization method.

    Attributes:
        name: the method's CLI name.
        target: ``"module:function"`` implementing it (imported lazily).
        needs: the LayerStats fields it requires (empty: data-free).
        summary: one line for ``--help`` and reports.
        internal: chosen by the pipeline for a kind of layer, not selectable by users
            (``rowfreq`` is what ``whiten`` becomes on an embedding lookup).
    """

    name: str
    target: str
    needs: frozenset[str]
    summary: str
    internal: bool = False

    def load(self) -> Callable[..., Factorization]:
        mod, fn = self.target.split(":")
        return getattr(importlib.import_module(mod, __name__), fn)


# The explicit registry: a new method adds one line here.
METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo("svd", ".svd:factorize_svd", frozenset(), "truncated SVD of the weight (data-free)"),
        MethodInfo("whiten", ".whiten:factorize_whiten", frozenset({"gram"}), "activation-whitened SVD (SVD-LLM): min ||X(B - AC)||"),
        MethodInfo("asvd", ".asvd:factorize_asvd", frozenset({"abs_sum"}), "SVD scaled by mean |x|^alpha per input channel (ASVD)"),
        MethodInfo("fwsvd", ".fwsvd:factorize_fwsvd", frozenset({"fisher"}), "Fisher-weighted SVD, row importance from squared gradients (FWSVD)"),
        MethodInfo("kfac", ".kfac:factorize_kfac", frozenset({"gram", "grad_gram"}), "two-sided weighted SVD: inputs x output sensitivity (K-FAC curvature)"),
        MethodInfo("afm", ".afm:factorize_afm", frozenset({"out_sum", "out_gram"}), "output-feature PCA with mean correction (AFM)"),
        MethodInfo("rowfreq", ".embedding:factorize_rowfreq", frozenset({"in_sum"}), "embedding table whitened by lookup frequency (whiten on one-hot rows)", internal=True),
    )
}


def register(info: MethodInfo) -> None:
    """Add a method to the registry (used by the method modules' import line above)."""
    METHODS[info.name] = info


def factorize(
    b: np.ndarray,
    policy: RankPolicy,
    method: str = "svd",
    stats: LayerStats | None = None,
    **options,
) -> Factorization:
    """Factorize a weight ``b [K, N]`` with the named method under a rank policy."""
    if method not in METHODS:
        raise KeyError(f"unknown factorization method {method!r}; known: {', '.join(sorted(METHODS))}")
    info = METHODS[method]
    missing = [n for n in sorted(info.needs) if stats is None or getattr(stats, n) is None]
    if missing:
        raise ValueError(f"method {method!r} needs calibration statistics {missing}")
    if b.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {b.shape}")
    return info.load()(b, policy, stats, **options)


__all__ = [
    "METHODS",
    "Factorization",
    "LayerStats",
    "MethodInfo",
    "RankPolicy",
    "break_even_rank",
    "factorize",
    "register",
    "round_rank",
]
