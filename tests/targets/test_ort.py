"""Tests for lrcompile.targets.ort (small models made here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrcompile.errors import LrcError
from lrcompile.targets.ort import compare_latency, default_providers, save_optimized, session


def linear_model(path: Path, rank: int | None = None, external: bool = False) -> Path:
    """y = relu(x @ W + b) with W [256, 256], or a rank-``rank`` chain x @ U @ V."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 256)) / 16).astype(np.float32)
    bias = numpy_helper.from_array((rng.standard_normal(256) * 0.1).astype(np.float32), "b")
    if rank is None:
        nodes, inits = [helper.make_node("MatMul", ["x", "W"], ["m"])], [numpy_helper.from_array(w, "W")]
    else:
        u, v = w[:, :rank], (rng.standard_normal((rank, 256)) / np.sqrt(rank)).astype(np.float32)
        inits = [numpy_helper.from_array(u, "U"), numpy_helper.from_array(v, "V")]
        nodes = [helper.make_node("MatMul", ["x", "U"], ["t"]), helper.make_node("MatMul", ["t", "V"], ["m"])]
    nodes += [helper.make_node("Add", ["m", "b"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "g", [vi("x", TensorProto.FLOAT, ["N", 256])], [vi("y", TensorProto.FLOAT, ["N", 256])], inits + [bias]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    kw = dict(save_as_external_data=True, location=path.name + ".data", size_threshold=0) if external else {}
    onnx.save(model, path, **kw)
    return path


FEEDS = {"x": np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)}


def test_session_defaults(tmp_path):
    sess = session(linear_model(tmp_path / "m.onnx"))
    assert sess.get_providers() == default_providers()
    assert "CPUExecutionProvider" in sess.get_providers()


def test_session_user_errors(tmp_path):
    with pytest.raises(LrcError, match="does not exist"):
        session(tmp_path / "nope.onnx")
    with pytest.raises(LrcError, match="onnxruntime-gpu"):
        session(linear_model(tmp_path / "m.onnx"), ["NoSuchExecutionProvider"])
    (tmp_path / "bad.onnx").write_bytes(b"junk")
    with pytest.raises(LrcError, match="cannot load bad.onnx") as err:
        session(tmp_path / "bad.onnx")
    assert "\n" not in str(err.value)


def test_compare_latency(tmp_path):
    original, compressed = linear_model(tmp_path / "o.onnx"), linear_model(tmp_path / "c.onnx", rank=16)
    result = compare_latency(original, compressed, FEEDS, warmup=2, repeats=15, intra_op_threads=1)
    for key in ("original", "compressed"):
        stats = result[key]
        assert 0 < stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"] < 1000
    assert result["ratio"] == pytest.approx(result["compressed"]["median_ms"] / result["original"]["median_ms"])
    assert result["speedup"] == pytest.approx(1 / result["ratio"])
    assert result["repeats"] == 15 and result["providers"] == default_providers()


def test_compare_latency_user_errors(tmp_path):
    m = linear_model(tmp_path / "m.onnx")
    with pytest.raises(LrcError, match=r"feeds lack input\(s\) \['x'\]"):
        compare_latency(m, m, {"input": FEEDS["x"]})
    with pytest.raises(LrcError, match="repeats >= 1"):
        compare_latency(m, m, FEEDS, repeats=0)


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_save_optimized(tmp_path, external):
    src = linear_model(tmp_path / "m.onnx", rank=16, external=external)
    out = save_optimized(src, tmp_path / "opt.onnx")
    assert out == tmp_path / "opt.onnx"
    expected = {"m.onnx", "opt.onnx"} | ({"m.onnx.data", "opt.onnx.data"} if external else set())
    assert {p.name for p in tmp_path.iterdir()} == expected  # nothing temporary left
    onnx.checker.check_model(str(out))
    ref = session(src).run(None, FEEDS)[0]
    np.testing.assert_allclose(session(out).run(None, FEEDS)[0], ref, rtol=1e-5, atol=1e-5)


def test_save_optimized_bad_input_leaves_nothing(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"junk")
    with pytest.raises(LrcError):
        save_optimized(tmp_path / "bad.onnx", tmp_path / "opt.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["bad.onnx"]


def test_compare_latency_min_seconds(tmp_path):
    """A fast model is timed until both models ran ``min_seconds`` together, not just ``repeats`` times."""
    original, compressed = linear_model(tmp_path / "o.onnx"), linear_model(tmp_path / "c.onnx", rank=16)
    short = compare_latency(original, compressed, FEEDS, warmup=1, repeats=3, intra_op_threads=1)
    long = compare_latency(original, compressed, FEEDS, warmup=1, repeats=3, intra_op_threads=1, min_seconds=0.2)
    assert short["repeats"] == 3
    spent_ms = long["repeats"] * (long["original"]["mean_ms"] + long["compressed"]["mean_ms"])
    assert long["repeats"] > 3 and spent_ms >= 200
    capped = compare_latency(original, compressed, FEEDS, warmup=0, repeats=2, min_seconds=60, max_repeats=5)
    assert capped["repeats"] == 5
    with pytest.raises(LrcError, match="min_seconds >= 0"):
        compare_latency(original, compressed, FEEDS, min_seconds=-1)
