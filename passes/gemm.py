"""Gemm with a constant weight B -> two Gemms that keep alpha, beta, transA and the bias C.

``Y = alpha * A' @ B' + beta * C`` with ``A' = A^T if transA``, ``B' = B^T if transB``. In the
[in, out] layout the weight is ``W = B' [K, N] ~= F [K, r] @ G [r, N]``. Rewrite:
``H = Gemm(A, F, transA=transA)`` (alpha 1, no C), ``Y = Gemm(H, G, C, alpha, beta)``, plus
``alpha * d`` when the method adds a mean correction. Lossless at full rank. When the weight's
factors are stored already transposed (the weight is also read in the other orientation, see
``ir.RewriteContext``), the Gemms read them with ``transB=1``.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lrcompile.ir import Candidate, ConstantResolver, Decline, RewriteContext, Wiring, float_weight_problem


class GemmPass:
    """Gemm(A, B, C) -> Gemm(Gemm(A, F), G, C) for a constant weight B, keeping alpha/beta/transA/bias."""

    name = "gemm"
    op_types = ("Gemm",)

    def match(self, node: gs.Node, consts: ConstantResolver) -> Candidate | Decline | None:
        ra, rb = consts.resolve(node.inputs[0]), consts.resolve(node.inputs[1])
        if rb.value is None:
            if "quantized" in rb.reason:
                return Decline(node, self.name, rb.reason)
            if ra.value is not None:
                return Decline(node, self.name, "the constant is Gemm's first input A; only a constant B is factorized")
            return Decline(node, self.name, "no constant weight (both inputs are activations)")
        if ra.value is not None:
            return Decline(node, self.name, "both inputs are constant (a constant-folding job, not ours)")
        w = rb.value
        problem = float_weight_problem(w)
        if problem:
            return Decline(node, self.name, problem, w.shape)
        trans_b = int(node.attrs.get("transB", 0))
        trans_a = int(node.attrs.get("transA", 0))
        matrix = w.T if trans_b else w
        return Candidate(
            node=node,
            pass_name=self.name,
            weight_key=rb.source,
            matrices=[np.ascontiguousarray(matrix)],
            activation=None if trans_a else node.inputs[0].name,
            details={"transA": trans_a, "alpha": float(node.attrs.get("alpha", 1.0)),
                     "beta": float(node.attrs.get("beta", 1.0))},
            transposed=bool(trans_b),
        )

    def detach(self, cand: Candidate) -> Wiring:
        node = cand.node
        c_in = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        w = Wiring(x=node.inputs[0], out=node.outputs[0], extra={"C": c_in})
        node.inputs.clear()
        node.outputs.clear()
        return w

    def first(self, ctx: RewriteContext, cand: Candidate, w: Wiring, mats: list[np.ndarray], tag: str) -> gs.Tensor:
        (m,) = mats
        base, key = cand.label, cand.weight_key
        h = ctx.var(base, f"{tag}_h", w.out.dtype)
        a, tb = ctx.const_either(key, f"{tag}_A", base, m)
        ctx.node("Gemm", base, f"{tag}_in", [w.x, a], [h],
                 {"transA": cand.details["transA"]} | ({"transB": 1} if tb else {}))
        return h

    def last(self, ctx: RewriteContext, cand: Candidate, w: Wiring, h: gs.Tensor, mats: list[np.ndarray],
             bias: list[np.ndarray | None] | None, tag: str) -> None:
        (m,) = mats
        d = None if bias is None else bias[0]
        base, key, det = cand.label, cand.weight_key, cand.details
        final = w.out if d is None else ctx.var(base, f"{tag}_y", w.out.dtype)
        c_in = w.extra["C"]
        c, tb = ctx.const_either(key, f"{tag}_C", base, m)
        ctx.node("Gemm", base, f"{tag}_out", [h, c] + ([c_in] if c_in is not None else []),
                 [final], {"alpha": det["alpha"], "beta": det["beta"]} | ({"transB": 1} if tb else {}))
        if d is not None:
            dc = ctx.const(key, f"{tag}_d", base, (det["alpha"] * d).astype(m.dtype))
            ctx.node("Add", base, f"{tag}_bias", [final, dc], [w.out])

    def select_inputs(self, ctx: RewriteContext, cand: Candidate, w: Wiring, rows: np.ndarray, tag: str) -> Wiring:
        """``w`` with ``A`` narrowed to the input channels ``rows`` (rows of ``B'``): its columns, or
        its rows under ``transA``."""
        xs = ctx.var(cand.label, f"{tag}_xsel", w.out.dtype)
        ctx.node("Gather", cand.label, f"{tag}_sel", [w.x, ctx.const(cand.weight_key, f"{tag}_rows", cand.label, rows)],
                 [xs], {"axis": 0 if cand.details["transA"] else 1})
        return Wiring(x=xs, out=w.out, extra=w.extra)

    def whole(self, ctx: RewriteContext, cand: Candidate, w: Wiring, mats: list[np.ndarray], tag: str, *,
              bias: bool = True, sparse: bool = False) -> None:
        """``Gemm(A, M, C)`` with the original alpha, beta, transA (C only with ``bias``)."""
        (m,) = mats
        base, key, det = cand.label, cand.weight_key, cand.details
        c_in = w.extra["C"] if bias else None
        if sparse:
            b, tb = ctx.sparse_const(key, f"{tag}_W", base, m), False
        else:
            b, tb = ctx.const_either(key, f"{tag}_W", base, m)
        attrs = {"alpha": det["alpha"], "transA": det["transA"]} | ({"transB": 1} if tb else {})
        if c_in is not None:
            attrs["beta"] = det["beta"]
        ctx.node("Gemm", base, f"{tag}_gemm", [w.x, b] + ([c_in] if c_in is not None else []), [w.out], attrs)
