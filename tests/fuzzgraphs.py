"""Random valid ONNX graphs for the fuzz harness (tests/test_fuzz.py) and the corpus benchmark
(benchmarks/corpus.py): what lrcompile rewrites, in the forms exporters write it.

A graph is one to three independent blocks, each with its own inputs and outputs:

- ``matmul``: ``x @ W`` or ``W @ x``, x of rank 1 to 4 (symbolic or fixed dims), then maybe a Relu or an Add;
- ``gemm``: every combination of alpha, beta, transA, transB and a bias C of shape [N], [1, N], [M, N],
  [M, 1], a scalar, a graph input (not constant) or none;
- ``conv``: 1-D, 2-D or 3-D, random groups (depthwise too), kernel, stride, dilations, explicit pads or
  auto_pad SAME_UPPER / SAME_LOWER / VALID, with or without bias and kernel_shape;
- ``gather``: an embedding lookup (int64 or int32 ids, axis 0 or -2, ids of rank 0 to 2), then a
  MatMul, Relu, Softmax or Tanh;
- ``chain``: MatMul -> Relu -> Gemm -> MatMul, each rewrite feeding the next;
- ``shared``: one weight W [K, N] read by two to four of: MatMul(x, W), a second MatMul(x2, W),
  Gemm(z, W, transB=1), MatMul(W, u), Gather(W, ids).

Each weight is an initializer or a Constant node, or reaches its reader through an Identity, a
Transpose or a Cast from float16; the opset is 11 to 21, the IR version the lowest
that opset needs or a newer one up to 10. Everything draws through ``Pick`` so that hypothesis can
drive it (``HypothesisPick``, shrinking included) and so can a seeded ``random.Random``
(``RandomPick``, for the corpus). ``build`` returns a ``Case``: the model and feeds for it
(random normal floats, never zeros; valid ids).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import random

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

KINDS = ("matmul", "gemm", "conv", "gather", "shared", "chain")
OPSETS = tuple(range(11, 22))


class Pick:
    """The choices a graph is made of."""

    def int(self, lo: int, hi: int) -> int:  # inclusive
        raise NotImplementedError

    def choice(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def bool(self) -> bool:
        return self.int(0, 1) == 1


class RandomPick(Pick):
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)


class HypothesisPick(Pick):
    """Draws from hypothesis's ``st.data()`` object (so failures shrink to small graphs)."""

    def __init__(self, data) -> None:
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))


@dataclass
class Case:
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    kinds: list[str]
    opset: int
    notes: list[str] = field(default_factory=list)  # what was drawn, for a failure's message

    def describe(self) -> str:
        return f"opset {self.opset}, IR {self.model.ir_version}: " + "; ".join(self.notes)


