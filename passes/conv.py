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

from lrcompile.factorize.patches import ConvGeometry
from lrcompile.ir import Candidate, ConstantResolver, Decline, RewriteContext, Wiring, float_weight_problem


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

    def detach(self, cand: Candidate) -> Wiring:
        node = cand.node
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        w = Wiring(x=node.inputs[0], out=node.outputs[0], extra={"bias": bias, "attrs": dict(node.attrs)})
        node.inputs.clear()
        node.outputs.clear()
        return w

    def first(self, ctx: RewriteContext, cand: Candidate, w: Wiring, mats: list[np.ndarray], tag: str) -> gs.Tensor:
        """A conv of the original geometry and groups whose kernels are ``mats``' columns."""
        wshape = cand.details["wshape"]
        m = mats[0].shape[1]
        assert all(a.shape[1] == m for a in mats), "groups must share one width"
        kernel = np.concatenate([a.T.reshape((m,) + tuple(wshape[1:])) for a in mats], axis=0)
        base = cand.label
        h = ctx.var(base, f"{tag}_h", w.out.dtype)
        ctx.node("Conv", base, f"{tag}_in", [w.x, ctx.const(cand.weight_key, f"{tag}_A", base, kernel)], [h],
                 dict(w.extra["attrs"]))
        return h

    def last(self, ctx: RewriteContext, cand: Candidate, w: Wiring, h: gs.Tensor, mats: list[np.ndarray],
             bias: list[np.ndarray | None] | None, tag: str) -> None:
        """A 1 x 1 grouped conv by ``mats``, the original bias plus ``bias`` folded into its bias."""
        base, key = cand.label, cand.weight_key
        g, wshape = cand.details["group"], cand.details["wshape"]
        kernel = wshape[2:]
        m = mats[0].shape[0]
        dtype = mats[0].dtype
        second = np.concatenate([c.T.reshape((wshape[0] // g, m) + (1,) * len(kernel)) for c in mats], axis=0)
        b = w.extra["bias"]
        if bias is not None and any(d is not None for d in bias):
            d = np.concatenate([x if x is not None else np.zeros(wshape[0] // g, dtype) for x in bias])
            if b is not None:
                b0 = np.asarray(b.values) if isinstance(b, gs.Constant) else None
                if b0 is None:
                    raise ValueError("a mean correction needs a constant Conv bias")  # match() guarantees
                d = d + b0
            b = ctx.const(key, f"{tag}_bias", base, d.astype(dtype))
        attrs = {"group": g, "kernel_shape": [1] * len(kernel)}
        ctx.node("Conv", base, f"{tag}_out", [h, ctx.const(key, f"{tag}_C", base, second)] + ([b] if b is not None else []),
                 [w.out], attrs)

    def whole(self, ctx: RewriteContext, cand: Candidate, w: Wiring, mats: list[np.ndarray], tag: str, *,
              bias: bool = True, sparse: bool = False) -> None:
        """The original conv (geometry, groups, and with ``bias`` its bias) with kernels ``mats``."""
        wshape = cand.details["wshape"]
        og = wshape[0] // cand.details["group"]
        kernel = np.concatenate([a.T.reshape((og,) + tuple(wshape[1:])) for a in mats], axis=0)
        base = cand.label
        const = ctx.sparse_const if sparse else ctx.const
        b = w.extra["bias"] if bias else None
        ctx.node("Conv", base, f"{tag}_conv", [w.x, const(cand.weight_key, f"{tag}_W", base, kernel)]
                 + ([b] if b is not None else []), [w.out], dict(w.extra["attrs"]))

    def sequence(self, ctx: RewriteContext, cand: Candidate, w: Wiring,
                 stages: list[tuple[str, np.ndarray, dict]], tag: str) -> None:
        """Convs in sequence from the input to the output: each stage ``(role, kernel [out, in/group,
        kh, kw], attrs)``; the last stage takes the original bias. The conv forms (Tucker-2, CP,
        spatial SVD) emit through this, their attributes from :func:`axis_attrs` / :func:`pointwise`."""
        base, key = cand.label, cand.weight_key
        x = w.x
        b = w.extra["bias"]
        for n, (role, kernel, attrs) in enumerate(stages):
            last = n == len(stages) - 1
            out = w.out if last else ctx.var(base, f"{tag}_{role}_h", w.out.dtype)
            ins = [x, ctx.const(key, f"{tag}_{role}", base, kernel)] + ([b] if last and b is not None else [])
            ctx.node("Conv", base, f"{tag}_{role}", ins, [out], attrs)
            x = out


def pointwise(group: int) -> dict:
    """Attributes of a 1 x 1 conv with ``group`` groups (stride 1, no padding)."""
    return {"group": int(group), "kernel_shape": [1, 1]}


def axis_attrs(attrs: dict, kernel: tuple[int, int], axis: int | None, group: int) -> dict:
    """The original conv's geometry (``attrs``: strides, dilations, pads, auto_pad) along ``axis``
    only (0: height, 1: width; None: both), with a ``kernel`` that is 1 along the other axis, and
    ``group`` groups. A conv whose geometry is split this way over two convs (``kh x 1`` then
    ``1 x kw``) computes the original's windows exactly: padding, stride and dilation act per axis,
    and ``SAME_*`` padding of a size-1 kernel at stride 1 is none."""
    out = {"group": int(group), "kernel_shape": [int(k) for k in kernel]}
    strides = list(attrs.get("strides", (1, 1)))
    dil = list(attrs.get("dilations", (1, 1)))
    pads = list(attrs.get("pads", (0, 0, 0, 0)))
    keep = [axis in (None, 0), axis in (None, 1)]
    out["strides"] = [int(s) if k else 1 for s, k in zip(strides, keep)]
    out["dilations"] = [int(d) if k else 1 for d, k in zip(dil, keep)]
    auto = str(attrs.get("auto_pad", "NOTSET"))
    if isinstance(attrs.get("auto_pad"), bytes):
        auto = attrs["auto_pad"].decode()
    if auto != "NOTSET":
        out["auto_pad"] = auto
    else:
        out["pads"] = [int(p) if keep[j % 2] else 0 for j, p in enumerate(pads)]
    return out
