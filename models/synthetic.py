"""Synthetic models built with numpy + onnx.helper only (no torch): the quick-start examples.

The weights are not trained but look trained where it matters for factorization: each weight
matrix ``W [in, out]`` is ``U diag(s) V^T`` with random orthonormal ``U``, ``V`` and singular
values ``s_i = i^-0.5``, plus i.i.d. noise at 10% of the entry RMS, then scaled to He init
(entry std ``sqrt(2 / fan_in)``). So W is full rank with a decaying spectrum, not exactly low-rank.
The feeds are Gaussian with an anisotropic covariance (vectors: eigenvalues decaying like
``i^-2``; images: a ``1/f`` spatial spectrum with correlated channels), so activations are
low-rank-ish the way real ones are. Metric: cosine of the outputs to the original's (1.0).
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from common import Built, make_model

NOISE = 0.1
DECAY = 0.5


def orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``n x k`` matrix with orthonormal columns, uniformly distributed (sign-fixed QR)."""
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def trained_like(rng: np.random.Generator, n_in: int, n_out: int, gain: float = math.sqrt(2.0)) -> np.ndarray:
    """A full-rank ``[n_in, n_out]`` weight with a power-law spectrum plus noise (module docstring)."""
    k = min(n_in, n_out)
    s = np.arange(1, k + 1, dtype=np.float64) ** -DECAY
    w = (orthonormal(rng, n_in, k) * s) @ orthonormal(rng, n_out, k).T
    w += NOISE * np.sqrt(np.mean(w ** 2)) * rng.standard_normal(w.shape)
    w *= gain / math.sqrt(n_in) / np.sqrt(np.mean(w ** 2))
    return w.astype(np.float32)


def anisotropic(rng: np.random.Generator, n: int, shape: tuple[int, ...], decay: float = 1.0) -> np.ndarray:
    """``n`` samples of shape ``(..., dim)``: Gaussian, covariance eigenvalues ``~ i^-2*decay``, unit mean variance."""
    dim = shape[-1]
    d = np.arange(1, dim + 1, dtype=np.float64) ** -decay
    d *= math.sqrt(dim / np.sum(d ** 2))
    q = orthonormal(rng, dim, dim)
    z = rng.standard_normal((n, *shape))
    return ((z * d) @ q.T).astype(np.float32)


def natural_images(rng: np.random.Generator, n: int, c: int = 3, hw: int = 32) -> np.ndarray:
    """``[n, c, hw, hw]`` Gaussian images with a ``1/f`` amplitude spectrum and channel correlation 0.8."""
    f = np.sqrt(np.fft.fftfreq(hw)[:, None] ** 2 + np.fft.rfftfreq(hw)[None, :] ** 2)
    f[0, 0] = 1.0 / hw
    spec = np.fft.rfft2(rng.standard_normal((n, c, hw, hw))) / f
    x = np.fft.irfft2(spec, s=(hw, hw))
    x /= x.std(axis=(2, 3), keepdims=True)
    mix = np.linalg.cholesky(np.full((c, c), 0.8) + 0.2 * np.eye(c))
    return np.einsum("ij,njhw->nihw", mix, x).astype(np.float32)


