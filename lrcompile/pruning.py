"""MLP hidden-channel pruning inside a compile: ``--prune-mlp F`` and ``--prune-mlp auto``.

``passes.mlp`` finds the pairs (Linear -> channel-wise activation -> Linear) and writes their
thinner constants; ``factorize.channels`` chooses the channels and refits the second layer. This
module joins them to the calibration data and the compile:

- ``--prune-mlp F``: every pair keeps the fraction F of its hidden channels, before the low-rank
  passes, which then see the pruned model (:func:`prune_mlps`).
- ``--prune-mlp auto``: each pair is one entry of the budget's allocation whose choices exclude
  each other: a pruned hidden width, or low rank (or dense) for each of its two layers. The
  pruning error curve is the refit's along one elimination path (``channels.prune_curve``), its
  sensitivity is measured like a low-rank layer's, and the knapsack spends the one ``--params``,
  ``--flops`` or ``--max-drop`` budget where it costs least: channels in some MLPs, ranks in
  their layers or in others (``lrcompile.planner``).

Data flows one way: pairs are found once on the original model (:meth:`MlpPairs.find`), their
statistics collected with the other layers', and :meth:`MlpPairs.prune` writes any choice of
widths into a fresh import of a model, reusing each (pair, width) refit it already computed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm.auto import tqdm

from .config import CompileConfig
from .engine import collect_stats, context, export, selected
from .errors import LrcError
from .factorize import LayerStats
from .forms import FORMS
from .ir import ConstantResolver, node_label
from .report import LayerRecord
from .weights import import_graph

log = logging.getLogger(__name__)

#: Planner keys of MLP pairs start with this (low-rank entries are keyed by weight tensor names).
PAIR_KEY = "mlp:"
#: The form every pair takes (``lrcompile.forms.channels``).
FORM = FORMS["channels"]


def _find(model: onnx.ModelProto, config: CompileConfig):
    from .passes import mlp

    graph = import_graph(model)
    nodes = [n for n in graph.nodes if n.domain in (None, "", "ai.onnx")]
    pairs, reasons = mlp.find_pairs(graph, ConstantResolver(graph), nodes)
    pairs = [pr for pr in pairs if all(selected(node_label(n), n.op, config) for n in (pr.up.node, pr.down.node))]
    return graph, pairs, reasons


@dataclass
class MlpPairs:
    """The prunable MLP pairs of one model, their statistics, and the refits computed so far.

    Attributes:
        pairs: ``passes.mlp.MlpPair`` by planner key (bound to a throwaway import: read-only).
        reasons: why other linear layers start no pair (up-node label -> reason).
        stats: hidden-activation statistics by planner key (filled by the caller's calibration).
        cache: ``(key, width) -> (channels.ChannelPrune, seconds it took)``.
    """

    pairs: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)
    stats: dict[str, LayerStats] = field(default_factory=dict)
    cache: dict = field(default_factory=dict)

    @classmethod
    def find(cls, model: onnx.ModelProto, config: CompileConfig) -> "MlpPairs":
        _, pairs, reasons = _find(model, config)
        return cls({PAIR_KEY + pr.label: pr for pr in pairs}, reasons)

    def form(self, key: str):
        return FORM

    def pruned_labels(self, widths: dict[str, int]) -> frozenset[str]:
        """Node labels of the two layers of every pair ``widths`` prunes (out of the low-rank passes)."""
        return frozenset(node_label(n) for key, pr in self.pairs.items() if 0 < widths.get(key, 0) < pr.width
                         for n in (pr.up.node, pr.down.node))

    def requests(self) -> dict:
        """Calibration requests: each pair's hidden activation (the second layer's input)."""
        from .calibrate import StatRequest

        return {key: StatRequest(pr.hidden, pr.width) for key, pr in self.pairs.items()}

    def take_stats(self, stats: dict) -> None:
        """Move each pair's hidden-activation statistics out of a calibration's ``stats``."""
        self.stats.update({k: stats.pop(k)[0] for k in self.pairs})

    def curve(self, key: str, grid: np.ndarray) -> np.ndarray:
        """Estimated relative squared refit error of pair ``key`` at each width of ``grid``."""
        return FORM.curve(self.pairs[key], self._stats(key), grid)

    def _stats(self, key: str) -> LayerStats:
        st = self.stats.get(key)
        if st is None or st.count == 0:
            raise LrcError(f"--prune-mlp: no calibration row reached {self.pairs[key].label} (every row masked "
                           f"out?); check --calib and --mask-input")
        return st

    def refit(self, key: str, width: int):
        """``(channels.ChannelPrune, seconds)`` of the pair pruned to ``width`` channels (cached)."""
        if (key, width) not in self.cache:
            pr, st = self.pairs[key], self._stats(key)
            t0 = time.perf_counter()
            cp = FORM.fit(pr, st, width)
            self.cache[(key, width)] = (cp, round(time.perf_counter() - t0, 3))
        return self.cache[(key, width)]

    def prune(self, model: onnx.ModelProto, widths: dict[str, int], *, reason: str, progress: bool = False,
              report_whole: bool = False) -> tuple[onnx.ModelProto, list[LayerRecord], list[dict]]:
        """``model`` (which holds these pairs unchanged) with each pair in ``widths`` pruned to its
        width (0 or missing: the whole width, left as it is). Returns the model, one record per
        layer of each pruned pair, and the report rows. A pair left whole gets none (its layers
        follow their ranks), unless ``report_whole``: then it is reported as pruned to its full
        width (a fraction of 1 asked for that; the caller keeps its layers out of low rank)."""
        todo = {k: w for k, w in widths.items() if k in self.pairs and 0 < w < self.pairs[k].width}  # 0: whole
        records: list[LayerRecord] = []
        rows: list[dict] = []
        graph = fresh = ctx = None
        if todo:  # a fresh import to rewrite (sensitivity probes of other layers need none)
            graph, found, _ = _find(model, CompileConfig())
            fresh = {PAIR_KEY + pr.label: pr for pr in found}
            ctx = context(graph)
        for key in tqdm(list(self.pairs), desc="prune MLPs", unit="pair", disable=None if progress else True,
                        leave=False):
            pr = self.pairs[key]
            k = todo.get(key, pr.width)
            if k == pr.width and not report_whole:
                continue
            cp, secs = self.refit(key, k)
            written = pr  # a pair kept whole still reads its own constants
            if k < pr.width:
                if key not in fresh:
                    raise AssertionError(f"MLP pair {pr.label} is not in the model being pruned")
                written = fresh[key]
                FORM.emit(ctx, written, cp)  # its nodes now read the new constants
            up_after, down_after = FORM.layer_params(pr, k)
            for lin, new, err in ((pr.up, written.up, None), (pr.down, written.down, cp.rel_error)):
                kin, kout = lin.weight.shape
                after = up_after if lin is pr.up else down_after
                records.append(LayerRecord(node=node_label(lin.node), op=lin.node.op, shape=[kin, kout],
                                           decision="pruned", reason=f"MLP hidden channels {k}/{pr.width} kept ({reason})"
                                           + ("" if lin is pr.up else ", refitted"), weight=new.node.inputs[1].name,
                                           params_before=kin * kout, params_after=after, rel_error=err, method="prune",
                                           seconds=secs if lin is pr.down else None,
                                           info={"kept": k, "channels": pr.width}))
            rows.append({"up": node_label(pr.up.node), "down": node_label(pr.down.node), "channels": pr.width,
                         "kept": k, "params_before": pr.params(), "params_after": pr.params(k),
                         "rel_error": cp.rel_error, "chain": [n.op for n in pr.chain]})
        return (export(graph, model) if todo else model), records, rows


def prune_mlps(model: onnx.ModelProto, config: CompileConfig, *, progress: bool = False
               ) -> tuple[onnx.ModelProto, list[LayerRecord], dict]:
    """``--prune-mlp F``: keep that fraction of the hidden channels of every MLP pair and refit each
    second layer on the calibration data. Returns the smaller model, one record per rewritten layer,
    and the report section (per pair: channels kept, parameters, the refit's relative error)."""
    from .factorize.channels import keep_count

    t0 = time.perf_counter()
    pairs = MlpPairs.find(model, config)
    info = {"keep": config.prune_mlp, "pairs": [], "not_pairs": pairs.reasons}
    if not pairs.pairs:
        log.warning("--prune-mlp: no MLP pair (Linear -> channel-wise activation -> Linear with constant weights) "
                    "in this model; nothing pruned")
        return model, [], {**info, "seconds": round(time.perf_counter() - t0, 3)}
    stats, calib = collect_stats(model, [], config, progress=progress, extra=pairs.requests())
    pairs.take_stats(stats)
    widths = {key: keep_count(pr.width, config.prune_mlp, config.multiple) for key, pr in pairs.pairs.items()}
    new, records, rows = pairs.prune(model, widths, reason=f"--prune-mlp {config.prune_mlp:g}", progress=progress,
                                     report_whole=True)
    info.update(pairs=rows, samples=calib.get("samples"), mask_kept_rows=calib.get("mask_kept_rows"),
                seconds=round(time.perf_counter() - t0, 3))
    return new, records, info
