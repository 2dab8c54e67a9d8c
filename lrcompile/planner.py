"""Rank planning under a global budget: ``--params``, ``--flops``, ``--max-drop``, latency limits.

Users think "half the size", "no more than 0.1% AUC lost", "faster on this target", not in
per-layer ranks. The planner turns those into ranks, one weight at a time:

1. **Error curves.** Each distinct weight is decomposed once, in full, by its method (whitened SVD
   with calibration data, ...). The spectrum of the matrix the method decomposes gives the
   method's relative objective error at every rank for free: ``err^2(r) = tail_r / total``.
2. **Sensitivity.** How much a layer's error costs end to end differs by orders of magnitude
   (MiniLM at 50%: compressing the FFN down projections alone costs 7x the cosine of the
   query/key ones). With calibration data each layer is compressed *alone* at two ranks, the
   model is run on a few calibration samples, and the metric change fitted as
   ``drop ~= s_l err_l^2(r)`` (a least-squares slope through the origin).
3. **Allocation.** The predicted drop ``sum_l s_l err_l^2(r_l)`` is minimised under the budget by a
   knapsack over each layer's choices (``lrcompile.factorize.allocate``); latency limits remove
   the ranks that would not be faster on the target.
4. **Accuracy budget.** ``--max-drop`` bisects the parameter budget, building and measuring each
   model on the validation data, and keeps the smallest that stays within the drop.

The numpy math lives in ``lrcompile.factorize.allocate``; this module only gathers its inputs
from the model and turns its answer into ranks for ``engine.Plan``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from tqdm.auto import tqdm

from .config import CompileConfig
from .engine import Evidence, Plan, attached, build, detached, sharers
from .errors import LrcError
from .factorize import LayerStats
from .factorize.allocate import Allocation, LayerOptions, allocate, allocate_threshold, min_cost
from .forms import CONV_FORMS, DEFAULT, FORMS, LAYER_OPS
from .ir import Candidate, node_label
from .parallel import InProcess, Task
from .weights import folder, reading

log = logging.getLogger(__name__)

#: Where a sensitivity is measured: the uniform rank of the budget and half of it.
PROBE_FRACTIONS = (1.0, 0.5)
#: Metrics whose change is a smooth (second-order) function of small output errors and so adds up
#: across layers; for the others (step functions like top-1 and AUC, or maxima) sensitivity is
#: measured on the squared relative L2 error of the metric's output instead.
ADDITIVE = ("cosine", "logloss")


@dataclass
class Layer:
    """One distinct weight and everything the planner knows about it."""

    key: str
    cands: list[Candidate]
    method: str
    stats: list[LayerStats | None]
    note: str
    spectra: list[np.ndarray]
    totals: list[float]
    grid: np.ndarray
    params: np.ndarray
    dense_params: int
    err2: np.ndarray
    has_bias: bool
    rows: dict[str, float] = field(default_factory=dict)  # candidate label -> rows per inference
    sensitivity: float = 1.0
    probes: list[dict] = field(default_factory=list)
    fast_rank: int | None = None  # largest rank faster than dense on the target (None: not timed)
    latency: list[dict] = field(default_factory=list)
    pair: object | None = None  # an MLP pair (``passes.mlp.MlpPair``): the grid holds hidden widths
    form: object | None = None  # the form whose sizes the grid holds (``lrcompile.forms``)

    @property
    def label(self) -> str:
        return self.pair.label if self.pair is not None else self.cands[0].label

    @property
    def site(self):
        """What the form replaces: the MLP pair, or the weight (its first candidate)."""
        return self.pair if self.pair is not None else self.cands[0]

    def probe_scale(self) -> float:
        """What the budget's fraction multiplies to give a probe (the break-even rank, the width)."""
        return self.form.probe_scale(self.site)

    def loss(self) -> np.ndarray:
        return self.sensitivity * self.err2

    def flops(self, sizes: np.ndarray) -> tuple[float, np.ndarray]:
        """Dense FLOPs and FLOPs at each size, summed over the nodes sharing the weight (a pair:
        both layers, on the up layer's rows)."""
        if self.pair is not None:
            rows = next(iter(self.rows.values()), None)
            if rows is None:
                raise LrcError(f"cannot count the FLOPs of {self.label} at the verification shapes; use --params")
            return self.form.flops(self.pair, sizes, rows)
        dense, fact = 0.0, np.zeros(len(sizes))
        for c in self.cands:
            rows = self.rows.get(c.label)
            if rows is None:
                raise LrcError(f"cannot count the FLOPs of {c.label} at the verification shapes; use --params")
            d, f = self.form.flops(c, sizes, rows)
            dense, fact = dense + d, fact + f
        return dense, fact


