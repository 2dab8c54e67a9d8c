"""Rewrites on models built with onnx helpers: structure, lossless at full rank, error at reduced
rank, and the cases that must stay untouched."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrcompile
from helpers import assert_lossless, compile_full, make_model, op_types, save, trained_like, vi

RNG = np.random.default_rng(1)


def _x(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,bias", list(itertools.product(
    [0, 1], [0, 1], [1.0, 0.5], [1.0, 2.0], [True, False])))
def test_gemm_all_attribute_combinations(tmp_path, trans_a, trans_b, alpha, beta, bias):
    k, n, m = 48, 40, 6
    w = trained_like(n, k, 2) if trans_b else trained_like(k, n, 2)
    inits = [("W", w)] + ([("C", _x(n))] if bias else [])
    node = helper.make_node("Gemm", ["x", "W"] + (["C"] if bias else []), ["y"], name="fc",
                            transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    xshape = [k, m] if trans_a else [m, k]
    src = save(make_model([node], [vi("x", xshape)], [vi("y", [m, n])], inits), tmp_path / "gemm.onnx")
    res = compile_full(src, tmp_path)
    assert op_types(res.output) == ["Gemm", "Gemm"]
    assert_lossless(src, res.output, {"x": _x(*xshape)})
    # the second Gemm keeps alpha, beta and the bias
    g2 = onnx.load(str(res.output)).graph.node[1]
    attrs = {a.name: helper.get_attribute_value(a) for a in g2.attribute}
    assert attrs["alpha"] == pytest.approx(alpha) and attrs["beta"] == pytest.approx(beta)
    assert len(g2.input) == (3 if bias else 2)


def test_matmul_left_and_right_weights(tmp_path):
    wr, wl = trained_like(32, 24, 3), trained_like(20, 16, 4)
    nodes = [helper.make_node("MatMul", ["x", "Wr"], ["h"], name="right"),
             helper.make_node("MatMul", ["Wl", "h"], ["y"], name="left")]
    src = save(make_model(nodes, [vi("x", [16, 32])], [vi("y", [20, 24])], [("Wr", wr), ("Wl", wl)]),
               tmp_path / "mm.onnx")
    res = compile_full(src, tmp_path)
    assert op_types(res.output).count("MatMul") == 4
    assert_lossless(src, res.output, {"x": _x(16, 32)})


def test_weights_as_constant_nodes_and_constant_subgraphs(tmp_path):
    w1 = trained_like(32, 48, 5)
    w2t = trained_like(16, 48, 6)  # stored transposed, float64, reshaped: Cast -> Transpose -> Reshape
    const = helper.make_node("Constant", [], ["W1"], name="w1_const", value=numpy_helper.from_array(w1, "v"))
    nodes = [
        const,
        helper.make_node("Cast", ["W2raw"], ["W2c"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["W2c"], ["W2t"], name="tr", perm=[1, 0]),
        helper.make_node("Reshape", ["W2t", "shape"], ["W2"], name="rs"),
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="fc2"),
    ]
    inits = [("W2raw", w2t.astype(np.float64)), ("shape", np.array([48, 16], np.int64))]
    src = save(make_model(nodes, [vi("x", ["b", 32])], [vi("y", ["b", 16])], inits), tmp_path / "c.onnx")
    res = compile_full(src, tmp_path)
    ops = op_types(res.output)
    assert ops.count("MatMul") == 4 and "Cast" not in ops and "Constant" not in ops
    assert_lossless(src, res.output, {"x": _x(5, 32)})
    assert {r.node for r in res.layers if r.decision == "factorized"} == {"fc1", "fc2"}


def test_shared_weight_factorized_once(tmp_path):
    w = trained_like(64, 64, 7)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="a"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="b")]
    src = save(make_model(nodes, [vi("x", [4, 64])], [vi("y", [4, 64])], [("W", w)]), tmp_path / "s.onnx")
    res = lrcompile.compile(src, tmp_path / "s.lr.onnx", rank=16, min_params=0)
    out = onnx.load(str(res.output))
    assert len(out.graph.initializer) == 2  # one A, one C shared by both chains
    shared = [r for r in res.layers if r.shared_with]
    assert len(shared) == 1 and shared[0].shared_with == "a"
    assert res.report["totals"]["params_after"] == 16 * 128


def test_reduced_rank_output_error_matches_weight_error(tmp_path):
    w = trained_like(256, 192, 8, decay=0.3)
    src = save(make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [vi("x", ["n", 256])],
                          [vi("y", ["n", 192])], [("W", w)]), tmp_path / "r.onnx")
    res = lrcompile.compile(src, tmp_path / "r.lr.onnx", ratio=0.5, min_params=0, dims={"n": 4096})
    (rec,) = [r for r in res.layers if r.decision == "factorized"]
    assert 0.05 < rec.rel_error < 0.9
    # isotropic inputs: E||x (W - AC)||^2 = ||W - AC||_F^2, so output rel L2 ~= weight rel error
    (d,) = res.verification
    assert d["rel_l2"] == pytest.approx(rec.rel_error, rel=0.05)
    assert rec.params_after <= 0.5 * rec.params_before


def test_quantized_and_non_constant_left_untouched(tmp_path):
    wq = RNG.integers(-100, 100, (64, 64)).astype(np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "sc", "zp"], ["Wd"], name="dq"),
        helper.make_node("MatMul", ["x", "Wd"], ["h"], name="quantized"),
        helper.make_node("MatMul", ["h", "z"], ["y"], name="dynamic"),
    ]
    inits = [("Wq", wq), ("sc", np.array(0.01, np.float32)), ("zp", np.array(0, np.int8))]
    src = save(make_model(nodes, [vi("x", [4, 64]), vi("z", [64, 8])], [vi("y", [4, 8])], inits), tmp_path / "q.onnx")
    before = src.read_bytes()
    with pytest.raises(lrcompile.LrcError, match="every candidate was declined"):
        lrcompile.compile(src, tmp_path / "q.lr.onnx", min_params=0)
    assert not (tmp_path / "q.lr.onnx").exists() and src.read_bytes() == before
    rows = {r["node"]: r for r in lrcompile.inspect(src, min_params=0)}
    assert "quantized" in rows["quantized"]["reason"]
    assert "activations" in rows["dynamic"]["reason"]


def test_metadata_names_and_other_domains_kept(tmp_path):
    w = trained_like(64, 64, 9)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")]
    m = make_model(nodes, [vi("x", [2, 64])], [vi("y", [2, 64])], [("W", w)], producer_name="exporter",
                   doc_string="model doc")
    m.metadata_props.add(key="vocab", value="a b c")
    src = save(m, tmp_path / "m.onnx")
    res = compile_full(src, tmp_path)
    out = onnx.load(str(res.output))
    assert out.producer_name == "exporter" and out.doc_string == "model doc"
    assert [(p.key, p.value) for p in out.metadata_props] == [("vocab", "a b c")]
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    assert out.opset_import == m.opset_import


def test_deterministic_output(tmp_path):
    w = trained_like(96, 80, 10)
    src = save(make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [vi("x", [2, 96])],
                          [vi("y", [2, 80])], [("W", w)]), tmp_path / "d.onnx")
    a = lrcompile.compile(src, tmp_path / "a.onnx", ratio=0.4, min_params=0).output.read_bytes()
    b = lrcompile.compile(src, tmp_path / "b.onnx", ratio=0.4, min_params=0).output.read_bytes()
    assert a == b


def test_conv_grouped_strided_dilated_onnx(tmp_path):
    w = RNG.standard_normal((32, 8, 3, 3)).astype(np.float32)  # 4 groups of 8 -> 8
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", group=4, strides=[2, 2],
                            dilations=[2, 1], pads=[2, 1, 2, 1])
    src = save(make_model([node], [vi("x", [1, 32, 17, 15])], [vi("y", [1, 32, 9, 8])], [("W", w), ("B", _x(32))]),
               tmp_path / "conv.onnx")
    res = compile_full(src, tmp_path)
    assert op_types(res.output) == ["Conv", "Conv"]
    assert_lossless(src, res.output, {"x": _x(1, 32, 17, 15)})


def test_subgraph_nodes_declined_with_reason(tmp_path):
    w = trained_like(32, 32, 11)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "Wi"], ["t"], name="inner")], "then", [],
                               [vi("t", [2, 32])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="id")], "else", [], [vi("e", [2, 32])])
    nodes = [helper.make_node("If", ["c"], ["y0"], name="branch", then_branch=then_g, else_branch=else_g),
             helper.make_node("MatMul", ["y0", "W"], ["y"], name="outer")]
    src = save(make_model(nodes, [vi("x", [2, 32]), vi("c", [], TensorProto.BOOL)], [vi("y", [2, 32])],
                          [("W", w), ("Wi", trained_like(32, 32, 12))]), tmp_path / "if.onnx")
    res = compile_full(src, tmp_path)
    rows = {r.node: r for r in res.layers}
    assert rows["outer"].decision == "factorized"
    assert rows["inner"].decision == "declined" and "If body" in rows["inner"].reason
    out = onnx.load(str(res.output))  # the body's outer weight is stored once
    held = [t.name for g in [out.graph, *(a.g for a in out.graph.node[0].attribute)] for t in g.initializer]
    assert held.count("Wi") == 1
    feeds = {"x": _x(2, 32), "c": np.array(True)}
    assert_lossless(src, res.output, feeds)


@pytest.mark.parametrize("opset", [11, 13, 23])
def test_opsets_11_to_23(tmp_path, opset):
    w1, w2 = trained_like(32, 48, 12), trained_like(48, 24, 13)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm"),
             helper.make_node("Gemm", ["h", "W2"], ["y"], name="gemm", transB=0)]
    src = save(make_model(nodes, [vi("x", [3, 32])], [vi("y", [3, 24])], [("W1", w1), ("W2", w2)], opset=opset),
               tmp_path / f"o{opset}.onnx")
    res = compile_full(src, tmp_path)
    assert onnx.load(str(res.output)).opset_import[0].version == opset
    assert_lossless(src, res.output, {"x": _x(3, 32)})


@pytest.mark.trt
def test_compressed_helper_models_build_trt_engines(tmp_path):
    """Every rewrite's output builds into a TensorRT engine (tensorrt-rtx on the CPU)."""
    from lrcompile.targets.trt import build_engine

    wr, wl, wg = trained_like(32, 24, 3), trained_like(20, 16, 4), trained_like(20, 24, 5)
    conv_w = RNG.standard_normal((16, 4, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "Wr"], ["h"], name="right"),
             helper.make_node("MatMul", ["Wl", "h"], ["h2"], name="left"),
             helper.make_node("Gemm", ["h2", "Wg", "bg"], ["y"], name="gemm", transA=1, transB=1, alpha=0.5, beta=2.0),
             helper.make_node("Conv", ["img", "Wc"], ["z"], name="conv", group=2, strides=[2, 2], pads=[1, 1, 1, 1])]
    inits = [("Wr", wr), ("Wl", wl), ("Wg", wg.T.copy()), ("bg", _x(24)), ("Wc", conv_w)]
    m = make_model(nodes, [vi("x", [16, 32]), vi("img", [1, 8, 9, 9])], [vi("y", [24, 24]), vi("z", [1, 16, 5, 5])],
                   inits)
    src = save(m, tmp_path / "all.onnx")
    res = compile_full(src, tmp_path)
    assert {r.node for r in res.layers if r.decision == "factorized"} == {"right", "left", "gemm", "conv"}
    info = build_engine(res.output, tmp_path / "all.engine")
    assert info["engine_bytes"] > 0 and (tmp_path / "all.engine").stat().st_size == info["engine_bytes"]
