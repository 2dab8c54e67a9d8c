"""Test helpers: build small ONNX models, run them in ORT, compile them at full or reduced rank."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import lrcompile
from lrcompile.targets.ort import session

FULL = dict(rank=10**6, multiple=1, min_params=0, keep_unprofitable=True)


def trained_like(k: int, n: int, seed: int = 0, decay: float = 0.5, dtype=np.float32) -> np.ndarray:
    """A weight with a slowly decaying spectrum (like trained weights: not low-rank)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((k, min(k, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(k, n))))
    s = (np.arange(1, min(k, n) + 1) ** -decay) * 2.0
    return ((u * s) @ v.T).astype(dtype)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def make_model(nodes, inputs, outputs, inits=(), opset: int = 17, **kw) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "test", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], **kw)


def vi(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def run(path: Path, feeds: dict) -> dict:
    s = session(path, ["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feeds)))


def compile_full(src: Path, tmp: Path, **kw):
    opts = {**FULL, **kw}
    return lrcompile.compile(src, tmp / (src.stem + ".lr.onnx"), **opts)


def assert_lossless(src: Path, out: Path, feeds: dict, rtol: float = 1e-5) -> None:
    a, b = run(src, feeds), run(out, feeds)
    for k in a:
        err = np.linalg.norm(b[k].astype(np.float64) - a[k]) / max(np.linalg.norm(a[k].astype(np.float64)), 1e-30)
        assert err <= rtol, f"{k}: rel err {err:.3e} > {rtol}"


def op_types(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def plugin_mlp(tmp: Path) -> Path:
    """MatMul -> Relu -> MatMul -> Gemm with a bias (the Gemm chain keeps its bias: left plain)."""
    w1, w2, w3 = trained_like(64, 96, seed=1), trained_like(96, 80, seed=2), trained_like(80, 24, seed=3)
    b3 = np.linspace(-1, 1, 24).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
             helper.make_node("Gemm", ["h2", "w3", "b3"], ["y"], name="head")]
    m = make_model(nodes, [vi("x", ["batch", 64])], [vi("y", ["batch", 24])],
                   [("w1", w1), ("w2", w2), ("w3", w3), ("b3", b3)])
    return save(m, tmp / "mlp.onnx")
