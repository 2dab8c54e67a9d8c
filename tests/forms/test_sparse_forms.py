"""The sparse forms (nm, lowrank+sparse, dense-nm, dictionary) through the engine, with their real
fits: ORT runs each rewrite and gives exactly the numpy product of the fitted parts (``A C + S``)
on every op they apply to; full size is lossless where the fit is exact; storage counted by hand;
budgets respected; sparse parts written smaller; refusals stated; byte-identical reruns."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import lrcompile
from helpers import make_model, run, save, trained_like, vi
from lrcompile.config import CompileConfig
from lrcompile.engine import Plan, analyze, apply, context, export
from lrcompile.errors import LrcError
from lrcompile.factorize.sparse import nm_mask_ok
from lrcompile.factorize.types import SparseFit
from lrcompile.forms import FORMS

RNG = np.random.default_rng(11)


def _x(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


CASES = {
    "matmul-right": (lambda: make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                                        [vi("x", [3, 5, 48])], [vi("y", [3, 5, 40])], [("W", trained_like(48, 40))]),
                     {"x": (3, 5, 48)}),
    "matmul-left": (lambda: make_model([helper.make_node("MatMul", ["W", "x"], ["y"], name="mm")],
                                       [vi("x", [48, 6])], [vi("y", [40, 6])], [("W", trained_like(40, 48))]),
                    {"x": (48, 6)}),
    "gemm": (lambda: make_model([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1, alpha=0.5,
                                                  beta=2.0)],
                                [vi("x", [6, 48])], [vi("y", [6, 40])],
                                [("W", trained_like(40, 48)), ("b", _x(40))]),
             {"x": (6, 48)}),
    "gemm-transA": (lambda: make_model([helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transA=1, alpha=1.5)],
                                       [vi("x", [48, 6])], [vi("y", [6, 40])], [("W", trained_like(48, 40))]),
                    {"x": (48, 6)}),
    "conv": (lambda: make_model([helper.make_node("Conv", ["x", "W", "b"], ["y"], name="cv", group=2, strides=[2, 1],
                                                  pads=[1, 0, 1, 2], dilations=[1, 2])],
                                [vi("x", [2, 8, 9, 11])], [vi("y", [2, 12, 5, 9])],
                                [("W", _x(12, 4, 3, 3)), ("b", _x(12))]),
             {"x": (2, 8, 9, 11)}),
    "gather": (lambda: make_model([helper.make_node("Gather", ["E", "i"], ["y"], name="emb")],
                                  [vi("i", [4, 3], onnx.TensorProto.INT64)], [vi("y", [4, 3, 24])],
                                  [("E", trained_like(64, 24))]),
               {"i": None}),
}
#: (form, extra options) -> the cases it serves
FORM_CASES = {
    ("nm", ()): ["matmul-right", "matmul-left", "gemm", "gemm-transA", "conv"],
    ("lowrank+sparse", ()): sorted(CASES),
    ("lowrank+sparse", (("sparse_pattern", "rows"),)): ["matmul-right", "gemm", "gemm-transA", "gather"],
    ("lowrank+sparse", (("sparse_pattern", "nm"), ("ratio", 0.9))): ["matmul-right", "gemm", "conv"],
    ("dense-nm", ()): sorted(set(CASES) - {"conv"}),
    ("dense-nm", (("ratio", 0.9),)): ["conv"],  # [36 x 6] per group: half leaves an inner width under 4
    ("dictionary", ()): sorted(CASES),
    ("dictionary", (("dictionary_kind", "omp"),)): ["matmul-right", "conv", "gather"],
}
PARAMS = [(f, opts, c) for (f, opts), cs in FORM_CASES.items() for c in cs]


def _feeds(spec):
    return {k: (RNG.integers(0, 64, (4, 3)).astype(np.int64) if v is None else _x(*v)) for k, v in spec.items()}


def _config(form, opts=(), **kw):
    return CompileConfig(**{"form": form, "min_params": 0, "multiple": 1, "ratio": 0.5, **dict(opts), **kw})


def _rewrite(src, config):
    model = onnx.load(str(src))
    a = analyze(model, config)
    p = Plan().decide(a.candidates, config)
    ctx = context(a.graph)
    apply(ctx, a.candidates, p)
    out = src.with_name("out.onnx")
    save(export(a.graph, model, ctx.sparse), out)
    return out, a.candidates, p


def _with_weight(src, case, cand, fits, path):
    """The original model with its weight replaced by the fit's dense ``A C + S`` in the op's layout."""
    model = onnx.load(str(src))
    dense = [f.dense().astype(np.float32) for f in fits]
    if case == "conv":
        og = 12 // 2
        w = np.concatenate([d.T.reshape(og, 4, 3, 3) for d in dense])
    elif case in ("matmul-left", "gemm"):
        w = dense[0].T
    else:
        w = dense[0]
    init = [t for t in model.graph.initializer if t.name in ("W", "E")][0]
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), init.name))
    return save(model, path)


@pytest.mark.parametrize("form,opts,case", PARAMS, ids=[f"{f}{dict(o).get('sparse_pattern', '')}-{c}"
                                                         for f, o, c in PARAMS])
def test_emission_is_the_numpy_product(tmp_path, form, opts, case):
    build, spec = CASES[case]
    src = save(build(), tmp_path / "m.onnx")
    out, (cand,), p = _rewrite(src, _config(form, opts))
    fits = p.value(cand.weight_key)
    assert fits is not None, p.records[0].reason
    assert all(isinstance(f, SparseFit) for f in fits) and p.forms() == {cand.weight_key: form}
    want_model = _with_weight(src, case, cand, fits, tmp_path / "want.onnx")
    feeds = _feeds(spec)
    got, want, orig = run(out, feeds)["y"], run(want_model, feeds)["y"], run(src, feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert not np.allclose(got, orig, atol=1e-3)  # a lossy size: the check above can fail
    assert p.records[0].params_after <= cand.params  # it saves something (counted with its indices)


def test_nm_is_lossless_on_a_weight_that_already_has_the_pattern(tmp_path):
    build, spec = CASES["matmul-right"]
    model = build()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[(np.arange(48) % 4) >= 2] = 0.0  # rows 2, 3 of every 4 along K: 2:4 already
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    src = save(model, tmp_path / "m.onnx")
    out, (cand,), p = _rewrite(src, _config("nm"))
    (f,) = p.value(cand.weight_key)
    assert nm_mask_ok(f.s, 2, 4) and f.rel_error < 1e-7
    feeds = _feeds(spec)
    np.testing.assert_allclose(run(out, feeds)["y"], run(src, feeds)["y"], rtol=1e-5, atol=1e-5)
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["MatMul"]


def test_nm_groups_a_conv_along_input_channels(tmp_path):
    """TensorRT's 2:4 runs over input channels at one kernel position: the pattern holds on the
    kernel [O, I/g, kh, kw] along its axis 1."""
    build, _ = CASES["conv"]
    src = save(build(), tmp_path / "m.onnx")
    out, _, _ = _rewrite(src, _config("nm"))
    conv = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Conv"][0]
    w = numpy_helper.to_array([t for t in onnx.load(str(out)).graph.initializer if t.name == conv.input[1]][0])
    nz = (w != 0).reshape(12, 1, 4, 9).sum(axis=2)  # groups of 4 input channels per (o, position)
    assert nz.max() <= 2 and nz.sum() == 12 * 9 * 2


def test_storage_counted_by_hand():
    nm = FORMS["nm"]
    s = np.zeros((8, 4), np.float32)
    s[::2] = 1.0
    st = nm.storage([SparseFit(kind="nm", method="svd", rel_error=0, objective_error=0, s=s, pattern="nm:2:4")])
    # 16 kept values + 2 bits each of metadata = 4 bytes = 1 fp32 parameter-equivalent
    assert st.params == 17 and st.nbytes == 16 * 4 + 4
    ls = FORMS["lowrank+sparse"]
    a, c = np.ones((8, 2), np.float32), np.ones((2, 4), np.float32)
    sp = np.zeros((8, 4), np.float32)
    sp[1, 2] = sp[5, 0] = sp[7, 3] = 1.0
    st = ls.storage([SparseFit(kind="lowrank+sparse", method="svd", rel_error=0, objective_error=0, a=a, c=c, s=sp,
                               pattern="unstructured")])
    # A, C: 16 + 8; S: 3 values + 3 int32 column indices + 9 int32 row pointers (CSR)
    assert st.nbytes == 4 * (16 + 8 + 3) + 4 * 3 + 4 * 9 and st.params == 16 + 8 + 3 + 3 + 9
    st = ls.storage([SparseFit(kind="lowrank+sparse", method="svd", rel_error=0, objective_error=0, a=a, c=c, s=sp,
                               pattern="rows")])
    assert st.nbytes == 4 * (16 + 8 + 3 * 4) + 8 * 3  # 3 whole rows of 4 + one int64 index each
    dic = FORMS["dictionary"]
    cc = np.zeros((5, 4), np.float32)
    cc[0] = cc[3] = 2.0
    st = dic.storage([SparseFit(kind="dictionary", method="svd", rel_error=0, objective_error=0,
                                a=np.ones((8, 5), np.float32), c=cc, c_pattern="cols:2")])
    assert st.nbytes == 4 * (40 + 8) + 2 * 8  # D, 8 codes, an int16 atom index each


@pytest.mark.parametrize("form,opts", [("lowrank+sparse", ()), ("lowrank+sparse", (("sparse_pattern", "rows"),)),
                                       ("dense-nm", ()), ("dictionary", ())])
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_budget_respected_with_indices(tmp_path, form, opts, ratio):
    build, _ = CASES["matmul-right"]
    src = save(build(), tmp_path / "m.onnx")
    _, (cand,), p = _rewrite(src, _config(form, opts, ratio=ratio))
    rec = p.records[0]
    assert rec.decision == "factorized", rec.reason
    assert rec.params_after <= ratio * 48 * 40 + 1
    assert rec.params_after >= 0.6 * ratio * 48 * 40  # and spends most of it


def test_sparse_part_is_written_smaller_and_counted(tmp_path):
    src = save(make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [4, 96])],
                          [vi("y", [4, 96])], [("W", trained_like(96, 96))]), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    res = lrcompile.compile(src, out, form="lowrank+sparse", ratio=0.5, min_params=0, multiple=1)
    m = onnx.load(str(out))
    sparse = [n for n in m.graph.node if n.op_type == "Constant" and n.attribute[0].name == "sparse_value"]
    assert len(sparse) == 1
    sv = sparse[0].attribute[0].sparse_tensor
    nnz = int(np.prod(sv.values.dims))
    rec = res.layers[0]
    assert 0 < nnz == rec.info["nonzeros"]
    t = res.report["totals"]
    # the file: A, C and S's values (+ int64 indices) instead of 96 x 96
    assert t["params_after"] == 96 * rec.info["rank"] * 2 + nnz
    assert t["storage_params_after"] == rec.params_after and t["index_bytes"] == rec.info["index_bytes"]
    assert t["ort_params_after"] == 96 * rec.info["rank"] * 2 + 96 * 96  # ORT densifies S
    assert t["output_bytes"] == out.stat().st_size


def test_refusals_are_stated(tmp_path):
    conv3 = make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="cv")], [vi("x", [1, 3, 8, 8])],
                       [vi("y", [1, 16, 6, 6])], [("W", _x(16, 3, 3, 3))])
    src = save(conv3, tmp_path / "c.onnx")
    _, _, p = _rewrite(src, _config("nm"))
    assert p.records[0].decision == "declined" and "not a multiple of M=4" in p.records[0].reason
    src = save(CASES["gather"][0](), tmp_path / "g.onnx")
    _, _, p = _rewrite(src, _config("nm"))
    assert "does not apply to gather" in p.records[0].reason
    _, _, p = _rewrite(src, _config("lowrank+sparse", (("sparse_pattern", "nm"),)))
    assert "N:M part does not apply to lookups" in p.records[0].reason
    src = save(CASES["matmul-left"][0](), tmp_path / "l.onnx")
    _, _, p = _rewrite(src, _config("lowrank+sparse", (("sparse_pattern", "rows"),)))
    assert "rows applies to MatMul (weight on the right)" in p.records[0].reason


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_auto_keeps_the_least_error_form_within_the_budget(tmp_path, ratio):
    """At 0.3 of the storage N:M (0.53) does not fit and is never chosen, however small its error."""
    build, _ = CASES["matmul-right"]
    src = save(build(), tmp_path / "m.onnx")
    _, (cand,), p = _rewrite(src, _config("auto", ratio=ratio))
    chosen = p.forms()[cand.weight_key]
    errs = {}
    for name in ("lowrank", "nm", "lowrank+sparse", "dense-nm", "dictionary"):
        _, _, q = _rewrite(src, _config(name, ratio=ratio))
        r = q.records[0]
        if r.decision == "factorized" and r.params_after <= ratio * 48 * 40 + 40:
            errs[name] = r.objective_error
    assert ("nm" in errs) == (ratio > 0.53)
    assert chosen == min(errs, key=errs.get), errs
    assert p.records[0].params_after <= ratio * 48 * 40 + 40


def test_layer_form_and_bad_options():
    c = CompileConfig(layer_forms=("fc.*=nm",))
    assert c.form_for("fc1") == "nm" and c.form_for("emb") == "lowrank"
    for bad, msg in [({"form": "nm", "energy": 0.9}, "not --energy"), ({"nm": "4:2"}, "0 < N < M"),
                     ({"form": "sparse"}, "unknown form"), ({"layer_forms": ("nm",)}, "REGEX=FORM"),
                     ({"sparse_share": 1.5}, "--sparse-share"),
                     ({"form": "nm", "distill": "d.npz", "calib": "c.npz"}, "fill the zeros")]:
        with pytest.raises(LrcError, match=msg):
            CompileConfig(**bad)


@pytest.mark.parametrize("form", ["nm", "lowrank+sparse", "dense-nm", "dictionary"])
def test_reruns_are_byte_identical(tmp_path, form):
    build, _ = CASES["gemm"]
    src = save(build(), tmp_path / "m.onnx")
    digests = []
    for i in range(2):
        out = tmp_path / f"o{i}.onnx"
        lrcompile.compile(src, out, form=form, ratio=0.5, min_params=0, multiple=1, verify=False)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("form", ["dense-nm", "dictionary", "lowrank+sparse", "nm"])
def test_diagonal_metric_never_forms_diag_and_matches_it(form):
    """Lookup counts, asvd's scales and Fisher rows are diagonal metrics: the fit gets the vector
    (a 30k-row vocabulary's dense diag would be 7 GB) and equals the fit with the dense diagonal."""
    from lrcompile.factorize import LayerStats, RankPolicy
    from lrcompile.forms.sparse import metric
    from lrcompile.ir import Candidate

    b = trained_like(64, 24, seed=3)
    counts = RNG.integers(0, 50, 64).astype(np.float64)
    cand = Candidate(node=None, pass_name="matmul", weight_key="W", matrices=[b], details={"side": "right"})
    g, name = metric("whiten", LayerStats(count=int(counts.sum()), in_sum=counts))
    assert g.ndim == 1 and name == "lookups"
    f = FORMS[form]
    opts = {"nm": "2:4", "sparse_share": 0.25, "sparse_pattern": "unstructured", "dictionary_share": 0.5, "seed": 0}
    pol = RankPolicy(ratio=0.6, multiple=1)
    by_vector = f._fit(cand, b, pol, g, opts)
    by_matrix = f._fit(cand, b, pol, np.diag(g), opts)
    w = np.sqrt(counts)[:, None]
    approx = by_vector.dense()
    want = np.linalg.norm(w * (b - approx)) / np.linalg.norm(w * b)
    assert by_vector.objective_error == pytest.approx(want, rel=1e-6)
    assert by_vector.objective_error == pytest.approx(by_matrix.objective_error, rel=0.05, abs=1e-6)


def _mlp(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    src = save(make_model(nodes, [vi("x", ["batch", 64])], [vi("y", ["batch", 48])],
                          [("W1", trained_like(64, 96, seed=1)), ("W2", trained_like(96, 48, seed=2))]),
               tmp_path / "mlp.onnx")
    x = (RNG.standard_normal((256, 64)) @ RNG.standard_normal((64, 64))).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return src, tmp_path / "calib.npz"


@pytest.mark.parametrize("form", ["auto", "nm", "lowrank+sparse"])
def test_planner_prices_the_forms_under_one_budget(tmp_path, form):
    src, calib = _mlp(tmp_path)
    out = tmp_path / "o.onnx"
    res = lrcompile.compile(src, out, form=form, params=0.6, calib=str(calib), min_params=0, multiple=1,
                            allocation="error")
    done = [r for r in res.layers if r.decision == "factorized"]
    assert done, [r.reason for r in res.layers]
    t = res.report["totals"]
    # the budget counts each form's storage with its indices, never less
    assert sum(r.params_after for r in done) <= 0.6 * (64 * 96 + 96 * 48) + 1
    assert t["storage_params_after"] == sum(r.params_after for r in done)
    if form != "auto":
        assert {r.info["form"] for r in done} == {form}
    assert res.verification[0]["cosine"] > 0.5
