"""Honest totals: the summary counts what the written model stores.

Hand-built models with shared weights, weights read inside If/Loop bodies and weights read in
both orientations are compiled in several configurations; for each, the report's totals must
equal an independent count of the written file (every stored value of the input and the output,
main graph and subgraphs), the file's size must be the one reported, a weight is never stored
twice, and a rewrite that would keep the original weight is declined with its reason.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrcompile
from helpers import FULL, assert_lossless, make_model, save, trained_like, vi
from lrcompile.config import CompileConfig
from lrcompile.engine import Plan, analyze, apply, context, export
from lrcompile.ir import store_once

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------- models


def _branch(name: str, weight: str, act: str, n: int = 64) -> onnx.GraphProto:
    nodes = [helper.make_node("MatMul", ["x", weight], [f"{name}_h"], name=f"{name}_mm"),
             helper.make_node(act, [f"{name}_h"], [f"{name}_out"], name=f"{name}_act")]
    return helper.make_graph(nodes, name, [], [vi(f"{name}_out", ["n", n])])


def if_model(main_reads: bool) -> onnx.ModelProto:
    """W read inside both branches of an If (and by a main-graph MatMul when ``main_reads``); W2
    is an ordinary weight so that there is something to compress."""
    nodes = [helper.make_node("If", ["c"], ["y1"], name="if", then_branch=_branch("then", "W", "Relu"),
                              else_branch=_branch("else", "W", "Sigmoid")),
             helper.make_node("MatMul", ["x", "W2"], ["y2"], name="mm2")]
    outs = [vi("y1", ["n", 64]), vi("y2", ["n", 48])]
    if main_reads:
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["y0"], name="mm"))
        outs.append(vi("y0", ["n", 64]))
    return make_model(nodes, [vi("x", ["n", 64]), vi("c", [], TensorProto.BOOL)], outs,
                      [("W", trained_like(64, 64, 1)), ("W2", trained_like(64, 48, 2))])


def loop_model() -> onnx.ModelProto:
    """W read by a main-graph MatMul and inside a Loop body (a running product x W W ...)."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["acc_in", "W"], ["acc_mm"], name="body_mm"),
         helper.make_node("Tanh", ["acc_mm"], ["acc_out"], name="body_tanh"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("acc_in", ["n", 64])],
        [vi("cond_out", [], TensorProto.BOOL), vi("acc_out", ["n", 64])])
    nodes = [helper.make_node("Loop", ["trip", "", "x"], ["y1"], name="loop", body=body),
             helper.make_node("MatMul", ["x", "W"], ["y0"], name="mm"),
             helper.make_node("MatMul", ["x", "W2"], ["y2"], name="mm2")]
    m = make_model(nodes, [vi("x", ["n", 64])], [vi("y0", ["n", 64]), vi("y1", ["n", 64]), vi("y2", ["n", 48])],
                   [("W", (0.1 * trained_like(64, 64, 1)).astype(np.float32)), ("W2", trained_like(64, 48, 2)),
                    ("trip", np.array(2, np.int64))])
    return m


def gemm_model() -> onnx.ModelProto:
    """W [64, 96] read as W by a MatMul and as W^T by a Gemm (transB=1)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("Gemm", ["z", "W", "b"], ["y2"], name="gemm", transB=1, alpha=0.5)]
    return make_model(nodes, [vi("x", ["n", 64]), vi("z", ["n", 96])], [vi("y", ["n", 96]), vi("y2", ["n", 64])],
                      [("W", trained_like(64, 96, 1)), ("b", RNG.standard_normal(64).astype(np.float32))])


def sides_model() -> onnx.ModelProto:
    """W [64, 96] on the right of one MatMul and on the left of another, with a Gemm transB=0 too."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="right"),
             helper.make_node("MatMul", ["W", "z"], ["y2"], name="left"),
             helper.make_node("Gemm", ["x", "W"], ["y3"], name="gemm")]
    return make_model(nodes, [vi("x", [4, 64]), vi("z", [96, 5])],
                      [vi("y", [4, 96]), vi("y2", [64, 5]), vi("y3", [4, 96])], [("W", trained_like(64, 96, 1))])


