"""Run configuration: one frozen dataclass, validated on construction, None meaning default.

The same object drives the CLI and the Python API, and is written into the JSON report so that
a run can be replayed (``lrcompile compile --config report.json``).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

from .errors import LrcError
from .factorize import METHODS, RankPolicy

TARGETS = ("onnx", "ort", "trt")
SOLVERS = ("auto", "exact", "randomized")


@dataclass(frozen=True)
class CompileConfig:
    """Options of one compile run.

    Attributes:
        target: ``onnx`` (write the model), ``ort`` (also ONNX Runtime latency + optimized model),
            ``trt`` (also a TensorRT engine).
        rank / ratio / energy / max_error: the rank policy (exactly one; default ``ratio=0.5``).
        multiple: round derived ranks to this multiple (hardware-friendly GEMM tiles).
        method: factorization method (see ``lrcompile.factorize.METHODS``).
        solver: SVD solver: auto, exact or randomized.
        only: op types to consider (None: all supported).
        exclude: regular expressions; nodes whose name matches any are left intact.
        include: regular expressions; when given, only nodes whose name matches one are considered.
        min_params: weights with fewer parameters are left intact (too small to matter).
        keep_unprofitable: factorize even when the rank saves no parameters (validation runs).
        seed: seed for randomized solvers and generated verification inputs.
        verify: run the original and the compressed model in ONNX Runtime and compare.
        tolerance: fail (exit 3) when any output's relative L2 error exceeds this.
        min_cosine: fail when any output's cosine similarity falls below this.
        inputs: verification inputs (.npz or Polygraphy JSON); None: seeded random inputs.
        dims: values for dynamic input dimensions (``{"batch": 4, "seq": 32}`` by dim name).
        external_data: force (True) or forbid (False) external data in the output; None: automatic.
        fp16 / sparse_weights / shapes: TensorRT build options (``trt`` target).
    """

    target: str = "onnx"
    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    max_error: float | None = None
    multiple: int = 8
    method: str = "svd"
    solver: str = "auto"
    only: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    min_params: int = 4096
    keep_unprofitable: bool = False
    seed: int = 0
    verify: bool = True
    tolerance: float | None = None
    min_cosine: float | None = None
    inputs: str | None = None
    dims: dict = field(default_factory=dict)
    external_data: bool | None = None
    fp16: bool = False
    sparse_weights: bool = False
    shapes: str | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise LrcError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.method not in METHODS:
            raise LrcError(f"unknown method {self.method!r}; choose one of {', '.join(sorted(METHODS))}")
        if self.solver not in SOLVERS:
            raise LrcError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        try:
            self.policy()
        except ValueError as e:
            raise LrcError(f"rank policy: {e}") from None
        if self.only is not None:
            from lrcompile.passes import BY_OP

            bad = [o for o in self.only if o not in BY_OP]
            if bad:
                raise LrcError(f"--only: unsupported op type(s) {bad}; supported: {', '.join(sorted(BY_OP))}")
        for pat in self.exclude + self.include:
            try:
                re.compile(pat)
            except re.error as e:
                raise LrcError(f"bad node-name pattern {pat!r}: {e}") from None
        if self.min_params < 0:
            raise LrcError("--min-params must be >= 0")
        if self.tolerance is not None and self.tolerance < 0:
            raise LrcError("--tolerance must be >= 0")

    def policy(self) -> RankPolicy:
        given = {n: getattr(self, n) for n in ("rank", "ratio", "energy", "max_error") if getattr(self, n) is not None}
        if not given:
            given = {"ratio": 0.5}
        return RankPolicy(multiple=self.multiple, **given)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["only"] = list(self.only) if self.only is not None else None
        d["exclude"], d["include"] = list(self.exclude), list(self.include)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CompileConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LrcError(f"unknown option(s) in config: {unknown}")
        d = dict(d)
        for k in ("only", "exclude", "include"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)
