"""The engine's own contract: a failed rewrite names its node and pass, the plan answers and
decides through its methods, evidence says what each layer's method gets, trial builds are what
a compile writes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import lrcompile
from helpers import make_model, save, trained_like, vi
from lrcompile.config import CompileConfig
from lrcompile.engine import Evidence, Plan, RewriteError, analyze, apply, build, context
from lrcompile.factorize import Factorization, LayerStats


def _model():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    return make_model(nodes, [vi("x", ["n", 64])], [vi("y", ["n", 32])],
                      [("W1", trained_like(64, 96, 1)), ("W2", trained_like(96, 32, 2))])


def test_a_failed_rewrite_names_the_node_and_the_pass():
    a = analyze(_model(), CompileConfig(min_params=0))
    cand = a.candidates[0]
    facts = [Factorization(a=np.ones((64, 4), np.float32), c=np.ones((4, 96), np.float32), rank=4, method="svd",
                           rel_error=0.0, objective_error=0.0)]
    p = Plan()
    p.put(cand, facts, 4)
    ctx = context(a.graph)
    ctx.node = lambda *args, **kw: (_ for _ in ()).throw(ValueError("boom"))  # the emission fails inside
    with pytest.raises(RewriteError, match=r"rewriting fc1 \(matmul pass, lowrank form\) failed: ValueError: boom") as e:
        apply(ctx, a.candidates, p)
    assert (e.value.node, e.value.pass_name, e.value.form) == ("fc1", "matmul", "lowrank")


def test_the_plan_decides_and_answers_through_its_methods():
    a = analyze(_model(), CompileConfig(min_params=0))
    p = Plan().decide(a.candidates, CompileConfig(min_params=0, rank=8, multiple=1))
    assert p and p.accepted() == {"fc1", "fc2"} and p.sizes() == {"W1": 8, "W2": 8}
    assert p.forms() == {"W1": "lowrank", "W2": "lowrank"} and p.form("W1").name == "lowrank"
    assert [r.params_after for r in p.records] == [8 * (64 + 96), 8 * (96 + 32)]
    p.keep_dense("W2", "too slow here")
    assert p.accepted() == {"fc1"} and p.value("W2") is None and p.dense_reasons() == {"W2": "too slow here"}
    assert (p.records[1].decision, p.records[1].reason) == ("declined", "too slow here")
    # a planner's sizes: 0 keeps a weight dense with the reason it gave
    q = Plan().decide(a.candidates, CompileConfig(min_params=0), ranks={"W1": 16, "W2": 0},
                      dense_reasons={"W2": "kept dense by the budget"})
    assert q.sizes() == {"W1": 16, "W2": 0} and q.records[1].reason == "kept dense by the budget"


def test_evidence_says_what_each_method_gets_and_why_it_fell_back():
    cand = analyze(_model(), CompileConfig(min_params=0)).candidates[0]
    none = Evidence()
    assert none.for_layer(cand, "svd") == ("svd", [None], "")
    method, st, note = none.for_layer(cand, "whiten")
    assert method == "svd" and "no activation statistics" in note
    gram = LayerStats(count=10, gram=np.eye(64), abs_sum=np.ones(64), in_sum=np.zeros(64))
    ev = Evidence(stats={"x": [gram]})
    assert ev.for_layer(cand, "whiten") == ("whiten", [gram], "")
    method, st, note = ev.for_layer(cand, "kfac")
    assert method == "whiten" and "kfac: no output curvature collected" in note


def test_a_trial_build_is_what_the_compile_writes(tmp_path):
    src = save(_model(), tmp_path / "m.onnx")
    res = lrcompile.compile(src, tmp_path / "out.onnx", rank=16, multiple=1, min_params=0, verify=False)
    model = onnx.load(str(src))
    trial, p = build(model, CompileConfig(min_params=0, rank=16, multiple=1), {"W1": 16, "W2": 16})
    assert trial.SerializeToString() == onnx.load(str(res.output)).SerializeToString()
    assert p.sizes() == {"W1": 16, "W2": 16}
