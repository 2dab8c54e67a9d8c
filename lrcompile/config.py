"""Run configuration: one frozen dataclass, validated on construction, None meaning default.

The same object drives the CLI and the Python API, and is written into the JSON report so that
a run can be replayed (``lrcompile compile --config report.json``).

Every option is declared once, as a field made by :func:`opt`: its default, its help text and,
where they differ from what the field's name and type give, its flag, choices and help section.
From those declarations come the ``compile`` command's click options (``lrcompile.cli``),
``docs/cli.md`` (``python -m lrcompile.clidoc``) and :func:`coerce`, the one function that turns
a user's value (a CLI string, a report's JSON value, a Python object, a bench configuration's
``KEY=V``) into the field's type. Adding an option is adding a field.

Values: None means the option's default everywhere. For options that take numbers, flags or
lists, the text ``none`` means None too; for text options it is a value (``--mask-input none``
and ``--timing-cache none`` turn those off: the one spelling for "off").
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, Callable, Iterable

from .errors import LrcError
from .factorize import METHODS, RankPolicy

TARGETS = ("onnx", "ort", "trt")
#: SVD solvers; the same tuple as ``lrcompile.factorize.svd.SOLVERS`` (a test checks; importing
#: that module here would load scipy for every ``lrcompile --help``).
SOLVERS = ("auto", "exact", "randomized")
ALLOCATIONS = ("auto", "sensitivity", "error", "threshold")
#: Losses of ``--fisher collect`` (``lrcompile.fisher``).
LOSSES = ("auto", "bce", "ce", "mse")
#: What ``--distill`` matches (see ``lrcompile.distill``).
DISTILL_MATCHES = ("outputs", "layers")
#: The default method when calibration data is given: the best measured on the test-bed models
#: (README "Data-aware factorization"); without data the default is plain SVD.
DEFAULT_WITH_DATA = "whiten"
#: The rank policy when none of rank / ratio / energy / max_error (nor a budget) is given.
DEFAULT_RATIO = 0.5
#: The value that turns a text option off (``--mask-input none``, ``--timing-cache none``).
OFF = "none"
#: Help sections of the ``compile`` command, in the order ``--help`` and docs/cli.md show them.
SECTIONS = ("Target", "Form", "Rank policy (per layer)", "Global budget", "Latency", "Method and data", "MLP pruning",
            "Attention", "Fisher information and curvature", "Distillation", "Layer selection", "Verification",
            "Output and TensorRT", "Scale")


def public_methods() -> tuple[str, ...]:
    """The factorization methods a user may name (registration order)."""
    return tuple(k for k, v in METHODS.items() if not v.internal)


def _form_names() -> tuple[str, ...]:
    from .forms import layer_form_names  # loads onnx: only when the names are shown or checked

    return layer_form_names() + ("auto",)


def _metric_names() -> tuple[str, ...]:
    from .evaluate import METRICS  # loads onnx: only when the names are shown or checked

    return tuple(METRICS)


@dataclass(frozen=True)
class Option:
    """How one ``CompileConfig`` field meets the user.

    Attributes:
        help: one paragraph for ``--help`` and docs/cli.md; ``{choices}`` is replaced by the
            choices, joined with commas.
        flag: the click declaration (``--no-verify``, ``--latency-aware/--size-only``);
            default ``--`` + the field name with ``-`` for ``_``.
        choices: the allowed values (checked by :func:`coerce`, a ``click.Choice`` on the CLI), or
            a function returning them (shown in the help only; ``__post_init__`` checks them).
        multiple: the flag is repeatable and each use adds one item (a string is one item);
            tuple fields that are not repeatable split a string on ``,`` or ``+``.
        metavar / example: ``NAME=INT`` and ``--dim batch=4`` for help and error messages.
        section: the help section this field starts (later fields inherit it; see SECTIONS).
        doc: more detail, for docs/cli.md and readers of this file.
        cli: False keeps the field off the command line (it is still an API and report option).
        flag_value: the value of a text option given without one (``--ray`` alone: a local cluster).
    """

    help: str
    flag: str | None = None
    choices: tuple[str, ...] | Callable[[], Iterable[str]] = ()
    multiple: bool = False
    metavar: str | None = None
    example: str | None = None
    section: str | None = None
    doc: str = ""
    cli: bool = True
    flag_value: str | None = None


def opt(default: Any, help: str, **option: Any) -> Any:  # noqa: A002
    """A ``CompileConfig`` field: its default and its :class:`Option` (help, flag, choices...)."""
    meta = {"option": Option(help=help, **option)}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class CompileConfig:
    """Options of one compile run; each field's help is in its declaration (and docs/cli.md).

    Construction coerces every value (:func:`coerce`) and validates the combination; a bad value
    or combination is an :class:`LrcError` naming the flag. ``method`` None means ``whiten``
    with calibration data, ``svd`` without; no rank policy and no budget means
    ``ratio=DEFAULT_RATIO``. The field order is the order of the report's ``config`` keys.
    """

    target: str = opt("onnx", "onnx: write the model; ort: also ORT latency + optimized model; trt: also a TensorRT "
                      "engine.", choices=TARGETS, section="Target")
    form: str = opt("lowrank", "What each weight becomes: {choices} (docs/forms.md).", choices=_form_names,
                    section="Form",
                    doc="lowrank: the chain A C (the default; on a conv: k x k to r channels, then 1 x 1); nm: the "
                    "weight pruned to N of every M along its reduction axis and refit (TensorRT's sparse kernels with "
                    "--sparse-weights); lowrank+sparse: A C + S; dense-nm: D S with S N:M; dictionary: D C with C "
                    "sparse per column; tucker2 (convs): 1 x 1, k x k, 1 x 1; cp (convs): 1 x 1, k x 1 and 1 x k "
                    "depthwise, 1 x 1; spatial (convs): k x 1 then 1 x k. The rank policy or budget sets each layer's "
                    "storage; nm's size is its pattern. auto: each layer's best form (docs/forms.md).")
    layer_forms: tuple[str, ...] = opt((), "Per-layer form (repeatable; the first matching pattern wins).",
                                       flag="--layer-form", multiple=True, metavar="REGEX=FORM",
                                       example="--layer-form 'attention.*=nm'")
    nm: str = opt("2:4", "The N:M pattern of nm, dense-nm and --sparse-pattern nm.", metavar="N:M",
                  doc="TensorRT's sparse tensor cores run 2:4.")
    conv_ranks: str = opt("budget", "tucker2/cp/spatial: ranks from the rank policy or budget ('budget'), per "
                          "mode by VBMF ('vbmf', data-free), or fixed ('R', or 'RINxROUT' for Tucker-2).",
                          metavar="RULE", doc="Under 'budget' a size buys storage; Tucker-2 spends it on the pair "
                          "(R_in, R_out) that keeps the most mode energy. --energy also works for these forms: per "
                          "mode. With VBMF or fixed ranks a conv has one size (the planner keeps it or leaves it dense).")
    sparse_share: float = opt(0.25, "lowrank+sparse: the share of each layer's storage spent on the sparse part S.")
    sparse_pattern: str = opt("unstructured", "lowrank+sparse: S's pattern: {choices}.",
                              choices=("unstructured", "rows", "nm"),
                              doc="unstructured: any entries (a value and an index each); rows: whole input rows of "
                              "the weight (a Gather of input channels and a small MatMul, cheap everywhere); nm: N:M.")
    dictionary_share: float = opt(0.5, "dictionary: the share of each layer's storage spent on the dictionary D "
                                  "(the rest holds the sparse codes C).")
    dictionary_kind: str = opt("orthogonal", "dictionary: {choices}.", choices=("orthogonal", "omp"),
                               doc="orthogonal (COMPOT): at most K orthonormal atoms in the whitened space, codes in "
                               "closed form, fast; omp (CoSpaDi): any number of atoms, codes by orthogonal matching "
                               "pursuit and the dictionary by least squares (MOD), 5-15x slower, lower error on MiniLM's "
                               "weights (benchmarks/results/forms).")
    rank: int | None = opt(None, "Fixed rank for every layer.", section="Rank policy (per layer)")
    ratio: float | None = opt(None, f"Keep about this fraction of each weight's parameters (default {DEFAULT_RATIO}).")
    energy: float | None = opt(None, "Smallest rank keeping this fraction of spectral energy.")
    max_error: float | None = opt(None, "Smallest rank with relative error at most this.")
    multiple: int = opt(RankPolicy.multiple, "Round ranks to this multiple.",
                        doc="Derived ranks are rounded to it (hardware-friendly GEMM tiles); 1 disables rounding.")
    method: str | None = opt(None, "Factorization method: {choices} (default: whiten with --calib, svd without).",
                             choices=public_methods, section="Method and data")
    solver: str = opt("auto", "SVD solver.", choices=SOLVERS)
    only: tuple[str, ...] | None = opt(None, "Comma-separated op types to consider (MatMul,Gemm,Conv,Gather).",
                                       section="Layer selection", doc="Default: every supported op type.")
    exclude: tuple[str, ...] = opt((), "Regex on node names to leave intact (repeatable).", multiple=True)
    include: tuple[str, ...] = opt((), "Regex on node names to consider (repeatable).", multiple=True,
                                   doc="When given, only nodes whose name matches one are considered.")
    min_params: int = opt(4096, "Leave smaller weights intact.",
                          doc="Weights with fewer parameters are too small to matter.")
    keep_unprofitable: bool = opt(False, "Factorize even when the rank saves nothing.",
                                  doc="For validation runs.")
    seed: int = opt(0, "Seed of the randomized solvers and of generated verification inputs.",
                    section="Verification")
    verify: bool = opt(True, "Skip the ONNX Runtime comparison.", flag="--no-verify",
                       doc="Without it the original and the compressed model run in ONNX Runtime and are compared.")
    tolerance: float | None = opt(None, "Fail if any output's relative L2 error exceeds this.", doc="Exit code 3.")
    min_cosine: float | None = opt(None, "Fail if any output's cosine falls below this.")
    inputs: str | None = opt(None, "Verification inputs: .npz, Polygraphy JSON, or a Polygraphy data-loader "
                             "script (loader.py[:func], func default load_data).", metavar="PATH",
                             doc="Default: seeded random inputs.")
    dims: dict[str, int] = opt({}, "Value of a dynamic input dimension (repeatable).", flag="--dim", multiple=True,
                               metavar="NAME=INT", example="--dim batch=4 --dim sequence=128")
    plugins: bool = opt(False, "Emit each fused chain as a call to an ONNX model-local function in domain "
                        "lrcompile (op = plugin name, body = the plain subgraph).",
                        section="Output and TensorRT",
                        doc="ONNX Runtime runs the body; TensorRT inlines it, or runs the lrcompile plugin where it "
                            "is registered (docs/plugins.md). Without it the output is byte-identical to before.")
    external_data: bool | None = opt(None, "Force external data on/off.", flag="--external-data/--no-external-data",
                                     section="Output and TensorRT",
                                     doc="Default: external when the weights are too large for one protobuf file.")
    fp16: bool = opt(False, "trt: convert the ONNX to fp16 before building.")
    sparse_weights: bool = opt(False, "trt: allow TensorRT sparse (2:4) weight kernels.")
    shapes: str | None = opt(None, "trt: input shapes, e.g. 'ids:[1,16],[4,128],[8,128]' (min,opt,max).")
    calib: str | None = opt(None, "Calibration data: .npz (batched on axis 0), Polygraphy JSON, or loader.py[:func].",
                            section="Method and data")
    calib_samples: int | None = opt(None, "Use at most this many calibration samples.", doc="Default: all.")
    calib_batch: int = opt(16, "Samples per ORT batch (.npz).")
    mask_input: str = opt("auto", "Input whose zeros mark padding rows ('auto': attention_mask if present; 'none').")
    method_options: dict[str, Any] = opt({}, "Factorizer option (repeatable).", flag="--method-option",
                                         multiple=True, metavar="KEY=VALUE",
                                         example="--method-option damping=0.01",
                                         doc="VALUE is read as JSON when it parses, else kept as text.")
    layer_methods: tuple[str, ...] = opt((), "Per-layer method (repeatable; the first matching pattern wins).",
                                         flag="--layer-method", multiple=True, metavar="REGEX=METHOD",
                                         example="--layer-method 'attention.*=svd'")
    sequential: bool = opt(False, "Calibrate each layer on the outputs of already-compressed ones and fit it to the "
                           "original's outputs (slower, more accurate).",
                           doc="One ORT pass of both models per stage instead of one pass on the original. Under a "
                           "global budget the ranks come from the one-shot planner, the factors from the stages.")
    prune_mlp: float | str | None = opt(
        None, "Keep this fraction of each MLP's hidden channels (Linear -> activation -> Linear: transformer FFNs, "
        "CTR towers), second layer refitted on --calib; the other layers follow the rank policy or budget. 'auto': "
        "the --params/--flops/--max-drop planner chooses each MLP's width with the other layers' ranks, under the "
        "one budget.", section="MLP pruning",
        doc="Runs before, and is left out of, the low-rank passes (``lrcompile.factorize.channels``, "
        "``lrcompile.pruning``); the planner's sensitivities and --sequential's targets are then measured against "
        "the pruned model, verification always against the original.")
    attention: float | str | None = opt(
        None, "Reduce the head dimension of multi-head attention blocks, Q.K and V.O as pairs (no node added, "
        "thinner projections): 'auto' lets the --params/--flops/--max-drop planner choose each block's QK and OV "
        "head dimensions, against low rank of its projections, under the one budget; R, or QK:OV (e.g. 16:24), "
        "fixes them for every block. Needs --calib.", section="Attention", metavar="auto|R|QK:OV",
        doc="Blocks are found by structure (``passes.attention``: projections, head reshapes, score MatMul, "
        "Softmax, context MatMul, merge, output projection); fused QKV weights and ONNX Runtime's fused "
        "Attention ops are declined with their reason (report: ``attention.not_blocks``). QK is fitted to the "
        "pre-softmax scores, OV to the block's output on the calibration data (``lrcompile.factorize.heads``; "
        "METHODS.md); biases fold exactly and the softmax scale stays the original. Runs before, and is left out "
        "of, the low-rank passes, like --prune-mlp.")
    fisher: str | None = opt(None, "fwsvd: Fisher .npz (weight name -> squared-gradient sums), or 'collect' (torch).",
                             section="Fisher information and curvature",
                             doc="'collect' computes it from the calibration data and labels (``lrcompile[fisher]``).")
    labels: str | None = opt(None, "Labels .npy of the --calib rows, for --fisher collect and the auc/logloss "
                             "metrics (default: __labels__ in the --calib .npz).")
    loss: str = opt("auto", "Loss for --fisher collect.", choices=LOSSES)
    fisher_output: str | None = opt(None, "Model output the loss applies to (default: the first).")
    probes: int = opt(4, "kfac: random output probes (backward passes) per calibration batch; the probed output is "
                      "--metric-output, else the first.")
    distill: str | None = opt(None, "Unlabeled data (same formats as --calib, ideally more of it) on which the "
                              "factors are trained to reproduce the original after factorizing (torch: "
                              "lrcompile[fisher]).", section="Distillation",
                              doc="Best kept disjoint from the verification inputs (``lrcompile.distill``).")
    distill_samples: int | None = opt(None, "Use at most this many --distill samples.")
    distill_batch: int = opt(32, "Samples per training step.")
    distill_epochs: int = opt(2, "Passes over the --distill data.")
    distill_lr: float = opt(1e-4, "Adam learning rate (cosine-decayed).")
    distill_match: str = opt("outputs", "What --distill matches: the model outputs, or also every rewritten layer's "
                             "output.", choices=DISTILL_MATCHES)
    params: float | None = opt(None, "Global budget: keep this fraction of the candidate weights' parameters, ranks "
                               "allocated across layers where they cost least.", section="Global budget",
                               doc="Instead of a per-layer rank policy (``lrcompile.planner``).")
    flops: float | None = opt(None, "Global budget on the candidates' FLOPs at the verification shapes.")
    max_drop: float | None = opt(None, "Smallest model whose --metric stays within this of the original's (measured "
                                 "on --val, else the calibration data).")
    metric: str | None = opt(None, "{choices}, or script (with --metric-script).", choices=_metric_names,
                             doc="What \"the metric\" is (``lrcompile.evaluate``) for --max-drop and for the "
                             "sensitivity measurements (default rel-l2).")
    metric_output: str | None = opt(None, "The output the metric reads (default: the first).")
    metric_script: str | None = opt(None, "User metric FILE.py[:func](outputs, reference, labels) -> float, higher "
                                    "is better; runs only when named here.")
    val: str | None = opt(None, "Validation data for --max-drop (same formats as --calib).")
    val_samples: int | None = opt(None, "Use at most this many validation samples.")
    val_labels: str | None = opt(None, "Labels .npy of the --val rows (default: __labels__ in the --val .npz).")
    allocation: str = opt("auto", "How a global budget is spread: measured sensitivity x error curves (auto with "
                          "--calib), error curves alone, or the data-free spectrum threshold.", choices=ALLOCATIONS)
    sensitivity_samples: int = opt(64, "Calibration samples per sensitivity measurement.")
    search_steps: int = opt(8, "Most models --max-drop measures.")
    latency_aware: bool | None = opt(None, "Time each layer dense vs factorized (ORT) and keep it dense where "
                                     "factorizing is not faster [default: on for --target ort].",
                                     flag="--latency-aware/--size-only", section="Latency",
                                     doc="See ``lrcompile.latency``.")
    latency_batches: tuple[int, ...] = opt((1, 16), "Batch sizes latency-aware timing uses.",
                                           doc="Each must be faster factorized.")
    timing_cache: str | None = opt(None, "Timing cache file (default: ~/.cache/lrcompile/timings.json; 'none': off).")
    latency_backend: str = opt("auto", "What times the layers: {choices}; auto: TensorRT engines for --target trt "
                               "where TensorRT and a GPU are present, else ONNX Runtime.", choices=("auto", "ort", "trt"),
                               doc="See ``lrcompile.latency`` (OrtTiming, TrtTiming).")
    workers: int = opt(1, "Processes that fit the weights, collect calibration shards and run the planner's trials "
                       "side by side (0: one per CPU).", section="Scale",
                       doc="The output is byte-identical for every N: each unit runs with one BLAS thread and the "
                       "results are combined in one fixed order (``lrcompile.parallel``, docs/scale.md).")
    ray: str | None = opt(None, "Run the same units as Ray tasks: 'auto', a cluster address, or alone for a local "
                          "cluster (pip install ray).", metavar="[ADDRESS]", flag_value="local",
                          example="--ray 127.0.0.1:6379",
                          doc="Weights travel through Ray's object store; every node needs the same lrcompile. Put "
                          "--ray after the model path (or write --ray=ADDRESS): a bare word after it is its address.")

    def _check_attention(self) -> None:
        a = self.attention
        if a is None:
            return
        fixed = a != "auto"
        if isinstance(a, str) and a != "auto" and not re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", a):
            raise LrcError(f"--attention {a!r}: give auto, a head dimension (e.g. 16), or QK:OV head dimensions "
                           "(e.g. 16:24)")
        if not isinstance(a, str) and (a < 1 or a != int(a)):
            raise LrcError(f"--attention {a:g}: a head dimension is a whole number >= 1 (or auto)")
        if not self.calib:
            raise LrcError("--attention fits the reduced heads to calibration data: pass --calib")
        if not fixed:
            if self.budget is None:
                raise LrcError("--attention auto lets the budget's planner choose each block's head dimensions: "
                               "give --params, --flops or --max-drop (or a head dimension, e.g. --attention 16)")
            if self.allocation == "threshold":
                raise LrcError("--attention auto needs measured or error-curve allocation; drop --allocation "
                               "threshold")
        elif self.max_drop is not None:
            raise LrcError("--max-drop searches budgets on the model as given; use a fixed --attention with "
                           "--params/--flops or a rank policy, or --attention auto")

    def __post_init__(self) -> None:
        for f in fields(self):  # frozen: each value set once, here
            object.__setattr__(self, f.name, coerce(f.name, getattr(self, f.name), cls=type(self)))
        for m in [self.method] + [lm.rpartition("=")[2] for lm in self.layer_methods]:
            if m is not None and m not in public_methods():
                raise LrcError(f"unknown method {m!r}; choose one of {', '.join(sorted(public_methods()))}")
        for lm in self.layer_methods:
            pat, sep, _ = lm.rpartition("=")
            if not sep or not pat:
                raise LrcError(f"--layer-method {lm!r}: expected REGEX=METHOD (e.g. 'attention.*=svd')")
        self._check_forms()
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
        if self.probes < 1:
            raise LrcError(f"--probes {self.probes}: give at least one probe per calibration batch")
        if self.calib_samples is not None and self.calib_samples < 1:
            raise LrcError("--calib-samples must be >= 1")
        if self.calib_batch < 1:
            raise LrcError("--calib-batch must be >= 1")
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
        for pat in (self.exclude + self.include + tuple(lm.rpartition("=")[0] for lm in self.layer_methods)
                    + tuple(lf.rpartition("=")[0] for lf in self.layer_forms)):
            try:
                re.compile(pat)
            except re.error as e:
                raise LrcError(f"bad node-name pattern {pat!r}: {e}") from None
        if self.min_params < 0:
            raise LrcError("--min-params must be >= 0")
        if self.tolerance is not None and self.tolerance < 0:
            raise LrcError("--tolerance must be >= 0")
        if self.workers < 0:
            raise LrcError(f"--workers {self.workers}: give a number of processes >= 1, or 0 for one per CPU")
        if self.ray is not None and self.workers != 1:
            raise LrcError("--workers and --ray both say where the work runs: give one (a Ray cluster's workers are "
                           "its CPUs)")

    def _check_forms(self) -> None:
        names = _form_names()
        for f in [self.form] + [lf.rpartition("=")[2] for lf in self.layer_forms]:
            if f not in names:
                raise LrcError(f"unknown form {f!r}; choose one of {', '.join(names)}")
        for lf in self.layer_forms:
            pat, sep, _ = lf.rpartition("=")
            if not sep or not pat:
                raise LrcError(f"--layer-form {lf!r}: expected REGEX=FORM (e.g. 'attention.*=nm')")
        used = {self.form} | {lf.rpartition("=")[2] for lf in self.layer_forms}
        from .forms.conv import CONV_FORMS, parse_ranks

        by_storage = used - {"lowrank"} - (set(CONV_FORMS) if self.max_error is None else set())
        if by_storage and (self.energy is not None or self.max_error is not None):
            raise LrcError(f"--form {'/'.join(sorted(by_storage))} sizes layers by storage: give --ratio, "
                           "--rank or a global budget (--params, --flops), not --energy or --max-error")
        if parse_ranks(self.conv_ranks) is None:
            raise LrcError(f"--conv-ranks {self.conv_ranks!r}: expected budget, vbmf, R or RINxROUT (e.g. 16x32)")
        if used - {"lowrank"} and self.distill:
            raise LrcError(f"--distill trains the low-rank factors as dense tensors; it would fill the zeros of "
                           f"--form {'/'.join(sorted(used - {'lowrank'}))} (masked training is not there yet): "
                           "drop --distill or use --form lowrank")
        if "auto" in used and self.max_drop is not None:
            raise LrcError("--form auto prices forms under --params or --flops; --max-drop searches low-rank "
                           "budgets only")
        n, sep, m = self.nm.partition(":")
        if not (sep and n.strip().isdigit() and m.strip().isdigit() and 0 < int(n) < int(m)):
            raise LrcError(f"--nm {self.nm!r}: expected N:M with 0 < N < M (e.g. --nm 2:4)")
        for name in ("sparse_share", "dictionary_share"):
            if not 0 < getattr(self, name) < 1:
                raise LrcError(f"{flag_of(name)} {getattr(self, name)}: give a fraction in (0, 1) (e.g. 0.25)")

    def _check_budget(self) -> None:
        budgets = [n for n in ("params", "flops", "max_drop") if getattr(self, n) is not None]
        rules = [n for n in ("rank", "ratio", "energy", "max_error") if getattr(self, n) is not None]
        if len(budgets) > 1 or (budgets and rules):
            raise LrcError(f"{' and '.join(map(flag_of, budgets + rules))} each set the ranks: pass only one")
        for n in ("params", "flops"):
            v = getattr(self, n)
            if v is not None and not 0 < v <= 1:
                raise LrcError(f"{flag_of(n)} {v}: give the fraction to keep, in (0, 1] (e.g. {flag_of(n)} 0.5)")
        if self.max_drop is not None:
            if not self.max_drop >= 0:
                raise LrcError(f"--max-drop {self.max_drop}: must be >= 0")
            if self.metric is None:
                raise LrcError(f"--max-drop needs --metric NAME ({', '.join(choices_of('metric'))}, script)")
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
        if isinstance(self.prune_mlp, str) and self.prune_mlp != "auto":  # coerce() keeps words that are no number
            raise LrcError(f"--prune-mlp {self.prune_mlp!r}: give a fraction of MLP hidden channels to keep, or auto")
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
        self._check_attention()
        if self.distill_samples is not None and self.distill_samples < 2:
            raise LrcError("--distill-samples must be >= 2 (the last tenth of the batches is held out)")
        if self.distill_batch < 1 or self.distill_epochs < 1:
            raise LrcError("--distill-batch and --distill-epochs must be >= 1")
        if not self.distill_lr > 0:
            raise LrcError(f"--distill-lr {self.distill_lr}: give a positive learning rate (e.g. 1e-4)")
        if self.allocation == "sensitivity" and not self.calib:
            raise LrcError("--allocation sensitivity measures layers on calibration data: pass --calib")
        if self.sensitivity_samples < 1 or self.search_steps < 1:
            raise LrcError("--sensitivity-samples and --search-steps must be >= 1")
        if self.val_samples is not None and self.val_samples < 1:
            raise LrcError("--val-samples must be >= 1")
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

    def form_for(self, label: str) -> str:
        """The form a node gets: the first matching ``--layer-form``, else ``--form``."""
        for lf in self.layer_forms:
            pat, _, f = lf.rpartition("=")
            if re.search(pat, label):
                return f
        return self.form

    @property
    def nm_pattern(self) -> tuple[int, int]:
        """``--nm`` as ``(N, M)``."""
        n, _, m = self.nm.partition(":")
        return int(n), int(m)

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
            given = {"ratio": DEFAULT_RATIO}
        return RankPolicy(multiple=self.multiple, **given)

    def to_dict(self) -> dict:
        """The options as JSON values (tuples as lists), in field order: the report's ``config``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "CompileConfig":
        """A config from option names (``-`` may stand for ``_``) and values in any form :func:`coerce` takes:
        a report's ``config``, ``lrcompile.compile()``'s keyword options, the CLI's raw values."""
        d = {str(k).replace("-", "_"): v for k, v in d.items()}
        names = _specs(cls)
        unknown = sorted(set(d) - set(names))
        if unknown:
            import difflib

            hints = [m for u in unknown for m in difflib.get_close_matches(u, names, n=1)]
            raise LrcError(f"unknown option(s) in config: {unknown}" + (f"; did you mean {hints}?" if hints else ""))
        return cls(**d)