class _Builder:
    def __init__(self, pick: Pick, seed: int) -> None:
        self.p = pick
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.feeds: dict[str, np.ndarray] = {}
        self.notes: list[str] = []

    # ---------------------------------------------------------------------------------------- pieces

    def normal(self, shape) -> np.ndarray:
        a = self.rng.standard_normal(shape).astype(np.float32)
        a[a == 0] = 0.5  # never an exact zero
        return a

    def weight(self, name: str, shape, *, low_rank: bool = False) -> str:
        """A float weight, stored as an initializer or produced by a Constant node."""
        shape = tuple(shape)
        if low_rank and len(shape) == 2 and min(shape) > 1:
            r = self.p.int(1, min(shape) - 1)
            w = (self.normal((shape[0], r)) @ self.normal((r, shape[1])) / np.sqrt(r)).astype(np.float32)
        else:
            w = self.normal(shape) / np.float32(np.sqrt(max(int(np.prod(shape[1:])) if len(shape) > 1 else 1, 1)))
        w = w.astype(np.float32)
        route = self.p.choice(("direct", "direct", "direct", "Identity", "Transpose", "Cast")) if len(shape) == 2 else "direct"
        if route != "direct":  # the weight reaches its reader through a node on constants (as exporters write it)
            src = f"{name}_src"
            stored = {"Identity": w, "Transpose": np.ascontiguousarray(w.T), "Cast": w.astype(np.float16)}[route]
            if route == "Cast":
                w = stored.astype(np.float32)  # the graph computes the float16-rounded values
            attrs = {"perm": [1, 0]} if route == "Transpose" else {"to": TensorProto.FLOAT} if route == "Cast" else {}
            self.inits.append(numpy_helper.from_array(stored, src))
            self.nodes.append(helper.make_node(route, [src], [name], name=f"{name}_{route.lower()}", **attrs))
            self.notes.append(f"{name} {list(shape)} through {route}")
            return name
        if self.p.bool():
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const",
                                               value=numpy_helper.from_array(w, name)))
            self.notes.append(f"{name} {list(shape)} Constant")
        else:
            self.inits.append(numpy_helper.from_array(w, name))
            self.notes.append(f"{name} {list(shape)} initializer")
        return name

    def dim(self, sym: str, value: int):
        """A dim declared fixed or symbolic; ``value`` is what the feeds use."""
        return value if self.p.bool() else sym

    def float_input(self, name: str, dims: list, values: list[int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
        self.feeds[name] = self.normal(values)
        return name

    def output(self, name: str, elem=TensorProto.FLOAT) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, None))

    def follow(self, p: str, y: str, n_last: int | None) -> str:
        """Maybe an op after a block's output (so the rewrite's output is consumed by a node)."""
        op = self.p.choice(("none", "Relu", "Add"))
        if op == "none":
            return y
        if op == "Relu":
            self.nodes.append(helper.make_node("Relu", [y], [f"{p}_relu"], name=f"{p}_relu"))
            return f"{p}_relu"
        c = numpy_helper.from_array(self.normal([n_last] if n_last else []), f"{p}_addc")
        self.inits.append(c)
        self.nodes.append(helper.make_node("Add", [y, f"{p}_addc"], [f"{p}_add"], name=f"{p}_add"))
        return f"{p}_add"

    # ---------------------------------------------------------------------------------------- blocks

    def matmul(self, p: str) -> None:
        k, n = self.p.int(2, 24), self.p.int(2, 24)
        side = self.p.choice(("right", "left"))
        lead = [self.p.int(1, 3) for _ in range(self.p.int(0, 2))]
        lead_dims = [self.dim(f"{p}_b{i}", v) for i, v in enumerate(lead)]
        low = self.p.int(0, 3) == 0
        if side == "right":
            rank1 = self.p.int(0, 5) == 0
            vals = [k] if rank1 else lead + [self.p.int(1, 5), k]
            dims = [k] if rank1 else lead_dims + [self.dim(f"{p}_m", vals[-2]), k]
            x = self.float_input(f"{p}_x", dims, vals)
            w = self.weight(f"{p}_W", (k, n), low_rank=low)
            ins = [x, w]
        else:
            w = self.weight(f"{p}_W", (n, k), low_rank=low)
            rank1 = self.p.int(0, 5) == 0
            vals = [k] if rank1 else lead + [k, self.p.int(1, 5)]
            dims = [k] if rank1 else lead_dims + [k, self.dim(f"{p}_m", vals[-1])]
            x = self.float_input(f"{p}_x", dims, vals)
            ins = [w, x]
        self.notes.append(f"{p}: MatMul weight on the {side}, x {vals}")
        self.nodes.append(helper.make_node("MatMul", ins, [f"{p}_y"], name=f"{p}_mm"))
        # an Add of a [last] constant only where the last dim is fixed (a symbolic dim that must be
        # one value would make the original fail on any other)
        last = n if side == "right" or rank1 else (vals[-1] if isinstance(dims[-1], int) else None)
        self.output(self.follow(p, f"{p}_y", last if self.p.bool() else None))

    def gemm(self, p: str) -> None:
        m, k, n = self.p.int(1, 6), self.p.int(2, 24), self.p.int(2, 24)
        trans_a, trans_b = self.p.int(0, 1), self.p.int(0, 1)
        alpha = self.p.choice((1.0, 0.5, -2.0))
        beta = self.p.choice((1.0, 0.0, 0.3))
        bias = self.p.choice(("none", "[N]", "[1,N]", "scalar", "[M,N]", "[M,1]", "input"))
        md = m if bias in ("[M,N]", "[M,1]") else self.dim(f"{p}_m", m)
        a = self.float_input(f"{p}_a", [k, md] if trans_a else [md, k], [k, m] if trans_a else [m, k])
        w = self.weight(f"{p}_B", (n, k) if trans_b else (k, n), low_rank=self.p.int(0, 3) == 0)
        ins = [a, w]
        if bias != "none":
            shape = {"[N]": [n], "[1,N]": [1, n], "scalar": [], "[M,N]": [m, n], "[M,1]": [m, 1], "input": [n]}[bias]
            if bias == "input":
                ins.append(self.float_input(f"{p}_c", [n], [n]))
            else:
                self.inits.append(numpy_helper.from_array(self.normal(shape), f"{p}_C"))
                ins.append(f"{p}_C")
        attrs = {}
        for key, val, default in (("alpha", alpha, 1.0), ("beta", beta, 1.0), ("transA", trans_a, 0),
                                  ("transB", trans_b, 0)):
            if val != default or self.p.bool():  # sometimes written out at its default
                attrs[key] = val
        self.notes.append(f"{p}: Gemm M={m} K={k} N={n} {attrs} C={bias}")
        self.nodes.append(helper.make_node("Gemm", ins, [f"{p}_y"], name=f"{p}_gemm", **attrs))
        self.output(self.follow(p, f"{p}_y", n if self.p.bool() else None))

    def conv(self, p: str) -> None:
        nd = self.p.choice((1, 2, 2, 2, 3))
        groups = self.p.choice((1, 1, 2, 3, 4))
        depthwise = groups > 1 and self.p.int(0, 2) == 0
        cin_g = 1 if depthwise else self.p.int(1, 4)
        m_g = self.p.int(1, 3) if depthwise else self.p.int(1, 6)
        c, mo = groups * cin_g, groups * m_g
        kernel = [self.p.int(1, 3) for _ in range(nd)]
        strides = [self.p.int(1, 2) for _ in range(nd)]
        dil = [self.p.int(1, 2) for _ in range(nd)]
        auto_pad = self.p.choice(("NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"))
        if auto_pad.startswith("SAME"):  # ONNX Runtime: "Dilation not supported for AutoPadType::SAME_*"
            dil = [1] * nd
        spatial = [self.p.int(5, 9) if nd == 3 else self.p.int(5, 14) for _ in range(nd)]
        batch = self.p.int(1, 2)
        dims = [self.dim(f"{p}_n", batch), c] + [self.dim(f"{p}_s{i}", s) for i, s in enumerate(spatial)]
        x = self.float_input(f"{p}_x", dims, [batch, c] + spatial)
        w = self.weight(f"{p}_W", [mo, cin_g] + kernel)
        ins = [x, w]
        if self.p.bool():
            self.inits.append(numpy_helper.from_array(self.normal([mo]), f"{p}_b"))
            ins.append(f"{p}_b")
        attrs: dict = {}
        if groups > 1 or self.p.bool():
            attrs["group"] = groups
        if self.p.bool():
            attrs["kernel_shape"] = kernel
        if any(s != 1 for s in strides) or self.p.bool():
            attrs["strides"] = strides
        if any(d != 1 for d in dil) or self.p.bool():
            attrs["dilations"] = dil
        if auto_pad == "NOTSET":
            pads = [self.p.int(0, (kk - 1) * dd) for kk, dd in zip(kernel + kernel, dil + dil)]
            if any(pads) or self.p.bool():
                attrs["pads"] = pads
        else:
            attrs["auto_pad"] = auto_pad
        self.notes.append(f"{p}: Conv{nd}d x {[batch, c] + spatial} W {[mo, cin_g] + kernel} {attrs}")
        self.nodes.append(helper.make_node("Conv", ins, [f"{p}_y"], name=f"{p}_conv", **attrs))
        self.output(self.follow(p, f"{p}_y", None))

    def ids_input(self, name: str, vocab: int) -> str:
        elem = self.p.choice((TensorProto.INT64, TensorProto.INT32))
        vals = [self.p.int(1, 4) for _ in range(self.p.int(0, 2))]
        dims = [self.dim(f"{name}_{i}", v) for i, v in enumerate(vals)]
        self.inputs.append(helper.make_tensor_value_info(name, elem, dims))
        ids = self.rng.integers(0, vocab, vals if vals else ())
        self.feeds[name] = np.asarray(ids, dtype=np.int64 if elem == TensorProto.INT64 else np.int32)
        self.notes.append(f"{name}: ids {vals} {'int64' if elem == TensorProto.INT64 else 'int32'}")
        return name

    def gather(self, p: str) -> None:
        v, d = self.p.int(4, 40), self.p.int(2, 16)
        e = self.weight(f"{p}_E", (v, d), low_rank=self.p.int(0, 3) == 0)
        ids = self.ids_input(f"{p}_ids", v)
        attrs = {"axis": self.p.choice((0, -2))} if self.p.bool() else {}
        self.nodes.append(helper.make_node("Gather", [e, ids], [f"{p}_h"], name=f"{p}_gather", **attrs))
        after = self.p.choice(("MatMul", "Relu", "Softmax", "Tanh"))
        self.notes.append(f"{p}: Gather {attrs} then {after}")
        if after == "MatMul":
            w = self.weight(f"{p}_W", (d, self.p.int(2, 16)))
            self.nodes.append(helper.make_node("MatMul", [f"{p}_h", w], [f"{p}_y"], name=f"{p}_mm"))
        else:
            attrs = {"axis": -1} if after == "Softmax" else {}
            self.nodes.append(helper.make_node(after, [f"{p}_h"], [f"{p}_y"], name=f"{p}_{after.lower()}", **attrs))
        self.output(f"{p}_y")

    def chain(self, p: str) -> None:
        """x -> MatMul -> Relu -> Gemm (transB either way, bias [N]) -> MatMul: rewrites that feed each other."""
        m, k, h1, h2, n = (self.p.int(1, 4),) + tuple(self.p.int(2, 20) for _ in range(4))
        x = self.float_input(f"{p}_x", [self.dim(f"{p}_m", m), k], [m, k])
        w1 = self.weight(f"{p}_W1", (k, h1))
        trans_b = self.p.int(0, 1)
        w2 = self.weight(f"{p}_W2", (h2, h1) if trans_b else (h1, h2))
        self.inits.append(numpy_helper.from_array(self.normal([h2]), f"{p}_b2"))
        w3 = self.weight(f"{p}_W3", (h2, n))
        self.notes.append(f"{p}: chain MatMul [{k},{h1}] Relu Gemm transB={trans_b} [{h1},{h2}] MatMul [{h2},{n}]")
        self.nodes += [helper.make_node("MatMul", [x, w1], [f"{p}_h1"], name=f"{p}_mm1"),
                       helper.make_node("Relu", [f"{p}_h1"], [f"{p}_r1"], name=f"{p}_relu1"),
                       helper.make_node("Gemm", [f"{p}_r1", w2, f"{p}_b2"], [f"{p}_h2"], name=f"{p}_gemm",
                                        transB=trans_b),
                       helper.make_node("MatMul", [f"{p}_h2", w3], [f"{p}_y"], name=f"{p}_mm3")]
        self.output(f"{p}_y")

    def shared(self, p: str) -> None:
        k, n = self.p.int(2, 20), self.p.int(2, 20)
        w = self.weight(f"{p}_W", (k, n), low_rank=self.p.int(0, 3) == 0)
        readers = ["right", "right2", "gemmT", "left", "gather"]
        chosen = [r for r in readers if self.p.bool()]
        while len(chosen) < 2:
            extra = self.p.choice(readers)
            if extra not in chosen:
                chosen.append(extra)
        self.notes.append(f"{p}: W [{k}, {n}] read by {chosen}")
        for r in sorted(chosen, key=readers.index):
            m = self.p.int(1, 4)
            if r in ("right", "right2"):
                x = self.float_input(f"{p}_{r}_x", [self.dim(f"{p}_{r}_m", m), k], [m, k])
                self.nodes.append(helper.make_node("MatMul", [x, w], [f"{p}_{r}_y"], name=f"{p}_{r}"))
            elif r == "gemmT":  # z [m, N] @ W^T -> [m, K]
                z = self.float_input(f"{p}_z", [self.dim(f"{p}_zm", m), n], [m, n])
                attrs = {"transB": 1}
                if self.p.bool():
                    attrs["alpha"] = 0.5
                self.nodes.append(helper.make_node("Gemm", [z, w], [f"{p}_{r}_y"], name=f"{p}_{r}", **attrs))
            elif r == "left":  # W [K, N] @ u [N, m] -> [K, m]
                u = self.float_input(f"{p}_u", [n, self.dim(f"{p}_um", m)], [n, m])
                self.nodes.append(helper.make_node("MatMul", [w, u], [f"{p}_{r}_y"], name=f"{p}_{r}"))
            else:
                ids = self.ids_input(f"{p}_ids", k)
                self.nodes.append(helper.make_node("Gather", [w, ids], [f"{p}_{r}_y"], name=f"{p}_{r}"))
            self.output(f"{p}_{r}_y")


