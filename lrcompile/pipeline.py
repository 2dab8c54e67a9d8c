"""The compile pipeline. Data flows one way:

    load -> find candidates -> (calibrate) -> factorize (numpy) -> rewrite -> clean up
         -> (distill: torch) -> check -> verify -> save/build

With ``sequential`` calibration the middle three run per stage (candidates sharing an input),
each stage calibrated on the model as rewritten so far.

Nothing here prints: progress goes through tqdm (stderr) and the result comes back as a
``CompileResult`` that the CLI renders.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm.auto import tqdm

from . import __version__
from .config import CompileConfig
from .errors import LrcError, VerificationFailed
from .factorize import METHODS, Factorization, LayerStats, RankPolicy, break_even_rank, factorize
from .factorize.derive import onehot_output_stats, sum_stats, with_output_stats
from .io import atomic_output, commit, load_model, same_file, write_model
from .ir import Candidate, ConstantResolver, Decline, RewriteContext, Namer, node_label
from .pruning import MlpPairs, prune_mlps
from .report import LayerRecord, sha256, totals

log = logging.getLogger(__name__)

@dataclass
class Analysis:
    """What the candidate search found in a model (``lrcompile inspect`` shows this)."""

    graph: gs.Graph
    candidates: list[Candidate]
    declines: list[Decline]
    folded: list[str] = field(default_factory=list)


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


def _subgraph_nodes(graph: gs.Graph):
    for node in graph.nodes:
        for attr in node.attrs.values():
            subs = attr if isinstance(attr, list) else [attr]
            for sub in subs:
                if isinstance(sub, gs.Graph):
                    for inner in sub.nodes:
                        yield node, inner
                    yield from _subgraph_nodes(sub)


def analyze(model: onnx.ModelProto, config: CompileConfig, skip: frozenset[str] = frozenset()) -> Analysis:
    """Import the model and sort its nodes into candidates and declines (reasons as values); nodes
    labelled in ``skip`` (already compressed another way) are neither."""
    from lrcompile.passes import BY_OP

    graph = gs.import_onnx(model)
    consts = ConstantResolver(graph)
    cands: list[Candidate] = []
    declines: list[Decline] = []
    for node in list(graph.nodes):
        p = BY_OP.get(node.op)
        if p is None or node.domain not in (None, "", "ai.onnx"):
            continue
        label = node_label(node)
        if label in skip:
            continue
        if config.only is not None and node.op not in config.only:
            declines.append(Decline(node, p.name, f"op not selected (--only {','.join(config.only)})"))
            continue
        hit = next((pat for pat in config.exclude if re.search(pat, label)), None)
        if hit:
            declines.append(Decline(node, p.name, f"excluded by --exclude {hit!r}"))
            continue
        if config.include and not any(re.search(pat, label) for pat in config.include):
            declines.append(Decline(node, p.name, "name not matched by --include"))
            continue
        m = p.match(node, consts)
        if m is None:
            continue
        if isinstance(m, Candidate) and m.params < config.min_params:
            m = Decline(node, p.name, f"too small to matter ({m.params} params < --min-params {config.min_params})",
                        m.shape)
        (cands if isinstance(m, Candidate) else declines).append(m)
    for parent, inner in _subgraph_nodes(graph):
        if inner.op in BY_OP:
            declines.append(Decline(inner, BY_OP[inner.op].name,
                                    f"inside a {parent.op} body ({node_label(parent)}); subgraphs are not rewritten"))
    return Analysis(graph, cands, declines, consts.folded)


def stat_request(cand: Candidate):
    """``(key, StatRequest)`` for the statistics ``cand``'s weight needs, or None."""
    from .calibrate import StatRequest

    if cand.activation is None:
        return None
    geo = cand.details.get("geometry")
    k = cand.matrices[0].shape[0]
    if cand.details.get("lookup"):
        return f"{cand.activation}|lookup{k}", StatRequest(cand.activation, k, lookup=True)
    if geo is not None:
        return f"{cand.activation}|{geo}", StatRequest(cand.activation, k, geo)
    return cand.activation, StatRequest(cand.activation, k)


