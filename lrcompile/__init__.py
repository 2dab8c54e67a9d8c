"""lrcompile: low-rank / sparse factorization compiler for ONNX models.

Python API (the same options as the CLI)::

    import lrcompile
    res = lrcompile.compile("model.onnx", "model.lr.onnx", target="onnx", ratio=0.5, tolerance=0.05)
    res.report["totals"], res.verification
    cmp = lrcompile.compare("model.onnx", "model.lr.onnx", tolerance=0.05)
    cmp.status, cmp.commands
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import LrcError, VerificationFailed

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import CompileResult

__version__ = "0.1.0"


def compile(model, output=None, *, progress: bool = False, **options) -> "CompileResult":  # noqa: A001
    """Compile ``model`` (a path) to ``output``; options are ``CompileConfig`` fields.

    Values may take any form ``lrcompile.config.coerce`` reads, the same as ``--config`` replay and
    bench configurations: ``only="MatMul,Gemm"`` or ``["MatMul", "Gemm"]``, ``latency_batches="1,16"``,
    ``dims={"batch": 4}``; None means the default. An unknown option is an ``LrcError``.
    """
    from .config import CompileConfig
    from .pipeline import compile_model

    return compile_model(model, output, CompileConfig.from_dict(options), progress=progress)


def inspect(model, *, ratio: float | None = None, min_params: int | None = None) -> list[dict]:
    """Candidates, singular-value summaries and declines of ``model``; writes nothing.

    ``ratio`` and ``min_params`` are the compile options of those names (None: their defaults)."""
    from .inspection import inspect_model

    return inspect_model(model, ratio=ratio, min_params=min_params)


def compare(original, compressed, **options):
    """Compare ``compressed`` with ``original`` through Polygraphy's runners and comparator (the
    ``lrcompile compare`` command): returns a ``lrcompile.comparison.Comparison`` (``status`` PASSED,
    FAILED or UNVERIFIED, per runner and output the accuracy and verdict, latency, the equivalent
    ``polygraphy run`` lines). Options are ``lrcompile.comparison.CompareOptions`` fields (``inputs``,
    ``seed``, ``dims``, ``tolerance``, ``min_cosine``, ``atol``, ``rtol``, ``check_error_stat``,
    ``trt``, ``warmup``, ``repeats``, ``save_inputs``); None means the default. Never raises on
    FAILED: read ``status``."""
    from .comparison import CompareOptions, compare_models
    from .config import coerce

    known = set(CompareOptions.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise LrcError(f"unknown compare option(s) {unknown}; known: {sorted(known)}")
    if options.get("dims") is not None:
        options["dims"] = coerce("dims", options["dims"])
    return compare_models(original, compressed, CompareOptions(**options))


__all__ = ["LrcError", "VerificationFailed", "compare", "compile", "inspect", "__version__"]