def layer_forms(cand: Candidate, config: CompileConfig) -> list:
    """The forms the planner prices for ``cand``'s weight: the one ``--form`` / ``--layer-form``
    gives it; under ``auto``, every registered layer form for its op. A form that refuses the
    candidate (``refuses``: e.g. N:M on a reduction axis that M does not divide) is not priced."""
    name = config.form_for(cand.label)
    forms = [f for f in FORMS.values() if cand.pass_name in f.ops and set(f.ops) & set(LAYER_OPS)] \
        if name == "auto" else [FORMS[name]] if cand.pass_name in FORMS[name].ops else []
    kept = [f for f in forms if not (hasattr(f, "refuses") and f.refuses(cand, form_knobs(f, config)))]
    if not kept and name in CONV_FORMS:  # a conv form names what k x k convs become; others keep the default
        return [FORMS[DEFAULT]]
    return kept


def form_knobs(form, config: CompileConfig) -> dict:
    """The config values a form reads (its ``knobs``)."""
    return {k: getattr(config, k) for k in getattr(form, "knobs", ())}


def fit_full_unit(form: str, cand: Candidate, method: str, stats: list, options: dict):
    """The full decomposition of ``cand``'s weight in ``form``: a task of ``lrcompile.parallel``
    (a weight that came as a file reference is mapped here and released after)."""
    with attached(cand) as cand:
        return FORMS[form].fit_full(cand, method, stats, options)


def trial_unit(ev, model: bytes, base) -> object:
    """One sensitivity trial, a task of ``lrcompile.parallel``: ``ev`` (an ``Evaluator``, its data
    and reference outputs) measures the serialized trial model, whose external data is read from
    ``base``."""
    with reading(base):
        return ev.measure(onnx.load_from_string(model))


def build_layers(cands: list[Candidate], config: CompileConfig, evidence: Evidence | None, *, progress: bool,
                 runner=None) -> list[Layer]:
    """One entry per distinct weight and form: the weight decomposed in full in that form (a task
    of ``runner``), its error at every size read off the result (a spectrum's tail for low rank)."""
    evidence = evidence or Evidence()
    layers = []
    opts = {"solver": config.solver, "seed": config.seed, **config.method_options}
    jobs = []
    for key, group in sharers(cands).items():
        cand = group[0]
        method, st, note = evidence.for_layer(cand, config.method_for(cand.label), group)
        for form in layer_forms(cand, config):
            jobs.append((key, group, method, st, note, form, form_knobs(form, config)))
    tasks = (Task(group[0].label, fit_full_unit, (form.name, detached(group[0]), method, st, {**opts, **knobs}))
             for key, group, method, st, note, form, knobs in jobs)  # made as the runner has room
    fulls = (runner or InProcess()).imap(tasks, what="spectra", progress=progress)
    for (key, group, method, st, note, form, knobs), full in zip(jobs, fulls):
        cand = group[0]
        grid = form.sizes(cand, config.multiple, knobs) if knobs else form.sizes(cand, config.multiple)
        has_bias = full[0].bias is not None
        err2, spectra = form.curve(full, grid)
        layers.append(Layer(key=key, cands=group, method=method, stats=st, note=note, spectra=spectra,
                            totals=[float(np.sum(x**2)) for x in spectra], grid=grid,
                            params=form.params(cand, grid, bias=has_bias), dense_params=cand.params,
                            err2=err2, has_bias=has_bias, form=form))
    return layers


def pair_layers(pairs, config: CompileConfig, *, progress: bool) -> list[Layer]:
    """One planner entry per multi-layer site (``lrcompile.sites``): an MLP pair, whose choices
    are the hidden widths below the full one (multiples of ``--multiple``) and its error curve the
    channel refit's; or an attention QK/OV pair, whose choices are head dimensions (``forms.heads``)."""
    layers = []
    for key, pr in tqdm(pairs.pairs.items(), desc="pair curves", unit="pair",
                        disable=None if progress else True, leave=False):
        form = pairs.form(key)
        grid = form.sizes(pr, config.multiple)
        err2 = pairs.curve(key, grid) if len(grid) else np.zeros(0)
        layers.append(Layer(key=key, cands=[], method="prune" if form.name == "channels" else form.name, stats=[pairs.stats.get(key)], note="",
                            spectra=[], totals=[], grid=grid, params=form.params(pr, grid), dense_params=pr.params(),
                            err2=err2, has_bias=False, pair=pr, form=form))
    return layers