# ------------------------------------------------------------------ options: specs and coercion


@dataclass(frozen=True)
class Spec:
    """One field's :class:`Option` with what its declaration implies.

    Attributes:
        kind: ``bool``, ``int``, ``float``, ``str``, ``number-or-word`` (``float | str``),
            ``tuple`` or ``dict``, read from the field's annotation.
        item: the item type of a tuple (``str``, ``int``) or the value type of a dict (``int``,
            ``Any``: JSON when it parses, else text).
        section: the help section (the last ``section=`` at or before this field).
        decl: the click declaration; ``flag`` its first flag, the name messages use.
        inverted: a boolean whose only flag sets it False (``--no-verify``).
    """

    name: str
    option: Option
    kind: str
    item: str | None
    section: str
    decl: str
    flag: str
    inverted: bool
    field: Field

    @property
    def default(self) -> Any:
        return self.field.default_factory() if self.field.default is MISSING else self.field.default

    @property
    def choices(self) -> tuple[str, ...]:
        """The allowed values (() when any), read from the registry where it is a function."""
        c = self.option.choices
        return tuple(c() if callable(c) else c)


_KINDS = {"bool", "int", "float", "str"}


def _kind(name: str, annotation: str) -> tuple[str, str | None]:
    """(kind, item) from a field's annotation (a string: ``from __future__ import annotations``);
    None is allowed to every field, meaning its default."""
    parts = [p.strip() for p in annotation.split("|") if p.strip() != "None"]
    if parts == ["float", "str"]:
        return "number-or-word", None
    m = re.fullmatch(r"(tuple|dict)\[(?:str, )?(str|int|Any)(?:, \.\.\.)?\]", parts[0]) if len(parts) == 1 else None
    if m:
        return m[1], m[2]
    if len(parts) == 1 and parts[0] in _KINDS:
        return parts[0], None
    raise TypeError(f"option {name}: coerce() has no rule for the annotation {annotation!r}")


