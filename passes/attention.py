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
only there; the probabilities reach the context MatMul unchanged (its rows sum to one). A fused
QKV projection (one weight) is followed through a Split on its last axis or the 5-D layout
``Reshape [.., 3, H, d] -> Transpose(2,0,3,1,4) -> Slice/Gather`` (``Fused``); one cut by Slices
with computed ends, and ONNX Runtime's fused ``Attention`` / ``MultiHeadAttention`` ops, are
declined with their reason.

The rewrite (``rewrite_qk`` / ``rewrite_ov``; the math in ``lrcompile.factorize.heads``) gives the
projections their thinner constants and every shape that names ``d`` (or ``H d``) its new value,
through a private copy of that shape (exporters share one shape tensor across layers). The
softmax scale is an operand of the score path and is left as it is: the original ``1/sqrt(d)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
class Fused:
    """One QKV projection ``[K, sum_i H d_i]`` feeding all three heads: its column blocks in
    ``order`` (roles "q", "k", "v"), current per-head dims (updated as rewrites land), and how it
    splits: ``split`` (a Split on the last axis, then a 4-D head reshape per role) or ``5d``
    (``Reshape [.., 3, H, d]`` -> ``Transpose(2,0,3,1,4)`` -> a Slice/Gather per role; rewritten into
    the split layout on the first reduction, so that Q.K and V.O may differ)."""

    lin: Linear
    order: tuple[str, ...]
    dims: dict[str, int]
    layout: str
    split: gs.Node | None = None
    reshape5: gs.Node | None = None
    heads_out: dict = field(default_factory=dict)  # 5d: role -> its [B, H, T, d] tensor
    w: np.ndarray | None = None  # the current weight [K, N] and bias (rewrites replace column blocks)
    b: np.ndarray | None = None


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
    fused: Fused | None = None  # one QKV weight (q, k, v are then column views of it)

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
    users = [c for c in _through_identity(lin.out).outputs if not _reads_leading_dims(c, 3, consts)]
    node = users[0] if len(users) == 1 else None
    if node is None or node.op != "Reshape" or node.inputs[0] is not _through_identity(lin.out):
        return f"the projection {node_label(lin.node)} does not feed one Reshape (fused QKV or another layout)"
    shape, how = _shape_value(node.inputs[1], consts)
    if shape is None:
        return f"head split {node_label(node)}: {how}"
    if shape.size != 4:
        return f"head split {node_label(node)} makes a rank-{shape.size} tensor, not [B, T, H, d]"
    return node, shape, how


def _through_identity(t: gs.Tensor) -> gs.Tensor:
    """``t``, or the output of the Identity ops it runs through alone (some exporters add them)."""
    while len(t.outputs) == 1 and t.outputs[0].op == "Identity":
        t = t.outputs[0].outputs[0]
    return t


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


@dataclass
class Side:
    """One operand of the score or context MatMul traced back to its projection."""

    lin: Linear
    chain: list  # the ops between the heads and the MatMul (scale, transposes)
    reshape: gs.Node | None = None  # the 4-D head split (None in the 5d layout)
    fused: str | None = None  # None, "split" or "5d"
    index: int = 0  # the role's column block in a fused weight
    split: gs.Node | None = None
    reshape5: gs.Node | None = None
    head: gs.Tensor | None = None  # 5d: the [B, H, T, d] tensor of this role


def _is_scalar(t: gs.Tensor, consts: ConstantResolver, value: float | None = None) -> bool:
    v = consts.resolve(t).value
    return v is not None and np.asarray(v).size == 1 and (value is None or float(np.asarray(v).reshape(-1)[0]) == value)


