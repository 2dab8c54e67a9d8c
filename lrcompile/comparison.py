"""``lrcompile compare ORIGINAL COMPRESSED``: two models on the same inputs, the way Polygraphy users do.

Both models run through Polygraphy's runners (``OnnxrtRunner`` always, on lrcompile's ONNX Runtime
sessions; ``TrtRunner`` where ``tensorrt`` imports and a GPU is present) and their outputs go
through Polygraphy's comparator (``Comparator.compare_accuracy`` with its simple compare function), so
each output gets Polygraphy's statistics and its tolerance semantics: with the ``elemwise`` check
an element fails when it exceeds both ``atol`` and ``rtol * |original|``; with ``max`` /
``mean`` / ``median`` / ``quantile`` that statistic of the absolute error must be within ``atol``
or the same statistic of the relative error within ``rtol``.

The verdict. The same rule as the compile's own verification (``lrcompile.verdict``) always
applies, on the same metrics (``lrcompile.verify.diff_outputs`` over all inputs): every float
output finite, varying with the input, with positive cosine; plus ``tolerance`` (relative L2) and
``min_cosine`` when given. Polygraphy's check decides as well once the user sets ``atol``,
``rtol`` or ``check_error_stat``: its defaults (1e-5, elementwise) judge equality, which no lossy
compression meets, so without them its result is reported and not judged. ``FAILED`` when either
rule fails (exit code 3), else ``UNVERIFIED`` when the compile's rule could judge nothing, else
``PASSED``.

Inputs are the compile's (``lrcompile.feeds``): seeded random at ``seed`` / ``dims`` (the same
feeds ``lrcompile compile`` verifies on with the same seed and dims), or ``inputs``: an .npz, a
Polygraphy JSON input file or a data-loader script.

Latency: each runner's ``last_inference_time`` of both models on the first input, interleaved
(original, compressed, original, ...) after a warm-up; median, mean and min in ms, and the speedup.

The result carries the equivalent ``polygraphy run`` command lines: the original with
``--save-outputs``, then the compressed one with ``--load-outputs`` and the same tolerances
(their exit code is Polygraphy's verdict on the tolerances alone).
"""
from __future__ import annotations

import logging
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import LrcError

log = logging.getLogger(__name__)

ERROR_STATS = ("elemwise", "max", "mean", "median", "quantile")
#: Polygraphy's defaults (``CompareFunc.simple``), shown when the user gives none.
POLYGRAPHY_ATOL = POLYGRAPHY_RTOL = 1e-5
RUNNERS = ("onnxrt", "trt")


