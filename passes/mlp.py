"""MLP pairs whose hidden channels can be pruned: Linear -> elementwise activation -> Linear.

A pair is ``up``: MatMul(x, B_up) [+ Add(b_up)] or Gemm(x, B_up, b_up), then a chain of
elementwise ops that act on each hidden channel alone (Relu, Gelu, an exported Erf-Gelu, Sigmoid,
SiLU as Mul(x, Sigmoid(x)), scalar Mul/Div/Add, ...), then ``down``: MatMul(h, B_down) [+ Add] or
Gemm(h, B_down, b_down). Every tensor between the two must be used only inside the pair, every
other operand of the chain must be a scalar constant, and both weights must be constants: then
dropping hidden channel ``j`` is exactly dropping column ``j`` of ``B_up`` and ``b_up`` and row
``j`` of ``B_down``. The math (which channels, the refitted ``B_down``) lives in
``lrcompile.factorize.channels``; this module finds pairs and writes the smaller constants.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from lrcompile.ir import ConstantResolver, RewriteContext, float_weight_problem, node_label

#: Ops that map each hidden channel to itself (with scalar constants as their other operands).
ELEMENTWISE = frozenset(
    {"Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Erf", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
     "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Mul", "Div", "Add", "Sub", "Pow", "Sqrt", "Exp", "Neg",
     "Abs", "Clip", "Identity"}
)
#: Most ops one activation chain may hold (an exported Erf-Gelu is five).
MAX_CHAIN = 16


@dataclass
class Linear:
    """One side of a pair: the GEMM node, its weight in [in, out] layout, and its bias site."""

    node: gs.Node
    weight: np.ndarray  # [in, out]
    trans: bool  # stored transposed (Gemm transB=1)
    bias: np.ndarray | None = None
    bias_node: gs.Node | None = None  # the Add holding the bias, or the Gemm itself
    bias_index: int = -1  # which input of bias_node is the bias
    out: gs.Tensor | None = None  # the tensor after the bias


@dataclass
class MlpPair:
    up: Linear
    down: Linear
    chain: list[gs.Node] = field(default_factory=list)
    hidden: str = ""  # the down layer's input tensor (the statistics are read there)

    @property
    def label(self) -> str:
        return f"{node_label(self.up.node)} -> {node_label(self.down.node)}"

    @property
    def width(self) -> int:
        return self.up.weight.shape[1]

    def params(self, k: int | None = None) -> int:
        """Weight parameters of both layers with ``k`` hidden channels (default: all)."""
        k = self.width if k is None else k
        return k * (self.up.weight.shape[0] + self.down.weight.shape[1])


def _const(t: gs.Tensor, consts: ConstantResolver) -> np.ndarray | None:
    return consts.resolve(t).value


def _single_consumer(t: gs.Tensor) -> gs.Node | None:
    return t.outputs[0] if len(t.outputs) == 1 else None


def linear(node: gs.Node, consts: ConstantResolver, graph_outputs: set[str]) -> Linear | str:
    """The node as a Linear, or why it is not one."""
    if node.op == "MatMul":
        w = _const(node.inputs[1], consts)
        if w is None or _const(node.inputs[0], consts) is not None:
            return "no constant right-hand weight"
        trans = False
    elif node.op == "Gemm":
        if int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0 \
                or float(node.attrs.get("beta", 1.0)) != 1.0:
            return "Gemm with transA, alpha or beta (not rewritten)"
        w = _const(node.inputs[1], consts)
        if w is None:
            return "no constant weight"
        trans = bool(int(node.attrs.get("transB", 0)))
        w = w.T if trans else w
    else:
        return f"{node.op} is not a linear layer"
    problem = float_weight_problem(w) if w.ndim == 2 else "weight is not 2-D"
    if problem:
        return problem
    lin = Linear(node, np.ascontiguousarray(w), trans, out=node.outputs[0])
    n = w.shape[1]
    if node.op == "Gemm":
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = _const(node.inputs[2], consts)
            if b is None or b.size != n or b.shape[-1] != n:
                return "Gemm bias is not a constant vector over the outputs"
            lin.bias, lin.bias_node, lin.bias_index = b.reshape(n), node, 2
        return lin
    add = _single_consumer(node.outputs[0])
    if add is not None and add.op == "Add" and node.outputs[0].name not in graph_outputs:
        other = 1 if add.inputs[0] is node.outputs[0] else 0
        b = _const(add.inputs[other], consts)
        if b is not None and b.size == n and b.shape[-1] == n and b.dtype.kind == "f":
            lin.bias, lin.bias_node, lin.bias_index, lin.out = b.reshape(n), add, other, add.outputs[0]
    return lin


def _scalar(t: gs.Tensor, consts: ConstantResolver) -> bool:
    v = _const(t, consts)
    return v is not None and v.size == 1


def find_pairs(graph: gs.Graph, consts: ConstantResolver, nodes: list[gs.Node]) -> tuple[list[MlpPair], dict]:
    """The MLP pairs whose ``up`` node is in ``nodes``; returns (pairs, reason by up-node label for
    the linear layers that do not start a prunable pair)."""
    outputs = {t.name for t in graph.outputs}
    pairs, reasons, used = [], {}, set()
    for node in nodes:
        if node.op not in ("MatMul", "Gemm") or id(node) in used:
            continue
        up = linear(node, consts, outputs)
        if isinstance(up, str):
            continue
        pair = _follow(up, consts, outputs)
        if isinstance(pair, str):
            reasons[node_label(node)] = pair
            continue
        if id(pair.down.node) in used:  # a layer is rewritten by one pair only
            reasons[node_label(node)] = "its second layer already belongs to another pair"
            continue
        used.update({id(node), id(pair.down.node)})
        pairs.append(pair)
    return pairs, reasons


def _follow(up: Linear, consts: ConstantResolver, outputs: set[str]) -> MlpPair | str:
    """Walk from ``up``'s output through channel-wise ops to the down layer."""
    region = {up.out.name}
    frontier = [up.out]
    chain: list[gs.Node] = []
    seen: set[int] = set()
    down_node = None
    while frontier:
        t = frontier.pop()
        if t.name in outputs:
            return "an intermediate tensor is a model output"
        for c in t.outputs:
            if id(c) in seen or c is down_node:
                continue
            if c.op in ("MatMul", "Gemm") and c.inputs[0] is t:
                if down_node is not None:
                    return _mixing(chain, region, consts) or "the hidden activation feeds more than one layer"
                down_node = c
                continue
            if c.op not in ELEMENTWISE or c.domain not in (None, "", "ai.onnx") or len(c.outputs) != 1:
                return f"the hidden activation feeds {c.op} ({node_label(c)}), not a channel-wise op"
            chain.append(c)
            seen.add(id(c))
            if len(chain) > MAX_CHAIN:
                return f"more than {MAX_CHAIN} ops between the two layers"
            region.add(c.outputs[0].name)
            frontier.append(c.outputs[0])
    if down_node is None:
        return "no second linear layer after the activation"
    if down_node.inputs[0].name not in region:
        return "the second layer does not read the activation"
    down = linear(down_node, consts, outputs)
    if isinstance(down, str):
        return f"second layer: {down}"
    if down.weight.shape[0] != up.weight.shape[1]:
        return "the layers' hidden widths differ (a reshape between them)"
    problem = _mixing(chain, region, consts)  # every operand must be a chain tensor or a scalar constant
    if problem:
        return problem
    return MlpPair(up, down, chain, down_node.inputs[0].name)