def _stats_for(cand: Candidate, method: str, stats: dict[str, list[LayerStats]] | None,
               fisher: dict[str, np.ndarray] | None = None, sharers: list[Candidate] = (),
               curvature=None) -> tuple[str, list[LayerStats | None], str]:
    """The method to use for ``cand``, its statistics per group, and a note when it fell back.

    A weight shared by several nodes is calibrated on all their inputs (``sharers``: the nodes
    with the same weight key), since one factorization serves them all; for ``kfac`` their
    output-gradient Grams add up the same way (``curvature``: a ``fisher.OutputCurvature``)."""
    none = [None] * len(cand.matrices)
    needs = METHODS[method].needs
    if not needs:
        return method, none, ""
    if "grad_gram" in needs:
        base, st, note = _stats_for(cand, "whiten", stats, fisher, sharers)
        if base != "whiten":
            return base, st, note
        gy, why = _grad_gram(cand, sharers, curvature)
        if gy is None:
            return "whiten", st, f"{method}: {why}: whiten"
        return method, [replace(st[0], grad_gram=gy)], ""
    if "fisher" in needs:
        from .fisher import fisher_for_candidate

        f = (fisher or {}).get(cand.weight_key.removesuffix(":T"))
        if f is None:
            return "svd", none, "no Fisher information for this weight: plain SVD"
        return method, [LayerStats(count=0, fisher=m) for m in fisher_for_candidate(cand, f)], ""
    keys = dict.fromkeys(r[0] for r in map(stat_request, [cand, *sharers]) if r is not None)
    found = [stats[k] for k in keys if stats and k in stats]
    st = [sum_stats(list(groups)) for groups in zip(*found)] if found else None
    if st is None:
        return "svd", none, f"no activation statistics for this {cand.node.op} input: plain SVD"
    if cand.details.get("lookup"):  # one-hot rows: G = diag(counts)
        if needs & {"out_sum", "out_gram"}:
            return method, [onehot_output_stats(st[0], cand.matrices[0])], ""
        if "gram" in needs:
            return "rowfreq", st, "lookups: whitening by one-hot rows = frequency-weighted SVD"
        return method, st, ""
    if needs & {"out_sum", "out_gram"}:
        st = [with_output_stats(s, m) for s, m in zip(st, cand.matrices)]
    return method, st, ""


def curvature_tensor(cand: Candidate) -> tuple[str | None, str]:
    """The tensor whose output gradients ``kfac`` reads for ``cand`` (``x @ B`` itself), or None with
    the reason: only right-weight MatMul and Gemm (no transA) outputs are the layer's ``x B``."""
    from .fisher import CURVATURE_OPS

    if cand.node.op not in CURVATURE_OPS or cand.details.get("lookup"):
        return None, f"no output curvature for {cand.node.op} layers"
    if cand.activation is None or len(cand.matrices) != 1 or not cand.node.outputs:
        return None, "no output curvature for a weight on the left or a transposed input"
    return cand.node.outputs[0].name, ""


def _grad_gram(cand: Candidate, sharers: list[Candidate], curvature) -> tuple[np.ndarray | None, str]:
    """Sum of the output-gradient Grams of ``cand`` and the nodes sharing its weight, or the reason."""
    if curvature is None:
        return None, "no output curvature collected"
    n = cand.matrices[0].shape[1]
    total = None
    for label in dict.fromkeys(c.label for c in [cand, *sharers]):
        t = curvature.tensor_of.get(label)
        if t is None:
            return None, curvature.reasons.get(label, "no output curvature for this layer")
        g = curvature.grams.get(t)
        if g is None:
            return None, f"no output curvature at {t!r} ({curvature.reasons.get(t, 'not collected')})"
        if g.shape != (n, n):
            return None, f"output curvature at {t!r} is {list(g.shape)}, the weight has {n} outputs"
        total = g if total is None else total + g
    if not np.trace(total) > 0:
        return None, "the probed output does not depend on this layer (zero output gradients)"
    return total, ""


#: Below this many weight elements BLAS runs single-threaded: small SVDs gain little from threads,
#: and on a busy machine OpenBLAS's spinning threads made them tens of times slower (measured).
SINGLE_THREAD_BELOW = 2048 * 2048


def _factorize_candidate(cand: Candidate, config: CompileConfig, policy: RankPolicy, method: str,
                         st: list[LayerStats | None]) -> list[Factorization]:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1 if cand.matrices[0].size < SINGLE_THREAD_BELOW else None, user_api="blas"):
        return _factorize_groups(cand, config, policy, method, st)