def _side(t: gs.Tensor, consts: ConstantResolver, outputs: set[str], key: bool) -> Side | str:
    """From an operand of the score (or context) MatMul back to its projection: optional scalar
    Mul/Div (a scaled query or key; an Add of 0 or Identity as some exporters write), the
    Transpose(s) to heads, the head split, the projection (or one fused QKV projection)."""
    chain: list[gs.Node] = []
    node = _producer(t)
    while node is not None and node.op in ("Mul", "Div", "Transpose", "Identity", "Add", "Sub") and len(chain) < 6:
        if node.op in ("Mul", "Div", "Add", "Sub"):
            others = [i for i in node.inputs if consts.resolve(i).value is not None]
            if len(others) != 1 or not _is_scalar(others[0], consts, None if node.op in ("Mul", "Div") else 0.0):
                return f"{node.op} ({node_label(node)}) on the head tensor is not by a scalar constant"
            inner = [i for i in node.inputs if consts.resolve(i).value is None][0]
        else:
            inner = node.inputs[0]
        chain.append(node)
        if len(inner.outputs) != 1:
            return f"{node_label(_producer(inner) or node)}'s output is used outside the attention block"
        node = _producer(inner)
    perms = [_perm(n) for n in chain if n.op == "Transpose"]
    if node is not None and node.op in ("Squeeze", "Gather"):  # one third of a 5-D fused QKV
        got = _fused5(node, consts, outputs)
        if isinstance(got, str):
            return got
        if perms != ([[0, 1, 3, 2]] if key else []):
            return f"head transposes {perms} after the fused QKV split are not the [B, H, T, d] layout"
        lin, index, reshape5 = got
        return Side(lin, chain, fused="5d", index=index, reshape5=reshape5, head=node.outputs[0])
    ok = ([[0, 2, 3, 1]], [[0, 1, 3, 2], [0, 2, 1, 3]]) if key else ([[0, 2, 1, 3]],)
    if perms not in [list(p) for p in ok]:
        return f"head transposes {perms} are not the [B, H, T, d] layout"
    if node is None or node.op != "Reshape":
        return "no head-split Reshape before the head transpose"
    proj = _producer(node.inputs[0])
    if proj is None:
        return "the head split reads no projection"
    if proj.op == "Split":  # a fused QKV projection chunked on its last axis
        got = _projection(_producer(proj.inputs[0]), consts, outputs)
        if isinstance(got, str):
            return f"fused QKV: {got}"
        if len(proj.outputs) != 3 or int(proj.attrs.get("axis", 0)) not in (-1, 2):
            return f"fused QKV: {node_label(proj)} does not split the projection in three on its last axis"
        return Side(got, chain, reshape=node, fused="split", index=list(proj.outputs).index(node.inputs[0]),
                    split=proj)
    if proj.op == "Slice":
        return "fused QKV projection sliced into Q, K and V: not rewritten (Split and 5-D reshape layouts are)"
    got = _projection(proj, consts, outputs)
    if isinstance(got, str):
        return got
    return Side(got, chain, reshape=node)


def _projection(proj: gs.Node | None, consts: ConstantResolver, outputs: set[str]) -> Linear | str:
    """The linear layer whose output (after its bias Add) is ``proj``'s output."""
    while proj is not None and proj.op == "Identity" and len(proj.outputs[0].outputs) == 1:
        proj = _producer(proj.inputs[0])
    if proj is None:
        return "the head split reads no projection"
    if proj.op == "Add":  # the bias Add: the linear layer is its MatMul input
        mm = [_producer(i) for i in proj.inputs if _producer(i) is not None and _producer(i).op == "MatMul"]
        if len(mm) != 1:
            return f"the head split reads {proj.op} ({node_label(proj)}), not a projection"
        proj = mm[0]
    if proj.op not in ("MatMul", "Gemm"):
        return f"the head split reads {proj.op} ({node_label(proj)}), not a projection"
    lin = linear(proj, consts, outputs)
    if isinstance(lin, str):
        return f"projection {node_label(proj)}: {lin}"
    return lin