def tied_model() -> onnx.ModelProto:
    """Tied embeddings: Gather(E, ids), then the logits Gemm(h, E, transB=1) with the same table."""
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "E"], ["logits"], name="head", transB=1)]
    return make_model(nodes, [vi("ids", ["n"], TensorProto.INT64)], [vi("logits", ["n", 200])],
                      [("E", trained_like(200, 48, 3))])


def shared_model() -> onnx.ModelProto:
    """W shared by two MatMuls in the same orientation, and a weight read through a Transpose
    whose source is also read by a Relu (so rewriting it would keep the original)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h1"], name="mm1"),
             helper.make_node("MatMul", ["h1", "W"], ["y1"], name="mm2"),
             helper.make_node("Transpose", ["V"], ["Vt"], name="vt", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Vt"], ["y2"], name="mm3"),
             helper.make_node("Relu", ["V"], ["y3"], name="vrelu")]
    return make_model(nodes, [vi("x", ["n", 64])], [vi("y1", ["n", 64]), vi("y2", ["n", 64]), vi("y3", [64, 64])],
                      [("W", trained_like(64, 64, 1)), ("V", trained_like(64, 64, 4))])


MODELS = {"if_both": lambda: if_model(True), "if_branches": lambda: if_model(False), "loop": loop_model,
          "gemm": gemm_model, "sides": sides_model, "tied": tied_model, "shared": shared_model}
CONFIGS = {"ratio": dict(ratio=0.5, min_params=0), "energy": dict(energy=0.9, min_params=0),
           "full": dict(FULL), "exclude": dict(ratio=0.5, min_params=0, exclude=["mm2|head|gemm|right"])}


def _feeds(model: onnx.ModelProto) -> dict:
    out = {}
    for i in model.graph.input:
        t = i.type.tensor_type
        shape = [d.dim_value or 3 for d in t.shape.dim]
        if t.elem_type == TensorProto.BOOL:
            out[i.name] = np.array(True)
        elif t.elem_type == TensorProto.INT64:
            out[i.name] = RNG.integers(0, 200, shape).astype(np.int64)
        else:
            out[i.name] = RNG.standard_normal(shape).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------- counting


def count_stored(path) -> tuple[int, dict[str, int]]:
    """Independently of lrcompile: every value an ONNX file stores (initializers of every graph,
    Constant nodes), and how many graphs hold each initializer name."""
    model = onnx.load(str(path))
    total, where = 0, {}

    def walk(g):
        nonlocal total
        for t in g.initializer:
            total += numpy_helper.to_array(t).size
            where[t.name] = where.get(t.name, 0) + 1
        for n in g.node:
            for a in n.attribute:
                if n.op_type == "Constant" and a.name == "value":
                    total += numpy_helper.to_array(a.t).size
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(model.graph)
    return total, where


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_totals_are_what_the_written_file_holds(tmp_path, name, config):
    model = MODELS[name]()
    src = save(model, tmp_path / f"{name}.onnx")
    out = tmp_path / f"{name}.lr.onnx"
    try:
        res = lrcompile.compile(src, out, verify=False, **CONFIGS[config])
    except lrcompile.LrcError as e:  # everything declined: then it must say why, and write nothing
        assert "every candidate was declined" in str(e) and not out.exists()
        return
    tot = res.report["totals"]
    before, _ = count_stored(src)
    after, where = count_stored(out)
    assert tot["counted_from"] == "written model"
    # the model changed by exactly what the totals say (nothing else is stored differently here)
    assert after - before == tot["params_after"] - tot["params_before"], tot
    assert all(n == 1 for n in where.values()), f"a tensor is stored in several graphs: {where}"
    assert tot["output_bytes"] == out.stat().st_size and tot["files"] == {str(out): out.stat().st_size}
    assert tot["bytes_after"] == 4 * tot["params_after"] and tot["bytes_before"] == 4 * tot["params_before"]
    if config != "full":  # a rewrite saves, or it is declined
        assert tot["params_after"] < tot["params_before"] and out.stat().st_size < src.stat().st_size
    else:
        assert_lossless(src, out, _feeds(model), rtol=1e-4)


# ---------------------------------------------------------------------------------------------- (a) subgraphs


def test_outer_weights_are_stored_once_after_an_export():
    """onnx-graphsurgeon writes an outer constant into every body that reads it; store_once
    keeps one copy, in the main graph."""
    for main_reads in (True, False):
        g = gs.import_onnx(if_model(main_reads))
        raw = gs.export_onnx(g)
        copies = sum(t.name == "W" for sub in raw.graph.node[0].attribute for t in sub.g.initializer)
        assert copies == 2  # what the exporter does by itself
        fixed = store_once(raw)
        assert [t.name for t in fixed.graph.initializer].count("W") == 1
        assert all(not a.g.initializer for a in fixed.graph.node[0].attribute)
        onnx.checker.check_model(fixed, full_check=True)


def test_a_weight_also_read_in_a_body_is_declined_with_the_reader():
    a = analyze(if_model(True), CompileConfig(min_params=0))
    assert [c.label for c in a.candidates] == ["mm2"]
    why = {d.label: d.reason for d in a.declines}
    assert why["mm"].startswith("weight W is also read inside a If body (if), which is not rewritten")
    assert "saving nothing" in why["mm"]
    a = analyze(loop_model(), CompileConfig(min_params=0))
    assert "inside a Loop body (loop)" in {d.label: d.reason for d in a.declines}["mm"]


def test_a_weight_kept_by_another_reader_is_declined():
    a = analyze(shared_model(), CompileConfig(min_params=0))
    assert [c.label for c in a.candidates] == ["mm1", "mm2"]  # W: both readers are rewritten
    why = {d.label: d.reason for d in a.declines}["mm3"]
    assert why.startswith("weight V is also read by vrelu (Relu), which is not rewritten: rewriting this node "
                          "would keep it")
    # excluding one sharer keeps W for it: the other is declined too
    a = analyze(shared_model(), CompileConfig(min_params=0, exclude=["mm2"]))
    assert not a.candidates
    assert "W is also read by mm2 (MatMul)" in {d.label: d.reason for d in a.declines}["mm1"]


def test_a_small_tensor_that_stays_does_not_stop_a_rewrite():
    """A weight made by ConstantOfShape from a shape that something else also reads."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["W"], name="fill",
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("Reshape", ["x", "shape"], ["y2"], name="reshape")]
    m = make_model(nodes, [vi("x", [64, 64])], [vi("y", [64, 64]), vi("y2", [64, 64])],
                   [("shape", np.array([64, 64], np.int64))])
    a = analyze(m, CompileConfig(min_params=0))
    assert [c.label for c in a.candidates] == ["mm"] and a.candidates[0].stored == {"shape": (2, 16)}


