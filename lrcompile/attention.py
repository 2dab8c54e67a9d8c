"""Attention head-dimension reduction inside a compile: ``--attention R`` and ``--attention auto``.

``passes.attention`` finds the blocks (by structure) and writes their thinner constants and head
shapes; ``factorize.heads`` computes the QK and OV reductions; ``forms.heads`` prices them. This
module joins them to the calibration data and the compile:

- ``--attention R`` (or ``QK:OV``): every block keeps head dimension R (R_QK for the scores,
  R_OV for the values), before the low-rank passes, which then see the reduced model
  (:func:`reduce_heads`).
- ``--attention auto``: each block's QK pair and OV pair is one entry of the budget's allocation
  whose choices exclude each other: a head dimension, or low rank (or dense) for each of its two
  projections, priced in the one knapsack with the MLP pairs and every other layer
  (``lrcompile.planner``).

Statistics: the QK pair reads the augmented Gram ``[X, 1]^T [X, 1]`` of its projections' input
(the key side's too for cross-attention); the OV pair, per head, the Gram of ``A_h X`` (the
attention probabilities times the value projection's input), collected in the same calibration
pass as everything else (``calibrate.StatRequest(probs=...)``), padding queries dropped.

Data flows one way: blocks are found once on the original model (:meth:`AttentionSites.find`),
their statistics collected with the other layers', and :meth:`AttentionSites.prune` writes any
choice of head dimensions into a fresh import of a model, reusing each (pair, r) fit.
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
from .forms import FORMS
from .ir import ConstantResolver, node_label
from .report import LayerRecord
from .weights import import_graph

log = logging.getLogger(__name__)

#: Planner keys of the two pairs of a block start with these (then the Softmax's label).
QK_KEY, OV_KEY = "attn-qk:", "attn-ov:"
#: The form every head pair takes (``lrcompile.forms.heads``).
FORM = FORMS["heads"]


@dataclass
class HeadPair:
    """One reducible product of an attention block: QK (query, key projections) or OV (value,
    output projections). ``up`` / ``down`` are the pair's first and second projection, as for an
    MLP pair (the planner groups a pair with its two layers' own low-rank choices)."""

    block: object  # passes.attention.AttentionBlock
    kind: str  # "qk" | "ov"

    @property
    def up(self):
        return self.block.q if self.kind == "qk" else self.block.v

    @property
    def down(self):
        return self.block.k if self.kind == "qk" else self.block.o

    @property
    def heads(self) -> int:
        return self.block.heads

    @property
    def width(self) -> int:
        """The head dimension (the pair's full size)."""
        return self.block.head_dim if self.kind == "qk" else self.block.v_dim

    @property
    def label(self) -> str:
        return f"{self.kind.upper()} of {node_label(self.up.node)}, {node_label(self.down.node)}"

    def params(self, r: int | None = None) -> int:
        """Weight parameters of both projections at head dimension ``r`` (default: the full one)."""
        return int(FORM.params(self, np.array([self.width if r is None else r]))[0])


def _find(model: onnx.ModelProto, config: CompileConfig):
    from .passes import attention

    graph = import_graph(model)
    consts = ConstantResolver(graph)
    nodes = [n for n in graph.nodes if n.domain in (None, "", "ai.onnx", "com.microsoft")]
    blocks, reasons = attention.find_blocks(graph, consts, nodes)
    kept = []
    for b in blocks:
        labels = [node_label(x.node) for x in (b.q, b.k, b.v, b.o)]
        if all(selected(lb, "MatMul", config) for lb in labels):
            kept.append(b)
        else:
            reasons[b.label] = "a projection is left out by --only/--exclude/--include"
    return graph, consts, kept, reasons


def _pairs(blocks) -> dict[str, HeadPair]:
    out = {}
    for b in blocks:
        out[QK_KEY + b.label] = HeadPair(b, "qk")
        out[OV_KEY + b.label] = HeadPair(b, "ov")
    return out


@dataclass
class AttentionSites:
    """The attention blocks of one model as QK and OV head pairs, their statistics, and the fits
    computed so far (the interface of ``pruning.MlpPairs``, which the planner and pipeline use).

    Attributes:
        pairs: ``HeadPair`` by planner key (bound to a throwaway import: read-only).
        reasons: why other softmaxes start no block (Softmax label -> reason).
        stats: by planner key, the statistics list (QK: the query input's [, the key input's];
            OV: one per head), filled by the caller's calibration.
        cache: ``(key, r) -> (heads.HeadFit, seconds it took)``; ``spectra``: key -> HeadSpectra.
    """

    pairs: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    spectra: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @classmethod
    def find(cls, model: onnx.ModelProto, config: CompileConfig) -> "AttentionSites":
        _, _, blocks, reasons = _find(model, config)
        return cls(_pairs(blocks), reasons)

    def form(self, key: str):
        return FORM

    def pruned_labels(self, widths: dict[str, int]) -> frozenset[str]:
        """Node labels of the projections of every pair ``widths`` reduces (out of the low-rank passes)."""
        return frozenset(node_label(x.node) for key, pr in self.pairs.items() if 0 < widths.get(key, 0) < pr.width
                         for x in (pr.up, pr.down))

    def requests(self) -> dict:
        """Calibration requests: the QK pairs' projection inputs, the OV pairs' ``A_h X``."""
        from .calibrate import StatRequest

        out = {}
        for key, pr in self.pairs.items():
            b = pr.block
            if pr.kind == "qk":
                out[key] = StatRequest(b.x_q, b.q.weight.shape[0])
                if b.cross:
                    out[key + "#kv"] = StatRequest(b.x_kv, b.k.weight.shape[0])
            else:
                out[key] = StatRequest(b.x_kv, b.v.weight.shape[0], probs=b.probs, heads=b.heads)
        return out

    def take_stats(self, stats: dict) -> None:
        """Move each pair's statistics out of a calibration's ``stats`` (new statistics drop the fits)."""
        for key, pr in self.pairs.items():
            got = stats.pop(key)
            if pr.kind == "qk" and pr.block.cross:
                got = got + stats.pop(key + "#kv")
            self.stats[key] = got
        self.cache.clear()
        self.spectra.clear()

    def _spectra(self, key: str):
        if key not in self.spectra:
            from .factorize.heads import augmented_gram, ov_spectra, qk_spectra

            pr, st = self.pairs[key], self.stats.get(key)
            if not st or any(s.count == 0 for s in st):
                raise LrcError(f"--attention: no calibration row reached the attention block at {pr.block.label} "
                               "(every row masked out?); check --calib and --mask-input")
            t0 = time.perf_counter()
            b = pr.block
            if pr.kind == "qk":
                grams = [augmented_gram(s.gram, s.in_sum, s.count) for s in st]
                self.spectra[key] = qk_spectra(b.q.weight, b.q.bias, b.k.weight, grams[0],
                                               grams[1] if len(grams) > 1 else None, heads=b.heads)
            else:
                self.spectra[key] = ov_spectra(b.v.weight, b.v.bias, b.o.weight, b.o.bias, [s.gram for s in st],
                                               heads=b.heads)
            self.seconds[key] = round(time.perf_counter() - t0, 3)
        return self.spectra[key]

    def curve(self, key: str, grid: np.ndarray) -> np.ndarray:
        """Estimated relative squared error of pair ``key`` at each head dimension of ``grid``."""
        return FORM.curve(self.pairs[key], self._spectra(key), grid)

    def refit(self, key: str, r: int):
        """``(heads.HeadFit, seconds)`` of the pair at head dimension ``r`` (cached)."""
        if (key, r) not in self.cache:
            sp = self._spectra(key)
            t0 = time.perf_counter()
            fit = FORM.fit(self.pairs[key], sp, r)
            self.cache[(key, r)] = (fit, round(time.perf_counter() - t0 + self.seconds.get(key, 0.0), 3))
        return self.cache[(key, r)]

    def prune(self, model: onnx.ModelProto, widths: dict[str, int], *, reason: str, progress: bool = False,
              report_whole: bool = False) -> tuple[onnx.ModelProto, list[LayerRecord], list[dict]]:
        """``model`` (which holds these blocks unchanged) with each pair in ``widths`` at its head
        dimension (0 or missing: the full one, left as it is). Returns the model, one record per
        projection of each reduced pair, and the report rows (``report_whole``: pairs kept at the
        full dimension are reported too, as a fixed ``--attention`` asked for them)."""
        todo = {k: w for k, w in widths.items() if k in self.pairs and 0 < w < self.pairs[k].width}
        records: list[LayerRecord] = []
        rows: list[dict] = []
        fused: dict = {}  # block label -> (block, the block written) of fused QKV weights touched
        graph = fresh = ctx = consts = None
        if todo:
            graph, consts, blocks, _ = _find(model, CompileConfig())
            fresh = _pairs(blocks)
            ctx = context(graph)
        for key in tqdm(list(self.pairs), desc="reduce heads", unit="pair", disable=None if progress else True,
                        leave=False):
            pr = self.pairs[key]
            r = todo.get(key, pr.width)
            if r == pr.width and not report_whole:
                continue
            fit, secs = self.refit(key, r)
            written = pr  # a pair kept whole still reads its own constants
            if r < pr.width:
                if key not in fresh:
                    raise AssertionError(f"attention block {pr.block.label} is not in the model being reduced")
                written = fresh[key]
                FORM.emit(ctx, written, fit, consts)  # its nodes now read the new constants
            left, right = FORM.layer_params(pr, r)
            what = "scores" if pr.kind == "qk" else "output"
            for lin, new, after, err in ((pr.up, written.up, left, None), (pr.down, written.down, right, fit.rel_error)):
                if pr.block.fused is not None and lin.node is pr.block.fused.lin.node:  # one record for it, below
                    fused[pr.block.label] = (pr.block, fresh[key].block if fresh and key in fresh else pr.block)
                    continue
                kin, kout = lin.weight.shape
                records.append(LayerRecord(
                    node=node_label(lin.node), op=lin.node.op, shape=[kin, kout], decision="pruned",
                    reason=f"attention {pr.kind.upper()} head dimension {r}/{pr.width} ({reason})",
                    weight=new.node.inputs[1].name, params_before=kin * kout, params_after=after, rel_error=err,
                    method="heads", seconds=secs if lin is pr.down else None,
                    info={"kind": pr.kind, "heads": pr.heads, "head_dim": pr.width, "kept": r,
                          "predicted_error_of": what}))
            rows.append({"block": pr.block.label, "kind": pr.kind, "projections": [node_label(pr.up.node),
                                                                                   node_label(pr.down.node)],
                         "heads": pr.heads, "head_dim": pr.width, "kept": r, "params_before": pr.params(),
                         "params_after": pr.params(r), "predicted_rel_error": fit.rel_error,
                         "error_of": what, "tensor": (pr.block.softmax.inputs[0] if pr.kind == "qk" else pr.down.out).name,
                         "scale": pr.block.scale, "cross": pr.block.cross})
        for label, (block, new) in fused.items():
            records.append(self._fused_record(block, new, widths if todo else {}, reason))
        if todo:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()  # new shape Concats; old shapes unused
            # intermediate shape annotations (value_info) may name the old head sizes anywhere between
            # a projection and the next layer (exporters add Identity, Cast...): ONNX infers them again
            outs = {t.name for t in graph.outputs} | {t.name for t in graph.inputs}
            for t in graph.tensors().values():
                if isinstance(t, gs.Variable) and t.name not in outs:
                    t.shape = None
        return (export(graph, model) if todo else model), records, rows


    def _fused_record(self, block, new, widths: dict[str, int], reason: str) -> LayerRecord:
        """The record of a fused QKV weight: its Q, K and V column blocks at their head dimensions."""
        lin = block.fused.lin
        r_qk = widths.get(QK_KEY + block.label, block.head_dim) or block.head_dim
        r_ov = widths.get(OV_KEY + block.label, block.v_dim) or block.v_dim
        kin, kout = lin.weight.shape
        after = kin * block.heads * (2 * min(r_qk, block.head_dim) + min(r_ov, block.v_dim))
        return LayerRecord(node=node_label(lin.node), op=lin.node.op, shape=[kin, kout], decision="pruned",
                           reason=f"fused QKV: QK head dimension {min(r_qk, block.head_dim)}/{block.head_dim}, "
                           f"OV {min(r_ov, block.v_dim)}/{block.v_dim} ({reason})",
                           weight=new.fused.lin.node.inputs[1].name, params_before=kin * kout, params_after=after,
                           method="heads", info={"heads": block.heads, "fused": True})

    def reserved(self) -> frozenset[str]:
        """Fused QKV weights: reduced by heads only (a low-rank QKV weight and a reduced head could
        not both be written; the planner prices the head choices)."""
        return frozenset(node_label(pr.block.fused.lin.node) for pr in self.pairs.values() if pr.block.fused)


def measure_errors(original: onnx.ModelProto, new: onnx.ModelProto, rows: list[dict], feeds: list[dict],
                   mask_input: str | None = None) -> None:
    """Add to each report row the error measured in ONNX Runtime on ``feeds`` at the tensor the
    math's error is about (QK: the pre-softmax scores; OV: the output projection's output), the
    compressed model against the original. End to end: the error of every layer compressed
    upstream is in it too, so it bounds the block's own error from above (roughly). Rows masked out
    by ``mask_input`` (padding queries and keys) are left out."""
    import tempfile
    from pathlib import Path

    from .io import write_model
    from .sessions import session, with_outputs

    names = sorted({r["tensor"] for r in rows})
    if not names or not feeds:
        return
    err = {n: 0.0 for n in names}
    tot = {n: 0.0 for n in names}
    with tempfile.TemporaryDirectory(prefix="lrcompile-heads-") as d:
        runs = []
        for tag, model in (("original", original), ("reduced", new)):  # each session made once, every feed run
            path = Path(d) / f"{tag}.onnx"
            write_model(with_outputs(model, names), path)
            sess = session(path, ["CPUExecutionProvider"])
            runs.append((sess, {i.name for i in sess.get_inputs()}))
        for feed in feeds:  # one feed's tensors held at a time
            a, b = (dict(zip(names, sess.run(names, {k: v for k, v in feed.items() if k in wanted})))
                    for sess, wanted in runs)
            keep = np.asarray(feed[mask_input]) != 0 if mask_input and mask_input in feed else None
            for n in names:
                x, y = a[n].astype(np.float64), b[n].astype(np.float64)
                if x.shape != y.shape:
                    raise AssertionError(f"{n} is {x.shape} in the original, {y.shape} after reducing heads")
                if keep is not None and x.ndim == 4 and keep.shape == (x.shape[0], x.shape[3]) == (x.shape[0],
                                                                                                    x.shape[2]):
                    sel = keep[:, None, :, None] & keep[:, None, None, :]
                    x, y = np.where(sel, x, 0.0), np.where(sel, y, 0.0)
                elif keep is not None and x.ndim == 3 and keep.shape == x.shape[:2]:
                    x, y = x[keep], y[keep]
                err[n] += float(np.sum((y - x) ** 2))
                tot[n] += float(np.sum(x ** 2))
    for r in rows:
        n = r["tensor"]
        r["measured_rel_error"] = float(np.sqrt(err[n] / tot[n])) if tot[n] > 0 else None


def spec_text(spec) -> str:
    """``--attention``'s value as the user wrote it (``16``, ``16:24``, ``auto``)."""
    return f"{spec:g}" if isinstance(spec, (int, float)) else str(spec)


def fixed_dims(spec: str, pairs: dict[str, HeadPair]) -> dict[str, int]:
    """``--attention R`` / ``QK:OV``: the head dimension of every pair (a dimension above a block's
    own is its own)."""
    parts = [int(float(p)) for p in str(spec).split(":")]
    qk, ov = (parts[0], parts[0]) if len(parts) == 1 else parts
    return {key: min(qk if pr.kind == "qk" else ov, pr.width) for key, pr in pairs.items()}


def reduce_heads(model: onnx.ModelProto, config: CompileConfig, *, progress: bool = False
                 ) -> tuple[onnx.ModelProto, list[LayerRecord], dict]:
    """``--attention R``: every attention block at head dimension R (or ``QK:OV``), before the
    low-rank passes. Returns the smaller model, one record per rewritten projection, and the
    report section."""
    t0 = time.perf_counter()
    sites = AttentionSites.find(model, config)
    spec = spec_text(config.attention)
    info = {"head_dim": spec, "pairs": [], "not_blocks": sites.reasons}
    if not sites.pairs:
        log.warning("--attention: no multi-head attention block (projections, head reshapes, Softmax, merge, "
                    "output projection) in this model; nothing reduced")
        return model, [], {**info, "seconds": round(time.perf_counter() - t0, 3)}
    stats, calib = collect_stats(model, [], config, progress=progress, extra=sites.requests())
    sites.take_stats(stats)
    dims = fixed_dims(config.attention, sites.pairs)
    new, records, rows = sites.prune(model, dims, reason=f"--attention {spec}", progress=progress,
                                     report_whole=True)
    info.update(pairs=rows, samples=calib.get("samples"), mask_kept_rows=calib.get("mask_kept_rows"),
                seconds=round(time.perf_counter() - t0, 3))
    return new, records, info