_SPECS: dict[type, dict[str, Spec]] = {}


def _specs(cls: type | None = None) -> dict[str, Spec]:
    """Every field's :class:`Spec`, in field order (built once per class: ``CompileConfig``, or a
    subclass that adds fields)."""
    cls = cls or CompileConfig
    if cls not in _SPECS:
        section, out = None, {}
        for f in fields(cls):
            o = f.metadata.get("option")
            if o is None:
                raise TypeError(f"{cls.__name__}.{f.name} is not declared with opt(): give it a help text")
            section = o.section or section
            if section not in SECTIONS:
                raise TypeError(f"{cls.__name__}.{f.name}: section {section!r} is not one of SECTIONS")
            kind, item = _kind(f.name, str(f.type))
            decl = o.flag or "--" + f.name.replace("_", "-")
            flag = decl.split("/")[0]
            inverted = kind == "bool" and "/" not in decl and f.default is True
            out[f.name] = Spec(f.name, o, kind, item, section, decl, flag, inverted, f)
        _SPECS[cls] = out
    return _SPECS[cls]


def specs(cls: type | None = None) -> list[Spec]:
    """The options of ``CompileConfig`` (or of a subclass), in field order."""
    return list(_specs(cls).values())


def default(name: str) -> Any:
    """The default of option ``name`` (a fresh dict for dict options)."""
    return _specs()[name].default


