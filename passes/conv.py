"""Conv with a constant weight -> a k x k Conv to r channels, then a 1 x 1 Conv back to O.

A Conv weight ``W [O, I/g, *k]`` (g groups) is, per group, the matrix
``W_g [O/g, (I/g)*prod(k)]``; in the [in, out] layout ``B_g = W_g^T [(I/g)*prod(k), O/g]``.
With ``B_g ~= A_g [K, r] @ C_g [r, O/g]`` the convolution splits exactly into
``Conv(x, A^T as [g*r, I/g, *k], stride/pads/dilations/auto_pad as before, group g)`` followed by
``Conv(., C^T as [O, r, 1...], group g, the original bias)``: every output pixel is a linear map of
its receptive field, and the rank-r map factors through r channels. All groups share one rank
(the largest any group needs). A mean correction ``d`` folds into the second Conv's bias.
Lossless at full rank.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lrcompile.factorize import Factorization
from lrcompile.factorize.patches import ConvGeometry
from lrcompile.ir import Candidate, ConstantResolver, Decline, RewriteContext, float_weight_problem


class ConvPass:
    """Conv(x, W, b) -> Conv(Conv(x, A, same geometry, r channels), C 1x1, b)."""

    name = "conv"
    op_types = ("Conv",)

    def match(self, node: gs.Node, consts: ConstantResolver) -> Candidate | Decline | None:
        rw = consts.resolve(node.inputs[1])
        if rw.value is None:
            return Decline(node, self.name, rw.reason if "quantized" in rw.reason else "weight is not constant")
        w = rw.value
        problem = float_weight_problem(w)
        if problem:
            return Decline(node, self.name, problem, w.shape)
        if w.ndim < 3:
            return Decline(node, self.name, f"weight is {w.ndim}-D; expected [O, I/g, k...]", w.shape)
        g = int(node.attrs.get("group", 1))
        o = w.shape[0]
        if o % g:
            return Decline(node, self.name, f"{o} output channels do not split into {g} groups", w.shape)
        og = o // g
        k = int(np.prod(w.shape[1:]))
        if min(og, k) == 1:
            kind = "depthwise conv" if g > 1 else "conv"
            return Decline(node, self.name, f"{kind}: each group's weight is [{k} x {og}], nothing to factorize", w.shape)
        mats = [np.ascontiguousarray(w[i * og:(i + 1) * og].reshape(og, k).T) for i in range(g)]
        geo = None
        if w.ndim == 4:  # 2-D conv: calibration rows are its receptive fields (im2col)
            a = node.attrs
            geo = ConvGeometry(kernel=tuple(w.shape[2:]), strides=tuple(a.get("strides", (1, 1))),
                               dilations=tuple(a.get("dilations", (1, 1))), pads=tuple(a.get("pads", (0, 0, 0, 0))),
                               auto_pad=str(a.get("auto_pad", "NOTSET")), group=g)
        return Candidate(node=node, pass_name=self.name, weight_key=rw.source, matrices=mats,
                         activation=node.inputs[0].name if geo else None,
                         details={"group": g, "wshape": tuple(w.shape), "geometry": geo})

    def rewrite(self, graph: gs.Graph, cand: Candidate, facts: list[Factorization], ctx: RewriteContext) -> None:
        node, base, key = cand.node, cand.label, cand.weight_key
        g, wshape = cand.details["group"], cand.details["wshape"]
        kernel = wshape[2:]
        r = facts[0].rank
        assert all(f.rank == r for f in facts), "groups must share one rank"
        first = np.concatenate([f.a.T.reshape((r,) + tuple(wshape[1:])) for f in facts], axis=0)
        second = np.concatenate([f.c.T.reshape((wshape[0] // g, r) + (1,) * len(kernel)) for f in facts], axis=0)
        x, out = node.inputs[0], node.outputs[0]
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if any(f.bias is not None for f in facts):
            d = np.concatenate([f.bias if f.bias is not None else np.zeros(wshape[0] // g, first.dtype) for f in facts])
            if bias is not None:
                b0 = np.asarray(bias.values) if isinstance(bias, gs.Constant) else None
                if b0 is None:
                    raise ValueError("a mean correction needs a constant Conv bias")  # match() guarantees
                d = d + b0
            bias = ctx.const(key, "lr_bias", base, d.astype(first.dtype))
        attrs = dict(node.attrs)
        node.inputs.clear()
        node.outputs.clear()
        w1, w2 = ctx.const(key, "lr_A", base, first), ctx.const(key, "lr_C", base, second)
        h = ctx.var(base, "lr_h", out.dtype)
        ctx.node("Conv", base, "lr_in", [x, w1], [h], attrs)
        attrs2 = {"group": g, "kernel_shape": [1] * len(kernel)}
        ctx.node("Conv", base, "lr_out", [h, w2] + ([bias] if bias is not None else []), [out], attrs2)
