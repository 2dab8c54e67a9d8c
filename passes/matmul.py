"""MatMul with a constant 2-D weight -> a chain of two thin MatMuls.

Right weight ``y = x @ W``, ``W [K, N] ~= A [K, r] @ C [r, N]``:
``y = (x @ A) @ C`` (+ ``d`` when the method adds a mean correction).

Left weight ``y = W @ x``, ``W [M, K]``: in the [in, out] layout the weight is ``B = W^T [K, M]``;
with ``B ~= A @ C``, ``W ~= C^T @ A^T`` and ``y = C^T @ (A^T @ x)`` (+ ``d[:, None]``).

Lossless at full rank; at rank r the output error is ``x @ (W - A C)``, bounded by the
factorization's weight error times ``||x||``.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lrcompile.ir import Candidate, ConstantResolver, Decline, RewriteContext, Wiring, float_weight_problem


class MatMulPass:
    """MatMul(x, W) -> MatMul(MatMul(x, A), C) for a constant 2-D weight W on either side."""

    name = "matmul"
    op_types = ("MatMul",)

    def match(self, node: gs.Node, consts: ConstantResolver) -> Candidate | Decline | None:
        x0, x1 = node.inputs[0], node.inputs[1]
        r0, r1 = consts.resolve(x0), consts.resolve(x1)
        if r0.value is not None and r1.value is not None:
            return Decline(node, self.name, "both inputs are constant (a constant-folding job, not ours)")
        if r1.value is not None:
            side, res, x = "right", r1, x0
        elif r0.value is not None:
            side, res, x = "left", r0, x1
        else:
            quant = [r.reason for r in (r0, r1) if "quantized" in r.reason]
            return Decline(node, self.name, quant[0] if quant else "no constant weight (both inputs are activations)")
        w = res.value
        if w.ndim != 2:
            return Decline(node, self.name, f"weight is {w.ndim}-D (batched); only 2-D weights are factorized", w.shape)
        problem = float_weight_problem(w)
        if problem:
            return Decline(node, self.name, problem, w.shape)
        matrix = w if side == "right" else w.T
        return Candidate(
            node=node,
            pass_name=self.name,
            weight_key=res.source,
            matrices=[np.ascontiguousarray(matrix)],
            activation=x.name if side == "right" else None,
            details={"side": side},
            transposed=side == "left",
        )

    def detach(self, cand: Candidate) -> Wiring:
        node = cand.node
        w = Wiring(x=node.inputs[0] if cand.details["side"] == "right" else node.inputs[1], out=node.outputs[0])
        node.inputs.clear()
        node.outputs.clear()
        return w

    def first(self, ctx: RewriteContext, cand: Candidate, w: Wiring, mats: list[np.ndarray], tag: str) -> gs.Tensor:
        (m,) = mats
        base, key = cand.label, cand.weight_key
        h = ctx.var(base, f"{tag}_h", w.out.dtype)
        if cand.details["side"] == "right":
            ctx.node("MatMul", base, f"{tag}_in", [w.x, ctx.const(key, f"{tag}_A", base, m)], [h])
        else:
            ctx.node("MatMul", base, f"{tag}_in", [ctx.const(key, f"{tag}_At", base, m.T), w.x], [h])
        return h

    def last(self, ctx: RewriteContext, cand: Candidate, w: Wiring, h: gs.Tensor, mats: list[np.ndarray],
             bias: list[np.ndarray | None] | None, tag: str) -> None:
        (m,) = mats
        d = None if bias is None else bias[0]
        base, key = cand.label, cand.weight_key
        final = w.out if d is None else ctx.var(base, f"{tag}_y", w.out.dtype)
        if cand.details["side"] == "right":
            ctx.node("MatMul", base, f"{tag}_out", [h, ctx.const(key, f"{tag}_C", base, m)], [final])
        else:
            ctx.node("MatMul", base, f"{tag}_out", [ctx.const(key, f"{tag}_Ct", base, m.T), h], [final])
            d = None if d is None else d[:, None]
        if d is not None:
            ctx.node("Add", base, f"{tag}_bias", [final, ctx.const(key, f"{tag}_d", base, d.astype(m.dtype))], [w.out])

    def select_inputs(self, ctx: RewriteContext, cand: Candidate, w: Wiring, rows: np.ndarray, tag: str) -> Wiring:
        """``w`` with ``x`` narrowed to the input channels ``rows`` (rows of ``B``; weight on the right)."""
        assert cand.details["side"] == "right", "input rows of a left weight are not selectable"
        xs = ctx.var(cand.label, f"{tag}_xsel", w.out.dtype)
        ctx.node("Gather", cand.label, f"{tag}_sel", [w.x, ctx.const(cand.weight_key, f"{tag}_rows", cand.label, rows)],
                 [xs], {"axis": -1})
        return Wiring(x=xs, out=w.out, extra=w.extra)

    def whole(self, ctx: RewriteContext, cand: Candidate, w: Wiring, mats: list[np.ndarray], tag: str, *,
              bias: bool = True, sparse: bool = False) -> None:
        """``x @ M`` (a weight on the left: ``M^T @ x``) into the node's output."""
        (m,) = mats
        base, key = cand.label, cand.weight_key
        const = ctx.sparse_const if sparse else ctx.const
        if cand.details["side"] == "right":
            ctx.node("MatMul", base, f"{tag}_mm", [w.x, const(key, f"{tag}_W", base, m)], [w.out])
        else:
            ctx.node("MatMul", base, f"{tag}_mm", [const(key, f"{tag}_Wt", base, m.T), w.x], [w.out])
