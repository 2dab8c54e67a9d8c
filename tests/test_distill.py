"""--distill (lrcompile.distill): which tensors train, that training lowers the error on unseen data,
the held-out guard, determinism, Conv factors, and one-line errors."""
from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import lrcompile
from lrcompile.errors import LrcError
from helpers import make_model, run, save, trained_like, vi

pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("--distill needs onnx2torch (lrcompile[fisher])", allow_module_level=True)

from lrcompile.distill import _groupable, _grouped, _trimmed, distill, trainable_tensors  # noqa: E402

K, H, N = 32, 64, 16


def _mlp(tmp_path):
    w1, w2 = trained_like(K, H, seed=1, decay=0.3), trained_like(H, N, seed=2, decay=0.3)
    b1 = np.linspace(-0.2, 0.2, H, dtype=np.float32)
    m = make_model(
        [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"), helper.make_node("Add", ["h0", "b1"], ["h1"]),
         helper.make_node("Tanh", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "W2"], ["y"], name="fc2")],
        [vi("x", ["b", K])], [vi("y", ["b", N])], [("W1", w1), ("b1", b1), ("W2", w2)])
    return save(m, tmp_path / "mlp.onnx")


def _x(n, seed):
    """Correlated inputs (a few strong directions), as real activations are."""
    mix = np.random.default_rng(0).normal(size=(K, K)) * (np.arange(1, K + 1) ** -1.0)[:, None]
    return (np.random.default_rng(seed).normal(size=(n, K)) @ mix).astype(np.float32)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def compiled(tmp_path):
    src = _mlp(tmp_path)
    np.savez(tmp_path / "calib.npz", x=_x(64, 1))
    np.savez(tmp_path / "distill.npz", x=_x(640, 2))
    opts = dict(method="whiten", calib=str(tmp_path / "calib.npz"), ratio=0.3, multiple=1, min_params=0, verify=False)
    return src, opts


@pytest.mark.parametrize("match", ["outputs", "layers"])
def test_trains_only_new_tensors_and_lowers_unseen_error(tmp_path, compiled, match):
    src, opts = compiled
    lrcompile.compile(src, tmp_path / "plain.onnx", **opts)
    res = lrcompile.compile(src, tmp_path / "d.onnx", **opts, distill=str(tmp_path / "distill.npz"),
                            distill_epochs=4, distill_lr=3e-3, distill_batch=32, distill_match=match)
    info = res.report["distillation"]
    assert info["match"] == match
    assert info["samples"] == 640 and info["held_out_batches"] == 2 and info["kept_epoch"] >= 1
    assert info["held_out_loss_after"] < 0.95 * info["held_out_loss_before"]

    before, after = onnx.load(str(tmp_path / "plain.onnx")), onnx.load(str(tmp_path / "d.onnx"))
    names, matched = trainable_tensors(onnx.load(str(src)), before)
    b, a = ({i.name: numpy_helper.to_array(i) for i in m.graph.initializer} for m in (before, after))
    assert set(b) == set(a) and "b1" in names and "W1" not in b and "W2" not in b  # both layers factorized
    assert set(names) == set(b)  # factors of both layers and fc1's bias
    for k in names:
        assert not np.array_equal(a[k], b[k]), k
    assert {"h1", "y"} <= set(matched)

    x = _x(512, 3)  # neither calibration nor distillation data
    ref = run(src, {"x": x})["y"]
    e_plain, e_dist = _rel(run(tmp_path / "plain.onnx", {"x": x})["y"], ref), _rel(run(tmp_path / "d.onnx", {"x": x})["y"], ref)
    assert e_dist < 0.97 * e_plain, (e_plain, e_dist)  # measured 0.948 (outputs), 0.954 (layers)


def test_untouched_weights_stay_byte_identical_and_output_is_deterministic(tmp_path, compiled):
    src, opts = compiled
    opts = {**opts, "include": ("fc2",), "distill": str(tmp_path / "distill.npz"), "distill_lr": 3e-3}
    lrcompile.compile(src, tmp_path / "a.onnx", **opts)
    lrcompile.compile(src, tmp_path / "b.onnx", **opts)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    orig = {i.name: i.SerializeToString() for i in onnx.load(str(src)).graph.initializer}
    out = {i.name: i.SerializeToString() for i in onnx.load(str(tmp_path / "a.onnx")).graph.initializer}
    assert out["W1"] == orig["W1"] and out["b1"] == orig["b1"]  # fc1 was not rewritten: not trained


