"""FLOPs and parameter counts read off an ONNX graph for concrete input shapes.

FLOPs are ``2 x MACs`` of the dense linear ops, from the shapes ONNX shape inference gives once
every graph input has a fixed shape:

    MatMul  A [..., M, K] x B [..., K, N] -> Y [..., M, N]:   MACs = prod(Y) * K
    Gemm    op(A) [M, K] x op(B) [K, N] -> Y [M, N]:           MACs = M * N * K   (transA/transB)
    Conv    W [O, C/g, k...], Y [B, O, out...]:                MACs = prod(Y) * (C/g) * prod(k)
    Gather  a table lookup:                                     0 FLOPs (its table counts as params)

Groups, strides, dilations and padding enter only through the output shape (each output element
is a dot product over one group's receptive field), so they need no special case. A low-rank
chain ``X [M, K] @ A [K, r] @ C [r, N]`` therefore counts ``2 M r (K + N)``. Bias additions,
activations and the other elementwise ops are not counted (they are O(outputs), not O(MACs)).
Nodes inside If/Loop/Scan bodies are not counted; nodes whose shapes cannot be inferred are
listed under ``unknown``.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from .errors import LrcError

log = logging.getLogger(__name__)

COUNTED = ("MatMul", "Gemm", "Conv", "Gather")


def _shape(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    return tuple(dims) if all(d >= 0 for d in dims) else None


def fix_input_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs have the given concrete shapes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        shape = input_shapes.get(vi.name)
        if shape is None:
            if all(d.HasField("dim_value") for d in dims):
                continue
            raise LrcError(f"input {vi.name!r} has dynamic dims and no shape was given for it; "
                           f"pass input_shapes={{{vi.name!r}: (...)}}")
        if len(shape) != len(dims):
            raise LrcError(f"input {vi.name!r} has {len(dims)} dims, the given shape {tuple(shape)} has {len(shape)}")
        for d, v in zip(dims, shape):
            d.Clear()
            d.dim_value = int(v)
    del m.graph.value_info[:]
    return m


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The main graph's initializers and Constant-node tensors, by name; a sparse Constant (a
    sparse form's part) by its stored values (its nonzeros)."""
    consts = {t.name: t for t in model.graph.initializer}
    consts.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    consts.update({n.output[0]: a.sparse_tensor.values for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "sparse_value"})
    return consts


def _elements(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) if len(t.dims) else 1


def param_count(model: onnx.ModelProto) -> dict[str, int]:
    """Parameters of the model: elements of its float initializers and Constant-node tensors, each
    counted once (``float``), and of all of them whatever the dtype (``all``)."""
    total = flt = 0
    for t in _constants(model).values():
        n = _elements(t)
        total += n
        if helper.tensor_dtype_to_np_dtype(t.data_type).kind == "f":
            flt += n
    return {"float": flt, "all": total}


def weight_params(model: onnx.ModelProto, ops: tuple[str, ...] = ("MatMul", "Gemm", "Conv")) -> int:
    """Elements of the constant weights the linear layers read (either operand of MatMul, Gemm's
    and Conv's second): the dense weights and the factors that replace them, each tensor once.
    Biases, embeddings and norms are not counted: this is the "MatMul parameters" of a budget."""
    consts = _constants(model)
    seen = {name for n in model.graph.node if n.op_type in ops
            for name in (n.input[:2] if n.op_type == "MatMul" else n.input[1:2]) if name in consts}
    return sum(_elements(consts[k]) for k in seen)


def _value_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    g = model.graph
    return {vi.name: _shape(vi) for vi in list(g.input) + list(g.value_info) + list(g.output)}


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    """Concrete shapes of the model's tensors (None where unknown), inputs already fixed.

    ONNX shape inference with data propagation first; where it leaves a dim symbolic (shape
    arithmetic it cannot fold, as in exported transformers), ONNX Runtime's symbolic shape
    inference fills it in.
    """
    try:
        shapes = _value_shapes(onnx.shape_inference.infer_shapes(model, data_prop=True))
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        raise LrcError(f"shape inference failed for the given input shapes ({e}); check the shapes") from None
    if any(n.op_type in COUNTED[:3] and shapes.get(n.output[0]) is None for n in model.graph.node):
        try:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            more = _value_shapes(SymbolicShapeInference.infer_shapes(model, auto_merge=True))
            shapes.update({k: v for k, v in more.items() if v is not None and shapes.get(k) is None})
        except Exception as e:  # noqa: BLE001 - best effort: what stays unknown is reported
            log.debug("symbolic shape inference failed: %s", e)
    return shapes


def count_flops(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict:
    """Count the FLOPs of ``model`` for concrete input shapes (see the module docstring).

    Args:
        model: the model (not modified).
        input_shapes: graph input name -> shape; inputs with only fixed dims may be left out.

    Returns:
        ``{"total": FLOPs, "by_op": {op: FLOPs}, "nodes": [{"name", "op", "flops", "params"}],
        "unknown": [names of counted-op nodes whose shapes were not inferred], "input_shapes"}``;
        a node's ``params`` is the element count of its constant weight (Gather: the table).

    Raises:
        LrcError: a dynamic input without a shape, or shape inference fails.
    """
    fixed = fix_input_shapes(model, input_shapes)
    shapes = infer_shapes(fixed)
    g = fixed.graph
    inits = {t.name: t for t in g.initializer}
    for t in g.initializer:
        shapes[t.name] = tuple(t.dims)
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    shapes[n.output[0]] = tuple(a.t.dims)
                if a.name == "sparse_value":
                    shapes[n.output[0]] = tuple(a.sparse_tensor.dims)

    def weight_params(name: str) -> int:
        return int(np.prod(inits[name].dims)) if name in inits else 0

    nodes, unknown, by_op, total = [], [], {}, 0
    for i, n in enumerate(g.node):
        if n.op_type not in COUNTED or n.domain not in ("", "ai.onnx"):
            continue
        name = n.name or f"{n.op_type}_{i}"
        ins = [shapes.get(x) if x else None for x in n.input]
        out = shapes.get(n.output[0])
        macs, params = 0, 0
        if n.op_type == "Gather":
            params = weight_params(n.input[0])
        elif n.op_type == "MatMul":
            if out is None or ins[0] is None:
                unknown.append(name)
                continue
            macs = int(np.prod(out)) * ins[0][-1]
            params = weight_params(n.input[1])
        elif n.op_type == "Gemm":
            if out is None or ins[0] is None:
                unknown.append(name)
                continue
            trans_a = next((a.i for a in n.attribute if a.name == "transA"), 0)
            macs = int(np.prod(out)) * (ins[0][0] if trans_a else ins[0][1])
            params = weight_params(n.input[1])
        elif n.op_type == "Conv":
            if out is None or ins[1] is None:
                unknown.append(name)
                continue
            macs = int(np.prod(out)) * int(np.prod(ins[1][1:]))
            params = weight_params(n.input[1])
        flops = 2 * macs
        total += flops
        by_op[n.op_type] = by_op.get(n.op_type, 0) + flops
        nodes.append({"name": name, "op": n.op_type, "flops": flops, "params": params})
    return {"total": total, "by_op": by_op, "nodes": nodes, "unknown": unknown,
            "input_shapes": {k: list(v) for k, v in input_shapes.items()}}


__all__ = ["count_flops", "fix_input_shapes", "infer_shapes", "param_count"]
