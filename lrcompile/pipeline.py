"""The compile orchestrator: ``compile_model`` as a short list of named stages.

    load -> prune-mlp -> analyze -> evidence -> factorize (calibrate, plan, rewrite) -> distill
         -> measure -> write (check, verify, target)

Each stage reads and extends one ``_Run``; data flows one way. With ``sequential`` calibration
the factorize stage runs per calibration stage (candidates sharing an input), each calibrated on
the model as rewritten so far. The engine (``lrcompile.engine``) does the work; the planner
(``lrcompile.planner``) chooses sizes under a global budget; pruning (``lrcompile.pruning``) finds
and writes MLP pairs. Nothing here prints: progress goes through tqdm (stderr) and the result
comes back as a ``CompileResult`` that the CLI renders.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from tqdm.auto import tqdm

from . import __version__
from .config import CompileConfig
from .engine import (Analysis, Evidence, Plan, analyze, apply, check_model, collect_curvature, collect_fisher,
                     collect_stats, context, decline_records, export, mask_input, stages)
from .engine.rewrite import MIN_IR_VERSION
from .errors import LrcError, VerificationFailed, is_write_error, note_stage, write_error
from .io import atomic_output, commit, load_model, same_file, write_model
from .ir import RewriteContext
from .memory import PhasePeaks
from .parallel import InProcess, Runner, default_workers, make_runner
from .pruning import MlpPairs, prune_mlps
from .sites import Sites
from .report import LayerRecord, sha256, totals
from .weights import reading

log = logging.getLogger(__name__)


@dataclass
class CompileResult:
    config: CompileConfig
    input: Path
    output: Path | None
    files: list[Path]
    layers: list[LayerRecord]
    verification: list[dict] | None
    feeds: dict | None
    target: dict
    status: str
    timings: dict
    report: dict


@dataclass
class _Run:
    """What the stages of one compile pass on to each other."""

    config: CompileConfig
    src: Path
    out: Path
    progress: bool
    t: dict
    original: onnx.ModelProto | None = None
    model: onnx.ModelProto | None = None  # the pruned one under --prune-mlp F
    feeds: list[dict[str, np.ndarray]] | None = None
    pruned: list[LayerRecord] = field(default_factory=list)
    pruning: dict | None = None
    attention: dict | None = None
    pairs: Sites | None = None  # the MLP / attention pairs the planner prices (the auto modes)
    analysis: Analysis | None = None
    ctx: RewriteContext | None = None
    evidence: Evidence = field(default_factory=Evidence)
    calib_info: dict | None = None
    plan: Plan | None = None
    planner: object | None = None
    plan_info: dict | None = None
    records: list[LayerRecord] = field(default_factory=list)
    new: onnx.ModelProto | None = None
    distill_info: dict | None = None
    result: CompileResult | None = None
    notes: list[str] = field(default_factory=list)  # for the report: what _load changed or chose
    plugins: dict | None = None  # --plugins: the function calls written (engine.functions.Fused)
    runner: Runner = field(default_factory=InProcess)  # where the units run (--workers / --ray)

    memory: PhasePeaks = field(default_factory=PhasePeaks)  # each phase's peak resident memory

    def mark(self, name: str) -> None:
        """Phase ``name`` ends: its time, and its peak resident memory since the previous mark."""
        self.t[name] = time.perf_counter()
        self.memory.mark(name)

    def reanalyze(self, analysis: Analysis) -> None:
        self.analysis, self.ctx = analysis, context(analysis.graph)


def default_output(input_path: Path) -> Path:
    return input_path.with_name(input_path.stem + ".lr.onnx")


def compile_model(input_path: str | Path, output: str | Path | None = None,
                  config: CompileConfig | None = None, *, progress: bool = False) -> CompileResult:
    """Compile one model: see the module docstring. Raises LrcError for user errors."""
    config = config or CompileConfig()
    src = Path(input_path)
    run = _Run(config=config, src=src, out=Path(output) if output is not None else default_output(src),
               progress=progress, t={"start": time.perf_counter()})
    # the model's external data is read from its folder, mapped, when needed; the units of work run
    # where --workers / --ray say
    with reading(src.parent), make_runner(config.workers or default_workers(), config.ray) as run.runner:
        for stage in STAGES:
            try:
                stage.run(run)
            except Exception as e:  # noted, not handled: the CLI names the stage of an internal error
                note_stage(e, stage.name)
                raise
    return run.result


# ---------------------------------------------------------------------------------------------- stages


def _load(run: _Run) -> None:
    """Read the model, check the output path, and fail early on what would fail late."""
    config, src, out = run.config, run.src, run.out
    run.model = run.original = load_model(src, notes=run.notes, lazy=True)
    run.memory.mark("load")
    if run.model.ir_version < MIN_IR_VERSION:
        run.notes.append(f"IR version {run.model.ir_version} raised to {MIN_IR_VERSION} in the output "
                         "(below 4 every initializer must also be listed as a graph input)")
        log.info("%s", run.notes[-1])
    if out.suffix != ".onnx":
        raise LrcError(f"output {out} must end in .onnx (the engine is written beside it for --target trt)")
    if same_file(src, out):
        raise LrcError(f"output {out} is the input model; lrcompile never overwrites its input: pass another -o")
    if config.distill:  # fail now, not after the factorization: torch present, the data readable and matching
        from .calibrate import CalibSource, iter_calibration
        from .distill import check_available

        check_available()
        next(iter_calibration(CalibSource(config.distill, 1, 1, flag="--distill"), run.model), None)
    if config.verify or config.target in ("ort", "trt") or config.flops is not None or config.resolved_latency_aware:
        run.feeds = _feeds(run, config)
        run.memory.mark("feeds")


def _prune(run: _Run) -> None:
    """``--prune-mlp F``: prune every MLP pair first; ``auto``: find the pairs for the planner."""
    config = run.config
    if config.prune_mlp == "auto":  # the budget's planner chooses each pair's width (lrcompile.pruning)
        run.pairs = Sites(mlp=MlpPairs.find(run.model, config))
        run.pruning = {"keep": "auto", "pairs": [], "not_pairs": run.pairs["mlp"].reasons}
        if not run.pairs["mlp"].pairs:
            log.warning("--prune-mlp auto: no MLP pair (Linear -> channel-wise activation -> Linear with constant "
                        "weights) in this model; the budget goes to low rank alone")
    elif config.prune_mlp is not None:
        run.model, run.pruned, run.pruning = prune_mlps(run.model, config, progress=run.progress)
        run.mark("prune")


def _attention(run: _Run) -> None:
    """``--attention R``: every attention block at that head dimension first; ``auto``: find the
    blocks for the planner."""
    from .attention import AttentionSites, reduce_heads

    config = run.config
    if config.attention == "auto":
        sites = AttentionSites.find(run.model, config)
        run.pairs = run.pairs or Sites()
        run.pairs.kinds["attention"] = sites
        run.attention = {"head_dim": "auto", "pairs": [], "not_blocks": sites.reasons}
        if not sites.pairs:
            log.warning("--attention auto: no multi-head attention block in this model (see the report's "
                        "attention.not_blocks); the budget goes to the other layers")
    elif config.attention is not None:
        run.model, recs, run.attention = reduce_heads(run.model, config, progress=run.progress)
        run.pruned += recs
        run.mark("attention")


def _analyze(run: _Run) -> None:
    reserved = run.pairs.reserved() if run.pairs else frozenset()
    run.reanalyze(analyze(run.model, run.config, skip=frozenset(r.node for r in run.pruned) | reserved))
    run.mark("analyze")
    a = run.analysis
    if not a.candidates and not a.declines and not run.pruned and not (run.pairs and run.pairs.pairs):
        raise LrcError(f"{run.src}: no MatMul/Gemm/Conv/Gather node with a constant weight; nothing to compress")


def _evidence(run: _Run) -> None:
    """Fisher information and output curvature, when some layer's method needs them."""
    cands = run.analysis.candidates
    run.evidence = Evidence(fisher=collect_fisher(run.model, cands, run.config, progress=run.progress),
                            curvature=collect_curvature(run.model, cands, run.config, progress=run.progress))
    if run.evidence.fisher is not None or run.evidence.curvature is not None:
        run.mark("evidence")


