"""Fisher collection (lrcompile.fisher): user .npz, labels, and torch gradients vs a hand-written reference."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrcompile.errors import LrcError
from lrcompile.fisher import collect_fisher, fisher_for_candidate, iter_labels, load_fisher_npz

K, H, N = 12, 16, 1


def _mlp(seed: int = 0, gemm: bool = False, shared: bool = False) -> tuple[onnx.ModelProto, dict]:
    """x [b,K] -> MatMul W1 + b1 -> Relu -> MatMul W2 (or Gemm transB=1 with W2t [N,H]) + b2 -> Sigmoid."""
    rng = np.random.default_rng(seed)
    w = {"W1": rng.normal(0, 1 / np.sqrt(K), (K, H)), "b1": rng.normal(0, 0.1, H),
         "W2": rng.normal(0, 1 / np.sqrt(H), (H, N)), "b2": np.full(N, 0.1)}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"])]
    if shared:  # W1 used twice: h2' = h2 + relu(x @ W1) ... keeps the [b,H] shape
        nodes += [helper.make_node("MatMul", ["x", "W1"], ["s0"], name="fc1b"),
                  helper.make_node("Relu", ["s0"], ["s1"]), helper.make_node("Add", ["h2", "s1"], ["h3"])]
    last = "h3" if shared else "h2"
    if gemm:
        w["W2t"] = np.ascontiguousarray(w.pop("W2").T)
        nodes.append(helper.make_node("Gemm", [last, "W2t", "b2"], ["z"], transB=1, alpha=0.5, name="fc2"))
    else:
        nodes += [helper.make_node("MatMul", [last, "W2"], ["z0"], name="fc2"), helper.make_node("Add", ["z0", "b2"], ["z"])]
    nodes.append(helper.make_node("Sigmoid", ["z"], ["p"]))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["b", N])],
                          [numpy_helper.from_array(v, k) for k, v in w.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m, w


def _data(n: int = 40, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, K)).astype(np.float32)
    y = (rng.random((n, 1)) < 0.5).astype(np.float32)
    assert 0 < y.sum() < n
    return x, y


def _reference(w: dict, x: np.ndarray, y: np.ndarray, bs: int, gemm: bool = False, shared: bool = False) -> dict:
    import torch

    t = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in w.items()}
    fisher = {k: np.zeros(v.shape) for k, v in w.items()}
    for lo in range(0, len(x), bs):
        xb, yb = torch.from_numpy(x[lo:lo + bs]), torch.from_numpy(y[lo:lo + bs])
        h = torch.relu(xb @ t["W1"] + t["b1"])
        if shared:
            h = h + torch.relu(xb @ t["W1"])
        z = (h @ t["W2t"].T) * 0.5 + t["b2"] if gemm else h @ t["W2"] + t["b2"]
        p = torch.sigmoid(z).clamp(1e-7, 1 - 1e-7)
        loss = -(yb * torch.log(p) + (1 - yb) * torch.log(1 - p)).mean()
        for k, g in zip(t, torch.autograd.grad(loss, list(t.values()))):
            fisher[k] += g.double().numpy() ** 2
    return fisher


def _batches(x, bs):
    return ({"x": x[lo:lo + bs]} for lo in range(0, len(x), bs))


def _close(a, b, rtol=1e-6):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


# ----------------------------------------------------------------------------- torch gradients

@pytest.mark.torch
@pytest.mark.parametrize("gemm,shared", [(False, False), (True, False), (False, True)])
def test_collect_matches_hand_autograd(gemm, shared):
    m, w = _mlp(gemm=gemm, shared=shared)
    x, y = _data()
    names = ["W1", "W2t" if gemm else "W2", "b1"]
    got = collect_fisher(m, names, _batches(x, 8), (y[lo:lo + 8] for lo in range(0, len(x), 8)))
    ref = _reference(w, x, y, 8, gemm=gemm, shared=shared)
    assert set(got) == set(names)
    for k in names:
        assert got[k].dtype == np.float64 and got[k].shape == w[k].shape  # stored layout ([N, H] for transB)
        assert got[k].max() > 0
        _close(got[k], ref[k])


@pytest.mark.torch
def test_auto_loss_choices_and_whole_label_array():
    m, w = _mlp()
    x, y = _data(30)
    ref = _reference(w, x, y, 7)
    got = collect_fisher(m, ["W1"], _batches(x, 7), y.astype(np.int64))  # one array, int 0/1 labels -> bce
    _close(got["W1"], ref["W1"])
    with pytest.raises(LrcError, match="labels ran out"):
        collect_fisher(m, ["W1"], _batches(x, 7), iter([y[:7]]))
    with pytest.raises(LrcError, match="label rows"):
        collect_fisher(m, ["W1"], _batches(x, 7), (y[:5] for _ in range(9)))
    mse = collect_fisher(m, ["W2"], _batches(x, 10), y * 0.3 + 0.35)  # non-binary floats -> mse
    assert mse["W2"].max() > 0
    with pytest.raises(LrcError, match="--loss ce"):
        collect_fisher(m, ["W2"], _batches(x, 10), y, loss="ce")
    with pytest.raises(LrcError, match="not a constant"):
        collect_fisher(m, ["h0"], _batches(x, 10), y)


@pytest.mark.torch
def test_cross_entropy_on_logits_with_constant_node_weight():
    rng = np.random.default_rng(3)
    wv = rng.normal(size=(K, 5)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(wv, "W")),
         helper.make_node("MatMul", ["x", "W"], ["logits"])], "lin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 5])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(20, K)).astype(np.float32)
    y = rng.integers(0, 5, 20)
    got = collect_fisher(m, ["W"], _batches(x, 10), y)
    import torch

    ref = np.zeros_like(wv, dtype=np.float64)
    for lo in (0, 10):
        t = torch.from_numpy(wv.copy()).requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(torch.from_numpy(x[lo:lo + 10]) @ t, torch.from_numpy(y[lo:lo + 10]))
        loss.backward()
        ref += t.grad.double().numpy() ** 2
    _close(got["W"], ref)
    _close(collect_fisher(m, ["W"], _batches(x, 10), y[:, None], loss="ce")["W"], ref)  # class ids as a column


@pytest.mark.torch
def test_conv_weight_from_baked_module():
    rng = np.random.default_rng(4)
    wv = (rng.normal(size=(4, 3, 3, 3)) * 0.3).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("ReduceMean", ["c"], ["o"], axes=[1, 2, 3], keepdims=0),
         helper.make_node("Sigmoid", ["o"], ["p"])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 6, 6])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["b"])], [numpy_helper.from_array(wv, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(12, 3, 6, 6)).astype(np.float32)
    y = (np.arange(12) % 2).astype(np.float32)
    got = collect_fisher(m, ["W"], _batches(x, 6), y)
    import torch

    ref = np.zeros(wv.shape)
    for lo in (0, 6):
        t = torch.from_numpy(wv.copy()).requires_grad_(True)
        p = torch.sigmoid(torch.nn.functional.conv2d(torch.from_numpy(x[lo:lo + 6]), t, padding=1).mean((1, 2, 3)))
        torch.nn.functional.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), torch.from_numpy(y[lo:lo + 6])).backward()
        ref += t.grad.double().numpy() ** 2
    _close(got["W"], ref)


def test_missing_onnx2torch_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx2torch", None)
    m, _ = _mlp()
    x, y = _data(8)
    with pytest.raises(LrcError, match=r"pip install 'lrcompile\[fisher\]'") as e:
        collect_fisher(m, ["W1"], _batches(x, 8), y)
    assert "\n" not in str(e.value)


@pytest.mark.torch
def test_onnx2torch_imports_without_torchvision(monkeypatch):
    pytest.importorskip("onnx2torch")
    from lrcompile.fisher import import_convert

    for k in [k for k in sys.modules if k.split(".")[0] in ("onnx2torch", "torchvision")]:
        monkeypatch.delitem(sys.modules, k)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    assert callable(import_convert())
    assert sys.modules["torchvision"] is None  # the stand-in is gone again


# ----------------------------------------------------------------------------- user Fisher / labels

def test_load_fisher_npz_and_errors(tmp_path):
    shapes = {"W1": (K, H), "W2t": (N, H)}
    good = tmp_path / "f.npz"
    np.savez(good, W1=np.ones((K, H), np.float32), W2t=np.arange(H, dtype=np.int64)[None])
    out = load_fisher_npz(good, shapes)
    assert out["W1"].dtype == np.float64 and out["W2t"].shape == (N, H)
    assert load_fisher_npz(_save(tmp_path, W1=np.ones((K, H))), shapes).keys() == {"W1"}
    cases = {
        "no such file": tmp_path / "missing.npz",
        "pickled": _save(tmp_path, W1=np.array([{"a": 1}], dtype=object)),
        "name no factorizable weight": _save(tmp_path, W3=np.ones(2)),
        r"shape \[16, 12\], expected the stored weight shape \[12, 16\]": _save(tmp_path, W1=np.ones((H, K))),
        "negative": _save(tmp_path, W1=-np.ones((K, H))),
        "NaN or Inf": _save(tmp_path, W1=np.full((K, H), np.inf)),
        "not an .npz archive": _bytes(tmp_path, b"not a zip"),
        "real numbers": _save(tmp_path, W1=np.full((K, H), "a")),
    }
    for msg, path in cases.items():
        with pytest.raises(LrcError, match=msg) as e:
            load_fisher_npz(path, shapes)
        assert "\n" not in str(e.value)


def _save(tmp_path, **arrays):
    p = tmp_path / f"f{len(list(tmp_path.iterdir()))}.npz"
    np.savez(p, **arrays)
    return p


def _bytes(tmp_path, data):
    p = tmp_path / "bad.npz"
    p.write_bytes(data)
    return p


def test_iter_labels_aligns_with_calibration(tmp_path):
    from lrcompile.calibrate import CalibSource, iter_calibration

    m, _ = _mlp()
    x, y = _data(23)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=x, __labels__=y)
    feeds = list(iter_calibration(CalibSource(str(calib), samples=19, batch_size=5), m))
    labels = list(iter_labels(calib, batch_size=5, samples=19))
    assert [len(f["x"]) for f in feeds] == [len(b) for b in labels] == [5, 5, 5, 4]
    np.testing.assert_array_equal(np.concatenate(labels), y[:19])
    npy = tmp_path / "y.npy"
    np.save(npy, y[:, 0] * 2)
    np.testing.assert_array_equal(np.concatenate(list(iter_labels(calib, npy, batch_size=8))), y[:, 0] * 2)
    np.save(npy, y[:5])
    with pytest.raises(LrcError, match="5 rows"):
        list(iter_labels(calib, npy))
    np.savez(calib, x=x)
    with pytest.raises(LrcError, match="no __labels__"):
        list(iter_labels(calib))
    with pytest.raises(LrcError, match="only an .npz"):
        list(iter_labels(tmp_path / "feeds.json"))


def test_fisher_for_candidate_layouts():
    from types import SimpleNamespace as NS

    f = np.arange(6.0).reshape(2, 3)
    cand = NS(weight_key="W:T", matrices=[np.zeros((3, 2))], label="n")
    np.testing.assert_array_equal(fisher_for_candidate(cand, f)[0], f.T)
    conv = np.arange(4 * 2 * 3 * 3.0).reshape(4, 2, 3, 3)  # O=4, groups=2
    cand = NS(weight_key="Wc", matrices=[np.zeros((18, 2))] * 2, label="c")
    mats = fisher_for_candidate(cand, conv)
    np.testing.assert_array_equal(mats[1], conv[2:].reshape(2, -1).T)
    with pytest.raises(AssertionError):
        fisher_for_candidate(NS(weight_key="W", matrices=[np.zeros((3, 2))], label="n"), f)
