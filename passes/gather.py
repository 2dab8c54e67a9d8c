"""Embedding Gather over a constant 2-D table -> a Gather over a thin table, then a MatMul.

``y = E[idx]`` with ``E [V, d] ~= A [V, r] @ C [r, d]`` becomes ``y = A[idx] @ C`` (+ ``d`` for a
mean correction). The table is stored at ``r*(V+d)`` instead of ``V*d`` values; each lookup costs
an extra ``r x d`` GEMM. Lossless at full rank.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lrcompile.factorize import Factorization
from lrcompile.ir import Candidate, ConstantResolver, Decline, RewriteContext, float_weight_problem


class GatherPass:
    """Gather(E, idx) -> MatMul(Gather(A, idx), C) for a constant float table E [V, d], axis 0."""

    name = "gather"
    op_types = ("Gather",)

    def match(self, node: gs.Node, consts: ConstantResolver) -> Candidate | Decline | None:
        rt = consts.resolve(node.inputs[0])
        if rt.value is None:
            # Shape arithmetic Gathers are not embeddings: not our business, unless quantized.
            return Decline(node, self.name, rt.reason) if "quantized" in rt.reason else None
        e = rt.value
        if e.ndim != 2 or float_weight_problem(e):
            return None
        if consts.resolve(node.inputs[1]).value is not None:
            return Decline(node, self.name, "indices are constant (a constant-folding job, not ours)", e.shape)
        axis = int(node.attrs.get("axis", 0))
        if axis not in (0, -2):
            return Decline(node, self.name, f"Gather along axis {axis}; only row lookups (axis 0) are factorized", e.shape)
        # Calibration sees the lookups: one-hot rows whose Gram is diag(lookup counts).
        return Candidate(node=node, pass_name=self.name, weight_key=rt.source, matrices=[np.ascontiguousarray(e)],
                         activation=node.inputs[1].name, details={"lookup": True})

    def rewrite(self, graph: gs.Graph, cand: Candidate, facts: list[Factorization], ctx: RewriteContext) -> None:
        (f,) = facts
        node, base, key = cand.node, cand.label, cand.weight_key
        idx, out = node.inputs[1], node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        a, c = ctx.const(key, "lr_A", base, f.a), ctx.const(key, "lr_C", base, f.c)
        h = ctx.var(base, "lr_h", out.dtype)
        ctx.node("Gather", base, "lr_in", [a, idx], [h], {"axis": 0})
        final = out if f.bias is None else ctx.var(base, "lr_y", out.dtype)
        ctx.node("MatMul", base, "lr_out", [h, c], [final])
        if f.bias is not None:
            d = ctx.const(key, "lr_d", base, f.bias.astype(f.a.dtype))
            ctx.node("Add", base, "lr_bias", [final, d], [out])