def _factorize(run: _Run) -> None:
    """Calibrate, plan (a rank policy or the planner's budget), and rewrite."""
    if run.config.calib and run.config.sequential:
        _factorize_sequential(run)
    else:
        _factorize_one_shot(run)
    run.records = run.pruned + run.plan.records + decline_records(run.analysis.declines)
    if not run.plan and not any(r.decision == "pruned" for r in run.pruned):
        raise LrcError(f"{run.src}: every candidate was declined ({_decline_summary(run.records)}); "
                       + _decline_advice(run.records))
    run.new = export(run.analysis.graph, run.model, run.ctx.sparse)
    if run.config.plugins:
        from .engine.functions import emit_functions

        run.new, fused = emit_functions(run.new)
        run.plugins = fused.to_dict()
    run.mark("rewrite")


def _factorize_one_shot(run: _Run) -> None:
    config, pairs = run.config, run.pairs
    if config.calib:
        stats, run.calib_info = _calibrate(run, run.model, run.analysis.candidates, progress=run.progress)
        run.evidence.stats = stats
        run.calib_info["mode"] = "one-shot"
        run.mark("calibrate")
    run.plan, run.planner, run.plan_info = _plan_sizes(run)
    if pairs and pairs.pairs:  # write the chosen widths, then the ranks onto the pruned model
        _, analysis = _prune_chosen(run, run.model)
        run.reanalyze(analysis)
        planner = run.planner
        run.plan = Plan().decide(analysis.candidates, config, run.evidence, ranks=planner.ranks, forms=planner.forms,
                                 dense_reasons=planner.dense_reasons, cache=planner.cache, runner=run.runner)
        planner.annotate(run.plan.records, planner.ranks)
    run.mark("factorize")
    if run.plan:
        apply(run.ctx, run.analysis.candidates, run.plan)