# ---------------------------------------------------------------------------------------------- (b) orientations


def test_one_factorization_serves_both_orientations(tmp_path):
    src = save(gemm_model(), tmp_path / "g.onnx")
    res = lrcompile.compile(src, tmp_path / "g.lr.onnx", verify=False, rank=16, multiple=1, min_params=0)
    recs = {r.node: r for r in res.layers}
    assert recs["mm"].decision == recs["gemm"].decision == "factorized" and recs["gemm"].shared_with == "mm"
    out = onnx.load(str(tmp_path / "g.lr.onnx"))
    assert sorted((t.name, tuple(t.dims)) for t in out.graph.initializer) == [
        ("b", (64,)), ("mm/lr_A", (64, 16)), ("mm/lr_C", (16, 96))]
    gemms = [n for n in out.graph.node if n.op_type == "Gemm"]
    assert [list(n.input)[1] for n in gemms] == ["mm/lr_C", "mm/lr_A"]  # C^T then A^T, read with transB
    assert all(helper.get_attribute_value(next(a for a in n.attribute if a.name == "transB")) == 1 for n in gemms)
    assert res.report["totals"]["params_after"] == 16 * (64 + 96)


@pytest.mark.parametrize("name", ["gemm", "sides", "tied"])
def test_both_orientations_are_exact_at_full_rank(tmp_path, name):
    model = MODELS[name]()
    src = save(model, tmp_path / f"{name}.onnx")
    res = lrcompile.compile(src, tmp_path / "o.onnx", verify=False, **FULL)
    assert len({r.weight for r in res.layers if r.decision == "factorized"}) == 1
    assert_lossless(src, tmp_path / "o.onnx", _feeds(model), rtol=1e-4)