def test_guard_returns_the_rewrite_when_training_does_not_help(tmp_path, compiled):
    src, opts = compiled
    plain = lrcompile.compile(src, tmp_path / "plain.onnx", **opts)
    res = lrcompile.compile(src, tmp_path / "d.onnx", **opts, distill=str(tmp_path / "distill.npz"), distill_lr=50.0)
    assert res.report["distillation"]["kept_epoch"] == 0
    assert (tmp_path / "d.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()
    assert plain.output is not None


def test_conv_factors_train_through_the_torch_modules(tmp_path):
    w = (trained_like(16, 3 * 9, seed=3, decay=0.2).reshape(16, 3, 3, 3))
    m = make_model([helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                    helper.make_node("Relu", ["c"], ["y"])],
                   [vi("x", ["b", 3, 8, 8])], [vi("y", ["b", 16, 8, 8])], [("W", w.astype(np.float32))])
    src = save(m, tmp_path / "conv.onnx")
    smooth = lambda n, s: np.cumsum(np.random.default_rng(s).normal(size=(n, 3, 8, 8)), axis=3).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=smooth(32, 1))
    np.savez(tmp_path / "distill.npz", x=smooth(256, 2))
    opts = dict(method="whiten", calib=str(tmp_path / "calib.npz"), rank=3, multiple=1, min_params=0, verify=False,
                keep_unprofitable=True)
    lrcompile.compile(src, tmp_path / "plain.onnx", **opts)
    res = lrcompile.compile(src, tmp_path / "d.onnx", **opts, distill=str(tmp_path / "distill.npz"),
                            distill_epochs=3, distill_lr=3e-3)
    assert res.report["distillation"]["kept_epoch"] >= 1
    x = smooth(64, 9)
    ref = run(src, {"x": x})["y"]
    e0, e1 = _rel(run(tmp_path / "plain.onnx", {"x": x})["y"], ref), _rel(run(tmp_path / "d.onnx", {"x": x})["y"], ref)
    assert e1 < e0, (e0, e1)


def test_trimmed_cuts_trailing_padding_of_mask_shaped_inputs():
    ids = np.arange(12).reshape(2, 6)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    other = np.ones((2, 3), np.float32)
    got = _trimmed({"ids": ids, "attention_mask": mask, "other": other}, "attention_mask")
    assert got["ids"].shape == (2, 3) and got["attention_mask"].shape == (2, 3) and got["other"] is other
    assert _trimmed({"ids": ids}, None)["ids"] is ids


@pytest.mark.parametrize("kw, match", [
    (dict(distill="missing.npz"), r"--distill .*missing\.npz: no such file"),
    (dict(distill_lr=0.0, distill="d.npz"), r"--distill-lr 0.0: give a positive learning rate"),
    (dict(distill_match="all", distill="d.npz"), r"--distill-match 'all': choose outputs or layers"),
    (dict(distill="d.npz", distill_samples=8, distill_batch=32), r"--distill: 8 samples make one batch"),
])
def test_one_line_errors_and_no_output(tmp_path, compiled, kw, match):
    src, opts = compiled
    np.savez(tmp_path / "d.npz", x=_x(64, 5))
    kw = {k: (str(tmp_path / v) if k == "distill" else v) for k, v in kw.items()}
    with pytest.raises(LrcError, match=match):
        lrcompile.compile(src, tmp_path / "o.onnx", **opts, **kw)
    assert not (tmp_path / "o.onnx").exists()


def test_nothing_new_to_train(tmp_path):
    src = _mlp(tmp_path)
    m = onnx.load(str(src))
    with pytest.raises(LrcError, match="no new weights"):
        distill(m, m, iter([{"x": _x(8, 0)}] * 2))