def _factorize_sequential(run: _Run) -> None:
    """Each calibration stage is calibrated on the model as rewritten so far and fitted to the
    original's outputs (target correction). Under a budget, the sizes come from one-shot statistics
    (the planner's error curves and sensitivities); the factors are then fitted stage by stage."""
    config, pairs = run.config, run.pairs
    ranks = reasons = forms = p0 = None
    if config.budget is not None or config.resolved_latency_aware:
        stats0, _ = _calibrate(run, run.model, run.analysis.candidates, progress=run.progress)
        run.evidence.stats = stats0
        p0, run.planner, run.plan_info = _plan_sizes(run)
        ranks, reasons, forms = p0.sizes(), p0.dense_reasons(), p0.forms()
        if pairs and pairs.pairs:  # prune the chosen widths first: the stages then fit the rest on it
            run.model, analysis = _prune_chosen(run, run.model)
            run.reanalyze(analysis)
    p, run.calib_info = Plan(), {"mode": "sequential", "stages": []}
    for stage in tqdm(stages(run.analysis.graph, run.analysis.candidates), desc="sequential calibration",
                      unit="stage", disable=None if run.progress else True, leave=False):
        stats = None
        if stage[0].activation is not None:
            # target correction: fit to the original's outputs once anything was rewritten
            stats, info = _calibrate(run, export(run.analysis.graph, run.model), stage, progress=False,
                                     reference=run.model if p else None, pairs=False)
            run.calib_info["stages"].append(info)
        ev = Evidence(stats=stats, fisher=run.evidence.fisher, curvature=run.evidence.curvature)
        p.decide(stage, config, ev, ranks=ranks, forms=forms, dense_reasons=reasons, runner=run.runner)
        apply(run.ctx, stage, p)
    if p0 is not None:  # carry the planner's per-layer details over to the final records
        before = {r.node: r for r in p0.records}
        for r in p.records:
            b = before.get(r.node)
            if b is not None:
                r.sensitivity, r.predicted_loss, r.probes = b.sensitivity, b.predicted_loss, b.probes
                r.flops_before, r.latency = b.flops_before, b.latency
                r.flops_after = b.flops_after if r.decision == "factorized" else b.flops_before
    run.plan = p
    run.mark("calibrate")
    run.mark("factorize")


def _distill_stage(run: _Run) -> None:
    """``--distill``: the rewritten model with its new tensors trained against the original."""
    config = run.config
    if not config.distill:
        return
    from .calibrate import CalibSource, iter_calibration
    from .distill import distill

    src = CalibSource(config.distill, config.distill_samples, config.distill_batch, flag="--distill")
    res = distill(run.original, run.new, iter_calibration(src, run.original), epochs=config.distill_epochs,
                  lr=config.distill_lr, seed=config.seed, match=config.distill_match,
                  mask_input=mask_input(run.original, config), progress=run.progress)
    run.new, run.distill_info = res.model, res.info
    run.mark("distill")


