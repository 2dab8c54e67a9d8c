"""The evidence a compile collects, and the per-layer question "what does this layer's method get".

``Evidence`` holds activation statistics (by request key), Fisher information (by weight name)
and output curvature (``fisher.OutputCurvature``); later kinds (attention statistics) join it
here. :meth:`Evidence.for_layer` answers, for one candidate and its method, the method to use,
its statistics per group, and a note when it fell back to a method that needs less.

The ``collect_*`` functions gather each kind on the calibration data; ONNX Runtime and torch
run inside them (``lrcompile.calibrate``, ``lrcompile.fisher``), imported when needed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from ..config import CompileConfig
from ..factorize import METHODS, LayerStats
from ..factorize.derive import onehot_output_stats, sum_stats, with_output_stats
from ..ir import Candidate


@dataclass
class Evidence:
    """What a compile knows about its layers beyond their weights (each part None when not collected)."""

    stats: dict[str, list[LayerStats]] | None = None
    fisher: dict[str, np.ndarray] | None = None
    curvature: object | None = None  # fisher.OutputCurvature

    def for_layer(self, cand: Candidate, method: str, sharers: list[Candidate] = ()
                  ) -> tuple[str, list[LayerStats | None], str]:
        """The method to use for ``cand``, its statistics per group, and a note when it fell back.

        A weight shared by several nodes is calibrated on all their inputs (``sharers``: the nodes
        with the same weight key), since one factorization serves them all; for ``kfac`` their
        output-gradient Grams add up the same way. Nodes that read the weight in the other
        orientation multiply its other side: their statistics do not add up with ``cand``'s, and
        the fit is calibrated on the nodes of ``cand``'s orientation."""
        none = [None] * len(cand.matrices)
        sharers = [c for c in sharers if c.transposed == cand.transposed]
        needs = METHODS[method].needs
        if not needs:
            return method, none, ""
        if "grad_gram" in needs:
            base, st, note = self.for_layer(cand, "whiten", sharers)
            if base != "whiten":
                return base, st, note
            gy, why = self._grad_gram(cand, sharers)
            if gy is None:
                return "whiten", st, f"{method}: {why}: whiten"
            return method, [replace(st[0], grad_gram=gy)], ""
        if "fisher" in needs:
            from ..fisher import fisher_for_candidate

            f = (self.fisher or {}).get(cand.weight_key)
            if f is None:
                return "svd", none, "no Fisher information for this weight: plain SVD"
            if cand.transposed and f.ndim == 2:  # the stored layout's Fisher, in the candidate's
                f = f.T
            return method, [LayerStats(count=0, fisher=m) for m in fisher_for_candidate(cand, f)], ""
        keys = dict.fromkeys(r[0] for r in map(stat_request, [cand, *sharers]) if r is not None)
        found = [self.stats[k] for k in keys if self.stats and k in self.stats]
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

    def _grad_gram(self, cand: Candidate, sharers: list[Candidate]) -> tuple[np.ndarray | None, str]:
        """Sum of the output-gradient Grams of ``cand`` and the nodes sharing its weight, or the reason."""
        curvature = self.curvature
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


# ---------------------------------------------------------------------------------------------- requests


def stat_request(cand: Candidate):
    """``(key, StatRequest)`` for the statistics ``cand``'s weight needs, or None."""
    from ..calibrate import StatRequest

    if cand.activation is None:
        return None
    geo = cand.details.get("geometry")
    k = cand.matrices[0].shape[0]
    if cand.details.get("lookup"):
        return f"{cand.activation}|lookup{k}", StatRequest(cand.activation, k, lookup=True)
    if geo is not None:
        return f"{cand.activation}|{geo}", StatRequest(cand.activation, k, geo)
    return cand.activation, StatRequest(cand.activation, k)