def _mixing(chain: list[gs.Node], region: set[str], consts: ConstantResolver) -> str | None:
    """Why the chain is not channel-wise: an op reading a tensor from outside it that is not a scalar."""
    for n in chain:
        for i in n.inputs:
            if i.name and i.name not in region and not _scalar(i, consts):
                return f"{n.op} ({node_label(n)}) mixes in a tensor that is not a scalar constant"
    return None


def rewrite(pair: MlpPair, keep: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
            ctx: RewriteContext) -> None:
    """Give ``pair`` its pruned constants: ``B_up[:, keep]``, ``b_up[keep]``, the refitted down."""
    up, down = pair.up, pair.down
    dtype = up.weight.dtype
    base_up, base_down = node_label(up.node), node_label(down.node)
    w_up = up.weight[:, keep]
    up.node.inputs[1] = ctx.const(base_up, "pruned_w", base_up, (w_up.T if up.trans else w_up).astype(dtype))
    if up.bias is not None:
        b = up.bias[keep].astype(up.bias.dtype)
        up.bias_node.inputs[up.bias_index] = ctx.const(base_up, "pruned_b", base_up, b)
    ddtype = down.weight.dtype
    down.node.inputs[1] = ctx.const(base_down, "pruned_w", base_down,
                                    (weight.T if down.trans else weight).astype(ddtype))
    if down.bias is not None and bias is not None:
        shape = down.bias_node.inputs[down.bias_index].shape
        b = bias.astype(down.bias.dtype).reshape(shape if shape is not None else (-1,))
        down.bias_node.inputs[down.bias_index] = ctx.const(base_down, "pruned_b", base_down, b)
    # the hidden tensors are narrower now: drop their recorded shapes (ONNX re-infers them)
    for t in [up.node.outputs[0], up.out, *(n.outputs[0] for n in pair.chain)]:
        if isinstance(t, gs.Variable):
            t.shape = None
