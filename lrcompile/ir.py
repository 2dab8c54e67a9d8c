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
    #: the stored tensors (initializers, Constant nodes' outputs) the value is computed from:
    #: name -> (values, bytes)
    leaves: dict[str, tuple[int, int]] = field(default_factory=dict)


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
            v = np.asarray(t.values)
            return Resolved(v, source=t.name, leaves={t.name: (int(v.size), int(v.nbytes))})
        if t in self.graph.inputs:
            return Resolved(None, "weight is a graph input, not a constant")
        if not t.inputs:
            return Resolved(None, "weight has no producer and no value")
        node = t.inputs[0]
        if node.op in QUANT_OPS:
            return Resolved(None, f"weight comes through {node.op} (quantized path)")
        if node.op == "Constant":
            v = _constant_node_value(node)
            return Resolved(v, source=t.name, leaves={t.name: (int(v.size), int(v.nbytes))})
        if node.op not in FOLDABLE_OPS or node.domain not in (None, "", "ai.onnx") or depth > 64:
            return Resolved(None, f"weight is computed by {node.op} from non-constant inputs")
        vals, leaves = [], {}
        for i in node.inputs:
            if i.name == "":
                vals.append(None)
                continue
            r = self.resolve(i, depth + 1)
            if r.value is None:
                return Resolved(None, r.reason)
            vals.append(r.value)
            leaves.update(r.leaves)
        out = _evaluate(node, vals, self.opset)
        self.folded.append(node.name)
        return Resolved(out[node.outputs.index(t)], source=t.name, leaves=leaves)

    def leaves(self, name: str) -> dict[str, tuple[int, int]]:
        """The stored tensors a resolved tensor ``name`` is computed from (empty if not resolved)."""
        r = self._memo.get(name)
        return dict(r.leaves) if r is not None else {}


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
        weight_key: identity of the weight: the name of the tensor it is read from. Nodes sharing
            a key share one factorization, whatever the orientation they read it in.
        matrices: the weight as one ``[K, N]`` matrix per group (a single one unless grouped conv).
        activation: name of the tensor whose rows ``x`` multiply the weight (``x @ B``), for
            calibration statistics; None when the input is not a plain row matrix (conv).
        details: pass-specific facts used by ``rewrite`` (e.g. transposes, conv geometry).
        transposed: the matrix is the transpose of the stored 2-D weight (MatMul with the weight
            on the left, Gemm ``transB``): ``B = W^T``, so ``W ~= A C`` serves it as ``C^T A^T``.
        stored: the stored tensors the weight is read from (initializers, Constant nodes'
            outputs): name -> (values, bytes); what rewriting every reader can free.
    """

    node: gs.Node
    pass_name: str
    weight_key: str
    matrices: list[np.ndarray]
    activation: str | None = None
    details: dict = field(default_factory=dict)
    transposed: bool = False
    stored: dict[str, tuple[int, int]] = field(default_factory=dict)

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
      scaling, plus a correction ``bias`` (per group ``[N]``, or None);
    - ``whole(ctx, cand, w, mats, tag, bias=True)``: the op itself with new weights ``mats`` (per
      group ``[K, N]``), its geometry, scaling and (``bias``) its own bias kept: a weight replaced
      in place (a pruned weight), or a branch that another one is added to (``bias=False``);
      ``sparse``: the weight is mostly zeros (``RewriteContext.sparse_const``).

    The class docstring states the op's rule and math, and doubles as the pass's help text."""

    name: str
    op_types: tuple[str, ...]

    def match(self, node: gs.Node, consts: ConstantResolver) -> Candidate | Decline | None: ...

    def detach(self, cand: Candidate) -> Wiring: ...

    def first(self, ctx: "RewriteContext", cand: Candidate, w: Wiring, mats: list[np.ndarray], tag: str) -> gs.Tensor: ...

    def last(self, ctx: "RewriteContext", cand: Candidate, w: Wiring, h: gs.Tensor, mats: list[np.ndarray],
             bias: list[np.ndarray | None] | None, tag: str) -> None: ...

    def whole(self, ctx: "RewriteContext", cand: Candidate, w: Wiring, mats: list[np.ndarray], tag: str, *,
              bias: bool = True, sparse: bool = False) -> None: ...


