"""Output curvature for kfac (lrcompile.fisher.collect_output_curvature) against Jacobians written out
in numpy, and the kfac method end to end through the CLI, verified in ONNX Runtime."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("torch")

from lrcompile.errors import LrcError  # noqa: E402
from lrcompile.fisher import collect_output_curvature  # noqa: E402

K, H, N = 10, 14, 6


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W1": rng.normal(0, 1 / np.sqrt(K), (K, H)).astype(np.float32),
            "b1": rng.normal(0, 0.1, H).astype(np.float32),
            "W2": rng.normal(0, 1 / np.sqrt(H), (H, N)).astype(np.float32)}


def _token_mlp(w: dict) -> onnx.ModelProto:
    """x [b,s,K], mask [b,s] -> y1 = x W1 (fc1) -> tanh(y1 + b1) -> y2 = . W2 (fc2) -> f = y2 + mask[..., None].

    The mask enters additively, so padding rows still carry gradients: dropping them is observable."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["y1"], name="fc1"),
             helper.make_node("Add", ["y1", "b1"], ["a1"]),
             helper.make_node("Tanh", ["a1"], ["h"]),
             helper.make_node("MatMul", ["h", "W2"], ["y2"], name="fc2"),
             helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "ax"], ["m3"]),
             helper.make_node("Add", ["y2", "m3"], ["f"])]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()] + [numpy_helper.from_array(np.array([-1]), "ax")]
    g = helper.make_graph(nodes, "tok", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K]),
                                         helper.make_tensor_value_info("mask", TensorProto.INT64, ["b", "s"])],
                          [helper.make_tensor_value_info("f", TensorProto.FLOAT, ["b", "s", N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def _gemm_mlp(w: dict) -> onnx.ModelProto:
    """x [b,K] -> Gemm(x, W1t, b1, transB=1, alpha=0.5) (fc1) -> tanh -> MatMul W2 (fc2) = f."""
    nodes = [helper.make_node("Gemm", ["x", "W1t", "b1"], ["a1"], transB=1, alpha=0.5, name="fc1"),
             helper.make_node("Tanh", ["a1"], ["h"]),
             helper.make_node("MatMul", ["h", "W2"], ["f"], name="fc2")]
    inits = [numpy_helper.from_array(np.ascontiguousarray(w["W1"].T), "W1t"), numpy_helper.from_array(w["b1"], "b1"),
             numpy_helper.from_array(w["W2"], "W2")]
    g = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                          [helper.make_tensor_value_info("f", TensorProto.FLOAT, ["b", N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def _token_data(batches: int = 3, b: int = 4, s: int = 5, seed: int = 3) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        mask = np.ones((b, s), np.int64)
        mask[:, 3:] = rng.integers(0, 2, (b, s - 3))  # trailing padding
        out.append({"x": rng.normal(size=(b, s, K)).astype(np.float32), "mask": mask})
    assert any((f["mask"] == 0).any() for f in out)
    return out


def _probes(shapes: list[tuple], probes: int, seed: int) -> list[list[np.ndarray]]:
    """The probes the collector draws: per batch, ``probes`` standard normals of the output's shape."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float32).numpy() for _ in range(probes)] for s in shapes]


def _reference(w: dict, feeds: list[dict], vs, *, alpha: float = 1.0, masked: bool = True) -> dict[str, np.ndarray]:
    """Exact Grams from the hand-derived Jacobians: g_y2 = v, g_y1 = alpha (v W2^T) * (1 - tanh^2)."""
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    gy1, gy2 = np.zeros((H, H)), np.zeros((N, N))
    for feed, probes in zip(feeds, vs):
        x = feed["x"].astype(np.float64)
        keep = (feed["mask"] != 0).reshape(-1) if masked and "mask" in feed else np.ones(x.size // K, bool)
        dt = 1.0 - np.tanh(alpha * (x @ w64["W1"]) + w64["b1"]) ** 2
        for v in probes:
            v = v.astype(np.float64)
            g2 = v.reshape(-1, N)[keep]
            g1 = (alpha * (v @ w64["W2"].T) * dt).reshape(-1, H)[keep]
            gy2 += g2.T @ g2
            gy1 += g1.T @ g1
    p = len(vs[0])
    return {"y1": gy1 / p, "y2": gy2 / p}


def test_token_grams_equal_the_hand_written_jacobian_and_drop_padding_rows():
    w = _weights()
    feeds = _token_data()
    res = collect_output_curvature(_token_mlp(w), ["y1", "y2"], iter(feeds), probes=3, seed=7, mask_input="mask")
    ref = _reference(w, feeds, _probes([f["x"].shape[:2] + (N,) for f in feeds], 3, 7))
    assert set(res.grams) == {"y1", "y2"} and not res.reasons
    for t in ("y1", "y2"):
        np.testing.assert_allclose(res.grams[t], ref[t], rtol=2e-5, atol=1e-6 * np.abs(ref[t]).max())
    assert res.info["mask_kept_rows"] == sum(int(f["mask"].sum()) for f in feeds)
    # without the mask the padding rows count too: a different (larger) Gram
    res_all = collect_output_curvature(_token_mlp(w), ["y1", "y2"], iter(feeds), probes=3, seed=7)
    ref_all = _reference(w, feeds, _probes([f["x"].shape[:2] + (N,) for f in feeds], 3, 7), masked=False)
    np.testing.assert_allclose(res_all.grams["y1"], ref_all["y1"], rtol=2e-5, atol=1e-6 * np.abs(ref_all["y1"]).max())
    assert np.trace(res_all.grams["y2"]) > np.trace(res.grams["y2"]) * 1.05


def test_many_probes_converge_to_the_gauss_newton_gram():
    """E_v[g g^T] = J^T J: with many probes the Gram approaches sum_t D_t W2 W2^T D_t."""
    w = _weights(1)
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.normal(size=(8, 1, K)).astype(np.float32), "mask": np.ones((8, 1), np.int64)}]
    res = collect_output_curvature(_token_mlp(w), ["y1", "y2"], iter(feeds), probes=400, seed=0)
    x = feeds[0]["x"].reshape(-1, K).astype(np.float64)
    d = 1.0 - np.tanh(x @ w["W1"] + w["b1"]) ** 2
    jtj = sum(np.outer(dt, dt) * (w["W2"] @ w["W2"].T) for dt in d)
    assert np.linalg.norm(res.grams["y1"] - jtj) / np.linalg.norm(jtj) < 0.08
    np.testing.assert_allclose(res.grams["y2"], 8 * np.eye(N), atol=8 * 0.2)


def test_gemm_output_gram_and_determinism():
    w = _weights(2)
    rng = np.random.default_rng(9)
    feeds = [{"x": rng.normal(size=(6, K)).astype(np.float32)} for _ in range(2)]
    m = _gemm_mlp(w)
    res = collect_output_curvature(m, ["a1", "f"], iter(feeds), probes=2, seed=4)
    vs = _probes([(6, N)] * 2, 2, 4)
    ref = _reference(w, feeds, vs, alpha=0.5)
    # the Gemm output a1 = alpha x W1 + b1: its gradient is (v W2^T) * tanh'(a1) (no alpha: it is after it)
    np.testing.assert_allclose(res.grams["a1"], ref["y1"] / 0.25, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(res.grams["f"], ref["y2"], rtol=2e-5, atol=1e-6)
    again = collect_output_curvature(m, ["a1", "f"], iter(feeds), probes=2, seed=4)
    assert all(np.array_equal(res.grams[t], again.grams[t]) for t in res.grams)


def test_unknown_tensor_is_reported_and_bad_options_refused():
    w = _weights()
    feeds = _token_data(1)
    res = collect_output_curvature(_token_mlp(w), ["y1", "no_such"], iter(feeds), probes=1)
    assert "y1" in res.grams and "no_such" in res.reasons
    with pytest.raises(LrcError, match="probe"):
        collect_output_curvature(_token_mlp(w), ["y1"], iter(feeds), probes=0)
    with pytest.raises(LrcError, match="not a model output"):
        collect_output_curvature(_token_mlp(w), ["y1"], iter(feeds), output="nope")
