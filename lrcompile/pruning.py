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
import re
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm.auto import tqdm

from .config import CompileConfig
from .errors import LrcError
from .factorize import LayerStats
from .ir import ConstantResolver, Namer, RewriteContext, node_label
from .report import LayerRecord

log = logging.getLogger(__name__)

#: Planner keys of MLP pairs start with this (low-rank entries are keyed by weight tensor names).
PAIR_KEY = "mlp:"


def selected(label: str, op: str, config: CompileConfig) -> bool:
    """Whether --only/--exclude/--include let a node be compressed."""
    return ((config.only is None or op in config.only) and not any(re.search(p, label) for p in config.exclude)
            and (not config.include or any(re.search(p, label) for p in config.include)))


def _find(model: onnx.ModelProto, config: CompileConfig):
    from .passes import mlp

    graph = gs.import_onnx(model)
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

    def pruned_labels(self, widths: dict[str, int]) -> frozenset[str]:
        """Node labels of the two layers of every pair ``widths`` prunes (out of the low-rank passes)."""
        return frozenset(node_label(n) for key, pr in self.pairs.items() if 0 < widths.get(key, 0) < pr.width
                         for n in (pr.up.node, pr.down.node))

    def requests(self) -> dict:
        """Calibration requests: each pair's hidden activation (the second layer's input)."""
        from .calibrate import StatRequest

        return {key: StatRequest(pr.hidden, pr.width) for key, pr in self.pairs.items()}

    def curve(self, key: str, grid: np.ndarray) -> np.ndarray:
        """Estimated relative squared refit error of pair ``key`` at each width of ``grid``."""
        from .factorize.channels import prune_curve

        pr, st = self.pairs[key], self._stats(key)
        smallest = int(grid[0]) if len(grid) else pr.width
        sizes, err2 = prune_curve(st.gram, st.in_sum, st.count, pr.down.weight, pr.down.bias, smallest=smallest)
        return np.interp(grid, sizes, err2)

    def _stats(self, key: str) -> LayerStats:
        st = self.stats.get(key)
        if st is None or st.count == 0:
            raise LrcError(f"--prune-mlp: no calibration row reached {self.pairs[key].label} (every row masked "
                           f"out?); check --calib and --mask-input")
        return st

    def refit(self, key: str, width: int):
        """``(channels.ChannelPrune, seconds)`` of the pair pruned to ``width`` channels (cached)."""
        from .factorize.channels import prune_channels

        if (key, width) not in self.cache:
            pr, st = self.pairs[key], self._stats(key)
            t0 = time.perf_counter()
            cp = prune_channels(st.gram, st.in_sum, st.count, pr.down.weight, pr.down.bias, width)
            self.cache[(key, width)] = (cp, round(time.perf_counter() - t0, 3))
        return self.cache[(key, width)]

    def prune(self, model: onnx.ModelProto, widths: dict[str, int], *, reason: str, progress: bool = False,
              report_whole: bool = False) -> tuple[onnx.ModelProto, list[LayerRecord], list[dict]]:
        """``model`` (which holds these pairs unchanged) with each pair in ``widths`` pruned to its
        width (0 or missing: the whole width, left as it is). Returns the model, one record per
        layer of each pruned pair, and the report rows. A pair left whole gets none (its layers
        follow their ranks), unless ``report_whole``: then it is reported as pruned to its full
        width (a fraction of 1 asked for that; the caller keeps its layers out of low rank)."""
        from .passes import mlp
        from .pipeline import export

        todo = {k: w for k, w in widths.items() if k in self.pairs and 0 < w < self.pairs[k].width}  # 0: whole
        records: list[LayerRecord] = []
        rows: list[dict] = []
        graph = fresh = ctx = None
        if todo:  # a fresh import to rewrite (sensitivity probes of other layers need none)
            graph, found, _ = _find(model, CompileConfig())
            fresh = {PAIR_KEY + pr.label: pr for pr in found}
            ctx = RewriteContext(graph, Namer(graph))
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
                mlp.rewrite(written, cp.keep, cp.weight, cp.bias, ctx)  # its nodes now read the new constants
            for lin, new, err in ((pr.up, written.up, None), (pr.down, written.down, cp.rel_error)):
                kin, kout = lin.weight.shape
                after = kin * k if lin is pr.up else k * kout
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
    from .pipeline import _calibrate

    t0 = time.perf_counter()
    pairs = MlpPairs.find(model, config)
    info = {"keep": config.prune_mlp, "pairs": [], "not_pairs": pairs.reasons}
    if not pairs.pairs:
        log.warning("--prune-mlp: no MLP pair (Linear -> channel-wise activation -> Linear with constant weights) "
                    "in this model; nothing pruned")
        return model, [], {**info, "seconds": round(time.perf_counter() - t0, 3)}
    _, calib = _calibrate(model, [], config, progress=progress, pairs=pairs)
    widths = {key: keep_count(pr.width, config.prune_mlp, config.multiple) for key, pr in pairs.pairs.items()}
    new, records, rows = pairs.prune(model, widths, reason=f"--prune-mlp {config.prune_mlp:g}", progress=progress,
                                     report_whole=True)
    info.update(pairs=rows, samples=calib.get("samples"), mask_kept_rows=calib.get("mask_kept_rows"),
                seconds=round(time.perf_counter() - t0, 3))
    return new, records, info
