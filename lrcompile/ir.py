"""Graph-side helpers shared by the passes: constant resolution, naming, the pass contract.

A weight is "constant" when it is an initializer, a ``Constant`` node's value, or the output of a
subgraph of shape-and-layout ops (Cast, Transpose, Reshape, Identity, ConstantOfShape, ...) whose
leaves are all constants. Such subgraphs are evaluated with ONNX's reference evaluator, one node at
a time, never touching the rest of the model. Weights fed through quantization ops are reported as
such so that passes can decline them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)

#: Ops a constant-only subgraph may be made of (all cheap, shape/layout/elementwise).
FOLDABLE_OPS = frozenset(
    {
        "Identity", "Cast", "CastLike", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
        "ConstantOfShape", "Concat", "Slice", "Expand", "Tile", "Mul", "Add", "Sub", "Div", "Neg",
        "Sqrt", "Reciprocal",
    }
)
QUANT_OPS = frozenset(
    {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
     "QLinearMatMul", "QLinearConv", "MatMulNBits", "DequantizeBFP", "QuantizeBFP"}
)
FLOAT_DTYPES = (np.float32, np.float16, np.float64)


@dataclass
class Resolved:
    """A tensor's constant value, or why it is not constant."""

    value: np.ndarray | None
    reason: str = ""
    source: str = ""  # name of the tensor the value is identified by (shared-weight key)


class ConstantResolver:
    """Resolves tensors to constant numpy values (memoized per tensor name)."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.opset = int(graph.opset or 13)
        self._memo: dict[str, Resolved] = {}
        self.folded: list[str] = []  # names of nodes evaluated, for the report

    def resolve(self, t: gs.Tensor, depth: int = 0) -> Resolved:
        if t.name in self._memo:
            return self._memo[t.name]
        r = self._resolve(t, depth)
        self._memo[t.name] = r
        return r

    def _resolve(self, t: gs.Tensor, depth: int) -> Resolved:
        if isinstance(t, gs.Constant):
            return Resolved(np.asarray(t.values), source=t.name)
        if t in self.graph.inputs:
            return Resolved(None, "weight is a graph input, not a constant")
        if not t.inputs:
            return Resolved(None, "weight has no producer and no value")
        node = t.inputs[0]
        if node.op in QUANT_OPS:
            return Resolved(None, f"weight comes through {node.op} (quantized path)")
        if node.op == "Constant":
            return Resolved(_constant_node_value(node), source=t.name)
        if node.op not in FOLDABLE_OPS or node.domain not in (None, "", "ai.onnx") or depth > 64:
            return Resolved(None, f"weight is computed by {node.op} from non-constant inputs")
        vals = []
        for i in node.inputs:
            if i.name == "":
                vals.append(None)
                continue
            r = self.resolve(i, depth + 1)
            if r.value is None:
                return Resolved(None, r.reason)
            vals.append(r.value)
        out = _evaluate(node, vals, self.opset)
        self.folded.append(node.name)
        return Resolved(out[node.outputs.index(t)], source=t.name)


def _constant_node_value(node: gs.Node) -> np.ndarray:
    a = node.attrs
    if "value" in a:
        v = a["value"]
        return np.asarray(v.values if isinstance(v, gs.Constant) else v)
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                    ("value_ints", np.int64)):
        if key in a:
            return np.asarray(a[key], dtype=dt)
    raise ValueError(f"Constant node {node.name!r} has no supported value attribute")


def _evaluate(node: gs.Node, vals: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    proto = OnnxExporter.export_node(node)
    names = [f"i{k}" if v is not None else "" for k, v in enumerate(vals)]
    del proto.input[:]
    proto.input.extend(names)
    outs = [f"o{k}" for k in range(len(node.outputs))]
    del proto.output[:]
    proto.output.extend(outs)
    inits = [onnx.numpy_helper.from_array(np.asarray(v), n) for n, v in zip(names, vals) if v is not None]
    g = onnx.helper.make_graph([proto], "fold", [], [onnx.helper.make_empty_tensor_value_info(o) for o in outs], inits)
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return [np.asarray(x) for x in ReferenceEvaluator(m).run(None, {})]


class Namer:
    """Derives unique tensor/node names from the replaced node's name."""

    def __init__(self, graph: gs.Graph) -> None:
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def __call__(self, base: str, suffix: str) -> str:
        name = f"{base}/{suffix}"
        k = 1
        while name in self.used:
            k += 1
            name = f"{base}/{suffix}_{k}"
        self.used.add(name)
        return name


def node_label(node: gs.Node) -> str:
    """A stable, human-readable identity of a node (its name, or its first output's name)."""
    return node.name or (node.outputs[0].name if node.outputs else node.op)


