"""``--plugins``: fused chains as ONNX model-local function calls. Structure, the call's outputs
equal to the plain rewrite's in ONNX Runtime, chains left plain with their reasons, byte identity
without the flag, and tensorrt-rtx building an engine from the functions (it inlines them)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import lrcompile
from helpers import make_model, plugin_mlp, run, trained_like, vi
from lrcompile.engine.functions import body, emit_functions
from lrcompile.plugins import CONTRACTS, LOW_RANK_GEMM, LOW_RANK_SPARSE_GEMM

ROOT = Path(__file__).resolve().parents[2]


def _feeds(n: int = 5) -> dict:
    return {"x": np.random.default_rng(7).standard_normal((n, 64)).astype(np.float32)}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fn")
    src = plugin_mlp(tmp)
    plain = lrcompile.compile(src, tmp / "plain.onnx", ratio=0.5, min_params=0)
    fused = lrcompile.compile(src, tmp / "fused.onnx", ratio=0.5, min_params=0, plugins=True)
    return src, plain, fused


def test_chains_become_calls_of_one_local_function(compiled):
    _, _, fused = compiled
    m = onnx.load(str(fused.output))
    calls = [n for n in m.graph.node if n.domain == "lrcompile"]
    assert [n.op_type for n in calls] == ["LowRankGemm", "LowRankGemm"]
    assert [n.name for n in calls] == ["fc1/LowRankGemm", "fc2/LowRankGemm"]
    for n in calls:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"plugin_namespace": b"lrcompile", "plugin_version": b"1"}
        assert len(n.input) == len(LOW_RANK_GEMM.inputs)
    (fn,) = m.functions
    assert (fn.domain, fn.name) == ("lrcompile", "LowRankGemm")
    assert list(fn.input) == LOW_RANK_GEMM.input_names and list(fn.output) == LOW_RANK_GEMM.output_names
    assert [n.op_type for n in fn.node] == ["MatMul", "MatMul"]
    assert ("lrcompile", 1) in [(o.domain, o.version) for o in m.opset_import] and m.ir_version >= 8
    onnx.checker.check_model(m, full_check=True)
    # the Gemm head adds its bias inside the chain: left plain, with the reason in the report
    assert "head" in str(fused.report["plugins"]["left_plain"]) and "bias" in str(fused.report["plugins"]["left_plain"])
    assert fused.report["plugins"]["calls"] == {"LowRankGemm": ["fc1", "fc2"]}


def test_calls_equal_the_plain_rewrite_in_ort(compiled):
    _, plain, fused = compiled
    feeds = _feeds()
    a, b = run(plain.output, feeds), run(fused.output, feeds)
    assert np.array_equal(a["y"], b["y"])  # ORT runs the body: the same ops on the same constants
    assert np.std(a["y"]) > 0.1
    # the plain rewrite itself, node for node: the call's inputs feed exactly the body's MatMuls
    pm, fm = onnx.load(str(plain.output)), onnx.load(str(fused.output))
    plain_mm = [(n.input[0], n.input[1]) for n in pm.graph.node if n.name == "fc1/lr_in"]
    call = next(n for n in fm.graph.node if n.name == "fc1/LowRankGemm")
    assert plain_mm == [(call.input[0], call.input[1])]


def test_lowrank_sparse_chain_is_one_call(tmp_path):
    src = plugin_mlp(tmp_path)
    kw = dict(ratio=0.5, min_params=0, form="lowrank+sparse", sparse_pattern="unstructured")
    plain = lrcompile.compile(src, tmp_path / "plain.onnx", **kw)
    fused = lrcompile.compile(src, tmp_path / "fused.onnx", plugins=True, **kw)
    m = onnx.load(str(fused.output))
    ops = [n.op_type for n in m.graph.node if n.domain == "lrcompile"]
    assert ops.count("LowRankSparseGemm") == 2
    fn = next(f for f in m.functions if f.name == "LowRankSparseGemm")
    assert [n.op_type for n in fn.node] == ["MatMul", "MatMul", "MatMul", "Add"]
    assert list(fn.input) == LOW_RANK_SPARSE_GEMM.input_names
    feeds = _feeds()
    assert np.array_equal(run(plain.output, feeds)["y"], run(fused.output, feeds)["y"])
    assert fused.status == "PASSED"


def test_emit_leaves_a_model_without_chains_unchanged():
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="n/lr_out")], [vi("x", [2, 4])],
                   [vi("y", [2, 3])], [("w", trained_like(4, 3))])
    out, fused = emit_functions(m)
    assert out.SerializeToString() == m.SerializeToString()
    assert fused.calls == {} and "not the two-node low-rank chain" in fused.left["n"]


def test_contracts_are_the_source_of_the_signatures():
    for c in CONTRACTS.values():
        assert c.namespace == "lrcompile" and c.qualified == f"lrcompile::{c.name}"
        used = {i for n in body(c) for i in n.input}
        assert set(c.input_names) <= used  # every declared input reaches the body


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def test_without_plugins_the_output_is_byte_identical_to_the_recorded_baseline(tmp_path):
    """The byte-identity baseline (benchmarks/results/byte_identity/baseline-fast.json, recorded
    without --plugins under one BLAS kernel): tiny-mlp's 'svd ratio=0.5' compiles to the same bytes."""
    base = json.loads((ROOT / "benchmarks/results/byte_identity/baseline-fast.json").read_text())
    entry = base["entries"]["tiny-mlp/svd ratio=0.5"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from byte_identity import blas_kernel

    if base["environment"].get("blas") != blas_kernel():
        pytest.skip(f"the baseline was recorded under BLAS kernel {base['environment'].get('blas')}, this machine "
                    f"runs {blas_kernel()}: other low bits")
    build = tmp_path / "tiny"
    subprocess.run([sys.executable, str(ROOT / "models" / "build.py"), "tiny-mlp", "--out", str(build), "--fast"],
                   check=True, capture_output=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    if _sha(build / "model.onnx") != base["builds"]["tiny-mlp"]["model.onnx"]:
        pytest.skip("this machine builds another tiny-mlp than the baseline's (numpy version)")
    for extra in ({}, {"plugins": False}):
        out = tmp_path / "model.lr.onnx"
        lrcompile.compile(build / "model.onnx", out, **entry["options"], **extra)
        assert _sha(out) == entry["files"]["model.lr.onnx"], extra
    # and with --plugins it differs (the calls), deterministically
    a = lrcompile.compile(build / "model.onnx", tmp_path / "a.onnx", **entry["options"], plugins=True)
    b = lrcompile.compile(build / "model.onnx", tmp_path / "b.onnx", **entry["options"], plugins=True)
    assert _sha(a.output) == _sha(b.output) != entry["files"]["model.lr.onnx"]


@pytest.mark.trt
def test_tensorrt_rtx_builds_an_engine_from_the_functions(compiled, tmp_path):
    """tensorrt-rtx has no plugin registered: its parser inlines each function's body, also with
    the plugin-override flag set (what the TensorRT glue sets), and builds the engine."""
    trt = pytest.importorskip("tensorrt_rtx")
    _, _, fused = compiled
    for override in (False, True):
        log = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(log)
        net = builder.create_network(0)
        parser = trt.OnnxParser(net, log)
        if override:
            parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
        assert parser.parse_from_file(str(fused.output)), [str(parser.get_error(i)) for i in range(parser.num_errors)]
        kinds = [net.get_layer(i).type for i in range(net.num_layers)]
        assert kinds.count(trt.LayerType.MATRIX_MULTIPLY) >= 5  # 2 x 2 inlined + the plain head
        cfg = builder.create_builder_config()
        prof = builder.create_optimization_profile()
        prof.set_shape("x", (1, 64), (4, 64), (16, 64))
        cfg.add_optimization_profile(prof)
        engine = builder.build_serialized_network(net, cfg)
        assert engine is not None and engine.nbytes > 10_000


@pytest.mark.trt
def test_compile_target_trt_with_plugins(tmp_path):
    src = plugin_mlp(tmp_path)
    res = lrcompile.compile(src, tmp_path / "m.lr.onnx", ratio=0.5, min_params=0, plugins=True, target="trt")
    assert res.status == "PASSED" and res.target["engine"]["engine_bytes"] > 10_000
    info = res.target["engine"]["plugins"]
    assert info["calls"] == ["LowRankGemm"]
    if res.target["engine"]["backend"] == "tensorrt_rtx":  # no plugin layers there: the bodies inlined
        assert info["registered"] == [] and info["inlined"] == ["LowRankGemm"] and "rejects" in info["why"]


@pytest.mark.trt
def test_fp16_engine_from_a_plugins_model(tmp_path):
    """--fp16 inlines the functions before converting (the converter does not enter function
    bodies); the inlined nodes are unnamed, which made the converter's Cast names collide."""
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             helper.make_node("Add", ["q", "k"], ["y"], name="add")]
    m = make_model(nodes, [vi("x", ["batch", 64])], [vi("y", ["batch", 48])],
                   [("wq", trained_like(64, 48, seed=4)), ("wk", trained_like(64, 48, seed=5))])
    src = tmp_path / "qk.onnx"
    onnx.save(m, str(src))
    res = lrcompile.compile(src, tmp_path / "m.lr.onnx", ratio=0.5, min_params=0, plugins=True, target="trt",
                            fp16=True)  # two calls read x: their inlined, unnamed MatMuls got Casts of one name
    assert res.status == "PASSED" and res.target["engine"]["engine_bytes"] > 10_000