def _factorize_groups(cand: Candidate, config: CompileConfig, policy: RankPolicy, method: str,
                      st: list[LayerStats | None]) -> list[Factorization]:
    opts = {"solver": config.solver, "seed": config.seed, **config.method_options}
    facts = [factorize(m, policy, method, s, **opts) for m, s in zip(cand.matrices, st)]
    r = max(f.rank for f in facts)
    if any(f.rank != r for f in facts):  # groups share one rank: refit the others at it
        fixed = RankPolicy(rank=r, multiple=1)
        facts = [f if f.rank == r else factorize(m, fixed, method, s, **opts)
                 for f, m, s in zip(facts, cand.matrices, st)]
    return facts


def _combined_error(cand: Candidate, facts: list[Factorization], attr: str) -> float:
    num = sum((getattr(f, attr) * float(np.linalg.norm(m))) ** 2 for f, m in zip(facts, cand.matrices))
    den = sum(float(np.linalg.norm(m)) ** 2 for m in cand.matrices)
    return float(np.sqrt(num / den)) if den > 0 else 0.0


@dataclass
class Plan:
    """Per-candidate decisions and the factorizations by weight key (accumulates over stages)."""

    records: list[LayerRecord] = field(default_factory=list)
    by_key: dict[str, list[Factorization]] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)
    declined_keys: dict[str, str] = field(default_factory=dict)


def plan(cands: list[Candidate], config: CompileConfig, *, stats: dict[str, list[LayerStats]] | None = None,
         fisher: dict[str, np.ndarray] | None = None, progress: bool = False, into: Plan | None = None,
         ranks: dict[str, int] | None = None, dense_reasons: dict[str, str] | None = None,
         cache: dict | None = None, curvature=None) -> Plan:
    """Factorize each distinct weight once and decide per candidate.

    Args:
        ranks: weight key -> rank chosen by a planner (``lrcompile.planner``), 0 = keep dense;
            None: each weight's rank comes from the config's rank policy. Keys missing from a
            given dict stay dense.
        dense_reasons: weight key -> why the planner kept it dense (for the report).
        cache: ``(weight key, rank) -> factorizations``, shared by a planner's repeated plans.
    """
    policy = config.policy()
    p = into or Plan()
    dense_reasons = dense_reasons or {}
    sharers: dict[str, list[Candidate]] = {}
    for c in cands:
        sharers.setdefault(c.weight_key, []).append(c)
    for cand in tqdm(cands, desc="factorize", unit="layer", disable=None if progress else True, leave=False):
        rec = LayerRecord(node=cand.label, op=cand.node.op, shape=list(cand.matrices[0].shape),
                          decision="factorized", weight=cand.weight_key, groups=len(cand.matrices),
                          params_before=cand.params, break_even=round(break_even_rank(*cand.matrices[0].shape), 2))
        key = cand.weight_key
        if ranks is not None and not ranks.get(key):
            p.declined_keys.setdefault(key, dense_reasons.get(key, "kept dense by the rank allocation"))
        if key in p.declined_keys:
            rec.decision, rec.reason = "declined", p.declined_keys[key]
            p.records.append(rec)
            continue
        if key in p.by_key:
            facts = p.by_key[key]
            rec.shared_with = p.owner[key]
        else:
            method, st, rec.reason = _stats_for(cand, config.method_for(cand.label), stats, fisher,
                                                sharers[key], curvature)
            t0 = time.perf_counter()
            pol = policy if ranks is None else RankPolicy(rank=int(ranks[key]), multiple=1)
            ck = (key, pol.rank) if cache is not None and pol.rank is not None else None
            if ck is not None and ck in cache:
                facts = cache[ck]
            else:
                facts = _factorize_candidate(cand, config, pol, method, st)
                if ck is not None:
                    cache[ck] = facts
            rec.seconds = round(time.perf_counter() - t0, 4)
        f0 = facts[0]
        rec.rank, rec.method = f0.rank, f0.method
        rec.params_after = sum(f.params_after for f in facts)
        rec.rel_error = _combined_error(cand, facts, "rel_error")
        rec.objective_error = _combined_error(cand, facts, "objective_error")
        rec.info = {k: v for k, v in f0.info.items() if isinstance(v, (int, float, str, bool))}
        if not config.keep_unprofitable and not all(f.pays_off() for f in facts):
            reason = (f"rank {f0.rank} >= break-even {break_even_rank(*f0.shape):.1f} "
                      f"for [{f0.shape[0]} x {f0.shape[1]}]: saves nothing")
            rec.decision, rec.reason = "declined", reason
            p.declined_keys[key] = reason
        elif key not in p.by_key:
            p.by_key[key] = facts
            p.owner[key] = cand.label
        p.records.append(rec)
    return p


