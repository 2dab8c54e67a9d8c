"""lrcompile bench: task metrics, configuration parsing, and end-to-end runs that write every file."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from helpers import make_model, save, trained_like, vi
from lrcompile import metrics
from lrcompile.bench import BenchConfig, load_dataset, method_availability, parse_config, run_bench
from lrcompile.errors import LrcError

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------- metrics


def test_cosine_rows_by_hand():
    y = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    ref = np.array([[0.0, 2.0], [2.0, 2.0], [4.0, 3.0]])
    np.testing.assert_allclose(metrics.cosine_rows(y, ref), [0.0, 1.0, 24 / 25])
    st = metrics.cosine_stats(y, ref)
    assert st["cosine_mean"] == pytest.approx((0 + 1 + 0.96) / 3)
    assert st["cosine_p1"] == pytest.approx(0.0 + 0.02 * 0.96)  # linear interpolation at 1%
    # leading axes are flattened into rows
    assert metrics.cosine_rows(y.reshape(3, 1, 2), ref.reshape(3, 1, 2)).shape == (3,)


def test_top1_by_hand():
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.5], [0.2, 0.3, 0.4], [1.0, 3.0, 2.0]])
    ref = np.array([[0.0, 1.0, 0.2], [0.1, 1.0, 0.5], [0.2, 0.1, 0.4], [1.0, 3.0, 2.0]])
    labels = np.array([1, 0, 0, 2])
    assert metrics.top1_accuracy(logits, labels) == 0.5
    assert metrics.top1_agreement(logits, ref) == 0.75


def test_auc_with_ties_by_hand_and_sklearn():
    labels = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.8, 0.8, 0.3, 0.2])
    # pairs (pos > neg) + 0.5 (pos == neg), over 4 x 4 pairs, counted by hand:
    # pos 0.4: > 0.1, 0.2; = 0.4 -> 2.5 | pos 0.8 (x2): > 0.1, 0.4, 0.2; = 0.8 -> 3.5 each | pos 0.3: > 0.1, 0.2 -> 2
    assert metrics.roc_auc(labels, scores) == pytest.approx((2.5 + 3.5 + 3.5 + 2) / 16)
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500) + 0.3 * y, 1)  # rounded: many ties
    assert metrics.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert metrics.roc_auc(y, s.astype(np.float32).reshape(-1, 1)) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-6)


def test_auc_needs_both_classes():
    with pytest.raises(ValueError, match="both"):
        metrics.roc_auc(np.ones(3), np.array([0.1, 0.2, 0.3]))


def test_logloss_by_hand_and_sklearn():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.6, 0.4])
    assert metrics.logloss(y, p) == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.6, 0.6])))
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    yy, pp = rng.integers(0, 2, 200), rng.random(200).astype(np.float32)
    pp[:3] = [0.0, 1.0, 1.0]  # clipped to [eps, 1 - eps] as sklearn does
    assert metrics.logloss(yy, pp) == pytest.approx(skm.log_loss(yy, pp), rel=1e-6)


def test_output_error_by_hand():
    e = metrics.output_error(np.array([1.0, 2.5, -1.0]), np.array([1.0, 2.0, -2.0]))
    assert e["max_abs"] == 1.0
    assert e["max_rel"] == 0.5  # relative to max |ref| = 2
    assert e["rel_l2"] == pytest.approx(np.sqrt(1.25) / 3.0)


def test_score_per_task():
    rng = np.random.default_rng(0)
    ref = rng.random((20, 1))
    y = ref + 0.01 * rng.standard_normal((20, 1))
    labels = (rng.random(20) < ref[:, 0]).astype(int)
    labels[:2] = [0, 1]
    s = metrics.score("auc", y, ref, labels)
    assert set(s) == {"max_abs", "max_rel", "rel_l2", "auc", "logloss"}  # no cosine on a 1-wide output
    logits = rng.standard_normal((20, 4))
    s = metrics.score("classification", logits, logits, rng.integers(0, 4, 20))
    assert s["top1_agreement"] == 1.0 and s["cosine_mean"] == pytest.approx(1.0) and "top1" in s
    with pytest.raises(ValueError, match="unknown"):
        metrics.score("bleu", y, ref)


# -------------------------------------------------------------------------------- configs


def test_parse_config_products_and_types():
    cfgs = parse_config("svd:ratio=0.9,0.5;multiple=1")
    assert cfgs == [BenchConfig("svd", (("ratio", 0.9), ("multiple", 1))),
                    BenchConfig("svd", (("ratio", 0.5), ("multiple", 1)))]
    assert cfgs[0].label == "svd ratio=0.9 multiple=1"
    assert cfgs[0].slug == "svd_ratio_0.9_multiple_1"
    (c,) = parse_config("svd:rank=16;keep-unprofitable=1;only=MatMul+Gemm")
    assert c.compile_options() == {"method": "svd", "rank": 16, "keep_unprofitable": True, "only": ("MatMul", "Gemm")}
    assert parse_config("svd") == [BenchConfig("svd")]


@pytest.mark.parametrize("text,match", [("nope:ratio=0.5", "unknown method"), ("svd:ratio", "KEY=V1"),
                                        ("svd:target=trt", "cannot be set"), ("svd:bogus=1", "cannot be set"),
                                        ("svd:ratio=x", "not a valid"), ("svd:sequential=maybe", "not a valid")])
def test_parse_config_errors(text, match):
    with pytest.raises(LrcError, match=match):
        parse_config(text)


def test_method_availability_without_data():
    ok, skipped = method_availability(has_calib=False)
    assert "svd" in ok
    from lrcompile.factorize import METHODS

    assert set(ok) | set(skipped) == {m for m, info in METHODS.items() if not info.internal}


def test_method_availability_gradient_methods(monkeypatch):
    """kfac needs calibration data only (no labels) and torch; fwsvd also needs labels."""
    import importlib.util

    ok, skipped = method_availability(has_calib=True, has_labels=False)
    assert "kfac" in ok and "whiten" in ok and "labels" in skipped["fwsvd"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx2torch" else real(name, *a))
    ok, skipped = method_availability(has_calib=True, has_labels=True)
    assert "whiten" in ok and "lrcompile[fisher]" in skipped["kfac"] and "lrcompile[fisher]" in skipped["fwsvd"]


# ----------------------------------------------------------------------------------- end to end


def _check_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 1024, path


def test_bench_cli_end_to_end_writes_every_file(tmp_path):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    build = tmp_path / "tiny"
    subprocess.run([sys.executable, str(ROOT / "models" / "build.py"), "tiny-mlp", "--out", str(build), "--fast"],
                   check=True, capture_output=True, env=env)
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "lrcompile.cli", "bench", str(build), "--config", "svd:ratio=0.9,0.5",
         "--eval-rows", "128", "--large-batch", "8", "--warmup", "1", "--repeats", "2", "-o", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PASSED" in proc.stdout and "svd ratio=0.5" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert [r["config"] for r in res["rows"]] == ["original", "svd ratio=0.9", "svd ratio=0.5"]
    assert res["environment"]["cpu_count"] and res["environment"]["date"]
    orig, r90, r50 = res["rows"]
    assert orig["cosine_mean"] == pytest.approx(1.0) and orig["params_ratio"] == 1.0
    for r in (r90, r50):
        assert r["status"] == "ok"
        assert 0 < r["cosine_mean"] < 1 and r["rel_l2"] > 0
        assert r["params"] < orig["params"] and r["flops"] < orig["flops"] and r["file_bytes"] < orig["file_bytes"]
        assert r["lat_b1_ratio"] > 0 and r["lat_b8_ratio"] > 0 and r["lat_b8_orig_ms"] > 0
        assert r["trt"] == "ok" or r["trt"].startswith("n/a")
    assert r50["factorized_params_ratio"] < r90["factorized_params_ratio"] <= 0.9
    assert r50["flops_ratio"] == pytest.approx(r50["factorized_params_ratio"], abs=0.05)  # an MLP: FLOPs ~ params
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == ["original", "svd ratio=0.9", "svd ratio=0.5"]
    assert {"params", "flops", "file_bytes", "cosine_mean", "cosine_p1", "lat_b1_ratio", "trt"} <= set(rows[0])
    pngs = ["pareto.png", "ranks_svd_ratio_0.5.png", "spectra.png"]
    assert set(pngs) <= set(res["files"])
    for name in pngs:
        _check_png(out / name)


def _binary_build(tmp_path: Path) -> Path:
    """A tiny CTR-like model (MatMul -> Sigmoid probability) with eval feed and labels."""
    rng = np.random.default_rng(0)
    w1, w2 = trained_like(64, 96), trained_like(96, 1, seed=1)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["z"]), helper.make_node("Sigmoid", ["z"], ["prob"])]
    model = make_model(nodes, [vi("x", ["batch", 64])], [vi("prob", ["batch", 1])], [("w1", w1), ("w2", w2)])
    path = save(model, tmp_path / "ctr.onnx")
    x = rng.standard_normal((200, 64)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    p = 1 / (1 + np.exp(-(np.maximum(x @ w1, 0) @ w2)))
    np.save(tmp_path / "labels.npy", (rng.random(200) < p[:, 0]).astype(np.int64))
    return path


def test_run_bench_binary_task_with_labels(tmp_path):
    path = _binary_build(tmp_path)
    ds = load_dataset(path, eval_feed=tmp_path / "eval.npz", labels=tmp_path / "labels.npy", metric="auc",
                      batch_size=64)
    assert ds.task == "binary_classification" and ds.output == "prob"
    res = run_bench(ds, parse_config("svd:ratio=0.5") + [BenchConfig("svd", (("ratio", 2.0),))], tmp_path / "out",
                    common={"min_params": 0}, latency=False, trt=False, plots=False, spectra_layers=0, progress=False)
    orig, ok, bad = res["rows"]
    assert res["primary"] == "auc" and res["higher_is_better"]
    assert 0.5 < orig["auc"] <= 1 and orig["rel_l2"] == 0
    assert ok["status"] == "ok" and ok["auc_delta"] == pytest.approx(ok["auc"] - orig["auc"])
    assert "logloss" in ok and "cosine_mean" not in ok
    assert bad["status"].startswith("error:") and "ratio" in bad["status"]  # recorded, not fatal
    assert (tmp_path / "out" / "results.json").is_file() and (tmp_path / "out" / "results.csv").is_file()
    assert not list((tmp_path / "out").glob(".bench.*"))  # the work folder is cleaned up


def test_load_dataset_errors(tmp_path):
    path = _binary_build(tmp_path)
    with pytest.raises(LrcError, match="--eval"):
        load_dataset(path)
    with pytest.raises(LrcError, match="no output"):
        load_dataset(path, eval_feed=tmp_path / "eval.npz", output="nope")
    with pytest.raises(LrcError, match="meta.json"):
        load_dataset(tmp_path)


def test_plots_without_matplotlib_say_how_to_install(monkeypatch, tmp_path):
    from lrcompile import plots

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(LrcError, match=r"pip install 'lrcompile\[plot\]'"):
        plots.spectra({"w": np.ones(3)}, tmp_path / "s.png", title="t")


def test_a_reference_that_is_not_the_models_is_refused(tmp_path):
    path = _binary_build(tmp_path)
    np.savez(tmp_path / "ref.npz", prob=np.full((200, 1), 0.5, np.float32))
    ds = load_dataset(path, eval_feed=tmp_path / "eval.npz", reference=tmp_path / "ref.npz", batch_size=64)
    with pytest.raises(LrcError, match="do not match"):
        run_bench(ds, [], tmp_path / "out", latency=False, trt=False, plots=False, progress=False)


def test_budget_rows_get_calibration_data_and_labels(tmp_path):
    """A --params/--max-drop row needs the calibration data for its sensitivity measurements and,
    with an AUC metric, the calibration labels; a data-free allocation and plain SVD get none."""
    from lrcompile.bench import Dataset, _data_options

    ds = Dataset.__new__(Dataset)
    ds.calib, ds.calib_labels = tmp_path / "calib.npz", tmp_path / "calib_labels.npy"
    assert _data_options(ds, {"method": "svd", "ratio": 0.5}) == {"method": "svd", "ratio": 0.5}
    assert _data_options(ds, {"method": "svd", "params": 0.5, "allocation": "threshold"})["method"] == "svd"
    assert "calib" not in _data_options(ds, {"method": "svd", "params": 0.5, "allocation": "threshold"})
    opts = _data_options(ds, {"method": "svd", "params": 0.5})
    assert opts["calib"] == str(ds.calib) and "labels" not in opts
    opts = _data_options(ds, {"method": "whiten", "max_drop": 0.001, "metric": "auc"})
    assert opts["calib"] == str(ds.calib) and opts["labels"] == str(ds.calib_labels)
    ds.output = "logits"  # kfac probes the output bench scores, and needs no labels
    opts = _data_options(ds, {"method": "kfac", "ratio": 0.5})
    assert opts["calib"] == str(ds.calib) and opts["metric_output"] == "logits" and "labels" not in opts