class GraphBuilder:
    """Accumulates nodes and initializers; every op returns its output name (= its node name)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.nodes, self.inits = rng, [], []

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def bias(self, name: str, n: int) -> str:
        return self.const(name, (0.01 * self.rng.standard_normal(n)).astype(np.float32))

    def linear(self, x: str, n_in: int, n_out: int, name: str, relu: bool = False) -> str:
        """``x @ W + b`` (MatMul + Add, W ``[n_in, n_out]``), optionally followed by Relu."""
        y = self.op("MatMul", [x, self.const(f"{name}.weight", trained_like(self.rng, n_in, n_out))], f"{name}/MatMul")
        y = self.op("Add", [y, self.bias(f"{name}.bias", n_out)], f"{name}/Add")
        return self.op("Relu", [y], f"{name}/Relu") if relu else y

    def layer_norm(self, x: str, dim: int, name: str) -> str:
        g = self.const(f"{name}.weight", (1 + 0.1 * self.rng.standard_normal(dim)).astype(np.float32))
        b = self.const(f"{name}.bias", (0.02 * self.rng.standard_normal(dim)).astype(np.float32))
        return self.op("LayerNormalization", [x, g, b], f"{name}/LayerNormalization", axis=-1, epsilon=1e-5)

    def conv(self, x: str, c_in: int, c_out: int, name: str, k: int = 3, stride: int = 1,
             dilation: int = 1, group: int = 1) -> str:
        """Conv (same padding) + bias + Relu; the weight as a ``[c_in/group*k*k, c_out]`` trained_like matrix."""
        w = trained_like(self.rng, c_in // group * k * k, c_out).T.reshape(c_out, c_in // group, k, k)
        pad = dilation * (k - 1) // 2
        y = self.op("Conv", [x, self.const(f"{name}.weight", w), self.bias(f"{name}.bias", c_out)], f"{name}/Conv",
                    kernel_shape=[k, k], strides=[stride] * 2, dilations=[dilation] * 2, group=group, pads=[pad] * 4)
        return self.op("Relu", [y], f"{name}/Relu")

    def gemm(self, x: str, n_in: int, n_out: int, name: str) -> str:
        """Gemm with ``transB=1`` (weight ``[n_out, n_in]``, the layout torch exports)."""
        w = self.const(f"{name}.weight", trained_like(self.rng, n_in, n_out).T.copy())
        return self.op("Gemm", [x, w, self.bias(f"{name}.bias", n_out)], f"{name}/Gemm", transB=1)

    def model(self, inputs, outputs, name: str, doc: str):
        return make_model(helper.make_graph(self.nodes, name, inputs, outputs, self.inits), doc)


def _built(model, feeds: np.ndarray, n_calib: int, input_name: str, output: str, data: dict, batch: int) -> Built:
    return Built(model=model, calib={input_name: feeds[:n_calib]}, eval={input_name: feeds[n_calib:]},
                 task="fidelity", output=output, primary="cosine_mean", batch_size=batch,
                 data={"kind": "synthetic", "calib_rows": n_calib, "eval_rows": len(feeds) - n_calib,
                       "rule": "one seeded draw; calib = first rows, eval = the rest", **data})


def tiny_mlp(seed: int, fast: bool = False, **_) -> Built:
    """``x [batch, 256]`` -> 512 -> 512 -> 256 (MatMul+Add+Relu) -> 10 logits."""
    g = GraphBuilder(np.random.default_rng([seed, 0]))
    dims = [256, 512, 512, 256, 10]
    h = "x"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        h = g.linear(h, a, b, f"fc{i + 1}", relu=i < len(dims) - 2)
    g.nodes[-1].output[0] = "logits"
    model = g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
                    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                    "tiny_mlp", __doc__)
    feeds = anisotropic(np.random.default_rng([seed, 1]), 512 + 1024, (256,))
    return _built(model, feeds, 512, "x", "logits",
                  {"distribution": "x = (z * d) @ Q^T, z ~ N(0, I), d_i ~ i^-1, Q random orthogonal"}, 1024)


def tiny_transformer(seed: int, fast: bool = False, heads: int = 4, **_) -> Built:
    """One post-LN encoder block (BERT layout), ``x [batch, seq, 64]`` -> ``y [batch, seq, 64]``.

    Q/K/V/output projections 64x64, FFN 64 -> 256 -> 64 with erf-GELU, Softmax attention over 4
    heads, LayerNormalization after each residual Add. Dynamic batch and sequence length.
    """
    d, ff = 64, 256
    g = GraphBuilder(np.random.default_rng([seed, 0]))
    split = g.const("shape.heads", np.array([0, 0, heads, d // heads], np.int64))
    merge = g.const("shape.merge", np.array([0, 0, d], np.int64))

    def project(name: str, perm: list[int]) -> str:
        y = g.linear("x", d, d, f"attn.{name}")
        return g.op("Transpose", [g.op("Reshape", [y, split], f"attn.{name}/Reshape")], f"attn.{name}/Transpose",
                    perm=perm)

    q, k, v = project("q", [0, 2, 1, 3]), project("k", [0, 2, 3, 1]), project("v", [0, 2, 1, 3])
    s = g.op("MatMul", [q, k], "attn/scores")
    s = g.op("Mul", [s, g.const("attn.scale", np.array(1 / math.sqrt(d // heads), np.float32))], "attn/scale")
    p = g.op("Softmax", [s], "attn/Softmax", axis=-1)
    ctx = g.op("Transpose", [g.op("MatMul", [p, v], "attn/context")], "attn/context/Transpose", perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", [ctx, merge], "attn/context/Reshape")
    h = g.layer_norm(g.op("Add", [g.linear(ctx, d, d, "attn.out"), "x"], "attn/residual"), d, "ln1")
    f = g.linear(h, d, ff, "ffn.in")
    erf = g.op("Erf", [g.op("Mul", [f, g.const("gelu.rsqrt2", np.array(1 / math.sqrt(2), np.float32))],
                            "gelu/Div")], "gelu/Erf")
    one, half = g.const("gelu.one", np.array(1, np.float32)), g.const("gelu.half", np.array(0.5, np.float32))
    f = g.op("Mul", [g.op("Mul", [f, g.op("Add", [erf, one], "gelu/Add")], "gelu/Mul"), half], "gelu/Mul_half")
    g.layer_norm(g.op("Add", [g.linear(f, ff, d, "ffn.out"), h], "ffn/residual"), d, "ln2")
    g.nodes[-1].output[0] = "y"
    model = g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d])],
                    "tiny_transformer", tiny_transformer.__doc__)
    feeds = anisotropic(np.random.default_rng([seed, 1]), 64 + 128, (32, d))
    return _built(model, feeds, 64, "x", "y",
                  {"distribution": "[n, 32, 64] tokens, each x = (z * d) @ Q^T, d_i ~ i^-1"}, 128)


def tiny_cnn(seed: int, fast: bool = False, **_) -> Built:
    """``x [batch, 3, 32, 32]`` -> convs (3x3; strided; dilated; grouped; depthwise; 1x1) -> Gemm head -> 10 logits."""
    g = GraphBuilder(np.random.default_rng([seed, 0]))
    h = g.conv("x", 3, 16, "conv1")                     # 32x32
    h = g.conv(h, 16, 32, "conv2", stride=2)            # 16x16, strided
    h = g.conv(h, 32, 32, "conv3", dilation=2)          # 16x16, dilated
    h = g.conv(h, 32, 64, "conv4", stride=2, group=4)   # 8x8, grouped
    h = g.conv(h, 64, 64, "conv5", group=64)            # depthwise
    h = g.conv(h, 64, 64, "conv6", k=1)                 # pointwise
    h = g.op("AveragePool", [h], "pool/AveragePool", kernel_shape=[2, 2], strides=[2, 2])  # 4x4
    h = g.op("Flatten", [h], "flatten/Flatten", axis=1)
    h = g.op("Relu", [g.gemm(h, 64 * 16, 128, "fc1")], "fc1/Relu")
    g.gemm(h, 128, 10, "fc2")
    g.nodes[-1].output[0] = "logits"
    model = g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                    "tiny_cnn", tiny_cnn.__doc__)
    feeds = natural_images(np.random.default_rng([seed, 1]), 128 + 256)
    return _built(model, feeds, 128, "x", "logits",
                  {"distribution": "Gaussian images, 1/f amplitude spectrum, channel correlation 0.8"}, 256)