@dataclass
class RewriteContext:
    """State shared by the rewrites of one run: naming, and the constants each weight key stores.

    A weight's constants are stored once: every request of a weight key for the same values gets
    the same Constant, and a request for the transpose of a 2-D Constant the key already stores
    gets that Constant through a Transpose node, or directly where the op reads it transposed
    (``const_either``): one factorization serves a weight read as ``W`` and as ``W^T``, since
    ``W ~= A C`` gives ``W^T ~= C^T A^T`` from the same ``A`` and ``C``."""

    graph: gs.Graph
    namer: Namer
    #: (weight key, dtype, shape, digest of the values) -> the Constant that stores them
    shared: dict[tuple, gs.Constant] = field(default_factory=dict)
    #: weight key -> the Constants it stores, in creation order (what the rewrite wrote)
    stored: dict[str, list[gs.Constant]] = field(default_factory=dict)
    #: names of the Constants whose values are mostly zeros: the export stores them as ONNX
    #: sparse initializers where that is smaller (``engine.rewrite.export``)
    sparse: set[str] = field(default_factory=set)
    _transposed: dict[tuple, gs.Variable] = field(default_factory=dict)

    def const(self, key: str, role: str, base: str, array: np.ndarray) -> gs.Tensor:
        """A tensor holding ``array`` for weight ``key``: a new Constant named from ``base`` and
        ``role``, the Constant the key already stores with these values, or a Transpose of the
        one that stores their transpose."""
        array = np.ascontiguousarray(array)
        k = _content_key(key, array)
        if k in self.shared:
            return self.shared[k]
        if array.ndim == 2:
            kt = _content_key(key, np.ascontiguousarray(array.T))
            if kt in self.shared:
                if k not in self._transposed:
                    out = gs.Variable(self.namer(base, role), dtype=array.dtype, shape=list(array.shape))
                    self.node("Transpose", base, f"{role}_T", [self.shared[kt]], [out], {"perm": [1, 0]})
                    self._transposed[k] = out
                return self._transposed[k]
        c = gs.Constant(self.namer(base, role), array)
        self.shared[k] = c
        self.stored.setdefault(key, []).append(c)
        return c

    def sparse_const(self, key: str, role: str, base: str, array: np.ndarray) -> gs.Tensor:
        """``const(...)`` for values that are mostly zeros (a sparse part): the file may store them
        as a sparse initializer (values and their indices)."""
        c = self.const(key, role, base, array)
        if isinstance(c, gs.Constant):
            self.sparse.add(c.name)
        return c

    def const_either(self, key: str, role: str, base: str, array: np.ndarray) -> tuple[gs.Tensor, bool]:
        """For an op that can read a weight transposed (Gemm ``transB``): the Constant the key
        already stores with the transpose of ``array`` and True, else ``const(...)`` and False."""
        array = np.ascontiguousarray(array)
        if array.ndim == 2 and _content_key(key, array) not in self.shared:
            kt = _content_key(key, np.ascontiguousarray(array.T))
            if kt in self.shared:
                return self.shared[kt], True
        return self.const(key, role, base, array), False

    def var(self, base: str, suffix: str, dtype) -> gs.Variable:
        return gs.Variable(self.namer(base, suffix), dtype=dtype)

    def node(self, op: str, base: str, suffix: str, inputs, outputs, attrs=None) -> gs.Node:
        n = gs.Node(op=op, name=self.namer(base, suffix), attrs=attrs or {}, inputs=inputs, outputs=outputs)
        self.graph.nodes.append(n)
        return n


def _subgraphs(graph: onnx.GraphProto):
    """Every subgraph of ``graph`` (If branches, Loop and Scan bodies), nested ones included."""
    for node in graph.node:
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                      list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []):
                yield g
                yield from _subgraphs(g)


def store_once(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store each constant of ``model`` once, in place (returns ``model``).

    onnx-graphsurgeon exports every constant a subgraph reads as that subgraph's initializer,
    including constants of the outer graph (a subgraph's tensor map holds the outer tensors its
    nodes read): a weight read inside both branches of an If is written twice, one read in the
    main graph and in a body once more per body. A subgraph initializer that the main graph
    already holds with the same values is dropped (the body reads the outer one, which is in
    scope), and one held by several subgraphs with the same values moves to the main graph,
    where all of them can read it. Values that differ under one name, and names some node or
    graph input also defines, are left as they are."""
    main = model.graph
    subs = list(_subgraphs(main))
    if not subs:
        return model
    top = {t.name: t for t in main.initializer}
    defined = {i.name for g in subs for i in g.input} | {i.name for i in main.input if i.name not in top}
    defined |= {o for g in [main, *subs] for n in g.node for o in n.output}
    held: dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}
    for g in subs:
        for t in g.initializer:
            held.setdefault(t.name, []).append((g, t))
    for name, where in held.items():
        if name in defined or (name not in top and len(where) < 2):
            continue
        first = top.get(name, where[0][1])
        if any(t.SerializeToString() != first.SerializeToString() for _, t in where):
            continue
        if name not in top:
            main.initializer.append(first)
            if model.ir_version < 4:  # an initializer must also be a graph input there
                main.input.append(onnx.helper.make_tensor_value_info(name, first.data_type, list(first.dims)))
        for g, t in where:
            g.initializer.remove(t)
    return model


def _content_key(key: str, array: np.ndarray) -> tuple:
    import hashlib

    return key, array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest()


def float_weight_problem(w: np.ndarray) -> str | None:
    """A reason to decline a weight array, or None if it is a usable float matrix source."""
    if w.dtype not in FLOAT_DTYPES:
        return f"weight dtype {w.dtype} is not float"
    if not np.all(np.isfinite(w)):
        return "weight holds NaN or Inf"
    return None
