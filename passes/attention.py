"""Multi-head attention blocks, found by structure, and their head-dimension rewrite.

A block, as the TorchScript (opset 14-17) and dynamo (opset 18) exporters write eager attention::

    q = Reshape(x_q Wq (+ bq), [.., H, d]) -> Transpose(0,2,1,3)          (also: Gemm)
    k = Reshape(x_k Wk (+ bk), [.., H, d]) -> Transpose(0,2,3,1)          (or (0,2,1,3) then (0,1,3,2))
    v = Reshape(x_k Wv (+ bv), [.., H, d]) -> Transpose(0,2,1,3)
    p = Softmax(elementwise(MatMul(q, k)), axis=-1)   (scale Mul/Div, mask Add/Where; or q, k scaled)
    o = Reshape(Transpose(MatMul(p, v), 0,2,1,3), [.., H d]) Wo (+ bo)

Names are never read. What is checked: each projection is a linear layer with a constant weight
(``passes.mlp.Linear``); the split reshapes end in ``[H, d]`` (or ``[-1, d]``, ``[H, -1]``), the
merge in ``H d`` (or -1); every tensor between a projection and the attention MatMuls is used
only there; the probabilities reach the context MatMul unchanged (its rows sum to one). Fused
QKV projections (one weight, then Split/Slice) and ONNX Runtime's fused ``Attention`` /
``MultiHeadAttention`` ops are declined with their reason.

The rewrite (``rewrite_qk`` / ``rewrite_ov``; the math in ``lrcompile.factorize.heads``) gives the
projections their thinner constants and every shape that names ``d`` (or ``H d``) its new value,
through a private copy of that shape (exporters share one shape tensor across layers). The
softmax scale is an operand of the score path and is left as it is: the original ``1/sqrt(d)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from lrcompile.ir import ConstantResolver, RewriteContext, node_label
from .mlp import Linear, linear

#: Ops allowed between the score MatMul and the Softmax (scale, mask, casts).
SCORE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity"})
#: Ops allowed between Softmax and the context MatMul (row sums stay one).
PROB_OPS = frozenset({"Cast", "Identity", "Dropout"})
FUSED = frozenset({"Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention"})


@dataclass
class Split:
    """A head split: ``Reshape(proj, shape)``, and where its shape names ``d``."""

    reshape: gs.Node
    shape: np.ndarray  # the shape's value (dynamic entries -> 0 placeholder not read)
    source: str  # "const": the shape input is constant; "concat": a Concat whose last input is


@dataclass
class AttentionBlock:
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    heads: int
    head_dim: int  # of queries and keys
    v_dim: int  # of values (the original export has both equal; a reduced model need not)
    q_split: gs.Node
    k_split: gs.Node
    v_split: gs.Node
    merge: gs.Node
    softmax: gs.Node
    probs: str  # the probabilities feeding the context MatMul [B, H, Tq, Tk]
    x_q: str  # the query projection's input
    x_kv: str  # the key / value projections' input
    scale: float | None = None  # the score scale, where it is a constant (reported, never changed)

    @property
    def label(self) -> str:
        return node_label(self.softmax)

    @property
    def cross(self) -> bool:
        return self.x_q != self.x_kv


def _single(t: gs.Tensor) -> gs.Node | None:
    return t.outputs[0] if len(t.outputs) == 1 else None


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def _perm(node: gs.Node) -> list[int] | None:
    return list(node.attrs.get("perm", [])) if node is not None and node.op == "Transpose" else None


def _shape_value(t: gs.Tensor, consts: ConstantResolver) -> tuple[np.ndarray | None, str]:
    """The value of a Reshape's shape input where its last entries are known: a constant, or a
    Concat whose last input is constant (the leading entries, batch and sequence, may be dynamic:
    they read as 0 here and are never rewritten)."""
    v = consts.resolve(t).value
    if v is not None:
        return np.asarray(v).astype(np.int64).reshape(-1), "const"
    node = _producer(t)
    if node is not None and node.op == "Concat" and node.inputs:
        parts = []
        for i in node.inputs:
            c = consts.resolve(i).value
            if c is None:
                n = _producer(i)
                if n is not None and (n.op == "Unsqueeze" or n.op == "Shape" and _shape_slice_len(n) == 1):
                    parts.append(np.zeros(1, np.int64))  # a dynamic dim (batch, sequence): never rewritten
                    continue
                return None, f"the shape part {i.name} is computed (length unknown)"
            parts.append(np.asarray(c).astype(np.int64).reshape(-1))
        if consts.resolve(node.inputs[-1]).value is None:
            return None, "the shape's last part is computed"
        return np.concatenate(parts), "concat"
    return None, "the shape is computed by a subgraph this rewrite does not follow"


def _shape_slice_len(node: gs.Node) -> int | None:
    """Entries of a ``Shape(x, start, end)`` output, where both ends are given and non-negative."""
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    return end - start if end is not None and start >= 0 and end >= 0 else None


def _split_of(lin: Linear, consts: ConstantResolver, outputs: set[str]) -> tuple[gs.Node, np.ndarray, str] | str:
    """The head-split Reshape right after a projection, with its shape."""
    if lin.out.name in outputs:
        return "the projection's output is a model output"
    users = [c for c in lin.out.outputs if not _reads_leading_dims(c, 3, consts)]
    node = users[0] if len(users) == 1 else None
    if node is None or node.op != "Reshape" or node.inputs[0] is not lin.out:
        return f"the projection {node_label(lin.node)} does not feed one Reshape (fused QKV or another layout)"
    shape, how = _shape_value(node.inputs[1], consts)
    if shape is None:
        return f"head split {node_label(node)}: {how}"
    if shape.size != 4:
        return f"head split {node_label(node)} makes a rank-{shape.size} tensor, not [B, T, H, d]"
    return node, shape, how


def _reads_leading_dims(node: gs.Node, rank: int, consts: ConstantResolver) -> bool:
    """Whether ``node`` is a ``Shape`` of which only dimensions before the last are read (exporters
    take batch and sequence from the projection's output): such a use survives a thinner last
    dimension."""
    if node.op != "Shape":
        return False
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    if end is not None and 0 <= start and 0 <= int(end) <= rank - 1 or end is not None and -rank < int(end) < 0:
        return True
    for use in node.outputs[0].outputs:
        idx = consts.resolve(use.inputs[1]).value if use.op == "Gather" and len(use.inputs) > 1 else None
        if idx is None or int(use.attrs.get("axis", 0)) != 0 or start != 0:
            return False
        i = np.asarray(idx).reshape(-1)
        if not np.all(((0 <= i) & (i <= rank - 2)) | ((-rank <= i) & (i <= -2))):
            return False
    return True


def _heads(shape: np.ndarray, width: int) -> tuple[int, int] | str:
    h, d = int(shape[-2]), int(shape[-1])
    if h > 0 and d > 0 and h * d == width:
        return h, d
    if h > 0 and d == -1 and width % h == 0:
        return h, width // h
    if h == -1 and d > 0 and width % d == 0:
        return width // d, d
    return f"split [.., {h}, {d}] does not divide the projection's {width} channels into heads"


def _back_through(t: gs.Tensor, allowed: frozenset, consts: ConstantResolver, depth: int = 8
                  ) -> tuple[gs.Node, list[gs.Node]] | None:
    """The one MatMul with two computed operands reached from ``t`` back through ``allowed`` ops
    (breadth first, at most ``depth`` ops deep), and the ops on the way to it; None when there is
    none or more than one (a mask built from another product)."""
    found = []
    frontier = [(t, [])]
    seen: set[str] = set()
    for _ in range(depth):
        nxt = []
        for tensor, path in frontier:
            node = _producer(tensor)
            if node is None or tensor.name in seen or consts.resolve(tensor).value is not None:
                continue
            seen.add(tensor.name)
            if node.op == "MatMul":
                if all(consts.resolve(i).value is None for i in node.inputs):
                    found.append((node, path))
                continue
            if node.op in allowed:
                nxt += [(i, path + [node]) for i in node.inputs if i.name]
        frontier = nxt
    return found[0] if len(found) == 1 else None


def _scale_of(path_nodes: list[gs.Node], consts: ConstantResolver) -> float | None:
    scale = 1.0
    found = False
    for n in path_nodes:
        if n.op in ("Mul", "Div"):
            for i in n.inputs:
                v = consts.resolve(i).value
                if v is not None and np.asarray(v).size == 1:
                    x = float(np.asarray(v).reshape(-1)[0])
                    scale = scale * x if n.op == "Mul" else scale / x
                    found = True
    return scale if found else None


def _side(t: gs.Tensor, consts: ConstantResolver, outputs: set[str], key: bool
          ) -> tuple[Linear, gs.Node, list[gs.Node]] | str:
    """From an operand of the score (or context) MatMul back to its projection: optional scalar
    Mul/Div (a scaled query or key), the Transpose(s) to heads, the split Reshape, the projection."""
    chain: list[gs.Node] = []
    node = _producer(t)
    while node is not None and node.op in ("Mul", "Div", "Transpose") and len(chain) < 4:
        if node.op in ("Mul", "Div"):
            others = [i for i in node.inputs if consts.resolve(i).value is not None]
            if len(others) != 1 or np.asarray(consts.resolve(others[0]).value).size != 1:
                return f"{node.op} ({node_label(node)}) on the head tensor is not by a scalar constant"
            inner = [i for i in node.inputs if consts.resolve(i).value is None][0]
        else:
            inner = node.inputs[0]
        chain.append(node)
        if len(inner.outputs) != 1:
            return f"{node_label(_producer(inner) or node)}'s output is used outside the attention block"
        node = _producer(inner)
    perms = [_perm(n) for n in chain if n.op == "Transpose"]
    ok = ([[0, 2, 3, 1]], [[0, 1, 3, 2], [0, 2, 1, 3]]) if key else ([[0, 2, 1, 3]],)
    if perms not in [list(p) for p in ok]:
        return f"head transposes {perms} are not the [B, H, T, d] layout"
    if node is None or node.op != "Reshape":
        return "no head-split Reshape before the head transpose"
    proj = _producer(node.inputs[0])
    if proj is None:
        return "the head split reads no projection"
    if proj.op == "Add":  # the bias Add: the linear layer is its MatMul input
        mm = [_producer(i) for i in proj.inputs if _producer(i) is not None and _producer(i).op == "MatMul"]
        if len(mm) != 1:
            return f"the head split reads {proj.op} ({node_label(proj)}), not a projection"
        proj = mm[0]
    if proj.op in ("Split", "Slice"):
        return "fused QKV projection (one weight split into Q, K and V): not rewritten"
    if proj.op not in ("MatMul", "Gemm"):
        return f"the head split reads {proj.op} ({node_label(proj)}), not a projection"
    lin = linear(proj, consts, outputs)
    if isinstance(lin, str):
        return f"projection {node_label(proj)}: {lin}"
    return lin, node, chain


def find_blocks(graph: gs.Graph, consts: ConstantResolver, nodes: list[gs.Node]) -> tuple[list[AttentionBlock], dict]:
    """The attention blocks whose Softmax is in ``nodes``; returns (blocks, reason by Softmax label
    for the softmaxes that start no block, and by node label for fused attention ops)."""
    outputs = {t.name for t in graph.outputs}
    blocks, reasons, used = [], {}, set()
    for node in nodes:
        if node.op in FUSED:
            reasons[node_label(node)] = (f"fused {node.op} ({node.domain or 'ai.onnx'}): export the model without "
                                         "ONNX Runtime's transformer optimizer to reduce its heads")
            continue
        if node.op != "Softmax":
            continue
        b = _block(node, consts, outputs)
        if isinstance(b, str):
            reasons[node_label(node)] = b
            continue
        ids = {id(x.node) for x in (b.q, b.k, b.v, b.o)}
        if ids & used or len(ids) != 4:
            reasons[node_label(node)] = "a projection is shared with another attention block"
            continue
        used |= ids
        blocks.append(b)
    return blocks, reasons


def _block(sm: gs.Node, consts: ConstantResolver, outputs: set[str]) -> AttentionBlock | str:
    axis = int(sm.attrs.get("axis", -1))
    if axis not in (-1, 3):
        return f"Softmax over axis {axis}, not the keys"
    found = _back_through(sm.inputs[0], SCORE_OPS, consts)
    if found is None:
        return "no single score MatMul (Q K^T) before the Softmax"
    score, path = found
    q = _side(score.inputs[0], consts, outputs, key=False)
    if isinstance(q, str):
        return f"query: {q}"
    k = _side(score.inputs[1], consts, outputs, key=True)
    if isinstance(k, str):
        return f"key: {k}"
    # softmax -> context MatMul (probabilities first)
    t = sm.outputs[0]
    ctx = None
    for _ in range(3):
        c = _single(t)
        if c is None or t.name in outputs:
            return "the probabilities are used outside the block (row sums would not be preserved)"
        if c.op == "MatMul" and c.inputs[0] is t:
            ctx = c
            break
        if c.op not in PROB_OPS:
            return f"the probabilities pass through {c.op} ({node_label(c)}) before the context MatMul"
        t = c.outputs[0]
    if ctx is None:
        return "no context MatMul after the Softmax"
    v = _side(ctx.inputs[1], consts, outputs, key=False)
    if isinstance(v, str):
        return f"value: {v}"
    # context -> Transpose(0,2,1,3) -> merge Reshape -> output projection
    tr = _single(ctx.outputs[0])
    if tr is None or _perm(tr) != [0, 2, 1, 3]:
        return "the context is not transposed back to [B, T, H, d]"
    merge = _single(tr.outputs[0])
    if merge is None or merge.op != "Reshape":
        return "no merge Reshape after the context"
    mshape, how = _shape_value(merge.inputs[1], consts)
    if mshape is None:
        return f"merge {node_label(merge)}: {how}"
    oproj = _single(merge.outputs[0])
    if oproj is None or oproj.op not in ("MatMul", "Gemm") or oproj.inputs[0] is not merge.outputs[0]:
        return "the merged context does not feed one output projection"
    o = linear(oproj, consts, outputs)
    if isinstance(o, str):
        return f"output projection {node_label(oproj)}: {o}"
    (ql, qs, _), (kl, ks, _), (vl, vs, _) = q, k, v
    splits = []
    for lin, node in ((ql, qs), (kl, ks), (vl, vs)):
        got = _split_of(lin, consts, outputs)
        if isinstance(got, str):
            return got
        if got[0] is not node:
            return f"{node_label(lin.node)} reaches the heads through another path"
        hd = _heads(got[1], lin.weight.shape[1])
        if isinstance(hd, str):
            return f"{node_label(node)}: {hd}"
        splits.append(hd)
    if len({h for h, _ in splits}) != 1 or splits[0] != splits[1]:
        return f"Q, K and V split into different heads: {splits}"
    heads, d = splits[0]
    dv = splits[2][1]
    if o.weight.shape[0] != heads * dv:
        return f"the output projection reads {o.weight.shape[0]} channels, the heads give {heads * dv}"
    if int(mshape[-1]) not in (-1, heads * dv):
        return f"merge {node_label(merge)} makes [.., {int(mshape[-1])}], not [.., {heads * dv}]"
    if vl.bias is not None and o.bias is None:
        return "the value bias has no output bias to fold into"
    if kl.node.inputs[0].name != vl.node.inputs[0].name:
        return "keys and values are projected from different inputs"
    return AttentionBlock(q=ql, k=kl, v=vl, o=o, heads=heads, head_dim=d, v_dim=dv, q_split=qs, k_split=ks,
                          v_split=vs,
                          merge=merge, softmax=sm, probs=ctx.inputs[0].name, x_q=ql.node.inputs[0].name,
                          x_kv=kl.node.inputs[0].name, scale=_scale_of(path + q[2] + k[2], consts))


# ---------------------------------------------------------------------------------------------- rewrite


def _set_last(reshape: gs.Node, value: int, ctx: RewriteContext, consts: ConstantResolver) -> None:
    """Give ``reshape`` a private shape whose last entry is ``value`` (kept as it is when -1)."""
    base = node_label(reshape)
    t = reshape.inputs[1]
    v = consts.resolve(t).value
    if v is not None:
        shape = np.asarray(v).astype(np.int64).copy()
        if shape[-1] == -1:
            return
        shape[-1] = value
        reshape.inputs[1] = ctx.const(base, "heads_shape", base, shape)
        return
    concat = _producer(t)
    last = np.asarray(consts.resolve(concat.inputs[-1]).value).astype(np.int64).reshape(-1).copy()
    if last[-1] == -1:
        return
    last[-1] = value
    part = ctx.const(base, "heads_shape_part", base, last)
    out = gs.Variable(ctx.namer(base, "heads_shape"), dtype=np.int64)
    ctx.node("Concat", base, "heads_shape_concat", [*concat.inputs[:-1], part], [out], {"axis": 0})
    reshape.inputs[1] = out


def _write(lin: Linear, w: np.ndarray, b: np.ndarray | None, role: str, ctx: RewriteContext) -> None:
    base = node_label(lin.node)
    lin.node.inputs[1] = ctx.const(base, f"{role}_w", base, (w.T if lin.trans else w).astype(lin.weight.dtype))
    if lin.bias is not None:
        shape = lin.bias_node.inputs[lin.bias_index].shape
        bb = (np.zeros(w.shape[1]) if b is None else b).astype(lin.bias.dtype)
        bb = bb.reshape([1] * (len(shape) - 1) + [-1]) if shape is not None and len(shape) > 1 else bb
        lin.bias_node.inputs[lin.bias_index] = ctx.const(base, f"{role}_b", base, bb)
    for t in (lin.node.outputs[0], lin.out):
        if isinstance(t, gs.Variable):
            t.shape = None


def rewrite_qk(block: AttentionBlock, fit, ctx: RewriteContext, consts: ConstantResolver) -> None:
    """Thinner query and key projections (``fit``: ``factorize.heads.HeadFit`` of kind qk) and
    their head splits at the new dimension."""
    _write(block.q, fit.left, fit.left_bias, "heads", ctx)
    _write(block.k, fit.right, fit.right_bias, "heads", ctx)
    for split in (block.q_split, block.k_split):
        _set_last(split, fit.rank, ctx, consts)
        _clear_shapes(split)


def rewrite_ov(block: AttentionBlock, fit, ctx: RewriteContext, consts: ConstantResolver) -> None:
    """Thinner value projection (bias folded into the output's), output projection reading
    ``H r`` channels, the value split and the merge at the new sizes."""
    v, o = block.v, block.o
    if v.bias is not None and v.bias_node is not v.node:  # the fold leaves it zero: drop its Add
        add = v.bias_node
        out, mm = add.outputs[0], v.node.outputs[0]
        for c in list(out.outputs):  # the split, and any Shape that reads the batch and sequence
            for j, i in enumerate(list(c.inputs)):
                if i is out:
                    c.inputs[j] = mm
        add.outputs.clear()
        add.inputs.clear()
        ctx.graph.nodes.remove(add)
        v.bias, v.out = None, v.node.outputs[0]
    _write(v, fit.left, None, "heads", ctx)
    base = node_label(o.node)
    o.node.inputs[1] = ctx.const(base, "heads_w", base, (fit.right.T if o.trans else fit.right).astype(o.weight.dtype))
    if o.bias is not None and fit.right_bias is not None:
        shape = o.bias_node.inputs[o.bias_index].shape
        bb = fit.right_bias.astype(o.bias.dtype)
        bb = bb.reshape([1] * (len(shape) - 1) + [-1]) if shape is not None and len(shape) > 1 else bb
        o.bias_node.inputs[o.bias_index] = ctx.const(base, "heads_b", base, bb)
    _set_last(block.v_split, fit.rank, ctx, consts)
    _set_last(block.merge, block.heads * fit.rank, ctx, consts)
    _clear_shapes(block.v_split)


def _clear_shapes(node: gs.Node) -> None:
    """Drop the recorded shapes from a rewritten split (or the context MatMul) down to the next
    MatMul that reads two computed operands (the score or context MatMul, whose shapes do not
    change) or to a projection (ONNX re-infers them)."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        for t in n.outputs:
            if isinstance(t, gs.Variable):
                t.shape = None
            for c in t.outputs:
                if c.op in ("Transpose", "Mul", "Div", "Reshape", "Cast", "Identity"):
                    todo.append(c)
                elif c.op == "MatMul" and n is not node and all(not isinstance(i, gs.Constant) for i in c.inputs):
                    if c.inputs[1] is t:  # the context MatMul: [B, H, T, r] now
                        todo.append(c)


__all__ = ["AttentionBlock", "find_blocks", "rewrite_ov", "rewrite_qk"]