def _measure(run: _Run) -> None:
    """Under a global budget with data: the planner's metric on the final model. With reduced
    attention heads: each pair's error measured at its scores or output on the verification feeds."""
    config = run.config
    if run.attention and run.attention.get("pairs") and run.feeds:
        from .attention import measure_errors

        measure_errors(run.original, run.new, run.attention["pairs"], run.feeds, mask_input(run.original, config))
    if run.planner is not None and (config.calib or config.val):
        ev = run.planner.evaluator(search=config.budget == "max_drop")
        m = ev.measure(run.new)
        run.plan_info["final"] = {"metric": ev.describe(), "value": m.value, "drop": m.drop,
                                  "rel_l2_sq": m.rel_l2_sq, "samples": m.samples}


def _write(run: _Run) -> None:
    """Write atomically, check, verify, judge, build the target, report; nothing is left on FAILED
    or on any error: the files move into place last, after everything else succeeded. A folder that
    cannot be written (permission, read-only, full disk, a file in the path) is a user error."""
    try:
        _write_files(run)
    except OSError as e:
        if is_write_error(e) and (e.filename is None or _within(e.filename, run.out.parent)):
            raise write_error(e, run.out.parent, "-o") from None
        raise


def _relocate(obj, src: Path, dest: Path):
    """``obj`` (a report: dicts, lists, strings) with every path inside folder ``src`` moved to
    ``dest``; other values as they are."""
    if isinstance(obj, str):
        inside = obj.startswith(str(src) + os.sep)
        return str(dest / obj[len(str(src)) + 1:]) if inside else str(dest) if obj == str(src) else obj
    if isinstance(obj, dict):
        return {_relocate(k, src, dest): _relocate(v, src, dest) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relocate(v, src, dest) for v in obj]
    return obj


def _within(path, folder: Path) -> bool:
    p, f = Path(path).absolute(), folder.absolute()
    return p == f or f in p.parents


def _write_files(run: _Run) -> None:
    config, src, out, t = run.config, run.src, run.out, run.t
    target_info: dict = {}
    with atomic_output(out) as tmp:
        model_path = tmp / out.name
        files = write_model(run.new, model_path, external_data=config.external_data)
        notes = check_model(model_path, src)
        run.mark("check")
        diffs = None
        if config.verify:
            from .verify import compare

            diffs = [d.to_dict() for d in compare(src, model_path, run.feeds)]
            run.mark("verify")
        verdict = _judge(diffs, config)
        status = verdict.status
        if status != "FAILED":
            target_info, extra = _build_target(config, src, model_path, out.parent, run.feeds)
            files += extra
        run.mark("target")
        # the report is made from the files in the temporary folder (the same names and bytes); its
        # paths are then moved to the destination with them (_relocate), so the files move last
        ok = status != "FAILED"
        result = CompileResult(
            config=config, input=src, output=model_path if ok else None, files=list(files) if ok else [],
            layers=run.records,
            verification=diffs, feeds=_feeds_info(run.feeds, config), target=target_info, status=status,
            timings={k: round(v - t["start"], 3) for k, v in t.items() if k != "start"}, report={},
        )
        result.report = build_report(result, notes=run.notes + notes + verdict.failures + verdict.unverified,
                                     folded=run.analysis.folded)
        result.report["memory"] = run.memory.to_dict(MEMORY_BOUNDS)
        if diffs is not None:
            result.report["verification"]["verdict"] = verdict.to_dict()
        calib_info = run.calib_info
        if run.evidence.curvature is not None:
            calib_info = {**(calib_info or {}), "output_curvature": run.evidence.curvature.info}
        result.report["calibration"] = calib_info
        result.report["plan"] = run.plan_info
        result.report["mlp_pruning"] = run.pruning
        if run.attention is not None:
            result.report["attention"] = run.attention
        result.report["distillation"] = run.distill_info
        if run.plugins is not None:
            result.report["plugins"] = run.plugins
        result.report["parallel"] = run.runner.info()
        if ok:
            result.report = _relocate(result.report, tmp, out.parent)
            result.output, result.files = out, [out.parent / f.name for f in files]
            commit(files, out.parent)
    run.result = result
    if status == "FAILED":
        hint = "relax the rank policy or the tolerance" if verdict.rule == "limits" else \
            "the output is broken, not merely lossy: relax the rank policy, and please report it if it persists"
        raise VerificationFailed("verification FAILED: " + "; ".join(verdict.failures)
                                 + f" (no output written; {hint})", result=result)


