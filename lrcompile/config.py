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
ALLOCATIONS = ("auto", "sensitivity", "error", "threshold")
#: What ``--distill`` matches (see ``lrcompile.distill``).
DISTILL_MATCHES = ("outputs", "layers")
#: The default method when calibration data is given: the best measured on the test-bed models
#: (README "Data-aware factorization"); without data the default is plain SVD.
DEFAULT_WITH_DATA = "whiten"


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
        calib: calibration data (.npz, Polygraphy JSON, or a ``.py[:func]`` data loader).
        calib_samples: use at most this many calibration samples (None: all).
        calib_batch: samples per ONNX Runtime batch when splitting an .npz.
        mask_input: input whose zeros mark padding rows ("auto": ``attention_mask`` if present,
            "none": no masking).
        method_options: extra keyword options for the factorizer (e.g. ``{"damping": 0.01}``).
        layer_methods: ``("regex=method", ...)``: per-layer method overrides, first match wins.
        sequential: calibrate each layer on activations produced by the already-compressed
            layers before it and fit it to the original model's outputs (target correction; one
            ORT pass of both models per stage) instead of one pass on the original. Under a
            global budget the ranks come from the one-shot planner, the factors from the stages.
        prune_mlp: keep this fraction of the hidden channels of every MLP pair (Linear ->
            channel-wise activation -> Linear, e.g. a transformer FFN or a CTR tower) and refit the
            second layer (``lrcompile.factorize.channels``); runs before, and is left out of, the
            low-rank passes, whose rank policy or budget then applies to the other layers (the
            planner's sensitivities and ``--sequential``'s targets are then measured against the
            pruned model; verification is always against the original). ``"auto"``: the global
            budget's planner chooses each pair's width alongside the other layers' ranks (needs
            ``params``, ``flops`` or ``max_drop``; see ``lrcompile.pruning``).
        fisher: Fisher information for ``fwsvd``: an .npz of weight name -> summed squared
            gradients (stored layout), or ``"collect"`` to compute it from the calibration data
            and labels with torch (``lrcompile[fisher]``).
        labels / loss / fisher_output: labels (.npy; default ``__labels__`` in the calibration
            .npz), the loss (auto, bce, ce, mse) and the output it applies to, for ``collect``.
        probes: ``kfac``: random probes (backward passes) per calibration batch of the Gauss-Newton
            output curvature; the probed output is ``metric_output``, else the first output.
        distill: unlabeled data (calibration formats) on which the rewrite's new tensors are
            trained to reproduce the original model, after factorizing (``lrcompile.distill``;
            torch); best kept data disjoint from the verification inputs. distill_samples /
            distill_batch / distill_epochs / distill_lr: how much of it, rows per step, passes,
            Adam's learning rate; distill_match: ``outputs`` (match the model outputs) or
            ``layers`` (also every rewritten layer's output).

    Budgets (instead of a per-layer rank policy; see ``lrcompile.planner``):
        params / flops: keep this fraction of the candidate weights' parameters (or of their
            FLOPs at the verification shapes), ranks allocated across layers non-uniformly.
        max_drop: the smallest model whose ``metric`` stays within this of the original's.
        metric / metric_output / metric_script: what "the metric" is (``lrcompile.evaluate``)
            for ``max_drop`` and for the sensitivity measurements (default ``rel-l2``).
        val / val_samples / val_labels: data the ``max_drop`` search is judged on (default: the
            calibration data), and its labels (.npy; default ``__labels__`` in the .npz).
        allocation: ``sensitivity`` (per-layer error curves x measured end-to-end sensitivity),
            ``error`` (error curves alone), ``threshold`` (data-free, WeLore-style), ``auto``
            (sensitivity with calibration data, else error).
        sensitivity_samples: calibration samples each sensitivity measurement runs on.
        search_steps: most models the ``max_drop`` search builds and measures.
    Latency (``lrcompile.latency``):
        latency_aware: time each layer dense vs factorized and keep it dense where factorizing
            is not faster (None: on for ``--target ort``, off otherwise).
        latency_batches: batch sizes the timing uses (each must be faster); timing_cache: the
            cache file (None: the default per-user cache; "none": no cache).

    ``method`` None means: ``whiten`` with calibration data, ``svd`` without (see DEFAULTS).
    """

    target: str = "onnx"
    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    max_error: float | None = None
    multiple: int = 8
    method: str | None = None
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
    calib: str | None = None
    calib_samples: int | None = None
    calib_batch: int = 16
    mask_input: str | None = "auto"
    method_options: dict = field(default_factory=dict)
    layer_methods: tuple[str, ...] = ()
    sequential: bool = False
    prune_mlp: float | str | None = None
    fisher: str | None = None
    labels: str | None = None
    loss: str = "auto"
    fisher_output: str | None = None
    probes: int = 4
    distill: str | None = None
    distill_samples: int | None = None
    distill_batch: int = 32
    distill_epochs: int = 2
    distill_lr: float = 1e-4
    distill_match: str = "outputs"
    params: float | None = None
    flops: float | None = None
    max_drop: float | None = None
    metric: str | None = None
    metric_output: str | None = None
    metric_script: str | None = None
    val: str | None = None
    val_samples: int | None = None
    val_labels: str | None = None
    allocation: str = "auto"
    sensitivity_samples: int = 64
    search_steps: int = 8
    latency_aware: bool | None = None
    latency_batches: tuple[int, ...] = (1, 16)
    timing_cache: str | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise LrcError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        for m in [self.method] + [lm.rpartition("=")[2] for lm in self.layer_methods]:
            if m is not None and (m not in METHODS or METHODS[m].internal):
                public = sorted(k for k, v in METHODS.items() if not v.internal)
                raise LrcError(f"unknown method {m!r}; choose one of {', '.join(public)}")
        for lm in self.layer_methods:
            pat, sep, _ = lm.rpartition("=")
            if not sep or not pat:
                raise LrcError(f"--layer-method {lm!r}: expected REGEX=METHOD (e.g. 'attention.*=svd')")
        methods = {self.resolved_method} | {lm.rpartition("=")[2] for lm in self.layer_methods}
        for m in sorted(methods):
            needs = METHODS[m].needs
            if "fisher" in needs and not self.fisher:
                raise LrcError(f"method {m!r} needs Fisher information: pass --fisher FILE.npz, or --fisher collect "
                               "with --calib data and labels")
            if needs and "fisher" not in needs and not self.calib:
                raise LrcError(f"method {m!r} needs calibration data: pass --calib FILE")
        if self.fisher == "collect" and not self.calib:
            raise LrcError("--fisher collect computes gradients on calibration data: pass --calib FILE")
        if self.loss not in ("auto", "bce", "ce", "mse"):
            raise LrcError(f"--loss {self.loss!r}: choose auto, bce, ce or mse")
        if self.probes < 1:
            raise LrcError(f"--probes {self.probes}: give at least one probe per calibration batch")
        if self.calib_samples is not None and self.calib_samples < 1:
            raise LrcError("--calib-samples must be >= 1")
        if self.calib_batch < 1:
            raise LrcError("--calib-batch must be >= 1")
        if self.solver not in SOLVERS:
            raise LrcError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        self._check_budget()
        try:
            self.policy()
        except ValueError as e:
            raise LrcError(f"rank policy: {e}") from None
        if self.only is not None:
            from lrcompile.passes import BY_OP

            bad = [o for o in self.only if o not in BY_OP]
            if bad:
                raise LrcError(f"--only: unsupported op type(s) {bad}; supported: {', '.join(sorted(BY_OP))}")
        for pat in self.exclude + self.include + tuple(lm.rpartition("=")[0] for lm in self.layer_methods):
            try:
                re.compile(pat)
            except re.error as e:
                raise LrcError(f"bad node-name pattern {pat!r}: {e}") from None
        if self.min_params < 0:
            raise LrcError("--min-params must be >= 0")
        if self.tolerance is not None and self.tolerance < 0:
            raise LrcError("--tolerance must be >= 0")

    def _check_budget(self) -> None:
        budgets = [n for n in ("params", "flops", "max_drop") if getattr(self, n) is not None]
        rules = [n for n in ("rank", "ratio", "energy", "max_error") if getattr(self, n) is not None]
        flag = lambda n: "--" + n.replace("_", "-")  # noqa: E731
        if len(budgets) > 1 or (budgets and rules):
            raise LrcError(f"{' and '.join(map(flag, budgets + rules))} each set the ranks: pass only one")
        for n in ("params", "flops"):
            v = getattr(self, n)
            if v is not None and not 0 < v <= 1:
                raise LrcError(f"{flag(n)} {v}: give the fraction to keep, in (0, 1] (e.g. {flag(n)} 0.5)")
        if self.max_drop is not None:
            if not self.max_drop >= 0:
                raise LrcError(f"--max-drop {self.max_drop}: must be >= 0")
            if self.metric is None:
                raise LrcError("--max-drop needs --metric NAME (cosine, top1, max-rel, rel-l2, auc, logloss, script)")
            if not (self.calib or self.val):
                raise LrcError("--max-drop measures the metric on data: pass --calib (and optionally --val)")
        if self.metric is not None:
            from .evaluate import METRICS

            if self.metric not in METRICS and self.metric != "script":
                raise LrcError(f"--metric {self.metric!r}: choose one of {', '.join(sorted(METRICS))}, or script")
            if (self.metric == "script") != bool(self.metric_script):
                raise LrcError("--metric script and --metric-script FILE.py[:func] go together")
        if self.sequential and self.max_drop is not None:
            raise LrcError("--max-drop measures one-shot models in its search, so it cannot promise the drop of a "
                           "--sequential one; use --sequential with --params or --flops")
        if isinstance(self.prune_mlp, str) and self.prune_mlp != "auto":
            try:
                object.__setattr__(self, "prune_mlp", float(self.prune_mlp))  # frozen: set once, here
            except ValueError:
                raise LrcError(f"--prune-mlp {self.prune_mlp!r}: give a fraction of MLP hidden channels to keep, "
                               f"or auto") from None
        if self.prune_mlp is not None:
            if self.prune_mlp != "auto" and not 0 < self.prune_mlp <= 1:
                raise LrcError(f"--prune-mlp {self.prune_mlp}: give the fraction of MLP hidden channels to keep, "
                               f"in (0, 1] (e.g. --prune-mlp 0.5), or auto")
            if not self.calib:
                raise LrcError("--prune-mlp chooses channels and refits the second layer on calibration data: "
                               "pass --calib")
            if self.prune_mlp == "auto":
                if self.budget is None:
                    raise LrcError("--prune-mlp auto lets the budget's planner choose each MLP's width: give "
                                   "--params, --flops or --max-drop (or a fraction, e.g. --prune-mlp 0.5)")
                if self.allocation == "threshold":
                    raise LrcError("--prune-mlp auto needs measured or error-curve allocation; drop "
                                   "--allocation threshold")
            elif self.max_drop is not None:
                raise LrcError("--max-drop searches low-rank budgets on the unpruned model; use --prune-mlp with "
                               "--params/--flops or a rank policy")
        if self.distill_samples is not None and self.distill_samples < 2:
            raise LrcError("--distill-samples must be >= 2 (the last tenth of the batches is held out)")
        if self.distill_batch < 1 or self.distill_epochs < 1:
            raise LrcError("--distill-batch and --distill-epochs must be >= 1")
        if not self.distill_lr > 0:
            raise LrcError(f"--distill-lr {self.distill_lr}: give a positive learning rate (e.g. 1e-4)")
        if self.distill_match not in DISTILL_MATCHES:
            raise LrcError(f"--distill-match {self.distill_match!r}: choose {' or '.join(DISTILL_MATCHES)}")
        if self.allocation not in ALLOCATIONS:
            raise LrcError(f"--allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "sensitivity" and not self.calib:
            raise LrcError("--allocation sensitivity measures layers on calibration data: pass --calib")
        if self.sensitivity_samples < 1 or self.search_steps < 1:
            raise LrcError("--sensitivity-samples and --search-steps must be >= 1")
        if self.val_samples is not None and self.val_samples < 1:
            raise LrcError("--val-samples must be >= 1")
        try:
            object.__setattr__(self, "latency_batches", tuple(int(b) for b in self.latency_batches))
        except (TypeError, ValueError):
            raise LrcError(f"--latency-batches {self.latency_batches!r}: give integers (e.g. 1,16)") from None
        if not self.latency_batches or any(b < 1 for b in self.latency_batches):
            raise LrcError(f"--latency-batches {list(self.latency_batches)}: give batch sizes >= 1 (e.g. 1,16)")

    @property
    def budget(self) -> str | None:
        """Which global budget is set (``params``, ``flops``, ``max_drop``), or None (a rank policy)."""
        return next((n for n in ("params", "flops", "max_drop") if getattr(self, n) is not None), None)

    @property
    def resolved_allocation(self) -> str:
        if self.allocation != "auto":
            return self.allocation
        return "sensitivity" if self.calib else "error"

    @property
    def resolved_latency_aware(self) -> bool:
        return self.target == "ort" if self.latency_aware is None else self.latency_aware

    @property
    def resolved_method(self) -> str:
        """The method in force: the user's, else the measured best with data, else plain SVD."""
        if self.method is not None:
            return self.method
        return DEFAULT_WITH_DATA if self.calib else "svd"

    def method_for(self, label: str) -> str:
        for lm in self.layer_methods:
            pat, _, m = lm.rpartition("=")
            if re.search(pat, label):
                return m
        return self.resolved_method

    def describe_ranks(self) -> str:
        """How ranks are chosen, for the report: ``params=0.5`` or the rank policy's description."""
        b = self.budget
        return f"{b}={getattr(self, b)},allocation={self.resolved_allocation}" if b else self.policy().describe()

    def policy(self) -> RankPolicy:
        given = {n: getattr(self, n) for n in ("rank", "ratio", "energy", "max_error") if getattr(self, n) is not None}
        if not given:
            given = {"ratio": 0.5}
        return RankPolicy(multiple=self.multiple, **given)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["only"] = list(self.only) if self.only is not None else None
        d["exclude"], d["include"] = list(self.exclude), list(self.include)
        d["layer_methods"] = list(self.layer_methods)
        d["latency_batches"] = list(self.latency_batches)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CompileConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LrcError(f"unknown option(s) in config: {unknown}")
        d = dict(d)
        for k in ("only", "exclude", "include", "layer_methods", "latency_batches"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)