def flag_of(name: str) -> str:
    """The flag that names option ``name`` in messages (``--max-drop``, ``--dim``)."""
    return _specs()[name].flag


def choices_of(name: str) -> tuple[str, ...]:
    """The choices of option ``name`` (() when it has none)."""
    return _specs()[name].choices


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _either(words: Iterable[str]) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _scalar(kind: str, v: Any, label: str) -> Any:
    import numbers

    if kind == "bool":
        if isinstance(v, (bool, int)) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
            return v.strip().lower() in _TRUE
        raise LrcError(f"{label} {v!r}: not a valid boolean (give 1/0, true/false, yes/no or on/off)")
    if kind == "int":
        if isinstance(v, numbers.Integral) and not isinstance(v, bool):
            return int(v)
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str):
            try:
                return int(v.strip())
            except ValueError:
                pass
        raise LrcError(f"{label} {v!r}: not a valid integer")
    if kind in ("float", "number-or-word"):
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                if kind == "number-or-word" and v.strip():
                    return v.strip()
        raise LrcError(f"{label} {v!r}: not a valid number")
    if isinstance(v, (str, os.PathLike)):
        return os.fspath(v)
    raise LrcError(f"{label} {v!r}: expected text")


def _tuple(s: Spec, v: Any, label: str) -> tuple:
    if isinstance(v, str):
        items = [v] if s.option.multiple else [p.strip() for p in re.split(r"[,+]", v) if p.strip()]
    elif isinstance(v, (list, tuple)):
        items = list(v)
    else:
        raise LrcError(f"{label} {v!r}: expected a list")
    if s.item == "int":
        try:
            return tuple(_scalar("int", x, label) for x in items)
        except LrcError:
            example = s.option.example or ",".join(map(str, s.default)) or "1,2"
            raise LrcError(f"{label} {v!r}: expected comma-separated integers (e.g. {example})") from None
    return tuple(_scalar("str", x, label) for x in items)