@dataclass(frozen=True)
class Stage:
    """A named step of a compile: ``run`` extends the ``_Run``; ``describe`` gives the steps it adds
    to the report's pipeline string for a config (none: the stage does nothing the string shows)."""

    name: str
    run: object
    describe: object = lambda config: []


def _describe_factorize(c: CompileConfig) -> list[str]:
    return ((["calibrate"] if c.calib else []) + [f"{c.resolved_method}{{{c.describe_ranks()},multiple={c.multiple}}}",
                                                  "rewrite", "cleanup"])


#: The stages, in order; their names are the module docstring's diagram, their descriptions the
#: report's ``pipeline`` string (``pipeline_string``).
STAGES = (
    Stage("load", _load),
    Stage("prune-mlp", _prune, lambda c: [f"prune-mlp{{keep={_g(c.prune_mlp)}}}"] if c.prune_mlp is not None else []),
    Stage("attention", _attention,
          lambda c: [f"attention{{head_dim={_g(c.attention)}}}"] if c.attention is not None else []),
    Stage("analyze", _analyze, lambda c: ["analyze"]),
    Stage("evidence", _evidence),
    Stage("factorize", _factorize, _describe_factorize),
    Stage("distill", _distill_stage),
    Stage("measure", _measure),
    Stage("write", _write, lambda c: ["check"] + (["verify"] if c.verify else []) + [f"target={c.target}"]),
)


def pipeline_string(config: CompileConfig) -> str:
    """What the stages do for ``config``, e.g. ``analyze,calibrate,whiten{ratio=0.5,multiple=8},...``."""
    return ",".join(step for stage in STAGES for step in stage.describe(config))


# ---------------------------------------------------------------------------------------------- helpers


def _calibrate(run: _Run, model: onnx.ModelProto, cands, *, progress: bool, reference=None, pairs: bool = True):
    """Activation statistics of ``cands`` and, with ``pairs``, of the MLP pairs' hidden activations
    (into ``run.pairs.stats``) in the same pass."""
    pairs = run.pairs if pairs and run.pairs and run.pairs.pairs else None
    stats, info = collect_stats(model, cands, run.config, progress=progress, reference=reference,
                                extra=pairs.requests() if pairs else None, runner=run.runner)
    if pairs:
        pairs.take_stats(stats)
    return stats, info


def _prune_chosen(run: _Run, model: onnx.ModelProto):
    """``--prune-mlp auto`` / ``--attention auto``: the model with the planner's widths and head
    dimensions written (their records, annotated by the planner, join ``run.pruned``; their rows
    the report's sections), and the analysis of the other layers on it."""
    pairs, planner = run.pairs, run.planner
    pmodel, records, rows = pairs.prune(model, planner.ranks, progress=run.progress,
                                        reason={"mlp": "--prune-mlp auto", "attention": "--attention auto"})
    planner.annotate(records, planner.ranks)
    run.pruned = run.pruned + records
    if "mlp" in rows:
        run.pruning["pairs"] = rows["mlp"]
    if "attention" in rows:
        run.attention["pairs"] = rows["attention"]
    return pmodel, analyze(pmodel, run.config, skip=frozenset(r.node for r in run.pruned) | pairs.reserved())