def _fused5(node: gs.Node, consts: ConstantResolver, outputs: set[str]) -> tuple[Linear, int, gs.Node] | str:
    """``Squeeze(Slice(T, i:i+1, axis 0), 0)`` or ``Gather(T, i, axis 0)`` of
    ``T = Transpose(Reshape(x W (+ b), [.., 3, H, d]), (2, 0, 3, 1, 4))``: the projection, ``i``
    and the 5-D reshape."""
    if node.op == "Gather":
        idx = consts.resolve(node.inputs[1]).value
        if idx is None or np.asarray(idx).size != 1 or np.asarray(idx).ndim != 0 or int(node.attrs.get("axis", 0)):
            return f"{node_label(node)} is not one fused QKV part"
        index, src = int(idx), node.inputs[0]
    else:
        axes = node.attrs.get("axes") if "axes" in node.attrs else (
            consts.resolve(node.inputs[1]).value if len(node.inputs) > 1 else None)
        sl = _producer(node.inputs[0])
        if axes is None or list(np.asarray(axes).reshape(-1)) != [0] or sl is None or sl.op != "Slice" \
                or len(node.inputs[0].outputs) != 1:
            return f"{node_label(node)} is not one fused QKV part"
        vals = [consts.resolve(i).value for i in sl.inputs[1:]]
        if any(v is None for v in vals) or len(vals) < 3:
            return f"{node_label(sl)} slices a computed range"
        start, end, ax = (int(np.asarray(v).reshape(-1)[0]) for v in vals[:3])
        steps = int(np.asarray(vals[3]).reshape(-1)[0]) if len(vals) > 3 else 1
        if ax != 0 or end != start + 1 or steps != 1 or not 0 <= start < 3:
            return f"{node_label(sl)} is not one part of a fused QKV"
        index, src = start, sl.inputs[0]
    tr = _producer(src)
    if tr is None or _perm(tr) != [2, 0, 3, 1, 4]:
        return "the fused QKV part is not taken from Transpose(2, 0, 3, 1, 4)"
    if any(c.op not in ("Slice", "Gather") for c in tr.outputs[0].outputs) or len(tr.outputs[0].outputs) != 3:
        return "the fused QKV tensor has other uses than its three parts"
    r5 = _producer(tr.inputs[0])
    if r5 is None or r5.op != "Reshape" or len(tr.inputs[0].outputs) != 1:
        return "no 5-D head reshape before the fused QKV transpose"
    shape, how = _shape_value(r5.inputs[1], consts)
    if shape is None:
        return f"fused QKV reshape {node_label(r5)}: {how}"
    if shape.size != 5 or int(shape[-3]) != 3:
        return f"fused QKV reshape {node_label(r5)} makes {shape.tolist()}, not [B, T, 3, H, d]"
    if how == "concat" and _const_tail(_producer(r5.inputs[1]), consts, 3) is None:
        return f"fused QKV reshape {node_label(r5)}: the head entries [3, H, d] are computed"
    lin = _projection(_producer(r5.inputs[0]), consts, outputs)
    if isinstance(lin, str):
        return f"fused QKV: {lin}"
    out = _through_identity(lin.out)
    users = [c for c in out.outputs if not _reads_leading_dims(c, 3, consts)]
    if users != [r5]:
        return f"the fused QKV projection {node_label(lin.node)} has other uses"
    return lin, index, r5


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
        if ids & used or len(ids) != (2 if b.fused else 4):
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
    sides = {"q": q, "k": k, "v": v}
    fused = None
    if any(x.fused for x in sides.values()):
        got = _fused_views(sides, consts, outputs)
        if isinstance(got, str):
            return got
        fused, views, heads, dims = got
        ql, kl, vl = views["q"], views["k"], views["v"]
        d, dv = dims["q"], dims["v"]
        if dims["k"] != d:
            return f"Q and K heads differ in size: {dims}"
    else:
        splits = []
        for x in (q, k, v):
            got = _split_of(x.lin, consts, outputs)
            if isinstance(got, str):
                return got
            if got[0] is not x.reshape:
                return f"{node_label(x.lin.node)} reaches the heads through another path"
            hd = _heads(got[1], x.lin.weight.shape[1])
            if isinstance(hd, str):
                return f"{node_label(x.reshape)}: {hd}"
            splits.append(hd)
        if len({h for h, _ in splits}) != 1 or splits[0] != splits[1]:
            return f"Q, K and V split into different heads: {splits}"
        heads, d = splits[0]
        dv = splits[2][1]
        ql, kl, vl = q.lin, k.lin, v.lin
        if kl.node.inputs[0].name != vl.node.inputs[0].name:
            return "keys and values are projected from different inputs"
    if o.weight.shape[0] != heads * dv:
        return f"the output projection reads {o.weight.shape[0]} channels, the heads give {heads * dv}"
    if int(mshape[-1]) not in (-1, heads * dv):
        return f"merge {node_label(merge)} makes [.., {int(mshape[-1])}], not [.., {heads * dv}]"
    if vl.bias is not None and o.bias is None:
        return "the value bias has no output bias to fold into"
    return AttentionBlock(q=ql, k=kl, v=vl, o=o, heads=heads, head_dim=d, v_dim=dv, q_split=q.reshape,
                          k_split=k.reshape, v_split=v.reshape, merge=merge, softmax=sm, probs=ctx.inputs[0].name,
                          x_q=ql.node.inputs[0].name, x_kv=kl.node.inputs[0].name,
                          scale=_scale_of(path + q.chain + k.chain, consts), fused=fused)