def decline_records(declines: list[Decline]) -> list[LayerRecord]:
    return [LayerRecord(node=d.label, op=d.node.op, shape=list(d.shape) if d.shape else None,
                        decision="declined", reason=d.reason) for d in declines]


def apply(ctx: RewriteContext, cands: list[Candidate], p: Plan) -> None:
    """Rewrite every accepted candidate of ``cands``, then one cleanup + toposort."""
    from lrcompile.passes import PASSES

    accepted = {r.node for r in p.records if r.decision == "factorized"}
    for cand in cands:
        if cand.label in accepted and cand.weight_key in p.by_key:
            PASSES[cand.pass_name].rewrite(ctx.graph, cand, p.by_key[cand.weight_key], ctx)
    ctx.graph.cleanup(remove_unused_graph_inputs=False).toposort()


def stages(graph: gs.Graph, cands: list[Candidate]) -> list[list[Candidate]]:
    """Candidates grouped by their activation tensor, in topological order (sequential calibration).
    Candidates without an activation come last, in one group."""
    order = {id(n): i for i, n in enumerate(graph.toposort().nodes)}
    groups: dict[str | None, list[Candidate]] = {}
    for c in sorted(cands, key=lambda c: order.get(id(c.node), 0)):
        groups.setdefault(c.activation, []).append(c)
    tail = groups.pop(None, [])
    return list(groups.values()) + ([tail] if tail else [])