def _plan_sizes(run: _Run):
    """The plan under the config's rank policy or global budget, with latency limits when asked.

    Returns ``(plan, planner or None, plan section of the report or None)``."""
    config, model, cands = run.config, run.model, run.analysis.candidates
    if config.budget is None and not config.resolved_latency_aware:
        return Plan().decide(cands, config, run.evidence, progress=run.progress, runner=run.runner), None, None
    from . import planner as pl

    timing = pl.timing_feeds(model, _timing_feed(model, config, run.feeds), config.latency_batches) \
        if config.resolved_latency_aware else None
    if config.budget is None:
        p = Plan().decide(cands, config, run.evidence, progress=run.progress, runner=run.runner)
        info = {"budget": None, "latency": pl.latency_declines(p, model, cands, timing, config,
                                                                progress=run.progress)}
        return p, None, info
    planner = pl.Planner(model, cands, config, evidence=run.evidence, feed=run.feeds[0] if run.feeds else None,
                         progress=run.progress, pairs=run.pairs, runner=run.runner)
    if timing is not None:
        planner.limit_latency(timing)
    ranks = planner.run()
    p = Plan().decide(cands, config, run.evidence, progress=run.progress, ranks=ranks, forms=planner.forms,
                      dense_reasons=planner.dense_reasons, cache=planner.cache, runner=run.runner)
    planner.annotate(p.records, ranks)
    return p, planner, planner.info


def _timing_feed(model: onnx.ModelProto, config: CompileConfig, feeds_list) -> dict[str, np.ndarray]:
    """The user's shapes for timing: --inputs, else a calibration batch, else the verification feed."""
    if not config.inputs and config.calib:
        from .engine import calibration

        first = next(calibration(model, config), None)
        if first is not None:
            return first
    return feeds_list[0]


def _build_target(config: CompileConfig, src: Path, model_path: Path, dest_dir: Path,
                  feeds_list: list[dict[str, np.ndarray]]) -> tuple[dict, list[Path]]:
    """The ``ort`` / ``trt`` target's extra work on the checked model in its temporary folder:
    returns the report's target section and the extra files to move beside the output."""
    stem = model_path.stem
    if config.target == "ort":
        from .targets import ort as ort_target

        opt = model_path.with_name(stem + ".ort.onnx")
        ort_target.save_optimized(model_path, opt)
        return {"latency": ort_target.compare_latency(src, model_path, feeds_list[0], min_seconds=1.0),
                "optimized_model": str(dest_dir / opt.name)}, [opt]
    if config.target == "trt":
        from .targets import trt as trt_target

        engine = model_path.with_name(stem + ".engine")
        opts = trt_target.TrtOptions(fp16=config.fp16, sparse_weights=config.sparse_weights,
                                     shapes=trt_target.parse_shapes(config.shapes) if config.shapes else None)
        info = trt_target.build_engine(model_path, engine, opts,
                                       default_shapes={k: tuple(v.shape) for k, v in feeds_list[0].items()})
        return {"engine": {**info, "path": str(dest_dir / engine.name)}}, [engine]
    return {}, []


def _decline_advice(records: list[LayerRecord]) -> str:
    """What the user can change, from the reasons: options where an option declined a layer; where
    only the model's structure did (subgraphs, depthwise convs, quantized or shared weights), that
    no option helps and where each reason is listed."""
    reasons = [r.reason for r in records]
    hints = []
    if any("not faster" in r for r in reasons):
        hints.append("pass --size-only to compress them anyway")
    if any("break-even" in r for r in reasons):
        hints.append("loosen the rank policy (a smaller --ratio, --rank or --energy) or pass --keep-unprofitable")
    if any(r.startswith("too small to matter") for r in reasons):
        hints.append("lower --min-params (e.g. --min-params 0)")
    if any(r.startswith(("op not selected", "excluded by", "name not matched")) for r in reasons):
        hints.append("widen --only / --include / --exclude")
    if not hints:
        return ("no option changes these reasons (the model's structure declines every layer; "
                "`lrcompile inspect MODEL` lists each)")
    return " or ".join(hints)


def _decline_summary(records: list[LayerRecord]) -> str:
    """The three commonest kinds of reason (reasons alike but for their numbers count as one kind),
    each shown by its first instance, numbers included."""
    reasons: dict[str, list] = {}
    for r in records:
        key = re.sub(r"\d+(\.\d+)?", "N", r.reason)
        reasons.setdefault(key, [0, r.reason])[0] += 1
    top = sorted(reasons.values(), key=lambda v: -v[0])[:3]
    return "; ".join(f"{n} x {first}" + (" (and alike)" if n > 1 and re.search(r"\d", first) else "")
                     for n, first in top)


