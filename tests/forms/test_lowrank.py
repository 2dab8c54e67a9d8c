"""The low-rank form on hand-built graphs, through the engine: structure per op, ORT equality at
full rank, the numpy product ``x A C + d`` at reduced rank, storage and FLOPs counted by hand,
the break-even decline."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import make_model, run, save, trained_like, vi
from lrcompile.config import CompileConfig
from lrcompile.engine import Plan, analyze, apply, context, export
from lrcompile.factorize import Factorization
from lrcompile.forms import FORMS, form_for

RNG = np.random.default_rng(7)
FORM = FORMS["lowrank"]


def _x(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _facts(cand, rank, bias=False):
    """Exact SVD factors of each group at ``rank`` (full rank: the weight itself)."""
    out = []
    for m in cand.matrices:
        u, s, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
        a, c = (u[:, :rank] * s[:rank]).astype(np.float32), vt[:rank].astype(np.float32)
        d = RNG.standard_normal(m.shape[1]).astype(np.float32) if bias else None
        out.append(Factorization(a=a, c=c, rank=rank, method="svd", rel_error=0.0, objective_error=0.0, bias=d))
    return out


def _rewrite(path, rank=None, bias=False):
    model = onnx.load(str(path))
    a = analyze(model, CompileConfig(min_params=0))
    (cand,) = a.candidates
    facts = _facts(cand, rank or min(cand.matrices[0].shape), bias)
    p = Plan()
    p.put(cand, facts, facts[0].rank)
    done = apply(context(a.graph), a.candidates, p)
    assert done.rewritten == {"lowrank": [cand.label]}
    out = path.with_name("out.onnx")
    save(export(a.graph, model), out)
    return out, cand, facts


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


CASES = {
    "matmul-right": (lambda: make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                                        [vi("x", [3, 5, 48])], [vi("y", [3, 5, 40])], [("W", trained_like(48, 40))]),
                     {"x": (3, 5, 48)}, ["MatMul", "MatMul"]),
    "matmul-left": (lambda: make_model([helper.make_node("MatMul", ["W", "x"], ["y"], name="mm")],
                                       [vi("x", [48, 6])], [vi("y", [40, 6])], [("W", trained_like(40, 48))]),
                    {"x": (48, 6)}, ["MatMul", "MatMul"]),
    "gemm": (lambda: make_model([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1, alpha=0.5,
                                                  beta=2.0)],
                                [vi("x", [6, 48])], [vi("y", [6, 40])],
                                [("W", trained_like(40, 48)), ("b", _x(40))]),
             {"x": (6, 48)}, ["Gemm", "Gemm"]),
    "conv": (lambda: make_model([helper.make_node("Conv", ["x", "W", "b"], ["y"], name="cv", group=2, strides=[2, 1],
                                                  pads=[1, 0, 1, 2], dilations=[1, 2])],
                                [vi("x", [2, 8, 9, 11])], [vi("y", [2, 12, 5, 9])],
                                [("W", _x(12, 4, 3, 3)), ("b", _x(12))]),
             {"x": (2, 8, 9, 11)}, ["Conv", "Conv"]),
    "gather": (lambda: make_model([helper.make_node("Gather", ["E", "i"], ["y"], name="emb")],
                                  [vi("i", [4, 3], onnx.TensorProto.INT64)], [vi("y", [4, 3, 24])],
                                  [("E", trained_like(50, 24))]),
               {"i": None}, ["Gather", "MatMul"]),
}


def _feeds(spec):
    return {k: (RNG.integers(0, 50, (4, 3)).astype(np.int64) if v is None else _x(*v)) for k, v in spec.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_full_rank_is_exact_in_ort(tmp_path, case):
    build, spec, ops = CASES[case]
    src = save(build(), tmp_path / "m.onnx")
    out, _, _ = _rewrite(src)
    assert _ops(out) == ops
    feeds = _feeds(spec)
    a, b = run(src, feeds)["y"], run(out, feeds)["y"]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


@pytest.mark.parametrize("case", ["matmul-right", "matmul-left", "gemm", "gather"])
def test_reduced_rank_with_bias_is_the_numpy_product(tmp_path, case):
    """At rank 4 with a correction ``d`` the output is what the math says, not the original."""
    build, spec, ops = CASES[case]
    src = save(build(), tmp_path / "m.onnx")
    out, cand, (f,) = _rewrite(src, rank=4, bias=True)
    assert _ops(out) == ops + ["Add"]
    feeds = _feeds(spec)
    got = run(out, feeds)["y"]
    x = next(iter(feeds.values()))
    if case == "matmul-right":
        want = x @ f.a @ f.c + f.bias
    elif case == "matmul-left":
        want = (f.a @ f.c).T @ x + f.bias[:, None]
    elif case == "gemm":
        bvec = onnx.numpy_helper.to_array(onnx.load(str(src)).graph.initializer[1])
        want = 0.5 * (x @ f.a @ f.c + f.bias) + 2.0 * bvec
    else:
        want = f.a[x] @ f.c + f.bias
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert not np.allclose(got, run(src, feeds)["y"], atol=1e-3)  # it is a lossy rank


def test_conv_mean_correction_folds_into_the_bias(tmp_path):
    build, spec, _ = CASES["conv"]
    src = save(build(), tmp_path / "m.onnx")
    out, cand, facts = _rewrite(src, rank=min(cand_shape(src)), bias=True)
    assert _ops(out) == ["Conv", "Conv"]  # no Add: d joins the 1 x 1 conv's bias
    feeds = _feeds(spec)
    d = np.concatenate([f.bias for f in facts])
    np.testing.assert_allclose(run(out, feeds)["y"], run(src, feeds)["y"] + d[None, :, None, None], rtol=1e-4,
                               atol=1e-3)


def cand_shape(path):
    return analyze(onnx.load(str(path)), CompileConfig(min_params=0)).candidates[0].matrices[0].shape


def test_storage_sizes_and_flops_by_hand(tmp_path):
    build, _, _ = CASES["conv"]
    src = save(build(), tmp_path / "m.onnx")
    cand = analyze(onnx.load(str(src)), CompileConfig(min_params=0)).candidates[0]
    assert len(cand.matrices) == 2 and cand.matrices[0].shape == (36, 6)  # per group: (4*3*3) x (12/2)
    facts = _facts(cand, 3, bias=True)
    st = FORM.storage(facts)
    assert st.params == 2 * (3 * 36 + 3 * 6 + 6) and st.nbytes == 4 * st.params
    sizes = np.array([1, 2, 3])
    np.testing.assert_array_equal(FORM.params(cand, sizes, bias=False), 2 * sizes * (36 + 6))
    dense, at = FORM.flops(cand, sizes, rows=10.0)
    assert dense == 2 * 10 * 2 * 36 * 6 and list(at) == [2 * 10 * s * 2 * 42 for s in sizes]
    # break-even of [36 x 6] is 36*6/42 = 5.14: rank 6 saves nothing, rank 5 does
    assert "saves nothing" in FORM.declines(_facts(cand, 6)) and FORM.declines(_facts(cand, 5)) is None
    assert list(FORM.sizes(cand, 1)) == [1, 2, 3, 4, 5]


def test_gather_flops_count_the_lookup_as_free():
    from lrcompile.ir import Candidate

    cand = Candidate(node=None, pass_name="gather", weight_key="E", matrices=[np.zeros((50, 24), np.float32)],
                     details={"lookup": True})
    dense, at = FORM.flops(cand, np.array([4]), rows=12.0)
    assert dense == 0.0 and at[0] == 2 * 12 * 4 * 24


def test_form_registry_applies_by_op():
    assert form_for("conv").name == "lowrank"
    with pytest.raises(KeyError, match="does not apply"):
        form_for("conv", "channels")
