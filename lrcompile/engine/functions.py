"""``--plugins``: each fused chain of the rewrite becomes a call to an ONNX model-local function.

One ONNX file for every runtime. A chain the plugins fuse (``lrcompile.plugins``) is replaced by
one node ``lrcompile::<Plugin>`` (op type = the plugin's name, domain = its namespace) whose
model-local function's body is the plain subgraph the rewrite wrote:

- ``LowRankGemm(X, A, C) = MatMul(MatMul(X, A), C)``: the low-rank chain ``{node}/lr_in`` ->
  ``{node}/lr_out`` on a MatMul with its weight on the right, or on a Gemm without transposes,
  scaling or bias (a mean correction's ``Add`` stays after the call);
- ``LowRankSparseGemm(X, A, C, S) = MatMul(MatMul(X, A), C) + MatMul(X, S)``: ``lowrank+sparse``
  with an unstructured ``S`` (``{node}/ls_in``, ``ls_out``, ``ls_S_mm``, ``ls_add``); ``S`` is the
  graph's tensor (the file stores it as a sparse Constant, as without ``--plugins``).

ONNX Runtime runs the body, so the output is the plain rewrite's (tested: equal outputs in ORT).
TensorRT without the plugin inlines the body (tested with tensorrt-rtx, which builds the engine);
TensorRT with the plugin registered (``plugins/<name>/trt.py``) is asked to prefer it by the
call's ``plugin_namespace`` / ``plugin_version`` attributes (``Contract.call_attributes``), which
ONNX Runtime ignores on a function call and the full checker accepts (tested). One function per
op type: TensorRT's parser keys functions by name only (it ignores ONNX overloads), so every
call of an op has the same arity.

A chain that does not have the exact structure is left as it is, with the reason (a value).
The rewrite is a pure function of the exported model: without ``--plugins`` nothing here runs and
the output file is byte-identical to before.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import helper

from ..plugins.contract import Contract
from ..plugins.low_rank_gemm.contract import CONTRACT as LOW_RANK_GEMM
from ..plugins.low_rank_sparse_gemm.contract import CONTRACT as LOW_RANK_SPARSE_GEMM

#: The IR version that model-local functions need (ONNX Runtime reads functions from IR 8).
FUNCTIONS_IR_VERSION = 8


@dataclass
class Fused:
    """What :func:`emit_functions` did: the calls per plugin (node labels) and the chains left plain
    with their reasons."""

    calls: dict[str, list[str]] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"calls": {k: list(v) for k, v in self.calls.items()}, "left_plain": dict(self.left),
                "functions": sorted(self.calls)}


def body(contract: Contract) -> list[onnx.NodeProto]:
    """The plain subgraph of a plugin's function, on the contract's formal names. Its nodes are
    unnamed: TensorRT names each inlined copy itself (named ones collide across calls)."""
    x, a, c = contract.input_names[:3]
    (y,) = contract.output_names
    if contract is LOW_RANK_GEMM:
        return [helper.make_node("MatMul", [x, a], ["H"], name=""),
                helper.make_node("MatMul", ["H", c], [y])]
    if contract is LOW_RANK_SPARSE_GEMM:
        s = contract.input_names[3]
        return [helper.make_node("MatMul", [x, a], ["H"]),
                helper.make_node("MatMul", ["H", c], ["L"]),
                helper.make_node("MatMul", [x, s], ["P"]),
                helper.make_node("Add", ["L", "P"], [y])]
    raise KeyError(contract.name)


def function(contract: Contract, opset: int) -> onnx.FunctionProto:
    """The model-local function of ``contract``: signature from the contract, body :func:`body`."""
    return helper.make_function(contract.namespace, contract.name, contract.input_names, contract.output_names,
                                body(contract), [helper.make_opsetid("", opset)],
                                doc_string=contract.doc)


class _Graph:
    """Producers, consumers and constants of one graph, by tensor name."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.by_name = {n.name: n for n in graph.node}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}
        self.inits = {t.name: t for t in graph.initializer}
        self.const_nodes = {o: n for n in graph.node if n.op_type == "Constant" for o in n.output}

    def only_into(self, tensor: str, node: onnx.NodeProto) -> bool:
        """``tensor`` feeds ``node`` alone and is no graph output (so it can become internal)."""
        return tensor not in self.outputs and [id(n) for n in self.consumers.get(tensor, [])] == [id(node)]

    def rank2_const(self, tensor: str) -> bool:
        """``tensor`` is a 2-D constant (an initializer or a Constant node's value), or a Transpose of one."""
        if tensor in self.inits:
            return len(self.inits[tensor].dims) == 2
        n = self.const_nodes.get(tensor)
        if n is not None:
            for at in n.attribute:
                if at.name == "value":
                    return len(at.t.dims) == 2
                if at.name == "sparse_value":
                    return len(at.sparse_tensor.dims) == 2
            return False
        prod = [p for p in self.by_name.values() if tensor in p.output]
        return len(prod) == 1 and prod[0].op_type == "Transpose" and self.rank2_const(prod[0].input[0])