def _feeds(run: _Run, config: CompileConfig) -> list[dict[str, np.ndarray]]:
    """Verification and timing inputs the ORIGINAL model runs on (checked in ONNX Runtime): the
    user's --inputs as given, else seeded random feeds at the --dim values, the defaults, or the
    first usual sizes that fit (``lrcompile.feeds.fit_feeds``); one line when none does."""
    from .feeds import check_feeds, check_runs, fit_feeds, load_feeds, original_runner

    model = run.model
    runs = original_runner(run.src)
    if config.inputs:
        feeds = [check_feeds(model, f, config.inputs) for f in load_feeds(config.inputs)]
        check_runs(runs, feeds, f"--inputs {config.inputs}")
        return feeds
    required = config.verify or config.target in ("ort", "trt") or config.resolved_latency_aware
    fitted = fit_feeds(model, runs, seed=config.seed, dims=config.dims, required=required)
    if fitted.note:
        run.notes.append(fitted.note)
    return [fitted.feeds]


def _feeds_info(feeds_list, config: CompileConfig) -> dict | None:
    if feeds_list is None:
        return None
    from .feeds import DISTRIBUTION, describe

    return {"source": config.inputs or "random", "distribution": None if config.inputs else DISTRIBUTION,
            "seed": config.seed, "batches": len(feeds_list), "inputs": describe(feeds_list[0])}


def _judge(diffs: list[dict] | None, config: CompileConfig):
    """The verdict on the outputs (``lrcompile.verdict``): the user's limits, else the default check."""
    from .verdict import judge

    return judge(diffs, tolerance=config.tolerance, min_cosine=config.min_cosine)


#: What each phase holds in memory (the report's ``memory.bounds``; docs/scale.md#memory). Weights
#: stored as external data are mapped from their file and count in the resident set only while
#: their pages are read; "the largest tensor" below means the largest such weight.
MEMORY_BOUNDS = {
    "load": "the model's protobuf without its external data (tensors stored inside the .onnx file are in memory)",
    "feeds": "the original in ONNX Runtime (it reads every weight into its own memory), run on the candidate feeds",
    "prune": "the model with the pruned MLP pairs' new weights in memory, and their calibration statistics",
    "attention": "the model with the reduced heads' new weights in memory, and their calibration statistics",
    "analyze": "the graph and its candidates: weights stay mapped and unread, except constant subgraphs evaluated "
               "and the copies a candidate keeps of a weight it reads transposed or reshaped (Conv, Gemm transB, "
               "MatMul with the weight on the left): these are in memory until the write",
    "calibrate": "ONNX Runtime running the whole model (it reads every weight into its own memory) and the "
                 "statistics of each candidate's input (K x K per layer); Fisher and curvature evidence too",
    "factorize": "per weight fitted: the weight's pages and the solver's work arrays (a few times the weight), "
                 "plus every value fitted so far; a weight's pages are dropped once it is released after its fit",
    "rewrite": "every factor made, in memory until the write (none is spilled to disk); the weights read are "
               "released and exported as their references to the input's data",
    "distill": "the original and the rewritten model in torch (every weight in memory) and ONNX Runtime",
    "check": "the output written (the protobuf with the new factors inline in memory while serialized, weights "
             "kept copied from the input's data 16 MiB at a time) and onnx.checker reading it by path",
    "verify": "the original and the output in ONNX Runtime at once (both read their weights into memory), "
              "the feeds and both models' outputs",
    "target": "the target's own tool on the output (ORT's optimizer, or TensorRT's builder)",
}


def build_report(res: CompileResult, *, notes: list[str], folded: list[str]) -> dict:
    import onnxruntime

    out = res.output
    return {
        "lrcompile": __version__,
        "status": res.status,
        "input": str(res.input),
        "input_sha256": sha256(res.input),
        "output": str(out) if out else None,
        "output_sha256": sha256(out) if out else None,
        "config": res.config.to_dict(),
        "pipeline": pipeline_string(res.config),
        "totals": totals(res.layers, res.output, res.files),
        "layers": res.layers,
        "verification": {"feeds": res.feeds, "outputs": res.verification},
        "target": res.target,
        "notes": notes,
        "constant_subgraph_nodes_evaluated": folded,
        "timings_s": res.timings,
        "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
    }


def _g(v) -> str:
    """A number in ``%g`` form, a word as it is."""
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)