def count_rows(model: onnx.ModelProto, cands: list[Candidate], feed: dict[str, np.ndarray]) -> dict[str, float]:
    """Rows each candidate processes per inference at the feed's shapes (FLOPs = 2 x rows x params)."""
    from .flops import count_flops, fix_input_shapes, infer_shapes

    shapes = {k: tuple(v.shape) for k, v in feed.items()}
    nodes = {n["name"]: n["flops"] for n in count_flops(model, shapes)["nodes"]}
    tensor_shapes = None
    rows = {}
    for c in cands:
        if c.details.get("lookup"):
            if tensor_shapes is None:
                tensor_shapes = infer_shapes(fix_input_shapes(model, shapes))
            idx = tensor_shapes.get(c.activation or "")
            if idx is not None:
                rows[c.label] = float(np.prod(idx))
        elif c.label in nodes:
            rows[c.label] = nodes[c.label] / (2.0 * sum(m.shape[0] * m.shape[1] for m in c.matrices))
    return rows


class Planner:
    """Chooses ranks for ``cands`` under the config's budget (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, cands: list[Candidate], config: CompileConfig, *,
                 evidence: Evidence | None = None, feed: dict[str, np.ndarray] | None = None,
                 progress: bool = False, pairs=None, runner=None) -> None:
        self.model, self.config, self.evidence = model, config, evidence or Evidence()
        self.runner = runner or InProcess()
        self.pairs = pairs if pairs is not None and pairs.pairs else None
        self.ranks: dict[str, int] = {}
        self.forms: dict[str, str] = {}  # key -> the chosen form, where a key's choices span several
        self._groups: dict[str, list[dict[str, tuple[str, int]]]] = {}  # key -> its choices, decoded
        self.progress = progress
        self.cache: dict = {}  # (weight key, rank) -> factorizations, shared by every plan built
        self.info: dict = {"budget": config.budget, "allocation": config.resolved_allocation}
        t0 = time.perf_counter()
        self.layers = build_layers(cands, config, self.evidence, progress=progress, runner=self.runner)
        if self.pairs is not None:
            self.layers += pair_layers(self.pairs, config, progress=progress)
            kinds = getattr(self.pairs, "kinds", {"mlp": self.pairs})
            for name, k in kinds.items():
                if k.pairs:
                    self.info["mlp_pairs" if name == "mlp" else f"{name}_pairs"] = len(k.pairs)
        self.info["spectra_seconds"] = round(time.perf_counter() - t0, 3)
        if config.flops is not None and feed is None:
            raise AssertionError("a FLOPs budget needs the verification feed's shapes")
        if feed is not None:  # FLOPs per layer: the budget's cost under --flops, the plan's report otherwise
            try:
                rows = count_rows(model, cands, feed)
            except LrcError:
                if config.flops is not None:
                    raise
                rows = {}
            for layer in self.layers:
                labels = [node_label(layer.pair.up.node)] if layer.pair is not None else [c.label for c in layer.cands]
                layer.rows = {label: rows.get(label) for label in labels}
        self.dense_reasons: dict[str, str] = {}
        self._sens_eval = None
        self._search_eval = None

    # ------------------------------------------------------------------ building and measuring models

    def build(self, ranks: dict[str, int], forms: dict[str, str] | None = None) -> onnx.ModelProto:
        """The model with these sizes (ranks, MLP pair widths; 0: dense) in these forms (missing:
        the default), on a fresh import of the model with those pairs pruned."""
        model, skip = self.model, frozenset()
        if self.pairs is not None:
            model, _, _ = self.pairs.prune(model, ranks, reason="planner")
            skip = self.pairs.pruned_labels(ranks)
        new, _ = build(model, self.config, ranks, forms=forms, evidence=self.evidence, skip=skip,
                       dense_reasons=self.dense_reasons, cache=self.cache, base=self.model, runner=self.runner)
        return new

    def evaluator(self, *, search: bool):
        """The metric on the sensitivity samples (calibration data) or on the search data (--val)."""
        from .evaluate import Evaluator

        cfg = self.config
        attr = "_search_eval" if search else "_sens_eval"
        if getattr(self, attr) is None:
            data = (cfg.val or cfg.calib) if search else cfg.calib
            samples = cfg.val_samples if search and cfg.val else (cfg.calib_samples if search
                                                                  else cfg.sensitivity_samples)
            if not search and cfg.calib_samples:
                samples = min(samples, cfg.calib_samples)
            ev = Evaluator(self.model, data, cfg.metric or "rel-l2", output=cfg.metric_output,
                           labels=cfg.labels if data == cfg.calib else cfg.val_labels, samples=samples,
                           batch_size=cfg.calib_batch, script=cfg.metric_script)
            setattr(self, attr, ev)
        return getattr(self, attr)

    def _signal(self, m) -> float:
        """The sensitivity signal of a measurement: the metric drop when it adds up across layers."""
        return float(m.drop) if (self.config.metric or "rel-l2") in ADDITIVE else float(m.rel_l2_sq)

    # ------------------------------------------------------------------ the three inputs of allocation

    def measure_sensitivity(self, fraction: float) -> None:
        """Compress each layer alone at the budget's uniform rank and half of it; fit ``s_l``."""
        ev = self.evaluator(search=False)
        jobs = []
        for layer in self.layers:
            if layer.fast_rank is not None and (not len(layer.grid) or layer.fast_rank < layer.grid[0]):
                continue  # kept dense for latency: its sensitivity does not matter
            for f in PROBE_FRACTIONS:
                r = _grid_at_most(layer.grid, f * fraction * layer.probe_scale())
                if r and all(p["rank"] != r for p in layer.probes):
                    layer.probes.append({"rank": r})
                    jobs.append((layer, layer.probes[-1]))
        t0 = time.perf_counter()

        def trial(layer: Layer, probe: dict) -> onnx.ModelProto:
            ranks = {x.key: 0 for x in self.layers}  # 0: dense (a pair: whole)
            ranks[layer.key] = probe["rank"]
            return self.build(ranks, {layer.key: layer.form.name})

        if isinstance(self.runner, InProcess):  # one model at a time, here
            measured = (ev.measure(trial(layer, probe)) for layer, probe in jobs)
        else:  # built here, measured there: the next models are built while the workers measure
            measured = self.runner.imap((Task(f"{layer.label} at size {probe['rank']}", trial_unit,
                                              (ev, trial(layer, probe).SerializeToString(), folder()))
                                         for layer, probe in jobs), what="sensitivity trial")
        for (layer, probe), m in zip(tqdm(jobs, desc="sensitivity", unit="model", leave=False,
                                          disable=None if self.progress else True), measured):
            probe["err2"] = float(layer.err2[np.searchsorted(layer.grid, probe["rank"])])
            probe["signal"] = self._signal(m)
            probe["metric"] = float(m.value)
        for layer in self.layers:
            e = np.array([p["err2"] for p in layer.probes])
            d = np.array([p["signal"] for p in layer.probes])
            layer.sensitivity = float(e @ d / (e @ e)) if e.size and e @ e > 0 else 0.0
        pos = [x.sensitivity for x in self.layers if x.sensitivity > 0]
        floor = 1e-2 * float(np.median(pos)) if pos else 1.0
        for layer in self.layers:  # a layer that measured as free still has a cost at lower ranks
            layer.sensitivity = max(layer.sensitivity, floor)
        self.info["sensitivity"] = {"models": len(jobs), "seconds": round(time.perf_counter() - t0, 3),
                                    "samples": ev.describe().get("samples"), "signal": (
                                        "metric drop" if (self.config.metric or "rel-l2") in ADDITIVE
                                        else "relative L2 error squared"), "floor": floor}

    def limit_latency(self, feeds_by_batch: dict[int, dict[str, np.ndarray]]) -> None:
        """Time every layer dense and factorized; keep only ranks that are faster at every batch."""
        from . import latency

        points = {}
        timed = [x for x in self.layers if x.pair is None and hasattr(x.form, "random")]  # random values to time
        for layer in timed:
            g = layer.grid
            pick = sorted({int(g[i]) for i in np.linspace(0, len(g) - 1, min(4, len(g))).round().astype(int)}) if len(g) else []
            for c in layer.cands:
                points.setdefault(c.label, {})[layer.form.name] = pick
        cache = latency.TimingCache(None if self.config.timing_cache in (None, "") else self.config.timing_cache,
                                    enabled=self.config.timing_cache != "none")
        backend = latency.timing_backend(self.config.latency_backend, self.config.target)
        t0 = time.perf_counter()
        timings = {}  # form name -> label -> timings (each form's sizes timed with its own structure)
        for name in dict.fromkeys(x.form.name for x in timed):
            group = [x for x in timed if x.form.name == name]
            timings[name] = latency.time_layers(
                self.model, [c for x in group for c in x.cands], feeds_by_batch,
                {c.label: points[c.label][name] for x in group for c in x.cands}, cache=cache, progress=self.progress,
                form=name, form_options=form_knobs(group[0].form, self.config) or None, backend=backend)
        cache.save()
        for layer in timed:
            fast, rows = None, []
            for c in layer.cands:
                for t in timings[layer.form.name].get(c.label, []):
                    fr = t.fast_rank()
                    fast = fr if fast is None else min(fast, fr)
                    rows.append({"node": c.label, "batch": t.batch, "dense_ms": t.dense_ms,
                                 "ranks": list(t.ranks), "factorized_ms": list(t.factorized_ms), "fast_rank": fr})
            layer.latency = rows
            layer.fast_rank = fast
            if fast is not None and (not len(layer.grid) or fast < layer.grid[0]):
                slow = max(rows, key=lambda r: r["factorized_ms"][0] / max(r["dense_ms"], 1e-9)) if rows else None
                size = "rank" if layer.form.name == DEFAULT else f"{layer.form.name} size"
                why = (f"at batch {slow['batch']} dense {slow['dense_ms']:.3f} ms, {size} {slow['ranks'][0]} "
                       f"{slow['factorized_ms'][0]:.3f} ms" if slow and slow["ranks"] else "")
                before = self.dense_reasons.get(layer.key)
                if before and before.startswith("not faster factorized") and why:  # several forms: each one's
                    self.dense_reasons[layer.key] = f"{before}; {why}"
                else:
                    self.dense_reasons[layer.key] = (f"not faster factorized on {backend.describe()}: {why}"
                                                     if why else "not faster factorized on this target")
        self.info["latency"] = {"target": backend.describe(), "batches": sorted(feeds_by_batch),
                                "seconds": round(time.perf_counter() - t0, 3), "cache": str(cache.path),
                                "cache_hits": cache.hits, "cache_misses": cache.misses}

    def _options(self, layer: Layer, cost: str) -> LayerOptions:
        keep = np.ones(len(layer.grid), bool)
        if layer.fast_rank is not None:
            keep &= layer.grid <= layer.fast_rank
        g = layer.grid[keep]
        if cost == "flops":
            dense, c = layer.flops(g)
        else:
            dense, c = float(layer.dense_params), layer.params[keep]
        s = np.sort(np.concatenate(layer.spectra))[::-1] if layer.spectra else None  # none for a pair
        return LayerOptions(layer.key, g, c, layer.loss()[keep], dense, spectrum=s)

    def options(self, cost: str) -> list[LayerOptions]:
        """One entry per site (a weight, or an MLP pair with its two layers' weights) whose choices
        exclude each other: every (form, size) of the site, and for a pair its pruned widths or any
        choices of its two layers (the Pareto front of their combinations); ``allocate`` decodes
        those choices. A weight with a single form keeps its sizes as its choice ids."""
        per_key: dict[str, list[Layer]] = {}
        for layer in self.layers:
            per_key.setdefault(layer.key, []).append(layer)
        single: dict[str, LayerOptions] = {}
        tables: dict[str, list[dict[str, tuple[str, int]]]] = {}
        for key, ls in per_key.items():
            if len(ls) == 1:
                single[key] = self._options(ls[0], cost)
            else:
                single[key], tables[key] = _exclusive(key, [(x.form.name, self._options(x, cost)) for x in ls])
        self._groups = {}
        if self.pairs is None:
            self._groups = tables
            return list(single.values())
        weights = {c.label: x for x in self.layers if x.pair is None for c in x.cands}
        grouped: set[str] = set()
        out = []
        for layer in self.layers:
            if layer.pair is None:
                continue
            parts = [weights.get(node_label(n)) for n in (layer.pair.up.node, layer.pair.down.node)]
            parts = [x for x in parts if x is not None and x.key not in grouped and len(x.cands) == 1]
            opt, choices = _pair_choices(single[layer.key], [single[x.key] for x in parts], form=layer.form.name,
                                         decode={x.key: (tables.get(x.key), x.form.name) for x in parts})
            self._groups[layer.key] = choices
            grouped.update([layer.key, *(x.key for x in parts)])
            out.append(opt)
        self._groups.update({k: t for k, t in tables.items() if k not in grouped})
        return out + [o for k, o in single.items() if k not in grouped]

    def allocate(self, fraction: float, cost: str = "params") -> Allocation:
        opts = self.options(cost)
        dense = sum(o.dense_cost for o in opts)
        budget = fraction * dense
        try:
            if self.config.resolved_allocation == "threshold":
                return allocate_threshold(opts, budget)
            return self._decoded(allocate(opts, budget))
        except ValueError:
            floor = min_cost(opts) / dense if dense else 1.0
            what = "parameters" if cost == "params" else "FLOPs"
            raise LrcError(f"--{cost} {fraction:g} is out of reach: the smallest plan keeps {floor:.3f} of the "
                           f"candidates' {what} (every layer at its lowest rank"
                           + (", slow layers dense" if any(x.fast_rank is not None for x in self.layers) else "")
                           + f"); ask for at least {math.ceil(floor * 1000) / 1000:g}"
                           + (" or pass --size-only" if any(x.fast_rank is not None for x in self.layers) else "")
                           ) from None

    # ------------------------------------------------------------------ the modes

    def run(self) -> dict[str, int]:
        """The ranks for the config's budget (``params``, ``flops`` or ``max_drop``)."""
        cfg = self.config
        probe_at = cfg.params if cfg.params is not None else 0.5
        if cfg.resolved_allocation == "sensitivity":
            self.measure_sensitivity(probe_at)
        if cfg.budget in ("params", "flops"):
            fraction = getattr(cfg, cfg.budget)
            alloc = self.allocate(fraction, cfg.budget)
            self.info.update(self._describe(alloc, cfg.budget, fraction))
        else:
            alloc = self.search(cfg.max_drop)
        self.ranks, self.forms = alloc.ranks, alloc.forms
        return self.ranks

    def search(self, eps: float) -> Allocation:
        """Smallest parameter fraction whose measured drop is at most ``eps`` (bisection)."""
        ev = self.evaluator(search=True)
        opts = self.options("params")
        dense = sum(o.dense_cost for o in opts)
        lo = min_cost(opts) / dense  # smallest reachable: never shown to pass before measuring
        hi, best = 1.0, None  # the dense model passes by definition (drop 0)
        walked = []

        def measure(f: float):
            alloc = self.allocate(f)
            m = ev.measure(self.build(alloc.ranks, alloc.forms))
            walked.append({"fraction": round(f, 6), "params": alloc.cost, "params_ratio": alloc.cost / dense,
                           "predicted_loss": alloc.loss, "metric": m.value, "drop": m.drop,
                           "passed": bool(m.drop <= eps)})
            return alloc, m.drop <= eps

        f = self._predicted_fraction(opts, eps, lo)
        bar = tqdm(total=self.config.search_steps, desc="max-drop search", unit="model",
                   disable=None if self.progress else True, leave=False)
        for _ in range(self.config.search_steps):
            alloc, ok = measure(f)
            bar.update()
            if ok:
                hi, best = f, alloc
            else:
                lo = f
            if hi - lo <= 0.01:
                break
            f = 0.5 * (lo + hi)
        bar.close()
        self.info["search"] = {"max_drop": eps, "evaluator": ev.describe(), "walked": walked}
        if best is None:
            tried = min(walked, key=lambda w: w["drop"])
            raise LrcError(f"no compressed model kept {ev.describe()['metric']} within --max-drop {eps:g}: the "
                           f"largest tried (params {tried['params_ratio']:.3f}) dropped {tried['drop']:.4g}; "
                           "raise --max-drop or --search-steps, or add calibration data")
        self.info.update(self._describe(best, "params", hi))
        self.info["measured"] = next(w for w in walked if w["fraction"] == round(hi, 6))
        return best

    def _predicted_fraction(self, opts: list[LayerOptions], eps: float, lo: float) -> float:
        """Where to start the search: the fraction whose *predicted* drop is ``eps`` when the
        prediction is in the metric's own units, else the middle of the range."""
        if self.config.resolved_allocation != "sensitivity" or (self.config.metric or "") not in ADDITIVE:
            return 0.5 * (lo + 1.0)
        a, b = lo, 1.0
        for _ in range(12):
            mid = 0.5 * (a + b)
            if self.allocate(mid).loss <= eps:
                b = mid
            else:
                a = mid
        return min(max(b, lo), 1.0)

    def _decoded(self, alloc: Allocation) -> Allocation:
        """The allocation with each site's choice id turned into sizes and forms (an MLP pair: its
        width, or its layers' sizes)."""
        if not self._groups:
            return alloc
        ranks, forms = dict(alloc.ranks), dict(alloc.forms)
        for key, choices in self._groups.items():
            i = ranks.pop(key, 0)
            ranks[key] = 0  # dense (a pair: whole) unless the choice names it
            for k, (form, size) in (choices[i - 1] if i else {}).items():
                ranks[k] = size
                if size:
                    forms[k] = form
        return replace(alloc, ranks=ranks, forms=forms)

    def _describe(self, alloc: Allocation, kind: str, fraction: float) -> dict:
        return {"budget_kind": kind, "fraction": fraction, "limit": alloc.budget, "cost": alloc.cost,
                "achieved_fraction": alloc.cost / alloc.budget * fraction if alloc.budget else None,
                "predicted_loss": alloc.loss, "solver": alloc.info}

    def annotate(self, records, ranks: dict[str, int]) -> None:
        """Per-layer plan details on the pipeline's records (sensitivity, predicted loss, FLOPs, latency)."""
        by_key = {x.key: x for x in self.layers if x.form.name == self.forms.get(x.key, DEFAULT) or x.pair is not None}
        by_node = {node_label(n): x for x in self.layers if x.pair is not None
                   for n in (x.pair.up.node, x.pair.down.node)}
        for rec in records:
            layer = by_key.get(rec.weight) or by_node.get(rec.node)
            if layer is None:
                continue
            r = ranks.get(layer.key, 0)
            i = int(np.searchsorted(layer.grid, r)) if r else None
            rec.sensitivity = layer.sensitivity if "sensitivity" in self.info else None
            rec.predicted_loss = float(layer.loss()[i]) if i is not None and i < len(layer.grid) else 0.0
            if layer.pair is not None and rec.node != node_label(layer.pair.down.node):
                rec.predicted_loss = 0.0  # a pair's loss is told once, on its second layer
            rec.probes = layer.probes
            if layer.pair is not None:  # both layers of a pair run on the up layer's rows
                rows = next(iter(layer.rows.values()), None)
                if rows is not None and rec.params_before:
                    rec.flops_before = 2.0 * rows * rec.params_before
                    rec.flops_after = 2.0 * rows * (rec.params_after or rec.params_before)
            elif layer.rows and rec.node in layer.rows and layer.rows[rec.node] is not None:
                cand = next(c for c in layer.cands if c.label == rec.node)
                dense, at = layer.form.flops(cand, np.array([r]), layer.rows[rec.node])
                rec.flops_before = dense
                rec.flops_after = float(at[0]) if r else rec.flops_before
            rec.latency = [t for t in layer.latency if t["node"] == rec.node] or None