def _plain_gemm(n: onnx.NodeProto) -> str | None:
    """Why a Gemm of the chain is not a plain product (None: it is)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    if attrs.get("transA", 0) or attrs.get("transB", 0):
        return "a Gemm of the chain reads a factor transposed"
    if attrs.get("alpha", 1.0) != 1.0:
        return f"a Gemm of the chain scales by alpha={attrs['alpha']:g}"
    if len(n.input) > 2 and n.input[2]:
        return "the chain's second Gemm adds the op's bias"
    return None


def _match_low_rank(g: _Graph, label: str) -> tuple[list[onnx.NodeProto], list[str], str] | str:
    """``(nodes, call inputs, output)`` of the low-rank chain of ``label``, or why it stays plain."""
    first, last = g.by_name.get(f"{label}/lr_in"), g.by_name.get(f"{label}/lr_out")
    if first is None or last is None:
        return "its chain is not the two-node low-rank chain (a grouped Conv, a lookup, or renamed nodes)"
    if first.op_type != last.op_type or first.op_type not in ("MatMul", "Gemm"):
        return f"a {first.op_type} chain (only MatMul and Gemm chains are fused)"
    if first.op_type == "Gemm":
        why = _plain_gemm(first) or _plain_gemm(last)
        if why:
            return why
    if len(first.output) != 1 or last.input[0] != first.output[0] or not g.only_into(first.output[0], last):
        return "its intermediate is read elsewhere"
    if not (g.rank2_const(first.input[1]) and g.rank2_const(last.input[1])):
        return "its factors are not constants on the right (a weight on the left)"
    return [first, last], [first.input[0], first.input[1], last.input[1]], last.output[0]


def _match_low_rank_sparse(g: _Graph, label: str) -> tuple[list[onnx.NodeProto], list[str], str] | str:
    names = ("ls_in", "ls_out", "ls_S_mm", "ls_add")
    nodes = [g.by_name.get(f"{label}/{n}") for n in names]
    if any(n is None for n in nodes):
        return "its sparse part is not an unstructured S beside the chain (whole rows, N:M, or a lookup)"
    first, last, sp, add = nodes
    if any(n.op_type != "MatMul" for n in (first, last, sp)) or add.op_type != "Add":
        return f"a {first.op_type} chain (only MatMul chains with an unstructured S are fused)"
    if last.input[0] != first.output[0] or not g.only_into(first.output[0], last):
        return "its intermediate is read elsewhere"
    if sp.input[0] != first.input[0]:
        return "its sparse branch reads another input"
    if sorted(add.input) != sorted([last.output[0], sp.output[0]]) or not (
            g.only_into(last.output[0], add) and g.only_into(sp.output[0], add)):
        return "its branches are read elsewhere"
    if not all(g.rank2_const(t) for t in (first.input[1], last.input[1], sp.input[1])):
        return "its factors are not constants on the right (a weight on the left)"
    return [first, last, sp, add], [first.input[0], first.input[1], last.input[1], sp.input[1]], add.output[0]


#: Form name -> (plugin contract, matcher)
PATTERNS = {"lowrank": (LOW_RANK_GEMM, _match_low_rank),
            "lowrank+sparse": (LOW_RANK_SPARSE_GEMM, _match_low_rank_sparse)}


#: The name suffix of each form's last chain node (``RewriteContext.node``: ``{label}/{suffix}``).
LAST = {"lowrank": "/lr_out", "lowrank+sparse": "/ls_add"}


def rewritten_chains(model: onnx.ModelProto) -> dict[str, list[str]]:
    """The labels of the chains the rewrite wrote, by form, read from the node names (each chain's
    structure is checked again when it is matched)."""
    out: dict[str, list[str]] = {}
    for n in model.graph.node:
        for form, suffix in LAST.items():
            if n.name.endswith(suffix):
                out.setdefault(form, []).append(n.name[: -len(suffix)])
    return out


def emit_functions(model: onnx.ModelProto, rewritten: dict[str, list[str]] | None = None
                   ) -> tuple[onnx.ModelProto, Fused]:
    """``model`` with every fusable chain of ``rewritten`` (labels by form name; default: every
    chain the rewrite wrote, :func:`rewritten_chains`) replaced by a call of its plugin's
    model-local function (a new ModelProto; ``model`` is not changed), and what was done."""
    if rewritten is None:
        rewritten = rewritten_chains(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    g = _Graph(graph)
    fused, drop, calls_at = Fused(), set(), {}
    for form, labels in sorted(rewritten.items()):
        if form not in PATTERNS:
            continue
        contract, match = PATTERNS[form]
        for label in labels:
            m = match(g, label)
            if isinstance(m, str):
                fused.left[label] = m
                continue
            nodes, inputs, output = m
            call = helper.make_node(contract.name, inputs, [output], name=f"{label}/{contract.name}",
                                    domain=contract.namespace, **contract.call_attributes())
            drop.update(id(n) for n in nodes)
            calls_at[id(nodes[-1])] = call  # the call takes the place of the chain's last node
            fused.calls.setdefault(contract.name, []).append(label)
    if not fused.calls:
        return out, fused
    internal = {t for n in graph.node if id(n) in drop for t in n.output} - {c.output[0] for c in calls_at.values()}
    nodes = [calls_at.get(id(n), n) for n in graph.node if id(n) not in drop or id(n) in calls_at]
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [v for v in graph.value_info if v.name not in internal]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 17)
    contracts = {c.name: c for c, _ in PATTERNS.values()}
    for name in sorted(fused.calls):
        out.functions.append(function(contracts[name], opset))
    if not any(o.domain == LOW_RANK_GEMM.namespace for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(LOW_RANK_GEMM.namespace, 1))
    out.ir_version = max(out.ir_version, FUNCTIONS_IR_VERSION)
    return out, fused
