"""Lazy weights (lrcompile.weights) and the compile of a model with external data: mapped reads,
released pages, portable references, the output equal to an eager compile's, the input untouched,
nothing left behind by an interruption."""
from __future__ import annotations

import hashlib
import pickle

import numpy as np
import onnx
import pytest
from onnx import helper

import lrcompile
from helpers import make_model, run, trained_like, vi
from lrcompile import io as lio
from lrcompile import weights
from lrcompile.engine import export
from lrcompile.report import memory_line


def _model():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2"),
             helper.make_node("Gemm", ["x", "Wg"], ["g"], name="gemm", transB=1),
             helper.make_node("Conv", ["img", "Wc"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    inits = [("W1", trained_like(64, 96, seed=1)), ("W2", trained_like(96, 48, seed=2)),
             ("Wg", trained_like(80, 64, seed=3)),
             ("Wc", np.random.default_rng(4).standard_normal((32, 3, 3, 3)).astype(np.float32))]
    return make_model(nodes, [vi("x", [4, 64]), vi("img", [1, 3, 16, 16])],
                      [vi("y", [4, 48]), vi("g", [4, 80]), vi("c", [1, 32, 16, 16])], inits)


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def pair(tmp_path):
    """The same model saved inline (``inl/m.onnx``) and with external data (``ext/m.onnx``)."""
    (tmp_path / "inl").mkdir()
    (tmp_path / "ext").mkdir()
    m = _model()
    onnx.save(m, str(tmp_path / "inl" / "m.onnx"))
    onnx.save(m, str(tmp_path / "ext" / "m.onnx"), save_as_external_data=True, location="m.bin", size_threshold=1024)
    return tmp_path / "inl" / "m.onnx", tmp_path / "ext" / "m.onnx"


def test_lazy_load_keeps_references_and_maps_on_read(pair):
    _, ext = pair
    m = lio.load_model(ext, lazy=True)
    assert all(onnx.external_data_helper.uses_external_data(t) for t in m.graph.initializer)
    assert lio.tensor_bytes(m) == lio.tensor_bytes(lio.load_model(ext))  # the external bytes count too
    with weights.reading(ext.parent):
        w = weights.to_array(m.graph.initializer[0])
        assert not w.flags.writeable and np.array_equal(w, trained_like(64, 96, seed=1))
        assert weights.release(w) >= w.nbytes and weights.release(np.ones(3)) == 0
        np.testing.assert_array_equal(w, trained_like(64, 96, seed=1))  # still readable after release
        g = weights.import_graph(m)
        c = g.tensors()["W1"]
        assert np.array_equal(c.values, w)  # read: a mapped array in the constant
        assert weights.release_graph(g) == 1
        out = export(g, m)
    (t,) = [t for t in out.graph.initializer if t.name == "W1"]
    assert onnx.external_data_helper.uses_external_data(t) and not t.HasField("raw_data")  # the reference again


def test_portable_refs_pickle_small_and_map_again(pair):
    _, ext = pair
    m = lio.load_model(ext, lazy=True)
    with weights.reading(ext.parent):
        w = weights.to_array(m.graph.initializer[0])
    for view in (w, w.T, w[::-1, 5:40:3], w[7]):
        ref = pickle.loads(pickle.dumps(weights.portable(view)))
        assert isinstance(ref, weights.FileRef) and len(pickle.dumps(ref)) < 1000
        back = weights.resolve(ref)
        assert back.shape == view.shape and np.array_equal(back, view)
    plain = np.arange(6.0)
    assert weights.portable(plain) is plain and weights.resolve(plain) is plain


def test_compile_with_external_data_equals_the_eager_compile(pair, tmp_path):
    """An external-data input compiles lazily: with external data the output is byte-identical to
    the inline model's; inline, the same graph; both verify; the input files stay as they were."""
    inl, ext = pair
    before = _hashes(ext.parent)
    outs = {}
    for name, src in (("inl", inl), ("ext", ext)):
        res = lrcompile.compile(src, tmp_path / f"o_{name}" / "m.lr.onnx", ratio=0.5, external_data=True)
        assert res.status == "PASSED" and res.verification
        outs[name] = _hashes(res.output.parent)
        assert set(res.report["memory"]["phases"]) >= {"load", "analyze", "factorize", "rewrite", "check", "verify"}
        assert res.report["memory"]["phases"]["factorize"]["rss_peak_mb"] > 0
        assert "verify" in res.report["memory"]["bounds"] and memory_line(res.report).startswith("peak RSS")
    assert outs["inl"] == outs["ext"]
    res = lrcompile.compile(ext, tmp_path / "o_inline" / "m.lr.onnx", ratio=0.5)  # inline output from lazy input
    assert res.status == "PASSED" and sorted(p.name for p in res.output.parent.iterdir()) == ["m.lr.onnx"]
    ref = onnx.load(str(tmp_path / "o_inl" / "m.lr.onnx"))
    got = onnx.load(str(res.output))
    assert [(n.op_type, list(n.input)) for n in got.graph.node] == [(n.op_type, list(n.input)) for n in ref.graph.node]
    feeds = {"x": np.ones((4, 64), np.float32), "img": np.ones((1, 3, 16, 16), np.float32)}
    for k, v in run(tmp_path / "o_inl" / "m.lr.onnx", feeds).items():
        np.testing.assert_array_equal(run(res.output, feeds)[k], v)
    assert _hashes(ext.parent) == before


def test_write_copies_references_in_chunks(pair, tmp_path, monkeypatch):
    """Referenced tensors reach the output's data file in COPY_CHUNK pieces, never whole."""
    _, ext = pair
    m = lio.load_model(ext, lazy=True)
    reads = []
    real = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def seek(self, *a):
            return self.f.seek(*a)

        def read(self, n):
            reads.append(n)
            return self.f.read(n)

    monkeypatch.setattr(lio, "COPY_CHUNK", 1000)
    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: Spy(real(p, mode)) if str(p).endswith(".bin")
                        else real(p, mode, *a, **k))
    files = lio.write_model(m, tmp_path / "o.onnx", external_data=True, base_dir=ext.parent)
    monkeypatch.undo()
    assert reads and max(reads) == 1000
    assert [f.name for f in files] == ["o.onnx", "o.onnx.data"]
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)
    assert all(onnx.external_data_helper.uses_external_data(t) for t in m.graph.initializer)
    assert {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"} == {"m.bin"}


def test_interrupted_write_leaves_nothing(pair, tmp_path, monkeypatch):
    """A KeyboardInterrupt while the output's data is copied: no output file, no temporary folder."""
    _, ext = pair
    out_dir = tmp_path / "out"
    seen = []

    def interrupted(t, base_dir, out):
        out.write(b"half a tensor")  # the data file is half written when the interrupt comes
        seen.append(out.name)
        raise KeyboardInterrupt

    monkeypatch.setattr(lio, "_copy_range", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lrcompile.compile(ext, out_dir / "m.lr.onnx", rank=4, include=("^fc1$",), external_data=True, verify=False)
    assert len(seen) == 1 and seen[0].endswith("m.lr.onnx.data")
    assert list(out_dir.iterdir()) == []
