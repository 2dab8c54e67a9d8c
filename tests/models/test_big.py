"""The streamed large-model builders (models/big.py), fast variants: valid, external, reproducible."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

MODELS = Path(__file__).resolve().parents[2] / "models"
sys.path.insert(0, str(MODELS))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import big  # noqa: E402
import build  # noqa: E402
from test_builders import check_build, constant_weights  # noqa: E402

BIG = ["synthetic-transformer", "ctr-embedding"]


def _external(model: onnx.ModelProto) -> dict[str, dict]:
    return {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer
            if t.data_location == TensorProto.EXTERNAL}


@pytest.mark.parametrize("name", BIG)
def test_big_fast_builds_external_and_deterministic(name, tmp_path):
    build.build(name, tmp_path / "a", fast=True)
    check_build(tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert big.DATA_FILE in files and big.PARTIAL not in files
    model = onnx.load(tmp_path / "a" / "model.onnx", load_external_data=False)
    ext = _external(model)
    assert ext and all(e["location"] == big.DATA_FILE and int(e["offset"]) % big.ALIGN == 0 for e in ext.values())
    # every initializer of 1 KB or more is external, the data file holds exactly them (plus alignment)
    inline = [t for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL]
    assert all(len(t.raw_data) < big.EXTERNAL_MIN_BYTES for t in inline)
    size = (tmp_path / "a" / big.DATA_FILE).stat().st_size
    assert size == max(int(e["offset"]) + int(e["length"]) for e in ext.values())
    build.build(name, tmp_path / "b", fast=True)
    for f in ("model.onnx", big.DATA_FILE, "eval.npz", "eval_reference.npz"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    build.build(name, tmp_path / "c", fast=True, seed=1)
    assert (tmp_path / "a" / big.DATA_FILE).read_bytes() != (tmp_path / "c" / big.DATA_FILE).read_bytes()


def test_streamed_bytes_are_the_arrays(tmp_path):
    g = big.StreamingGraph(np.random.default_rng(0), tmp_path / "w.bin", location="w.bin")
    arrays = {"a": np.arange(300, dtype=np.float32).reshape(3, 100), "b": np.arange(10, dtype=np.int64),
              "c": np.full((1000,), 2.5, np.float32)}
    for k, v in arrays.items():
        g.const(k, v)
    g.close()
    assert g.bytes == arrays["a"].nbytes + arrays["c"].nbytes  # "b" (80 bytes) stays inline
    for t in g.inits:
        if t.data_location == TensorProto.EXTERNAL:
            onnx.external_data_helper.load_external_data_for_tensor(t, str(tmp_path))
        np.testing.assert_array_equal(numpy_helper.to_array(t), arrays[t.name])


def test_failed_build_leaves_no_partial_file(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(big, "encoder_block", boom)
    with pytest.raises(RuntimeError, match="boom"):
        build.build("synthetic-transformer", tmp_path, fast=True)
    assert not (tmp_path / big.PARTIAL).exists()
    with pytest.raises(ValueError, match="build.py"):
        big.ctr_embedding(seed=0, fast=True)  # no scratch folder


def test_synthetic_transformer_structure(tmp_path):
    meta = build.build("synthetic-transformer", tmp_path, fast=True)
    d, ff, heads, blocks = big.TRANSFORMER_FAST
    model = onnx.load(tmp_path / "model.onnx")
    shapes = constant_weights(model, "MatMul")
    assert sorted(set(shapes)) == [(d, d), (d, ff), (ff, d)]
    assert (shapes.count((d, d)), shapes.count((d, ff)), shapes.count((ff, d))) == (4 * blocks, blocks, blocks)
    assert sum(n.op_type == "LayerNormalization" for n in model.graph.node) == 2 * blocks
    assert meta["shape"]["matmul_weights"] == 6 * blocks
    total = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer
                if t.data_type == TensorProto.FLOAT and t.dims)  # scalars (scale, GELU) aside
    assert total == big.transformer_weight_bytes(*big.TRANSFORMER_FAST)
    # the weights decay like synthetic.trained_like's: full rank, most energy in the top half
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "block1.ffn.in.weight"))
    s = np.linalg.svd(w, compute_uv=False)
    assert s[-1] > 1e-3 * s[0] and 0.5 < (np.cumsum(s ** 2) / np.sum(s ** 2))[len(s) // 2] < 0.95
    # the full-size build is about 4 GB: past protobuf's 2 GB limit
    assert 3.9e9 < big.transformer_weight_bytes(*big.TRANSFORMER) < 4.2e9


def test_ctr_embedding_structure_and_labels(tmp_path):
    meta = build.build("ctr-embedding", tmp_path, fast=True)
    model = onnx.load(tmp_path / "model.onnx")
    rows = sum(big.VOCAB_FAST)
    assert constant_weights(model, "Gather") == [(rows, big.EMB_DIM)]
    fields = len(big.VOCAB_FAST)
    assert constant_weights(model, "Gemm") == [(big.HEAD[0], fields * big.EMB_DIM), (big.HEAD[1], big.HEAD[0]),
                                               (1, big.HEAD[1])]
    assert model.graph.node[-1].op_type == "Sigmoid"
    feats = np.load(tmp_path / "eval.npz")["features"]
    assert feats.dtype == np.int64 and (feats >= 0).all() and (feats < np.array(big.VOCAB_FAST)).all()
    assert np.mean(feats[:, 0] < 10) > 0.3  # power-law ids: the first rows of each field are popular
    # labels drawn from the model's own probability: it ranks them well, the positive rate is near 30%
    assert 0.7 < meta["baseline"]["auc"] < 0.95
    assert 0.2 < np.load(tmp_path / "eval_labels.npy").mean() < 0.4
    table = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "embedding.weight"))
    s = np.linalg.svd(table, compute_uv=False)
    assert s[-1] > 0.05 * s[0] and s[0] > 4 * s[-1]  # decaying, not low-rank
    assert np.sqrt(np.mean(table ** 2)) == pytest.approx(big.TABLE_RMS, rel=0.05)
    assert 2.9e9 < sum(big.VOCAB) * big.EMB_DIM * 4 < 3.2e9


@pytest.mark.parametrize("name,op", [("synthetic-transformer", "MatMul"), ("ctr-embedding", "Gather")])
def test_big_fast_compiles(name, op, tmp_path):
    import lrcompile

    build.build(name, tmp_path / "m", fast=True)
    res = lrcompile.compile(tmp_path / "m" / "model.onnx", tmp_path / "out.onnx", rank=8, verify=False)
    done = [r for r in res.layers if r.decision == "factorized"]
    assert any(r.op == op for r in done)
    assert all(r.seconds is not None and r.seconds >= 0 for r in done)