def _dict(s: Spec, v: Any, label: str) -> dict:
    def bad(item):
        return LrcError(f"{label} {item!r}: expected {s.option.metavar or 'KEY=VALUE'}"
                        + (f" (e.g. {s.option.example})" if s.option.example else "")
                        + ("; the value must be a positive integer" if s.item == "int" else ""))

    def value(raw, item):
        if s.item == "int":
            if isinstance(raw, str) and raw.strip().isdigit() and int(raw) > 0:
                return int(raw)
            if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0:
                return raw
            raise bad(item)
        if isinstance(raw, str):
            try:
                return json.loads(raw)
            except ValueError:
                return raw
        return raw

    if isinstance(v, str) and v.lstrip().startswith("{"):
        try:
            v = json.loads(v)
        except ValueError:
            raise bad(v) from None
    if isinstance(v, dict):
        return {str(k): value(x, f"{k}={x}") for k, x in v.items()}
    out = {}
    for item in [v] if isinstance(v, str) else v if isinstance(v, (list, tuple)) else [v]:
        key, sep, raw = item.partition("=") if isinstance(item, str) else ("", "", "")
        if not sep or not key:
            raise bad(item)
        out[key] = value(raw, item)
    return out


def coerce(name: str, value: Any, *, label: str | None = None, cls: type | None = None) -> Any:
    """``value`` as option ``name``'s type: the one conversion of user values.

    ``lrcompile.compile()``, ``CompileConfig.from_dict`` (``--config`` replay), the CLI and bench
    configurations all come here (``CompileConfig.__post_init__`` applies it to every field).
    None, and the text ``none`` for options that are not text, give the default. Numbers and
    flags parse from text (``"16"``, ``"0.5"``, ``"yes"``); lists from a list or a text split on
    ``,`` or ``+`` (``"1,16"``, ``"MatMul+Gemm"``), except repeatable options, where a text is one
    item (a pattern may hold ``,`` or ``+``); dicts from a dict, JSON text, or ``KEY=VALUE``
    texts; paths become text. Idempotent.

    Args:
        name: a ``CompileConfig`` field.
        value: the user's value.
        label: how messages name the option (default: its flag).
        cls: ``CompileConfig`` (default) or a subclass that adds fields.

    Raises:
        LrcError: a value the option cannot take, naming the option and the value.
    """
    s = _specs(cls)[name]
    label = label or (s.name if s.inverted else s.flag)
    if isinstance(value, str) and s.kind != "str" and value.strip().lower() == OFF:
        value = None
    if value is None:
        return s.default
    if s.kind == "tuple":
        return _tuple(s, value, label)
    if s.kind == "dict":
        return _dict(s, value, label)
    v = _scalar(s.kind, value, label)
    if isinstance(s.option.choices, tuple) and s.option.choices and v not in s.option.choices:
        raise LrcError(f"{label} {v!r}: choose {_either(s.option.choices)}")
    return v