def test_cli_prints_the_distillation_and_errors_in_one_line(tmp_path, compiled):
    import subprocess
    import sys

    src, _ = compiled
    base = [sys.executable, "-m", "lrcompile.cli", "compile", str(src), "--method", "whiten", "--calib",
            str(tmp_path / "calib.npz"), "--ratio", "0.3", "--multiple", "1", "--min-params", "0", "--no-verify"]
    r = subprocess.run(base + ["-o", str(tmp_path / "d.onnx"), "--distill", str(tmp_path / "distill.npz"),
                               "--distill-lr", "3e-3", "--report", str(tmp_path / "d.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "distilled on 640 samples" in r.stdout and "held-out loss" in r.stdout
    import json

    assert json.loads((tmp_path / "d.json").read_text())["config"]["distill"].endswith("distill.npz")
    np.savez(tmp_path / "bad.npz", y=_x(64, 1))
    r = subprocess.run(base + ["-o", str(tmp_path / "e.onnx"), "--distill", str(tmp_path / "bad.npz")],
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("lrcompile: error: "), r.stderr
    assert "--distill bad.npz" in lines[0] and "Traceback" not in r.stderr, lines[0]
    assert not (tmp_path / "e.onnx").exists()


def test_bench_config_takes_the_distill_options():
    from lrcompile.bench import parse_config

    (c,) = parse_config("whiten:ratio=0.5;distill=d.npz;distill-epochs=3;distill_lr=1e-3")
    assert dict(c.options) == {"ratio": 0.5, "distill": "d.npz", "distill_epochs": 3, "distill_lr": 1e-3}


def test_missing_torch_is_one_line_before_any_work(tmp_path, compiled, monkeypatch):
    import importlib.util as iu

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "onnx2torch" else real(name, *a))
    src, opts = compiled
    with pytest.raises(LrcError, match=r"--distill trains with torch; onnx2torch not installed: pip install"):
        lrcompile.compile(src, tmp_path / "o.onnx", **opts, distill=str(tmp_path / "distill.npz"))
    assert not (tmp_path / "o.onnx").exists()


def test_grouped_rebatches_every_row_once_by_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 17, size=40)
    mask = (np.arange(16)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 1000, size=(40, 16)) * mask
    feeds = [{"ids": ids[i:i + 8], "attention_mask": mask[i:i + 8]} for i in range(0, 40, 8)]
    assert _groupable(feeds, "attention_mask") and not _groupable(feeds, None)
    got = _grouped(feeds, "attention_mask")
    assert [len(f["ids"]) for f in got] == [8] * 5
    widths = [f["ids"].shape[1] for f in got]
    assert widths == sorted(widths) and widths[0] < 16  # short rows together, cut to their longest
    for f in got:
        assert f["attention_mask"][:, -1].any()  # no all-padding column left
    pad = lambda a: np.pad(a, ((0, 0), (0, 16 - a.shape[1])))  # noqa: E731
    before = sorted(map(tuple, ids))
    assert sorted(map(tuple, np.concatenate([pad(f["ids"]) for f in got]))) == before
    ragged = feeds[:2] + [{"ids": ids[:8, :12], "attention_mask": mask[:8, :12]}]
    assert not _groupable(ragged, "attention_mask")  # shapes differ past the batch axis: batches kept as given


def test_length_grouping_and_the_teacher_cache_on_a_masked_model(tmp_path, monkeypatch):
    """A masked sequence model: grouped batches still train, and caching the teacher changes nothing."""
    import lrcompile.distill as D

    T, E = 12, 16
    table = trained_like(50, E, seed=3, decay=0.5)
    w, w2 = trained_like(E, 32, seed=4, decay=0.2), trained_like(32, E, seed=6, decay=0.2)
    m = make_model(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "W"], ["h0"], name="fc"),
         helper.make_node("Tanh", ["h0"], ["h1"]), helper.make_node("MatMul", ["h1", "W2"], ["h"], name="fc2"),
         helper.make_node("Cast", ["mask"], ["mf"], to=onnx.TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["mf", "ax"], ["m3"]), helper.make_node("Mul", ["h", "m3"], ["hm"]),
         helper.make_node("ReduceSum", ["hm", "ax1"], ["y"], keepdims=0)],
        [vi("ids", ["b", "t"], onnx.TensorProto.INT64), vi("mask", ["b", "t"], onnx.TensorProto.INT64)],
        [vi("y", ["b", E])],
        [("table", table), ("W", w), ("W2", w2), ("ax", np.array([-1], np.int64)), ("ax1", np.array([1], np.int64))])
    rng = np.random.default_rng(5)
    lengths = rng.integers(2, T + 1, size=320)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 50, size=(320, T)) * mask
    src = save(m, tmp_path / "seq.onnx")
    np.savez(tmp_path / "c.npz", ids=ids[:64], mask=mask[:64])
    lrcompile.compile(src, tmp_path / "low.onnx", method="whiten", calib=str(tmp_path / "c.npz"), ratio=0.3,
                      multiple=1, min_params=0, mask_input="mask", verify=False, include=("fc", "fc2"))
    original, low = onnx.load(str(src)), onnx.load(str(tmp_path / "low.onnx"))
    feeds = [{"ids": ids[i:i + 32], "mask": mask[i:i + 32]} for i in range(64, 320, 32)]
    runs = []
    for cache in (1 << 30, 0):
        monkeypatch.setattr(D, "TEACHER_CACHE_BYTES", cache)
        runs.append(distill(original, low, feeds, epochs=3, lr=3e-2, mask_input="mask"))
    info = runs[0].info
    assert info["length_grouped"] and info["kept_epoch"] >= 1
    assert info["held_out_loss_after"] < 0.9 * info["held_out_loss_before"]  # measured 0.595 -> 0.489
    assert runs[0].model.SerializeToString() == runs[1].model.SerializeToString()
    ungrouped = distill(original, low, feeds, epochs=1, lr=3e-3, mask_input="mask", group_lengths=False)
    assert not ungrouped.info["length_grouped"]