def _decode(key: str, i: int, table: list[dict[str, tuple[str, int]]] | None, form: str) -> dict[str, tuple[str, int]]:
    """Choice ``i`` (0: dense) of site ``key`` as ``{key: (form, size)}``."""
    if table is None:
        return {key: (form, int(i))}
    return table[i - 1] if i else {key: (form, 0)}


def _exclusive(key: str, alternatives: list[tuple[str, LayerOptions]]
               ) -> tuple[LayerOptions, list[dict[str, tuple[str, int]]]]:
    """One weight's choices across forms: every (form, size) that no other beats on both cost and
    loss and that costs less than dense. Returns the merged options (choice ids 1, 2, ...; 0 stays
    dense) and, per id, ``{key: (form, size)}``."""
    dense = alternatives[0][1].dense_cost
    items = [(float(c), float(l), {key: (form, int(r))})
             for form, o in alternatives for r, c, l in zip(o.ranks, o.cost, o.loss)]
    front = [x for x in _pareto(items) if x[0] < dense]
    opt = LayerOptions(key, np.arange(1, len(front) + 1), np.array([c for c, _, _ in front], np.float64),
                       np.array([l for _, l, _ in front], np.float64), dense)
    return opt, [x[2] for x in front]


def _pair_choices(prune: LayerOptions, parts: list[LayerOptions], *, form: str = "channels",
                  decode: dict[str, tuple[list | None, str]] | None = None
                  ) -> tuple[LayerOptions, list[dict[str, tuple[str, int]]]]:
    """One MLP pair's exclusive choices: each pruned width (``prune``, in ``form``), or any choices
    of its layers' own options (``parts``, dense included), keeping only combinations no other
    beats on both cost and loss. ``decode``: per part, the table of a part whose choices span
    several forms (``_exclusive``) or None, and its form (default: no table, ``lowrank``). Returns
    the merged options (choice ids 1, 2, ...; 0 stays "all dense") and, per id,
    ``{key: (form, size)}``: the pair's width, or its layers' sizes."""
    decode = decode or {}
    cands: list[tuple[float, float, dict]] = [
        (float(c), float(l), {prune.key: (form, int(w))}) for w, c, l in zip(prune.ranks, prune.cost, prune.loss)]
    combos = [(0.0, 0.0, {})]
    for part in parts:
        ids, cost, loss = part.choices()
        table, part_form = decode.get(part.key, (None, DEFAULT))
        combos = [(c0 + float(c), l0 + float(l), {**r0, **_decode(part.key, int(i), table, part_form)})
                  for c0, l0, r0 in combos for i, c, l in zip(ids, cost, loss)]
        combos = _pareto(combos)
    dense = prune.dense_cost
    offset = dense - sum(p.dense_cost for p in parts)  # a layer of the pair that is no candidate stays dense
    cands += [(c + offset, l, r) for c, l, r in combos if any(size for _, size in r.values())]
    front = [x for x in _pareto(cands) if x[0] < dense]
    opt = LayerOptions(prune.key, np.arange(1, len(front) + 1), np.array([c for c, _, _ in front], np.float64),
                       np.array([l for _, l, _ in front], np.float64), dense)
    return opt, [x[2] for x in front]