def _const_tail(concat: gs.Node, consts: ConstantResolver, n: int) -> tuple[list, np.ndarray] | None:
    """A shape Concat as (its leading inputs, the values of its trailing constant inputs), the
    constant tail holding at least the last ``n`` entries; None when those are computed."""
    tail: list[np.ndarray] = []
    inputs = list(concat.inputs)
    while inputs and sum(t.size for t in tail) < n:
        v = consts.resolve(inputs[-1]).value
        if v is None:
            return None
        tail.insert(0, np.asarray(v, np.int64).reshape(-1))
        inputs.pop()
    return (inputs, np.concatenate(tail)) if sum(t.size for t in tail) >= n else None


def _fused_views(sides: dict, consts: ConstantResolver, outputs: set[str]):
    """One fused QKV weight behind all three sides: the ``Fused`` record, a column view (``Linear``)
    per role, the heads and the per-role head dims; or why not."""
    layouts = {x.fused for x in sides.values()}
    nodes = {id(x.lin.node) for x in sides.values()}
    if len(layouts) != 1 or None in layouts or len(nodes) != 1:
        return "Q, K and V do not all come from one fused QKV projection"
    idx = {role: x.index for role, x in sides.items()}
    if sorted(idx.values()) != [0, 1, 2]:
        return f"the fused QKV parts are taken as {idx}"
    lin = sides["q"].lin
    layout = layouts.pop()
    order = tuple(sorted(idx, key=idx.get))
    if layout == "5d":
        r5 = sides["q"].reshape5
        if any(x.reshape5 is not r5 for x in sides.values()):
            return "the fused QKV parts come from different reshapes"
        shape, _ = _shape_value(r5.inputs[1], consts)
        hd = _heads(shape[-2:], lin.weight.shape[1] // 3)
        if isinstance(hd, str):
            return f"{node_label(r5)}: {hd}"
        heads, dims = hd[0], {role: hd[1] for role in order}
        fused = Fused(lin, order, dims, "5d", reshape5=r5, heads_out={r: x.head for r, x in sides.items()})
    else:
        split = sides["q"].split
        if any(x.split is not split for x in sides.values()):
            return "the fused QKV parts come from different Splits"
        shapes = {}
        for role, x in sides.items():
            shape, how = _shape_value(x.reshape.inputs[1], consts)
            if shape is None or shape.size != 4:
                return f"head split {node_label(x.reshape)}: {how if shape is None else 'not [B, T, H, d]'}"
            shapes[role] = (int(shape[-2]), int(shape[-1]))
        if any(h <= 0 or dd <= 0 for h, dd in shapes.values()) or len({h for h, _ in shapes.values()}) != 1:
            return f"fused QKV head splits {shapes} do not name the heads and head size"
        heads = shapes["q"][0]
        dims = {role: dd for role, (_, dd) in shapes.items()}
        if sum(heads * dims[r] for r in order) != lin.weight.shape[1]:
            return f"the fused QKV weight has {lin.weight.shape[1]} columns, the heads {shapes}"
        fused = Fused(lin, order, dims, "split", split=split)
    fused.w, fused.b = lin.weight, lin.bias
    views, off = {}, 0
    for role in order:
        n = heads * fused.dims[role]
        views[role] = Linear(node=lin.node, weight=lin.weight[:, off:off + n], trans=lin.trans,
                             bias=None if lin.bias is None else lin.bias[off:off + n], bias_node=lin.bias_node,
                             bias_index=lin.bias_index, out=lin.out)
        off += n
    return fused, views, heads, dict(fused.dims)


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
    if block.fused is not None:
        _write_fused(block, {"q": (fit.left, fit.left_bias), "k": (fit.right, fit.right_bias)}, ctx, consts)
        return
    _write(block.q, fit.left, fit.left_bias, "heads", ctx)
    _write(block.k, fit.right, fit.right_bias, "heads", ctx)
    for split in (block.q_split, block.k_split):
        _set_last(split, fit.rank, ctx, consts)
        _clear_shapes(split)


def rewrite_ov(block: AttentionBlock, fit, ctx: RewriteContext, consts: ConstantResolver) -> None:
    """Thinner value projection (bias folded into the output's), output projection reading
    ``H r`` channels, the value split and the merge at the new sizes."""
    v, o = block.v, block.o
    if block.fused is not None:  # the value columns of the fused weight (their bias part zero)
        _write_fused(block, {"v": (fit.left, None)}, ctx, consts)
    elif v.bias is not None and v.bias_node is not v.node:  # the fold leaves it zero: drop its Add
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
    if block.fused is None:
        _write(v, fit.left, None, "heads", ctx)
    _write(o, fit.right, fit.right_bias, "heads", ctx)  # an output bias always has the folded one
    if block.fused is None:
        _set_last(block.v_split, fit.rank, ctx, consts)
        _clear_shapes(block.v_split)
    _set_last(block.merge, block.heads * fit.rank, ctx, consts)


def _write_fused(block: AttentionBlock, parts: dict, ctx: RewriteContext, consts: ConstantResolver) -> None:
    """Replace the column blocks of ``parts`` (role -> (weight, bias or None)) in a fused QKV
    weight, and every size that follows: the Split's sizes and each changed role's head reshape."""
    f = block.fused
    if f.layout == "5d":
        _unfuse_5d(block, ctx, consts)
    h = block.heads
    cols, bias, off = [], [], 0
    for role in f.order:
        n = h * f.dims[role]
        w, b = parts.get(role, (f.w[:, off:off + n], None if f.b is None else f.b[off:off + n]))
        cols.append(w)
        bias.append(np.zeros(w.shape[1]) if b is None else b)
        off += n
    for role, (w, _) in parts.items():
        f.dims[role] = w.shape[1] // h
    f.w = np.concatenate(cols, axis=1).astype(f.lin.weight.dtype)
    f.b = None if f.lin.bias is None else np.concatenate(bias).astype(f.lin.bias.dtype)
    _write(f.lin, f.w, f.b, "heads", ctx)
    _set_split_sizes(f.split, [h * f.dims[r] for r in f.order], ctx)
    for role in parts:
        split = getattr(block, f"{role}_split")
        _set_last(split, f.dims[role], ctx, consts)
        _clear_shapes(split)


def _set_split_sizes(split: gs.Node, sizes: list[int], ctx: RewriteContext) -> None:
    base = node_label(split)
    if "split" in split.attrs or ctx.graph.opset < 13:
        split.attrs["split"] = [int(x) for x in sizes]
    else:
        t = ctx.const(base, "heads_split", base, np.asarray(sizes, np.int64))
        if len(split.inputs) > 1:
            split.inputs[1] = t
        else:
            split.inputs.append(t)
    split.attrs.pop("num_outputs", None)
    for t in split.outputs:
        t.shape = None


def _unfuse_5d(block: AttentionBlock, ctx: RewriteContext, consts: ConstantResolver) -> None:
    """``Reshape [.., 3, H, d] -> Transpose(2,0,3,1,4) -> three Slices/Gathers`` becomes ``Split``
    on the last axis, then per role ``Reshape [.., H, d] -> Transpose(0,2,1,3)`` writing the same
    ``[B, H, T, d]`` tensor: the same values, and each role may then take its own head size."""
    f = block.fused
    r5 = f.reshape5
    base = node_label(r5)
    x = r5.inputs[0]
    parts = [gs.Variable(ctx.namer(base, f"qkv_{r}"), dtype=x.dtype) for r in f.order]
    split = ctx.node("Split", base, "qkv_split", [x], parts, {"axis": -1})
    shape_t = r5.inputs[1]
    v = consts.resolve(shape_t).value
    concat = None if v is not None else _producer(shape_t)
    for role, part in zip(f.order, parts):
        if v is not None:
            new_shape = ctx.const(base, f"{role}_heads_shape", base,
                                  np.concatenate([np.asarray(v, np.int64).reshape(-1)[:-3], [block.heads, f.dims[role]]]))
        else:
            lead_inputs, tail = _const_tail(concat, consts, 3)
            heads_part = ctx.const(base, f"{role}_heads_shape_part", base,
                                   np.concatenate([tail[:-3], [block.heads, f.dims[role]]]).astype(np.int64))
            new_shape = gs.Variable(ctx.namer(base, f"{role}_heads_shape"), dtype=np.int64)
            ctx.node("Concat", base, f"{role}_heads_shape_concat", [*lead_inputs, heads_part], [new_shape],
                     {"axis": 0})
        shaped = gs.Variable(ctx.namer(base, f"{role}_heads"), dtype=x.dtype)
        reshape = ctx.node("Reshape", base, f"{role}_heads_reshape", [part, new_shape], [shaped])
        head = f.heads_out[role]
        old = head.inputs[0]
        old.outputs.clear()  # the Slice/Squeeze (or Gather) that wrote it: now unused
        ctx.node("Transpose", base, f"{role}_heads_transpose", [shaped], [head], {"perm": [0, 2, 1, 3]})
        setattr(block, f"{role}_split", reshape)
    f.split, f.layout = split, "split"


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
