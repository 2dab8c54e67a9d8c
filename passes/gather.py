"""Embedding Gather over a constant 2-D table -> a Gather over a thin table, then a MatMul.

``y = E[idx]`` with ``E [V, d] ~= A [V, r] @ C [r, d]`` becomes ``y = A[idx] @ C`` (+ ``d`` for a
mean correction). The table is stored at ``r*(V+d)`` instead of ``V*d`` values; each lookup costs
an extra ``r x d`` GEMM. Lossless at full rank.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lrcompile.ir import Candidate, ConstantResolver, Decline, RewriteContext, Wiring, float_weight_problem


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

    def detach(self, cand: Candidate) -> Wiring:
        node = cand.node
        w = Wiring(x=node.inputs[1], out=node.outputs[0])
        node.inputs.clear()
        node.outputs.clear()
        return w

    def first(self, ctx: RewriteContext, cand: Candidate, w: Wiring, mats: list[np.ndarray], tag: str) -> gs.Tensor:
        (m,) = mats
        base = cand.label
        h = ctx.var(base, f"{tag}_h", w.out.dtype)
        ctx.node("Gather", base, f"{tag}_in", [ctx.const(cand.weight_key, f"{tag}_A", base, m), w.x], [h], {"axis": 0})
        return h

    def last(self, ctx: RewriteContext, cand: Candidate, w: Wiring, h: gs.Tensor, mats: list[np.ndarray],
             bias: list[np.ndarray | None] | None, tag: str) -> None:
        (m,) = mats
        d = None if bias is None else bias[0]
        base, key = cand.label, cand.weight_key
        final = w.out if d is None else ctx.var(base, f"{tag}_y", w.out.dtype)
        ctx.node("MatMul", base, f"{tag}_out", [h, ctx.const(key, f"{tag}_C", base, m)], [final])
        if d is not None:
            ctx.node("Add", base, f"{tag}_bias", [final, ctx.const(key, f"{tag}_d", base, d.astype(m.dtype))], [w.out])

    def whole(self, ctx: RewriteContext, cand: Candidate, w: Wiring, mats: list[np.ndarray], tag: str, *,
              bias: bool = True, sparse: bool = False) -> None:
        """A lookup in the table ``M``."""
        (m,) = mats
        const = ctx.sparse_const if sparse else ctx.const
        ctx.node("Gather", cand.label, f"{tag}_gather", [const(cand.weight_key, f"{tag}_W", cand.label, m), w.x],
                 [w.out], {"axis": 0})
