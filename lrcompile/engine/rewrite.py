"""Applying a plan to a graph, exporting the result, checking it, and building trial models.

``apply`` rewrites every accepted candidate through its form (one cleanup + toposort at the end)
and returns what it did; when a rewrite fails it names the node and the pass. ``export`` keeps
every model-level field of the original. ``check_model`` runs the full checker and strict shape
inference. ``build`` turns a model plus sizes into the rewritten model in one call: what the
planner's trials and the latency micro models need.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..config import CompileConfig
from ..ir import Candidate, Namer, RewriteContext, store_once
from ..weights import release, release_graph
from .analysis import analyze
from .evidence import Evidence
from .plan import Plan


class RewriteError(AssertionError):
    """A rewrite failed: a bug of ours, with the node and the pass that failed."""

    def __init__(self, node: str, pass_name: str, form: str, cause: Exception) -> None:
        super().__init__(f"rewriting {node} ({pass_name} pass, {form} form) failed: {type(cause).__name__}: {cause}")
        self.node, self.pass_name, self.form = node, pass_name, form


@dataclass
class Applied:
    """What ``apply`` rewrote: candidate labels by form name."""

    rewritten: dict[str, list[str]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.rewritten.values())


def context(graph: gs.Graph) -> RewriteContext:
    """A fresh rewrite context (naming, shared factor constants) for ``graph``."""
    return RewriteContext(graph, Namer(graph))


def apply(ctx: RewriteContext, cands: list[Candidate], plan: Plan) -> Applied:
    """Rewrite every accepted candidate of ``cands`` through its form, then one cleanup + toposort."""
    accepted = plan.accepted()
    done = Applied()
    for cand in cands:
        if cand.label not in accepted:
            continue
        form = plan.form(cand.weight_key)
        try:
            form.emit(ctx, cand, plan.value_for(cand))
        except Exception as e:  # noqa: BLE001 - any failure here is ours: name where it happened
            raise RewriteError(cand.label, cand.pass_name, form.name, e) from e
        done.rewritten.setdefault(form.name, []).append(cand.label)
        release(*cand.matrices)  # a weight mapped from external data: its pages are no longer needed
    ctx.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    plan.note_written(ctx)
    return done


#: The lowest IR version ``export`` writes. Below 4 every initializer must also be listed as a
#: graph input, which a subgraph cannot do (If branches take no inputs; Loop and Scan bodies take
#: theirs by position); ONNX Runtime treats such listed initializers as constants anyway.
MIN_IR_VERSION = 4


def export(graph: gs.Graph, original: onnx.ModelProto, sparse: set[str] | frozenset[str] = frozenset()
           ) -> onnx.ModelProto:
    """Export the rewritten graph, keeping every model-level field of the original exactly, except
    an IR version below ``MIN_IR_VERSION``, which is raised to it (graphsurgeon does not list
    initializers as graph inputs, as IR versions 1 to 3 require). The initializers named in
    ``sparse`` (``RewriteContext.sparse``) are stored as sparse initializers where that is
    smaller (:func:`sparse_initializers`)."""
    release_graph(graph)  # constants read from external data: exported as their references again
    model = gs.export_onnx(graph, do_type_check=False)
    if sparse:
        sparse_initializers(model.graph, sparse)
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, f, getattr(original, f))
    model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    model.graph.doc_string = original.graph.doc_string
    model.graph.name = original.graph.name
    return store_once(model)


#: Bytes of one index of an ONNX sparse initializer (its indices are int64).
SPARSE_INDEX_BYTES = 8


def sparse_initializers(graph: onnx.GraphProto, names: set[str] | frozenset[str]) -> list[str]:
    """Store each initializer of ``graph`` named in ``names`` as a ``Constant`` node with a sparse
    value (its nonzero values and their int64 linear indices, row-major) where that takes fewer
    bytes than dense. The node outputs the dense tensor (ops read dense inputs; a graph's
    ``sparse_initializer`` would be a sparse-typed input no MatMul takes); ONNX Runtime densifies it
    when it loads the model: this saves file bytes, not memory at run time. Returns the names
    converted."""
    from onnx import numpy_helper

    done, keep, consts = [], [], []
    for t in graph.initializer:
        if t.name not in names or t.data_location == onnx.TensorProto.EXTERNAL:
            keep.append(t)
            continue
        a = numpy_helper.to_array(t)
        flat = a.ravel()
        idx = np.flatnonzero(flat)
        if idx.size * (a.itemsize + SPARSE_INDEX_BYTES) >= a.nbytes:
            keep.append(t)
            continue
        values = numpy_helper.from_array(np.ascontiguousarray(flat[idx]), t.name)
        indices = numpy_helper.from_array(idx.astype(np.int64), t.name + "_indices")
        consts.append(onnx.helper.make_node("Constant", [], [t.name], name=t.name + "_sparse",
                                            sparse_value=onnx.helper.make_sparse_tensor(values, indices, list(a.shape))))
        done.append(t.name)
    if done:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        nodes = consts + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return done


def build(model: onnx.ModelProto, config: CompileConfig, ranks: dict[str, int], *,
          forms: dict[str, str] | None = None, evidence: Evidence | None = None, skip: frozenset[str] = frozenset(),
          dense_reasons: dict[str, str] | None = None, cache: dict | None = None,
          base: onnx.ModelProto | None = None, runner=None) -> tuple[onnx.ModelProto, Plan]:
    """``model`` with each weight at its size in ``ranks`` (0 or missing: dense), in its form in
    ``forms`` (missing: the default form): a fresh import, planned and rewritten. ``base``: the
    model whose fields the result keeps (default ``model``); ``runner``: where the fits run."""
    analysis = analyze(model, config, skip=skip)
    p = Plan().decide(analysis.candidates, config, evidence, ranks=ranks, forms=forms, dense_reasons=dense_reasons,
                      cache=cache, runner=runner)
    ctx = context(analysis.graph)
    apply(ctx, analysis.candidates, p)
    return export(analysis.graph, base if base is not None else model, ctx.sparse), p


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


__all__ = ["MIN_IR_VERSION", "SPARSE_INDEX_BYTES", "sparse_initializers", "Applied", "RewriteError", "apply", "build", "check_model", "context", "export"]