def test_a_mean_correction_cannot_serve_the_transposed_use(tmp_path):
    model = gemm_model()
    src = save(model, tmp_path / "g.onnx")
    np.savez(tmp_path / "c.npz", x=RNG.standard_normal((64, 64)).astype(np.float32) + 1,
             z=RNG.standard_normal((64, 96)).astype(np.float32))
    with pytest.raises(lrcompile.LrcError, match="every candidate was declined"):
        lrcompile.compile(src, tmp_path / "o.onnx", verify=False, calib=str(tmp_path / "c.npz"), method="whiten",
                          rank=16, multiple=1, min_params=0, method_options={"bias_correction": True})
    a = analyze(model, CompileConfig(min_params=0))
    p = Plan().decide(a.candidates, CompileConfig(min_params=0, rank=16, multiple=1))
    assert p.accepted() == {"mm", "gemm"}  # without the correction it serves both


# ---------------------------------------------------------------------------------------------- the plan


def test_a_weight_that_stays_dense_keeps_the_tensors_it_shares_dense():
    """V read directly by one MatMul and through a Transpose by another (two weight keys, one
    stored tensor): when the planner keeps one dense, rewriting the other would save nothing."""
    nodes = [helper.make_node("MatMul", ["x", "V"], ["y1"], name="direct"),
             helper.make_node("Transpose", ["V"], ["Vt"], name="vt", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Vt"], ["y2"], name="through")]
    m = make_model(nodes, [vi("x", ["n", 64])], [vi("y1", ["n", 64]), vi("y2", ["n", 64])],
                   [("V", trained_like(64, 64, 4))])
    a = analyze(m, CompileConfig(min_params=0))
    assert sorted(c.weight_key for c in a.candidates) == ["V", "Vt"]
    p = Plan().decide(a.candidates, CompileConfig(min_params=0), ranks={"V": 8, "Vt": 0},
                      dense_reasons={"Vt": "kept dense by the budget"})
    assert not p and "V stays: Vt reads it too and stays dense (kept dense by the budget)" in p.records[0].reason
    both = Plan().decide(a.candidates, CompileConfig(min_params=0), ranks={"V": 8, "Vt": 8})
    assert both.accepted() == {"direct", "through"}
    ctx = context(a.graph)
    apply(ctx, a.candidates, both)
    written = export(a.graph, m)
    assert "V" not in {t.name for t in written.graph.initializer}
    assert both.records[0].stored_after[:2] == ["direct/lr_A", "direct/lr_C"]


def test_records_fall_back_when_nothing_was_written():
    from lrcompile.report import totals

    a = analyze(gemm_model(), CompileConfig(min_params=0))
    p = Plan().decide(a.candidates, CompileConfig(min_params=0, rank=16, multiple=1))
    tot = totals(p.records)
    assert tot["counted_from"] == "records" and tot["params_before"] == 64 * 96
    assert tot["params_after"] == 16 * (64 + 96)


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("name", ["gemm", "tied", "shared", "loop"])
def test_calibrated_totals_are_what_the_written_file_holds(tmp_path, name, sequential):
    """Data-aware fits of a weight read in both orientations use the uses of one orientation."""
    model = MODELS[name]()
    src = save(model, tmp_path / f"{name}.onnx")
    calib = {k: (RNG.integers(0, 200, 256).astype(np.int64) if v.dtype == np.int64 else
                 RNG.standard_normal((256,) + v.shape[1:]).astype(np.float32)) for k, v in _feeds(model).items()}
    np.savez(tmp_path / "c.npz", **calib)
    out = tmp_path / "o.onnx"
    res = lrcompile.compile(src, out, verify=False, calib=str(tmp_path / "c.npz"), method="whiten", ratio=0.5,
                            min_params=0, sequential=sequential)
    tot = res.report["totals"]
    assert count_stored(out)[0] - count_stored(src)[0] == tot["params_after"] - tot["params_before"]
    assert tot["params_after"] < tot["params_before"]
    if name in ("gemm", "tied"):  # one weight, one factorization, both nodes rewritten
        assert [r.decision for r in res.layers].count("factorized") == 2
        assert len(onnx.load(str(out)).graph.initializer) == 2 + (name == "gemm")