def build(pick: Pick, *, kinds: tuple[str, ...] = KINDS, max_blocks: int = 3, seed: int | None = None) -> Case:
    """A random valid model of 1 to ``max_blocks`` blocks drawn from ``kinds``, checked by the ONNX
    checker (full check); ``seed`` seeds the weights and feeds (by default drawn through ``pick``)."""
    seed = pick.int(0, 2**31 - 1) if seed is None else seed
    b = _Builder(pick, seed)
    opset = pick.choice(OPSETS)
    chosen = [pick.choice(kinds) for _ in range(pick.int(1, max_blocks))]
    for i, kind in enumerate(chosen):
        getattr(b, kind)(f"b{i}")
    g = helper.make_graph(b.nodes, "fuzz", b.inputs, b.outputs, b.inits)
    min_ir = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="lrcompile-fuzz")
    model.ir_version = pick.int(min_ir, max(min_ir, 10))
    # outputs are declared without a shape above; shape inference fills them in (as exporters do)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type for v in inferred.graph.output}
    for v in model.graph.output:
        v.type.CopyFrom(types[v.name])
    onnx.checker.check_model(model, full_check=True)
    return Case(model, b.feeds, chosen, opset, b.notes)


def corpus_cases(count: int, seed: int = 0) -> list[Case]:
    """``count`` seeded cases (the corpus benchmark's share of fuzz graphs)."""
    return [build(RandomPick(seed * 100_003 + i)) for i in range(count)]