@dataclass
class Candidate:
    """A node a pass can rewrite, with its weight in the [in, out] layout.

    Attributes:
        node: the graph node.
        pass_name: the pass that matched it.
        weight_key: identity of the weight (source tensor + orientation): nodes sharing a key
            share one factorization.
        matrices: the weight as one ``[K, N]`` matrix per group (a single one unless grouped conv).
        activation: name of the tensor whose rows ``x`` multiply the weight (``x @ B``), for
            calibration statistics; None when the input is not a plain row matrix (conv).
        details: pass-specific facts used by ``rewrite`` (e.g. transposes, conv geometry).
    """

    node: gs.Node
    pass_name: str
    weight_key: str
    matrices: list[np.ndarray]
    activation: str | None = None
    details: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return node_label(self.node)

    @property
    def shape(self) -> tuple[int, int]:
        k, n = self.matrices[0].shape
        return (k, n * len(self.matrices)) if len(self.matrices) > 1 else (k, n)

    @property
    def params(self) -> int:
        return sum(m.size for m in self.matrices)


@dataclass(frozen=True)
class Decline:
    """A node left intact, with the reason."""

    node: gs.Node
    pass_name: str
    reason: str
    shape: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        return node_label(self.node)


@dataclass
class Wiring:
    """A candidate node taken apart for a rewrite (``RewritePass.detach``): the tensors the new
    nodes connect to. ``x`` is what the weight multiplies (the activation, or a Gather's
    indices), ``out`` the node's output, ``extra`` what else the op kept (a Gemm's bias C, a
    Conv's bias and attributes)."""

    x: gs.Tensor
    out: gs.Tensor
    extra: dict = field(default_factory=dict)


class RewritePass(Protocol):
    """The pass contract: what one op type means in the [in, out] layout.

    ``match`` returns a Candidate (the node's weight as ``[K, N]`` matrices, one per group), a
    Decline with its reason, or None when the node is not its business. A form (``lrcompile.forms``)
    then rewrites a matched candidate through the op's primitives, so that a form knows shapes and
    an op knows its semantics:

    - ``detach(cand)``: disconnect the node, return its ``Wiring``;
    - ``first(ctx, cand, w, mats, tag)``: the op's input side with new weights ``mats`` (per group
      ``[K, m]``): ``x`` mapped to ``m`` channels per group (geometry, transA, lookups kept);
    - ``last(ctx, cand, w, h, mats, bias, tag)``: an intermediate ``h`` (``m`` channels per group)
      mapped by ``mats`` (per group ``[m, N]``) to the node's output, with the op's own bias and
      scaling, plus a correction ``bias`` (per group ``[N]``, or None).

    The class docstring states the op's rule and math, and doubles as the pass's help text."""

    name: str
    op_types: tuple[str, ...]

    def match(self, node: gs.Node, consts: ConstantResolver) -> Candidate | Decline | None: ...

    def detach(self, cand: Candidate) -> Wiring: ...

    def first(self, ctx: "RewriteContext", cand: Candidate, w: Wiring, mats: list[np.ndarray], tag: str) -> gs.Tensor: ...

    def last(self, ctx: "RewriteContext", cand: Candidate, w: Wiring, h: gs.Tensor, mats: list[np.ndarray],
             bias: list[np.ndarray | None] | None, tag: str) -> None: ...


@dataclass
class RewriteContext:
    """State shared by the rewrites of one run: naming, and factor constants shared by weight key."""

    graph: gs.Graph
    namer: Namer
    shared: dict[tuple[str, str], gs.Constant] = field(default_factory=dict)

    def const(self, key: str, role: str, base: str, array: np.ndarray) -> gs.Constant:
        """A Constant for ``(weight key, role)``, created once and reused by every sharer."""
        k = (key, role)
        if k not in self.shared:
            self.shared[k] = gs.Constant(self.namer(base, role), np.ascontiguousarray(array))
        return self.shared[k]

    def var(self, base: str, suffix: str, dtype) -> gs.Variable:
        return gs.Variable(self.namer(base, suffix), dtype=dtype)

    def node(self, op: str, base: str, suffix: str, inputs, outputs, attrs=None) -> gs.Node:
        n = gs.Node(op=op, name=self.namer(base, suffix), attrs=attrs or {}, inputs=inputs, outputs=outputs)
        self.graph.nodes.append(n)
        return n


def float_weight_problem(w: np.ndarray) -> str | None:
    """A reason to decline a weight array, or None if it is a usable float matrix source."""
    if w.dtype not in FLOAT_DTYPES:
        return f"weight dtype {w.dtype} is not float"
    if not np.all(np.isfinite(w)):
        return "weight holds NaN or Inf"
    return None
