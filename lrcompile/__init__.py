"""lrcompile: low-rank / sparse factorization compiler for ONNX models.

Python API (the same options as the CLI)::

    import lrcompile
    res = lrcompile.compile("model.onnx", "model.lr.onnx", target="onnx", ratio=0.5, tolerance=0.05)
    res.report["totals"], res.verification
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import LrcError, VerificationFailed

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import CompileResult

__version__ = "0.1.0"


def compile(model, output=None, *, progress: bool = False, **options) -> "CompileResult":  # noqa: A001
    """Compile ``model`` (a path) to ``output``; options are ``CompileConfig`` fields."""
    from .config import CompileConfig
    from .pipeline import compile_model

    if "only" in options and isinstance(options["only"], (list, str)):
        o = options["only"]
        options["only"] = tuple(o.split(",")) if isinstance(o, str) else tuple(o)
    for k in ("exclude", "include"):
        if isinstance(options.get(k), (list, str)):
            v = options[k]
            options[k] = (v,) if isinstance(v, str) else tuple(v)
    return compile_model(model, output, CompileConfig(**options), progress=progress)


def inspect(model, *, ratio: float = 0.5, min_params: int = 4096) -> list[dict]:
    """Candidates, singular-value summaries and declines of ``model``; writes nothing."""
    from .inspect import inspect_model

    return inspect_model(model, ratio=ratio, min_params=min_params)


__all__ = ["LrcError", "VerificationFailed", "compile", "inspect", "__version__"]