def curvature_tensor(cand: Candidate) -> tuple[str | None, str]:
    """The tensor whose output gradients ``kfac`` reads for ``cand`` (``x @ B`` itself), or None with
    the reason: only right-weight MatMul and Gemm (no transA) outputs are the layer's ``x B``."""
    from ..fisher import CURVATURE_OPS

    if cand.node.op not in CURVATURE_OPS or cand.details.get("lookup"):
        return None, f"no output curvature for {cand.node.op} layers"
    if cand.activation is None or len(cand.matrices) != 1 or not cand.node.outputs:
        return None, "no output curvature for a weight on the left or a transposed input"
    return cand.node.outputs[0].name, ""


def mask_input(model: onnx.ModelProto, config: CompileConfig) -> str | None:
    """The input whose zeros mark padding rows: ``--mask-input``, resolved."""
    from ..calibrate import default_mask_input

    return default_mask_input(model) if config.mask_input == "auto" else (
        None if config.mask_input in (None, "none") else config.mask_input)


def calibration(model: onnx.ModelProto, config: CompileConfig):
    """The calibration batches (an iterator of feeds) the config names."""
    from ..calibrate import CalibSource, iter_calibration

    return iter_calibration(CalibSource(config.calib, config.calib_samples, config.calib_batch), model)


# ---------------------------------------------------------------------------------------------- collecting


def collect_stats(model: onnx.ModelProto, cands: list[Candidate], config: CompileConfig, *, progress: bool,
                  reference: onnx.ModelProto | None = None, extra: dict | None = None, runner=None
                  ) -> tuple[dict[str, list[LayerStats]], dict]:
    """Activation statistics of the candidates' inputs on the calibration data; with ``reference``
    (the original of a partly compressed ``model``) also the cross statistics of target correction;
    ``extra``: more requests (key -> ``calibrate.StatRequest``) collected in the same pass;
    ``runner``: where the calibration shards run (``lrcompile.parallel``)."""
    from ..calibrate import collect_stats as collect

    requests = dict(r for r in map(stat_request, cands) if r is not None)
    requests.update(extra or {})
    if not requests:
        return {}, {"samples": 0, "layers": 0}
    return collect(model, requests, calibration(model, config), mask_input=mask_input(model, config),
                   progress=progress, total=config.calib_samples, reference=reference, runner=runner)


def collect_curvature(model: onnx.ModelProto, cands: list[Candidate], config: CompileConfig, *, progress: bool):
    """Output-gradient Grams (``fisher.OutputCurvature``) when some layer's method needs them
    (``kfac``); None otherwise. The probed output is ``--metric-output`` when named, else the first.
    Layers whose output is not ``x B`` (convs, left weights) get a reason and fall back to whiten."""
    users = {c.weight_key for c in cands if "grad_gram" in METHODS[config.method_for(c.label)].needs}
    if not users:
        return None
    from .. import fisher as fz

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
    res = fz.collect_output_curvature(
        model, sorted(set(tensor_of.values())), calibration(model, config), output=config.metric_output,
        probes=config.probes, seed=config.seed, mask_input=mask_input(model, config), progress=progress,
        total=config.calib_samples)
    res.tensor_of = tensor_of
    res.reasons.update(reasons)
    return res


def collect_fisher(model: onnx.ModelProto, cands: list[Candidate], config: CompileConfig, *, progress: bool
                   ) -> dict[str, np.ndarray] | None:
    """Fisher information by weight name, when some layer's method needs it."""
    if not config.fisher or not any("fisher" in METHODS[config.method_for(c.label)].needs for c in cands):
        return None
    from .. import fisher as fz

    names = sorted({c.weight_key for c in cands if "fisher" in METHODS[config.method_for(c.label)].needs})
    if config.fisher != "collect":
        shapes = {}
        for c in cands:
            n = c.weight_key
            if n in names:
                shapes[n] = c.details.get("wshape") or (c.matrices[0].T.shape if c.transposed else c.matrices[0].shape)
        return fz.load_fisher_npz(config.fisher, shapes)
    labels = fz.load_labels(config.calib, config.labels)
    return fz.collect_fisher(model, names, calibration(model, config), labels, loss=config.loss,
                             output=config.fisher_output, progress=progress, total=config.calib_samples)


__all__ = ["Evidence", "calibration", "collect_curvature", "collect_fisher", "collect_stats", "curvature_tensor",
           "mask_input", "stat_request"]
