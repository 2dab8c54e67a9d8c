"""End-to-end evaluation (lrcompile.evaluate): metrics against numpy, labels, caching, user errors, scripts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model, run, save, vi
from onnx import helper

import lrcompile.evaluate as evaluate
from lrcompile.errors import LrcError
from lrcompile.evaluate import METRICS, Evaluator, Measurement
from lrcompile.metrics import logloss, output_error, roc_auc

K, H, C, N = 8, 16, 5, 48


def _mlp(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """x [b,K] -> MatMul W1 -> Relu (output h) -> MatMul W2 (output y [b,C])."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="fc1"), helper.make_node("Relu", ["a"], ["h"]),
             helper.make_node("MatMul", ["h", "W2"], ["y"], name="fc2")]
    return make_model(nodes, [vi("x", ["b", K])], [vi("y", ["b", C]), vi("h", ["b", H])],
                      inits=[("W1", w1), ("W2", w2)])


def _ctr(w: np.ndarray, sigmoid: bool = True) -> onnx.ModelProto:
    """x [b,K] -> MatMul w [K,1] (-> Sigmoid): a probability (or logit) per sample."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z" if sigmoid else "p"], name="fc")]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["z"], ["p"]))
    return make_model(nodes, [vi("x", ["b", K])], [vi("p", ["b", 1])], inits=[("w", w)])


@pytest.fixture
def mlp(tmp_path):
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 1 / np.sqrt(K), (K, H)).astype(np.float32)
    w2 = rng.normal(0, 1 / np.sqrt(H), (H, C)).astype(np.float32)
    x = rng.normal(size=(N, K)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    orig = _mlp(w1, w2)
    noisy = _mlp(w1 + rng.normal(0, 0.15, w1.shape).astype(np.float32), w2 * np.float32(0.9))
    save(orig, tmp_path / "orig.onnx")
    save(noisy, tmp_path / "noisy.onnx")
    ref, got = run(tmp_path / "orig.onnx", {"x": x}), run(tmp_path / "noisy.onnx", {"x": x})
    return {"orig": orig, "noisy": noisy, "data": str(tmp_path / "data.npz"), "x": x, "ref": ref, "got": got,
            "path": tmp_path / "noisy.onnx"}


@pytest.fixture
def ctr(tmp_path):
    """A sigmoid model, labels drawn from it (so it has a real AUC), and a worse copy."""
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (K, 1)).astype(np.float32)
    x = rng.normal(size=(N, K)).astype(np.float32)
    p = 1 / (1 + np.exp(-(x @ w)))
    y = (rng.random((N, 1)) < p).astype(np.int64)
    np.savez(tmp_path / "ctr.npz", x=x, __labels__=y)
    np.savez(tmp_path / "nolabels.npz", x=x)
    np.save(tmp_path / "labels.npy", y.ravel())
    worse = w + rng.normal(0, 1.5, w.shape).astype(np.float32)
    return {"orig": _ctr(w), "worse": _ctr(worse), "x": x, "y": y.ravel(), "data": str(tmp_path / "ctr.npz"),
            "w": w, "worse_w": worse, "dir": tmp_path}


def _numpy_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).reshape(len(a), -1), b.astype(np.float64).reshape(len(b), -1)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_metrics_table():
    assert set(METRICS) == {"cosine", "top1", "max-rel", "rel-l2", "auc", "logloss"}
    assert not METRICS["top1"].smooth and not METRICS["auc"].smooth and METRICS["cosine"].smooth
    assert METRICS["auc"].needs_labels and not METRICS["max-rel"].higher_is_better


@pytest.mark.parametrize("metric", ["cosine", "top1", "max-rel", "rel-l2"])
def test_original_against_itself_drops_nothing(mlp, metric):
    ev = Evaluator(mlp["orig"], mlp["data"], metric, providers=["CPUExecutionProvider"])
    m = ev.measure(mlp["orig"])
    assert m == Measurement(value=ev.baseline, drop=0.0, rel_l2_sq=0.0, samples=N)
    assert ev.baseline == (1.0 if METRICS[metric].higher_is_better else 0.0)


def test_perturbed_model_matches_numpy(mlp):
    ref, got = mlp["ref"]["y"], mlp["got"]["y"]
    kw = dict(providers=["CPUExecutionProvider"], batch_size=10)  # 5 batches, the last one short
    cos = Evaluator(mlp["orig"], mlp["data"], "cosine", **kw).measure(mlp["path"])
    assert cos.value == pytest.approx(_numpy_cosine(got, ref), abs=1e-12)
    assert cos.drop == pytest.approx(1.0 - cos.value, abs=1e-15) and cos.drop > 1e-4
    rel_sq = np.sum((got.astype(np.float64) - ref) ** 2) / np.sum(ref.astype(np.float64) ** 2)
    assert cos.rel_l2_sq == pytest.approx(rel_sq, rel=1e-12)
    err = output_error(got, ref)
    for name, key in (("max-rel", "max_rel"), ("rel-l2", "rel_l2")):
        m = Evaluator(mlp["orig"], mlp["data"], name, **kw).measure(mlp["noisy"])
        assert m.value == pytest.approx(err[key], rel=1e-12) and m.drop == m.value > 0
    top = Evaluator(mlp["orig"], mlp["data"], "top1", **kw).measure(mlp["noisy"])
    assert top.value == np.mean(got.argmax(1) == ref.argmax(1)) and top.drop == 1.0 - top.value


def test_other_output_is_scored_and_only_it_is_fetched(mlp):
    ev = Evaluator(mlp["orig"], mlp["data"], "rel-l2", output="h", providers=["CPUExecutionProvider"])
    assert ev._fetch == ["h"] and set(ev.reference) == {"h"}
    m = ev.measure(mlp["noisy"])
    assert m.value == pytest.approx(output_error(mlp["got"]["h"], mlp["ref"]["h"])["rel_l2"], rel=1e-12)
    assert ev.describe()["output"] == "h"


def test_original_runs_once_and_data_is_read_once(mlp, monkeypatch):
    calls = []
    real = evaluate._session
    monkeypatch.setattr(evaluate, "_session", lambda m, p: calls.append(m) or real(m, p))
    ev = Evaluator(mlp["orig"], mlp["data"], "cosine", providers=["CPUExecutionProvider"])
    assert len(calls) == 1
    Path(mlp["data"]).unlink()  # the data is held in memory: measuring does not read it again
    first = ev.measure(mlp["noisy"])
    assert ev.measure(mlp["path"]) == first and len(calls) == 3


def test_samples_cap_and_labels_from_npz(ctr):
    ev = Evaluator(ctr["orig"], ctr["data"], "auc", samples=20, batch_size=8, providers=["CPUExecutionProvider"])
    p = 1 / (1 + np.exp(-(ctr["x"][:20].astype(np.float64) @ ctr["w"])))
    assert ev.samples == 20 and ev.labels.tolist() == ctr["y"][:20].tolist()
    assert ev.baseline == pytest.approx(roc_auc(ctr["y"][:20], p), abs=1e-12)
    assert ev.measure(ctr["worse"]).samples == 20


def test_auc_and_logloss_against_labels(ctr, tmp_path):
    save(ctr["worse"], tmp_path / "worse.onnx")
    save(ctr["orig"], tmp_path / "orig.onnx")
    p_ref = run(tmp_path / "orig.onnx", {"x": ctr["x"]})["p"]
    p_bad = run(tmp_path / "worse.onnx", {"x": ctr["x"]})["p"]
    kw = dict(providers=["CPUExecutionProvider"])
    auc = Evaluator(ctr["orig"], ctr["data"], "auc", **kw)
    assert auc.baseline == roc_auc(ctr["y"], p_ref) and auc.describe()["scores"] == "probabilities"
    m = auc.measure(ctr["worse"])
    assert m.value == roc_auc(ctr["y"], p_bad) and m.drop == auc.baseline - m.value > 0
    ll = Evaluator(ctr["orig"], ctr["data"], "logloss", labels=str(ctr["dir"] / "labels.npy"), **kw)
    assert ll.baseline == logloss(ctr["y"], p_ref)
    m = ll.measure(tmp_path / "worse.onnx")
    assert m.value == logloss(ctr["y"], p_bad) and m.drop == m.value - ll.baseline > 0
    assert ll.measure(ctr["orig"]).drop == 0.0


def test_logit_output_gets_a_sigmoid(ctr):
    ev = Evaluator(_ctr(ctr["w"], sigmoid=False), ctr["data"], "logloss", providers=["CPUExecutionProvider"])
    assert ev.describe()["scores"].startswith("logits")
    z = ctr["x"].astype(np.float64) @ ctr["w"]
    assert ev.baseline == pytest.approx(logloss(ctr["y"], (1 / (1 + np.exp(-z))).astype(np.float32)), rel=1e-5)
    assert ev.measure(_ctr(ctr["worse_w"], sigmoid=False)).drop > 0


def test_external_data_route_leaves_the_callers_model_alone(mlp, monkeypatch):
    ev = Evaluator(mlp["orig"], mlp["data"], "cosine", providers=["CPUExecutionProvider"])
    expected = ev.measure(mlp["noisy"])
    before = mlp["noisy"].SerializeToString()
    monkeypatch.setattr(evaluate, "_MAX_PROTO_BYTES", 0)  # as if the model were over 2 GB
    assert ev.measure(mlp["noisy"]) == expected
    assert mlp["noisy"].SerializeToString() == before


def test_loader_script_runs_once(mlp, tmp_path):
    np.save(tmp_path / "x.npy", mlp["x"])
    (tmp_path / "load.py").write_text(
        "import numpy as np, pathlib\n"
        "def batches():\n"
        f"    log = pathlib.Path({str(tmp_path / 'runs.txt')!r})\n"
        "    log.write_text(log.read_text() + 'x' if log.exists() else 'x')\n"
        f"    x = np.load({str(tmp_path / 'x.npy')!r})\n"
        "    for i in range(0, len(x), 20):\n"
        "        yield {'x': x[i:i + 20]}\n")
    ev = Evaluator(mlp["orig"], str(tmp_path / "load.py:batches"), "cosine", providers=["CPUExecutionProvider"])
    ev.measure(mlp["noisy"])
    ev.measure(mlp["noisy"])
    assert ev.samples == N and (tmp_path / "runs.txt").read_text() == "x"


NEG_MSE = ("import numpy as np\n"
           "def neg_mse(outputs, reference, labels):\n"
           "    assert set(outputs) == set(reference) == {'y', 'h'} and labels is None\n"
           "    return -float(np.mean((outputs['y'].astype(np.float64) - reference['y']) ** 2))\n")


def test_script_metric(mlp, tmp_path):
    (tmp_path / "m.py").write_text(NEG_MSE)
    ev = Evaluator(mlp["orig"], mlp["data"], "script", script=f"{tmp_path / 'm.py'}:neg_mse",
                   providers=["CPUExecutionProvider"])
    assert ev.baseline == 0.0 and ev.describe()["script"].endswith("m.py:neg_mse")
    m = ev.measure(mlp["noisy"])
    mse = np.mean((mlp["got"]["y"].astype(np.float64) - mlp["ref"]["y"]) ** 2)
    assert m.value == pytest.approx(-mse, rel=1e-12) and m.drop == pytest.approx(mse, rel=1e-12) and m.drop > 0
    assert m.rel_l2_sq > 0  # of the first output, y


def test_script_gets_labels_from_the_npz(ctr, tmp_path):
    (tmp_path / "m.py").write_text("def metric(outputs, reference, labels):\n    return float(labels.sum())\n")
    ev = Evaluator(ctr["orig"], ctr["data"], "script", script=str(tmp_path / "m.py"), samples=30,
                   providers=["CPUExecutionProvider"])
    assert ev.baseline == ctr["y"][:30].sum()


def test_script_only_runs_when_named(mlp, tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "m.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef metric(o, r, l):\n    return 0.0\n")
    with pytest.raises(LrcError, match="unknown --metric.*--metric-script"):
        Evaluator(mlp["orig"], mlp["data"], str(tmp_path / "m.py"))
    with pytest.raises(LrcError, match="only used with --metric script"):
        Evaluator(mlp["orig"], mlp["data"], "cosine", script=str(tmp_path / "m.py"))
    assert not marker.exists()


@pytest.mark.parametrize("body, match", [
    (None, "no such Python file"),
    ("def other(o, r, l):\n    return 1.0\n", r"defines no function metric\(\)"),
    ("raise RuntimeError('boom')\n", "failed to import: RuntimeError: boom"),
    ("def metric(o, r, l):\n    raise KeyError('z')\n", "raised KeyError"),
    ("def metric(o, r, l):\n    return float('nan')\n", "returned nan, not a finite number"),
    ("def metric(o, r, l):\n    return 'good'\n", "returned str, not a number"),
    ("def metric(o, r, l):\n    return None\n", "returned NoneType, not a number"),
])
def test_script_errors(mlp, tmp_path, body, match):
    if body is not None:
        (tmp_path / "m.py").write_text(body)
    with pytest.raises(LrcError, match=match):
        Evaluator(mlp["orig"], mlp["data"], "script", script=str(tmp_path / "m.py"))


def test_script_raising_on_a_candidate(mlp, tmp_path):
    (tmp_path / "m.py").write_text("import numpy as np\ndef metric(o, r, l):\n"
                                   "    if not np.array_equal(o['y'], r['y']):\n        raise ValueError('bad')\n"
                                   "    return 1.0\n")
    ev = Evaluator(mlp["orig"], mlp["data"], "script", script=str(tmp_path / "m.py"))
    with pytest.raises(LrcError, match="raised ValueError: bad"):
        ev.measure(mlp["noisy"])


def test_user_errors(mlp, ctr, tmp_path):
    def err(match, model, data, metric="cosine", **kw):
        with pytest.raises(LrcError, match=match) as e:
            Evaluator(model, data, metric, **kw)
        assert "\n" not in str(e.value)

    err("unknown --metric 'f1'; choose one of cosine, top1, max-rel, rel-l2, auc, logloss, script", mlp["orig"],
        mlp["data"], "f1")
    err(r"--metric-output 'z' is not an output of the model; its outputs are \['y', 'h'\]", mlp["orig"],
        mlp["data"], output="z")
    err("--metric script needs --metric-script", mlp["orig"], mlp["data"], "script")
    err("--metric auc needs labels.*--labels FILE.npy", ctr["orig"], str(ctr["dir"] / "nolabels.npz"), "auc")
    np.save(tmp_path / "three.npy", np.arange(N) % 3)
    err("needs binary 0/1 labels, found \\[2\\]", ctr["orig"], ctr["data"], "auc", labels=str(tmp_path / "three.npy"))
    np.save(tmp_path / "short.npy", np.arange(N - 3) % 2)
    err(f"{N - 3} rows", ctr["orig"], ctr["data"], "logloss", labels=str(tmp_path / "short.npy"))
    np.save(tmp_path / "ones.npy", np.ones(N))
    err("both classes", ctr["orig"], ctr["data"], "auc", labels=str(tmp_path / "ones.npy"))
    err("only compares signs; use --metric rel-l2", ctr["orig"], ctr["data"], "cosine")
    err("top1 needs class scores", ctr["orig"], ctr["data"], "top1")
    err("reads one score per sample.*--metric-output", mlp["orig"], mlp["data"], "auc",
        labels=str(ctr["dir"] / "labels.npy"))
    err("no such file", mlp["orig"], str(tmp_path / "missing.npz"))


def test_labels_must_match_the_evaluated_samples(ctr, tmp_path):
    """A loader source is not checked by load_labels: the count check here catches it."""
    np.save(tmp_path / "x.npy", ctr["x"])
    (tmp_path / "load.py").write_text(
        f"import numpy as np\ndef load_data():\n    yield {{'x': np.load({str(tmp_path / 'x.npy')!r})}}\n")
    np.save(tmp_path / "long.npy", np.arange(N + 5) % 2)
    with pytest.raises(LrcError, match=f"{N + 5} labels for {N} evaluated samples"):
        Evaluator(ctr["orig"], str(tmp_path / "load.py"), "auc", labels=str(tmp_path / "long.npy"))
    ev = Evaluator(ctr["orig"], str(tmp_path / "load.py"), "auc", labels=str(tmp_path / "long.npy"), samples=10)
    assert ev.samples == 10 and len(ev.labels) == 10


def test_candidate_with_other_outputs_is_refused(mlp, ctr):
    ev = Evaluator(mlp["orig"], mlp["data"], "cosine")
    with pytest.raises(LrcError, match=r"has no output \['y'\]"):
        ev.measure(ctr["orig"])