def _pareto(items: list[tuple]) -> list[tuple]:
    """Items ``(cost, loss, ...)`` no other item beats on both, by ascending cost."""
    out, best = [], np.inf
    for it in sorted(items, key=lambda t: (t[0], t[1])):
        if it[1] < best:
            out.append(it)
            best = it[1]
    return out


def _grid_at_most(grid: np.ndarray, r: float) -> int:
    ok = grid[grid <= r]
    return int(ok[-1]) if ok.size else (int(grid[0]) if grid.size else 0)


def timing_feeds(model: onnx.ModelProto, feed: dict[str, np.ndarray], batches: tuple[int, ...]
                 ) -> dict[int, dict[str, np.ndarray]]:
    """The feed at each batch size: rows repeated or cut along axis 0 of every input whose first
    dimension is dynamic; a model with a fixed batch is timed at its own batch only."""
    from .feeds import graph_inputs

    dynamic = {}
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        dynamic[vi.name] = bool(dims) and not dims[0].HasField("dim_value")
    if not any(dynamic.get(k) for k in feed):
        b = next(iter(feed.values())).shape[0] if feed else 1
        return {int(b): feed}
    out = {}
    for b in batches:
        out[int(b)] = {k: (np.take(v, np.arange(int(b)) % v.shape[0], axis=0) if dynamic.get(k) and v.ndim else v)
                       for k, v in feed.items()}
    return out


