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

from lrcompile.factorize import Factorization
from lrcompile.ir import Candidate, ConstantResolver, Decline, RewriteContext, float_weight_problem


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
            weight_key=res.source + ("" if side == "right" else ":T"),
            matrices=[np.ascontiguousarray(matrix)],
            activation=x.name if side == "right" else None,
            details={"side": side},
        )

    def rewrite(self, graph: gs.Graph, cand: Candidate, facts: list[Factorization], ctx: RewriteContext) -> None:
        (f,) = facts
        node, base, key = cand.node, cand.label, cand.weight_key
        out = node.outputs[0]
        x = node.inputs[0] if cand.details["side"] == "right" else node.inputs[1]
        node.inputs.clear()
        node.outputs.clear()
        final = out if f.bias is None else ctx.var(base, "lr_y", out.dtype)
        h = ctx.var(base, "lr_h", out.dtype)
        if cand.details["side"] == "right":
            a, c = ctx.const(key, "lr_A", base, f.a), ctx.const(key, "lr_C", base, f.c)
            ctx.node("MatMul", base, "lr_in", [x, a], [h])
            ctx.node("MatMul", base, "lr_out", [h, c], [final])
            bias = f.bias
        else:
            at, ct = ctx.const(key, "lr_At", base, f.a.T), ctx.const(key, "lr_Ct", base, f.c.T)
            ctx.node("MatMul", base, "lr_in", [at, x], [h])
            ctx.node("MatMul", base, "lr_out", [ct, h], [final])
            bias = None if f.bias is None else f.bias[:, None]
        if bias is not None:
            d = ctx.const(key, "lr_d", base, bias.astype(f.a.dtype))
            ctx.node("Add", base, "lr_bias", [final, d], [out])