@dataclass(frozen=True)
class CompareOptions:
    """What ``compare`` does; None means the default.

    Attributes:
        inputs: .npz, Polygraphy JSON, or a data-loader script ``loader.py[:func]`` (default:
            seeded random inputs, as the compile's verification makes them).
        seed, dims: of the generated inputs (the compile's ``--seed`` / ``--dim``).
        tolerance, min_cosine: the compile's limits (relative L2 error, cosine).
        atol, rtol, check_error_stat: Polygraphy's; any of them given makes its check decide.
        trt: run the TensorRT runner (None: where tensorrt imports and a GPU is present; True: a
            user error when it cannot).
        warmup, repeats: latency runs per model and runner (default 5 and 50; repeats 0: no timing).
        save_inputs: write the inputs used as a Polygraphy JSON input file (the printed lines load
            it, and save the original's outputs beside it).
    """

    inputs: str | None = None
    seed: int | None = None
    dims: dict | None = None
    tolerance: float | None = None
    min_cosine: float | None = None
    atol: float | None = None
    rtol: float | None = None
    check_error_stat: str | None = None
    trt: bool | None = None
    warmup: int | None = None
    repeats: int | None = None
    save_inputs: str | None = None

    def __post_init__(self):
        for name in ("tolerance", "atol", "rtol"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise LrcError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        if self.check_error_stat is not None and self.check_error_stat not in ERROR_STATS:
            raise LrcError(f"--check-error-stat {self.check_error_stat!r}: use one of {', '.join(ERROR_STATS)}")
        for name in ("warmup", "repeats"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise LrcError(f"--{name} must be >= 0, got {v}")
        if self.save_inputs is not None and not str(self.save_inputs).endswith(".json"):
            raise LrcError(f"--save-inputs {self.save_inputs}: use a .json path (Polygraphy's input format)")

    @property
    def polygraphy_judges(self) -> bool:
        """Whether Polygraphy's tolerance check takes part in the verdict."""
        return self.atol is not None or self.rtol is not None or self.check_error_stat is not None


@dataclass
class RunnerResult:
    """One runner's comparison of the two models: per output Polygraphy's statistics and verdict,
    the compile's metrics and verdict, and the latency of both."""

    runner: str
    outputs: list[dict] = field(default_factory=list)
    verdict: dict = field(default_factory=dict)
    latency: dict | None = None


@dataclass
class Comparison:
    """What ``compare_models`` returns; ``status`` is PASSED, FAILED or UNVERIFIED."""

    original: str
    compressed: str
    status: str
    inputs: dict
    runners: list[RunnerResult]
    skipped: dict[str, str]
    commands: list[str]
    rule: str

    def to_dict(self) -> dict:
        return {"original": self.original, "compressed": self.compressed, "status": self.status,
                "rule": self.rule, "inputs": self.inputs,
                "runners": [{"runner": r.runner, "outputs": r.outputs, "verdict": r.verdict, "latency": r.latency}
                            for r in self.runners],
                "skipped_runners": self.skipped, "polygraphy_commands": self.commands}


# ---------------------------------------------------------------------------------------- inputs


def compare_feeds(original: Path, compressed: Path, opts: CompareOptions) -> tuple[list[dict[str, np.ndarray]], dict]:
    """The inputs both models run on, checked against both, and their description."""
    from .feeds import DISTRIBUTION, check_feeds, check_runs, describe, fit_feeds, load_feeds, original_runner
    from .io import load_model

    model = load_model(original)
    other = load_model(compressed)
    runs = original_runner(original)
    if opts.inputs:
        feeds = [check_feeds(model, f, f"--inputs {opts.inputs}") for f in load_feeds(opts.inputs)]
        check_runs(runs, feeds, f"--inputs {opts.inputs}")
        info = {"source": str(opts.inputs), "distribution": None}
    else:
        feeds = [fit_feeds(model, runs, seed=opts.seed or 0, dims=opts.dims or {}).feeds]
        info = {"source": "random", "distribution": DISTRIBUTION, "seed": opts.seed or 0}
    for f in feeds:  # the compressed model must take the same inputs
        check_feeds(other, f, f"the inputs of {compressed}")
    info.update(batches=len(feeds), inputs=describe(feeds[0]))
    return feeds, info


# ---------------------------------------------------------------------------------------- runners


def trt_available() -> str | None:
    """None when Polygraphy's TensorRT runner can run here, else why not (one line)."""
    try:
        import tensorrt  # the full TensorRT (tensorrt-rtx has no TrtRunner)
    except ImportError:
        return "the tensorrt package does not import (tensorrt-rtx has no Polygraphy runner)"
    try:
        builder = tensorrt.Builder(tensorrt.Logger(tensorrt.Logger.ERROR))
    except Exception as e:  # noqa: BLE001 - no CUDA device or driver
        return f"TensorRT cannot start ({type(e).__name__}: {e}); a GPU is needed"
    if builder is None:
        return "TensorRT cannot start: no GPU"
    return None


def _profile(feeds: list[dict[str, np.ndarray]]):
    """One TensorRT optimization profile spanning the shapes of ``feeds``."""
    from polygraphy.backend.trt import Profile

    prof = Profile()
    for name in feeds[0]:
        shapes = np.array([f[name].shape for f in feeds])
        lo, hi = tuple(int(v) for v in shapes.min(0)), tuple(int(v) for v in shapes.max(0))
        prof.add(name, min=lo, opt=hi, max=hi)
    return prof


def make_runners(kind: str, original: Path, compressed: Path, feeds: list[dict[str, np.ndarray]]):
    """The (original, compressed) Polygraphy runners of one kind."""
    if kind == "onnxrt":
        from polygraphy.backend.onnxrt import OnnxrtRunner

        from .sessions import session

        return tuple(OnnxrtRunner((lambda p=p: session(p)), name=f"onnxrt-{which}")
                     for p, which in ((original, "original"), (compressed, "compressed")))
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, TrtRunner

    cfg = CreateConfig(profiles=[_profile(feeds)])
    return tuple(TrtRunner(EngineFromNetwork(NetworkFromOnnxPath(str(p)), config=cfg), name=f"trt-{which}")
                 for p, which in ((original, "original"), (compressed, "compressed")))


def _ms_stats(ms: list[float]) -> dict:
    return {"median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "min_ms": min(ms), "runs": len(ms)}


def run_pair(runners, feeds: list[dict[str, np.ndarray]], *, warmup: int, repeats: int):
    """Outputs of both runners on every feed (Polygraphy ``RunResults``, the compressed model's
    first), and their latency on the first feed, interleaved."""
    from polygraphy.comparator import IterationResult, RunResults

    results = RunResults()
    ms: dict[str, list[float]] = {r.name: [] for r in runners}
    with runners[0], runners[1]:
        for r in reversed(runners):  # compressed first: Polygraphy's relative error is then relative to the
            iters = []               # original's output, as `polygraphy run COMPRESSED --load-outputs ORIGINAL` has it
            for f in feeds:
                out = r.infer(f)
                iters.append(IterationResult({k: np.array(v) for k, v in out.items()},
                                             runtime=r.last_inference_time(), runner_name=r.name))
            results.append((r.name, iters))
        for _ in range(warmup):
            for r in runners:
                r.infer(feeds[0])
        for _ in range(repeats):
            for r in runners:
                r.infer(feeds[0])
                ms[r.name].append(r.last_inference_time() * 1e3)
    latency = None
    if repeats:
        a, b = (_ms_stats(ms[r.name]) for r in runners)
        latency = {"original": a, "compressed": b, "speedup": a["median_ms"] / b["median_ms"],
                   "warmup": warmup, "repeats": repeats, "interleaved": True}
    return results, latency


# ---------------------------------------------------------------------------------------- accuracy


def compare_func(opts: CompareOptions):
    try:
        from polygraphy.comparator import SimpleCompareFunc  # Polygraphy >= 0.53
    except ImportError:
        from polygraphy.comparator import CompareFunc

        SimpleCompareFunc = CompareFunc.simple
    return SimpleCompareFunc(atol=opts.atol, rtol=opts.rtol, check_error_stat=opts.check_error_stat)


def judge_pair(results, opts: CompareOptions) -> tuple[list[dict], dict]:
    """Per output: Polygraphy's statistics and verdict (over all iterations) and the compile's
    metrics; and the verdict of both rules."""
    from polygraphy.comparator import Comparator

    from .verdict import judge
    from .verify import diff_outputs

    acc = Comparator.compare_accuracy(results, compare_func=compare_func(opts))
    if not hasattr(acc, "values"):  # AccuracyResults: one AccuracyResult per compare function
        acc = acc[0]
    iters = next(iter(acc.values()))
    (_, got), (_, ref) = results[0], results[1]
    outputs, diffs = [], []
    for name in ref[0].keys():
        if name not in got[0]:
            raise LrcError(f"the compressed model has no output {name!r}; it is not a compression of the original")
        r = [np.asarray(it[name]) for it in ref]
        g = [np.asarray(it[name]) for it in got]
        if any(x.shape != y.shape for x, y in zip(r, g)):
            raise LrcError(f"output {name!r} changed shape: {r[0].shape} -> {g[0].shape}")
        cat = (lambda xs: np.concatenate([x.reshape(1, *x.shape) if x.ndim == 0 else x for x in xs], axis=0))
        d = diff_outputs(name, cat(g), cat(r)).to_dict()
        diffs.append(d)
        per = [it[name] for it in iters]
        stats = {k: _worst([getattr(p, k, None) for p in per]) for k in
                 ("max_absdiff", "max_reldiff", "mean_absdiff", "mean_reldiff", "median_absdiff", "median_reldiff")}
        outputs.append({"name": name, "shape": list(d["shape"]),
                        "polygraphy": {**stats, "passed": all(bool(p) for p in per)},
                        **{k: d[k] for k in ("max_abs", "max_rel", "rel_l2", "cosine", "sample_cosine_min")}})
    verdict = judge(diffs, tolerance=opts.tolerance, min_cosine=opts.min_cosine).to_dict()
    poly_failed = [o["name"] for o in outputs if not o["polygraphy"]["passed"]]
    verdict["polygraphy"] = {"judged": opts.polygraphy_judges, "failed_outputs": poly_failed, **_tolerances(opts)}
    if opts.polygraphy_judges and poly_failed:
        verdict["status"] = "FAILED"
        for o in verdict["outputs"]:
            if o["name"] in poly_failed:
                o["status"] = "failed"
                o["reasons"].append(f"output {o['name']!r} fails Polygraphy's check ({_describe_tol(opts)})")
    return outputs, verdict


def _worst(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _tolerances(opts: CompareOptions) -> dict:
    return {"atol": POLYGRAPHY_ATOL if opts.atol is None else opts.atol,
            "rtol": POLYGRAPHY_RTOL if opts.rtol is None else opts.rtol,
            "check_error_stat": opts.check_error_stat or "elemwise"}


def _describe_tol(opts: CompareOptions) -> str:
    t = _tolerances(opts)
    return f"atol {t['atol']:g}, rtol {t['rtol']:g}, {t['check_error_stat']}"


# ---------------------------------------------------------------------------------------- command lines


def polygraphy_commands(original: Path, compressed: Path, kinds: list[str], opts: CompareOptions,
                        feeds: list[dict[str, np.ndarray]]) -> list[str]:
    """The ``polygraphy run`` lines that repeat this comparison for each runner kind."""
    from .feeds import split_script

    q = shlex.quote
    if opts.inputs and split_script(opts.inputs):
        path, func = split_script(opts.inputs)
        load = f"--data-loader-script {q(f'{path}:{func}')}"
    elif opts.inputs and str(opts.inputs).endswith(".json"):
        load = f"--load-inputs {q(str(opts.inputs))}"
    else:
        load = f"--load-inputs {q(str(opts.save_inputs) if opts.save_inputs else 'INPUTS.json')}"
    base = Path(opts.save_inputs).with_suffix("") if opts.save_inputs else Path(compressed).with_suffix("")
    t = _tolerances(opts)
    tol = f"--atol {t['atol']:g} --rtol {t['rtol']:g} --check-error-stat {t['check_error_stat']}"
    lines = []
    for kind in kinds:
        flag = "--onnxrt" if kind == "onnxrt" else "--trt " + " ".join(
            f"--trt-{w}-shapes " + " ".join(q(f"{k}:{list(v.shape)}".replace(" ", "")) for k, v in feeds[0].items())
            for w in ("min", "opt", "max"))
        out = q(f"{base}.{kind}-original-outputs.json")
        lines.append(f"polygraphy run {q(str(original))} {flag} {load} --save-outputs {out}")
        lines.append(f"polygraphy run {q(str(compressed))} {flag} {load} --load-outputs {out} {tol}")
    return lines


# ---------------------------------------------------------------------------------------- the whole


def _run(original: Path, compressed: Path, opts: CompareOptions):
    feeds, info = compare_feeds(original, compressed, opts)
    if opts.save_inputs:
        from polygraphy.json import save_json

        save_json(feeds, str(opts.save_inputs), description="lrcompile compare inputs")
        info["saved"] = str(opts.save_inputs)
    kinds, skipped = ["onnxrt"], {}
    why = trt_available() if opts.trt is not False else "--no-trt"
    if why is None:
        kinds.append("trt")
    elif opts.trt:
        raise LrcError(f"--trt: TensorRT cannot run here: {why}")
    else:
        skipped["trt"] = why
    warmup = 5 if opts.warmup is None else opts.warmup
    repeats = 50 if opts.repeats is None else opts.repeats
    results = []
    for kind in kinds:
        pair, latency = run_pair(make_runners(kind, original, compressed, feeds), feeds, warmup=warmup, repeats=repeats)
        outputs, verdict = judge_pair(pair, opts)
        results.append(RunnerResult(kind, outputs, verdict, latency))
    return feeds, info, results, kinds, skipped


def compare_models(original: str | Path, compressed: str | Path, opts: CompareOptions | None = None) -> Comparison:
    """Compare ``compressed`` with ``original`` on the same inputs through Polygraphy (see the
    module docstring)."""
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    opts = opts or CompareOptions()
    original, compressed = Path(original), Path(compressed)
    for p in (original, compressed):
        if not p.is_file():
            raise LrcError(f"{p}: no such model file")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        try:
            feeds, info, results, kinds, skipped = _run(original, compressed, opts)
        except PolygraphyException as e:
            raise LrcError(f"Polygraphy: {' '.join(str(e).split())[:300]}") from None
    statuses = [r.verdict["status"] for r in results]
    status = "FAILED" if "FAILED" in statuses else "UNVERIFIED" if "UNVERIFIED" in statuses else "PASSED"
    rule = results[0].verdict["description"] + (
        f"; and Polygraphy's check ({_describe_tol(opts)})" if opts.polygraphy_judges else
        f"; Polygraphy's check at its defaults ({_describe_tol(opts)}) is reported, not judged "
        "(set --atol/--rtol/--check-error-stat)")
    return Comparison(str(original), str(compressed), status, info, results, skipped,
                      polygraphy_commands(original, compressed, kinds, opts, feeds), rule)


def comparison_table(res: Comparison) -> str:
    """Per runner and output: Polygraphy's statistics and verdict, the compile's metrics; latency."""
    from tabulate import tabulate

    rows = []
    for r in res.runners:
        status = {o["name"]: o["status"] for o in r.verdict["outputs"]}
        for o in r.outputs:
            p = o["polygraphy"]
            rows.append([r.runner, o["name"], "x".join(map(str, o["shape"])), f"{p['max_absdiff']:.3e}",
                         f"{p['max_reldiff']:.3e}", f"{p['mean_absdiff']:.3e}", "pass" if p["passed"] else "fail",
                         f"{o['rel_l2']:.3e}", f"{o['cosine']:.6f}", status.get(o["name"], "-")])
    text = tabulate(rows, headers=["runner", "output", "shape", "max abs", "max rel", "mean abs", "polygraphy",
                                   "rel L2", "cosine", "verdict"], tablefmt="simple")
    lat = [[r.runner, f"{r.latency['original']['median_ms']:.3f}", f"{r.latency['compressed']['median_ms']:.3f}",
            f"x{r.latency['speedup']:.2f}", r.latency["repeats"]] for r in res.runners if r.latency]
    if lat:
        text += "\n\n" + tabulate(lat, headers=["runner", "original ms", "compressed ms", "speedup", "runs"],
                                  tablefmt="simple")
    return text