def latency_declines(p: Plan, model: onnx.ModelProto, cands: list[Candidate], feeds_by_batch, config: CompileConfig,
                     *, progress: bool) -> dict:
    """Latency-aware mode under a per-layer rank policy: time each factorized layer at its planned
    rank against dense, and keep it dense where it is not faster at every batch."""
    from . import latency

    planned = {r.node: r.rank for r in p.records if r.decision == "factorized" and r.rank}
    todo = [c for c in cands if c.label in planned]
    cache = latency.TimingCache(None if config.timing_cache in (None, "") else config.timing_cache,
                                enabled=config.timing_cache != "none")
    backend = latency.timing_backend(config.latency_backend, config.target)
    t0 = time.perf_counter()
    forms = p.forms()
    timings = {}
    for name in dict.fromkeys(forms.get(c.weight_key, DEFAULT) for c in todo):  # each form timed with its structure
        group = [c for c in todo if forms.get(c.weight_key, DEFAULT) == name]
        extra = {} if name == DEFAULT else {"form": name, "form_options": form_knobs(FORMS[name], config) or None}
        timings.update(latency.time_layers(model, group, feeds_by_batch, {c.label: [planned[c.label]] for c in group},
                                           cache=cache, progress=progress, backend=backend, **extra))
    cache.save()
    slow_keys: dict[str, str] = {}
    for c in todo:
        for t in timings.get(c.label, []):
            if t.fast_rank() < planned[c.label]:
                name = forms.get(c.weight_key, DEFAULT)
                size = "rank" if name == DEFAULT else f"{name} size"
                slow_keys.setdefault(c.weight_key, (
                    f"not faster factorized on {backend.describe()}: at batch {t.batch} dense "
                    f"{t.dense_ms:.3f} ms, {size} {planned[c.label]} {t.factorized_ms[0]:.3f} ms"))
    for rec in p.records:
        rec_t = [t for t in timings.get(rec.node, [])]
        if rec_t:
            rec.latency = [{"node": rec.node, "batch": t.batch, "dense_ms": t.dense_ms, "ranks": list(t.ranks),
                            "factorized_ms": list(t.factorized_ms), "fast_rank": t.fast_rank()} for t in rec_t]
    for key, why in slow_keys.items():
        p.keep_dense(key, why)
    return {"target": backend.describe(), "batches": sorted(feeds_by_batch), "kept_dense": len(slow_keys),
            "seconds": round(time.perf_counter() - t0, 3), "cache": str(cache.path), "cache_hits": cache.hits,
            "cache_misses": cache.misses}


__all__ = ["Layer", "Planner", "build_layers", "count_rows", "latency_declines", "timing_feeds"]