def export(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Export the rewritten graph, keeping every model-level field of the original exactly."""
    model = gs.export_onnx(graph, do_type_check=False)
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, f, getattr(original, f))
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    model.graph.doc_string = original.graph.doc_string
    model.graph.name = original.graph.name
    return model


def check_model(path: Path, original_path: Path) -> list[str]:
    """Full checker and strict shape inference on the output. A check the original itself fails
    is reported as a note instead of an error (it is not ours to fix)."""
    notes = []
    for name, fn in (
        ("onnx.checker (full)", lambda p: onnx.checker.check_model(str(p), full_check=True)),
        ("strict shape inference", lambda p: onnx.shape_inference.infer_shapes_path(
            str(p), str(p) + ".inferred", check_type=True, strict_mode=True, data_prop=True)),
    ):
        try:
            fn(path)
        except Exception as e:  # noqa: BLE001 - onnx raises several types
            try:
                fn(original_path)
            except Exception:  # noqa: BLE001
                notes.append(f"{name} skipped: the original model fails it too")
                continue
            finally:
                Path(str(original_path) + ".inferred").unlink(missing_ok=True)
            raise AssertionError(f"rewritten model fails {name}: {e}") from e
        finally:
            Path(str(path) + ".inferred").unlink(missing_ok=True)
    return notes


def default_output(input_path: Path) -> Path:
    return input_path.with_name(input_path.stem + ".lr.onnx")


def compile_model(input_path: str | Path, output: str | Path | None = None,
                  config: CompileConfig | None = None, *, progress: bool = False) -> CompileResult:
    """Compile one model: see the module docstring. Raises LrcError for user errors."""
    config = config or CompileConfig()
    src = Path(input_path)
    t = {"start": time.perf_counter()}
    model = original = load_model(src)  # ``model`` becomes the pruned one under --prune-mlp F
    out = Path(output) if output is not None else default_output(src)
    if out.suffix != ".onnx":
        raise LrcError(f"output {out} must end in .onnx (the engine is written beside it for --target trt)")
    if same_file(src, out):
        raise LrcError(f"output {out} is the input model; lrcompile never overwrites its input: pass another -o")

    if config.distill:  # fail now, not after the factorization: torch present, the data readable and matching
        from .calibrate import CalibSource, iter_calibration
        from .distill import check_available

        check_available()
        next(iter_calibration(CalibSource(config.distill, 1, 1, flag="--distill"), model), None)
    feeds_list = None
    if config.verify or config.target in ("ort", "trt") or config.flops is not None or config.resolved_latency_aware:
        feeds_list = _feeds(model, config)

    pruned: list[LayerRecord] = []
    pruning = pairs = None
    if config.prune_mlp == "auto":  # the budget's planner chooses each pair's width (lrcompile.pruning)
        pairs = MlpPairs.find(model, config)
        pruning = {"keep": "auto", "pairs": [], "not_pairs": pairs.reasons}
        if not pairs.pairs:
            log.warning("--prune-mlp auto: no MLP pair (Linear -> channel-wise activation -> Linear with constant "
                        "weights) in this model; the budget goes to low rank alone")
    elif config.prune_mlp is not None:
        model, pruned, pruning = prune_mlps(model, config, progress=progress)
        t["prune"] = time.perf_counter()
    analysis = analyze(model, config, skip=frozenset(r.node for r in pruned))
    t["analyze"] = time.perf_counter()
    if not analysis.candidates and not analysis.declines and not pruned and not (pairs and pairs.pairs):
        raise LrcError(f"{src}: no MatMul/Gemm/Conv/Gather node with a constant weight; nothing to compress")
    ctx = RewriteContext(analysis.graph, Namer(analysis.graph))
    fisher = _fisher(model, analysis.candidates, config, progress=progress)
    curvature = _curvature(model, analysis.candidates, config, progress=progress)
    calib_info = None
    planner = plan_info = None
    if config.calib and config.sequential:
        ranks = reasons = None
        if config.budget is not None or config.resolved_latency_aware:
            # the ranks come from one-shot statistics (the planner's error curves and sensitivities);
            # the factors are then fitted stage by stage on the partly compressed model
            stats0, _ = _calibrate(model, analysis.candidates, config, progress=progress, pairs=pairs)
            p0, planner, plan_info = _plan_ranks(model, analysis, config, stats0, fisher, feeds_list,
                                                 progress=progress, curvature=curvature, pairs=pairs)
            ranks = {r.weight: (r.rank if r.decision == "factorized" else 0) for r in p0.records}
            reasons = dict(p0.declined_keys)
            if pairs and pairs.pairs:  # prune the chosen widths first: the stages then fit the rest on it
                model, pruned, pruning["pairs"], analysis = _prune_chosen(pairs, model, planner, config,
                                                                          progress=progress)
                ctx = RewriteContext(analysis.graph, Namer(analysis.graph))
        p, calib_info = Plan(), {"mode": "sequential", "stages": []}
        for stage in tqdm(stages(analysis.graph, analysis.candidates), desc="sequential calibration",
                          unit="stage", disable=None if progress else True, leave=False):
            stats = None
            if stage[0].activation is not None:
                # target correction: fit to the original's outputs once anything was rewritten
                stats, info = _calibrate(export(analysis.graph, model), stage, config, progress=False,
                                         reference=model if p.by_key else None)
                calib_info["stages"].append(info)
            plan(stage, config, stats=stats, fisher=fisher, into=p, ranks=ranks, dense_reasons=reasons,
                 curvature=curvature)
            apply(ctx, stage, p)
        if ranks is not None:  # carry the planner's per-layer details over to the final records
            before = {r.node: r for r in p0.records}
            for r in p.records:
                b = before.get(r.node)
                if b is not None:
                    r.sensitivity, r.predicted_loss, r.probes = b.sensitivity, b.predicted_loss, b.probes
                    r.flops_before, r.latency = b.flops_before, b.latency
                    r.flops_after = b.flops_after if r.decision == "factorized" else b.flops_before
        t["calibrate"] = t["factorize"] = time.perf_counter()
    else:
        stats = None
        if config.calib:
            stats, calib_info = _calibrate(model, analysis.candidates, config, progress=progress, pairs=pairs)
            calib_info["mode"] = "one-shot"
            t["calibrate"] = time.perf_counter()
        p, planner, plan_info = _plan_ranks(model, analysis, config, stats, fisher, feeds_list, progress=progress,
                                            curvature=curvature, pairs=pairs)
        if pairs and pairs.pairs:  # write the chosen widths, then the ranks onto the pruned model
            _, pruned, pruning["pairs"], analysis = _prune_chosen(pairs, model, planner, config, progress=progress)
            ctx = RewriteContext(analysis.graph, Namer(analysis.graph))
            p = plan(analysis.candidates, config, stats=stats, fisher=fisher, ranks=planner.ranks,
                     curvature=curvature, dense_reasons=planner.dense_reasons, cache=planner.cache)
            planner.annotate(p.records, planner.ranks)
        t["factorize"] = time.perf_counter()
        if p.by_key:
            apply(ctx, analysis.candidates, p)
    records = pruned + p.records + decline_records(analysis.declines)
    if not p.by_key and not any(r.decision == "pruned" for r in pruned):
        slow = any("not faster" in r.reason for r in records)
        raise LrcError(f"{src}: every candidate was declined ({_decline_summary(records)}); "
                       + ("pass --size-only to compress them anyway, or " if slow else "")
                       + "loosen the rank policy (e.g. --ratio 0.5) or --min-params")
    new = export(analysis.graph, model)
    t["rewrite"] = time.perf_counter()
    distill_info = None
    if config.distill:
        new, distill_info = _distill(original, new, config, progress=progress)
        t["distill"] = time.perf_counter()
    if planner is not None and (config.calib or config.val):
        ev = planner.evaluator(search=config.budget == "max_drop")
        m = ev.measure(new)
        plan_info["final"] = {"metric": ev.describe(), "value": m.value, "drop": m.drop,
                              "rel_l2_sq": m.rel_l2_sq, "samples": m.samples}

    target_info: dict = {}
    with atomic_output(out) as tmp:
        files = write_model(new, tmp / out.name, external_data=config.external_data)
        notes = check_model(tmp / out.name, src)
        t["check"] = time.perf_counter()
        diffs = None
        if config.verify:
            from .verify import compare

            diffs = [d.to_dict() for d in compare(src, tmp / out.name, feeds_list)]
            t["verify"] = time.perf_counter()
        status, failures = _judge(diffs, config)
        if status != "FAILED":
            target_info, extra = _build_target(config, src, tmp / out.name, out.parent, feeds_list)
            files += extra
        t["target"] = time.perf_counter()
        committed = commit(files, out.parent) if status != "FAILED" else []
    result = CompileResult(
        config=config, input=src, output=out if committed else None, files=committed, layers=records,
        verification=diffs, feeds=_feeds_info(feeds_list, config), target=target_info, status=status,
        timings={k: round(v - t["start"], 3) for k, v in t.items() if k != "start"}, report={},
    )
    result.report = build_report(result, notes=notes + failures, folded=analysis.folded)
    if curvature is not None:
        calib_info = {**(calib_info or {}), "output_curvature": curvature.info}
    result.report["calibration"] = calib_info
    result.report["plan"] = plan_info
    result.report["mlp_pruning"] = pruning
    result.report["distillation"] = distill_info
    if status == "FAILED":
        raise VerificationFailed("verification FAILED: " + "; ".join(failures)
                                 + " (no output written; relax the rank policy or the tolerance)", result=result)
    return result


def _prune_chosen(pairs: MlpPairs, model: onnx.ModelProto, planner, config: CompileConfig, *, progress: bool
                  ) -> tuple[onnx.ModelProto, list[LayerRecord], list[dict], Analysis]:
    """``--prune-mlp auto``: the model with the planner's widths written, the pruned layers' records
    (annotated by the planner), the report rows, and the analysis of the other layers on it."""
    pmodel, records, rows = pairs.prune(model, planner.ranks, reason="--prune-mlp auto", progress=progress)
    planner.annotate(records, planner.ranks)
    return pmodel, records, rows, analyze(pmodel, config, skip=pairs.pruned_labels(planner.ranks))


def _plan_ranks(model: onnx.ModelProto, analysis: Analysis, config: CompileConfig, stats, fisher, feeds_list,
                *, progress: bool, curvature=None, pairs=None):
    """The plan under the config's rank policy or global budget, with latency limits when asked.

    Returns ``(plan, planner or None, plan section of the report or None)``."""
    cands = analysis.candidates
    if config.budget is None and not config.resolved_latency_aware:
        return plan(cands, config, stats=stats, fisher=fisher, progress=progress, curvature=curvature), None, None
    from . import planner as pl

    timing = pl.timing_feeds(model, _timing_feed(model, config, feeds_list), config.latency_batches) \
        if config.resolved_latency_aware else None
    if config.budget is None:
        p = plan(cands, config, stats=stats, fisher=fisher, progress=progress, curvature=curvature)
        info = {"budget": None, "latency": pl.latency_declines(p, model, cands, timing, config, progress=progress)}
        return p, None, info
    planner = pl.Planner(model, cands, config, stats=stats, fisher=fisher, curvature=curvature,
                         feed=feeds_list[0] if feeds_list else None, progress=progress, pairs=pairs)
    if timing is not None:
        planner.limit_latency(timing)
    ranks = planner.run()
    p = plan(cands, config, stats=stats, fisher=fisher, progress=progress, ranks=ranks, curvature=curvature,
             dense_reasons=planner.dense_reasons, cache=planner.cache)
    planner.annotate(p.records, ranks)
    return p, planner, planner.info


def _timing_feed(model: onnx.ModelProto, config: CompileConfig, feeds_list) -> dict[str, np.ndarray]:
    """The user's shapes for timing: --inputs, else a calibration batch, else the verification feed."""
    if not config.inputs and config.calib:
        from .calibrate import CalibSource, iter_calibration

        first = next(iter_calibration(CalibSource(config.calib, config.calib_samples, config.calib_batch), model),
                     None)
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


def _calibrate(model: onnx.ModelProto, cands: list[Candidate], config: CompileConfig, *, progress: bool,
               reference: onnx.ModelProto | None = None, pairs: MlpPairs | None = None
               ) -> tuple[dict[str, list[LayerStats]], dict]:
    """Activation statistics of the candidates' inputs on the calibration data; with ``reference``
    (the original of a partly compressed ``model``) also the cross statistics of target correction;
    with ``pairs``, their hidden activations' statistics too, in the same pass (into ``pairs.stats``)."""
    from .calibrate import CalibSource, collect_stats, iter_calibration

    requests = dict(r for r in map(stat_request, cands) if r is not None)
    requests.update(pairs.requests() if pairs else {})
    if not requests:
        return {}, {"samples": 0, "layers": 0}
    mask = _mask_input(model, config)
    src = CalibSource(config.calib, config.calib_samples, config.calib_batch)
    stats, info = collect_stats(model, requests, iter_calibration(src, model), mask_input=mask, progress=progress,
                                total=config.calib_samples, reference=reference)
    if pairs:
        pairs.stats.update({k: stats.pop(k)[0] for k in pairs.pairs})
    return stats, info


def _mask_input(model: onnx.ModelProto, config: CompileConfig) -> str | None:
    from .calibrate import default_mask_input

    return default_mask_input(model) if config.mask_input == "auto" else (
        None if config.mask_input in (None, "none") else config.mask_input)


def _curvature(model: onnx.ModelProto, cands: list[Candidate], config: CompileConfig, *, progress: bool):
    """Output-gradient Grams (``fisher.OutputCurvature``) when some layer's method needs them
    (``kfac``); None otherwise. The probed output is ``--metric-output`` when named, else the first.
    Layers whose output is not ``x B`` (convs, left weights) get a reason and fall back to whiten."""
    users = {c.weight_key for c in cands if "grad_gram" in METHODS[config.method_for(c.label)].needs}
    if not users:
        return None
    from . import fisher as fz
    from .calibrate import CalibSource, iter_calibration

    tensor_of, reasons = {}, {}
    for c in cands:
        if c.weight_key in users:
            t, why = curvature_tensor(c)
            if t is None:
                reasons[c.label] = why
            else:
                tensor_of[c.label] = t
    if not tensor_of:
        return fz.OutputCurvature(reasons=reasons, info={"tensors": 0})
    src = CalibSource(config.calib, config.calib_samples, config.calib_batch)
    res = fz.collect_output_curvature(
        model, sorted(set(tensor_of.values())), iter_calibration(src, model), output=config.metric_output,
        probes=config.probes, seed=config.seed, mask_input=_mask_input(model, config), progress=progress,
        total=config.calib_samples)
    res.tensor_of = tensor_of
    res.reasons.update(reasons)
    return res


def _fisher(model: onnx.ModelProto, cands: list[Candidate], config: CompileConfig, *, progress: bool
            ) -> dict[str, np.ndarray] | None:
    """Fisher information by weight name, when some layer's method needs it."""
    if not config.fisher or not any("fisher" in METHODS[config.method_for(c.label)].needs for c in cands):
        return None
    from . import fisher as fz

    names = sorted({c.weight_key.removesuffix(":T") for c in cands
                    if "fisher" in METHODS[config.method_for(c.label)].needs})
    if config.fisher != "collect":
        shapes = {}
        for c in cands:
            n = c.weight_key.removesuffix(":T")
            if n in names:
                shapes[n] = c.details.get("wshape") or (c.matrices[0].T.shape if c.weight_key.endswith(":T")
                                                         else c.matrices[0].shape)
        return fz.load_fisher_npz(config.fisher, shapes)
    from .calibrate import CalibSource, iter_calibration

    src = CalibSource(config.calib, config.calib_samples, config.calib_batch)
    labels = fz.load_labels(config.calib, config.labels)
    return fz.collect_fisher(model, names, iter_calibration(src, model), labels, loss=config.loss,
                             output=config.fisher_output, progress=progress, total=config.calib_samples)


def _distill(original: onnx.ModelProto, new: onnx.ModelProto, config: CompileConfig, *, progress: bool
             ) -> tuple[onnx.ModelProto, dict]:
    """``--distill``: the rewritten model with its new tensors trained against the original."""
    from .calibrate import CalibSource, iter_calibration
    from .distill import distill

    src = CalibSource(config.distill, config.distill_samples, config.distill_batch, flag="--distill")
    res = distill(original, new, iter_calibration(src, original), epochs=config.distill_epochs,
                  lr=config.distill_lr, seed=config.seed, match=config.distill_match,
                  mask_input=_mask_input(original, config),
                  progress=progress)
    return res.model, res.info


def _decline_summary(records: list[LayerRecord]) -> str:
    reasons: dict[str, int] = {}
    for r in records:
        key = re.sub(r"\d+(\.\d+)?", "N", r.reason)
        reasons[key] = reasons.get(key, 0) + 1
    return "; ".join(f"{n} x {k}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])


def _feeds(model: onnx.ModelProto, config: CompileConfig) -> list[dict[str, np.ndarray]]:
    from .feeds import check_feeds, load_feeds, random_feeds

    if config.inputs:
        return [check_feeds(model, f, config.inputs) for f in load_feeds(config.inputs)]
    return [random_feeds(model, seed=config.seed, dims=config.dims)]


def _feeds_info(feeds_list, config: CompileConfig) -> dict | None:
    if feeds_list is None:
        return None
    from .feeds import DISTRIBUTION, describe

    return {"source": config.inputs or "random", "distribution": None if config.inputs else DISTRIBUTION,
            "seed": config.seed, "batches": len(feeds_list), "inputs": describe(feeds_list[0])}


def _judge(diffs: list[dict] | None, config: CompileConfig) -> tuple[str, list[str]]:
    if diffs is None:
        return "UNVERIFIED", []
    fails = []
    for d in diffs:
        if config.tolerance is not None and not d["rel_l2"] <= config.tolerance:
            fails.append(f"output {d['name']!r} rel L2 error {d['rel_l2']:.3e} > --tolerance {config.tolerance:g}")
        if config.min_cosine is not None and not d["cosine"] >= config.min_cosine:
            fails.append(f"output {d['name']!r} cosine {d['cosine']:.6f} < --min-cosine {config.min_cosine:g}")
    return ("FAILED" if fails else "PASSED"), fails


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
        "pipeline": ((f"prune-mlp{{keep={_g(res.config.prune_mlp)}}}," if res.config.prune_mlp is not None else "")
                     + "analyze," + ("calibrate," if res.config.calib else "")
                     + f"{res.config.resolved_method}{{{res.config.describe_ranks()},multiple={res.config.multiple}}},"
                    "rewrite,cleanup,check" + (",verify" if res.config.verify else "") + f",target={res.config.target}"),
        "totals": totals(res.layers),
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
