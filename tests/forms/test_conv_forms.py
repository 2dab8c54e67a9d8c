"""The conv forms (tucker2, cp, spatial) through the engine and in ONNX Runtime: exact at full rank
for strides, asymmetric pads, dilations, every auto_pad and groups; at reduced rank the rewrite is
exactly the conv with the fitted weight; budgets, VBMF / fixed ranks, fallbacks and refusals;
byte-identical reruns; the default run never fits a conv form."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import lrcompile
from helpers import make_model, run, save, vi
from lrcompile.config import CompileConfig
from lrcompile.engine import Plan, analyze, apply, context, export
from lrcompile.errors import LrcError
from lrcompile.factorize.convdecomp import ConvFit
from lrcompile.forms import FORMS

RNG = np.random.default_rng(7)

#: name -> (Conv attributes, group, kernel, input H x W)
GEOMETRY = {
    "stride-pads": (dict(strides=[2, 2], pads=[1, 1, 1, 1]), 1, (3, 3), (11, 10)),
    "asym-pads": (dict(strides=[1, 2], pads=[0, 1, 2, 0]), 1, (3, 3), (9, 9)),
    "dilation": (dict(dilations=[2, 1], pads=[2, 1, 2, 1]), 1, (3, 3), (10, 8)),
    "same-upper": (dict(auto_pad="SAME_UPPER", strides=[2, 2]), 1, (3, 3), (9, 8)),
    "same-lower": (dict(auto_pad="SAME_LOWER", strides=[2, 1]), 1, (3, 2), (9, 10)),  # (ORT: no dilation with SAME)
    "valid": (dict(auto_pad="VALID", strides=[1, 2]), 1, (2, 3), (8, 9)),
    "groups": (dict(strides=[2, 1], pads=[1, 0, 1, 2], dilations=[1, 2]), 2, (3, 3), (9, 11)),
}
FORM_NAMES = ("tucker2", "cp", "spatial")


def _model(geometry: str, weight: np.ndarray | None = None, bias: bool = True, o: int = 12, i: int = 8):
    attrs, g, (kh, kw), (h, w) = GEOMETRY[geometry]
    wt = weight if weight is not None else RNG.standard_normal((o, i // g, kh, kw)).astype(np.float32)
    ins = ["x", "W"] + (["b"] if bias else [])
    inits = [("W", wt)] + ([("b", RNG.standard_normal(o).astype(np.float32))] if bias else [])
    node = helper.make_node("Conv", ins, ["y"], name="cv", group=g, **attrs)
    return make_model([node], [vi("x", [2, i, h, w])], [vi("y", ["n", "c", "h", "w"])], inits), (2, i, h, w)


def _rewrite(src, config):
    model = onnx.load(str(src))
    a = analyze(model, config)
    p = Plan().decide(a.candidates, config)
    ctx = context(a.graph)
    apply(ctx, a.candidates, p)
    out = src.with_name("out.onnx")
    save(export(a.graph, model, ctx.sparse), out)
    return out, a.candidates, p


def _config(form, **kw):
    return CompileConfig(**{"form": form, "min_params": 0, "multiple": 1, "ratio": 0.5, **kw})


def _with_weight(src, fits, path):
    """The original model with its weight replaced by the fitted weight (all groups)."""
    model = onnx.load(str(src))
    w = np.concatenate([f.weight for f in fits]).astype(np.float32)
    init = [t for t in model.graph.initializer if t.name == "W"][0]
    init.CopyFrom(numpy_helper.from_array(w, "W"))
    return save(model, path)


def _x(shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("geometry", sorted(GEOMETRY))
@pytest.mark.parametrize("form", ["tucker2", "spatial"])
def test_full_rank_is_lossless(tmp_path, form, geometry):
    m, shape = _model(geometry)
    src = save(m, tmp_path / "m.onnx")
    out, (cand,), p = _rewrite(src, _config(form, conv_ranks="1000x1000", keep_unprofitable=True))
    assert p.forms() == {cand.weight_key: form}
    feeds = {"x": _x(shape)}
    got, want = run(out, feeds)["y"], run(src, feeds)["y"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    convs = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Conv"]
    assert len(convs) == (1 if form == "tucker2" else 2)  # Tucker-2 at full ranks: both sides fold


@pytest.mark.parametrize("geometry", sorted(GEOMETRY))
def test_cp_is_lossless_on_a_weight_of_its_rank(tmp_path, geometry):
    attrs, g, (kh, kw), _ = GEOMETRY[geometry]
    fac = lambda d: RNG.standard_normal((d, 3))  # noqa: E731
    w = np.concatenate([np.einsum("ir,hr,wr,or->oihw", fac(8 // g), fac(kh), fac(kw), fac(12 // g))
                        for _ in range(g)]).astype(np.float32)
    m, shape = _model(geometry, weight=w)
    src = save(m, tmp_path / "m.onnx")
    out, (cand,), p = _rewrite(src, _config("cp", conv_ranks="3", keep_unprofitable=True))
    feeds = {"x": _x(shape)}
    want = run(src, feeds)["y"]
    np.testing.assert_allclose(run(out, feeds)["y"], want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("Conv") == 4


@pytest.mark.parametrize("geometry", ["groups", "same-lower", "stride-pads"])
@pytest.mark.parametrize("form", FORM_NAMES)
def test_reduced_rank_rewrite_is_the_conv_with_the_fitted_weight(tmp_path, form, geometry):
    m, shape = _model(geometry)
    src = save(m, tmp_path / "m.onnx")
    out, (cand,), p = _rewrite(src, _config(form, ratio=0.4))
    fits = p.value(cand.weight_key)
    assert fits is not None, p.records[0].reason
    assert all(isinstance(f, ConvFit) and f.kind == form for f in fits)
    want_model = _with_weight(src, fits, tmp_path / "want.onnx")
    feeds = {"x": _x(shape)}
    got, want, orig = run(out, feeds)["y"], run(want_model, feeds)["y"], run(src, feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert not np.allclose(got, orig, atol=1e-3)  # lossy: the check above can fail
    rec = p.records[0]
    assert rec.params_after <= 0.4 * cand.params + 1 and rec.params_after >= 0.5 * 0.4 * cand.params
    assert rec.info["form"] == form and rec.params_after == FORMS[form].storage(fits).params
    stored = sum(numpy_helper.to_array(t).size for t in onnx.load(str(out)).graph.initializer if t.name != "b")
    assert stored == rec.params_after  # what the file holds is what the form counts
    # the error the form reports is the weight's
    w = numpy_helper.to_array(onnx.load(str(src)).graph.initializer[0]).astype(np.float64)
    approx = np.concatenate([f.weight for f in fits])
    assert rec.rel_error == pytest.approx(np.linalg.norm(w - approx) / np.linalg.norm(w), rel=1e-4)


def test_tucker2_folds_a_full_rank_side_into_the_core(tmp_path):
    """R_in = I: the input 1 x 1 conv would be an invertible map; it is folded into the core (the
    chain is today's split) and not stored."""
    m, shape = _model("stride-pads", o=24, i=8)
    src = save(m, tmp_path / "m.onnx")
    out, (cand,), p = _rewrite(src, _config("tucker2", conv_ranks="8x10"))
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Conv", "Conv"]
    assert p.records[0].params_after == 10 * 8 * 9 + 24 * 10
    (fit,) = p.value(cand.weight_key)
    want = run(_with_weight(src, [fit], tmp_path / "w.onnx"), {"x": (x := _x(shape))})["y"]
    np.testing.assert_allclose(run(out, {"x": x})["y"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_tucker2_spends_the_budget_on_the_pair_with_the_most_energy():
    form = FORMS["tucker2"]
    m, _ = _model("stride-pads", o=32, i=16)
    cfg = _config("tucker2", ratio=0.3)
    a = analyze(m, cfg)
    (cand,) = a.candidates
    k, n = cand.matrices[0].shape
    budget = 0.3 * k * n
    r_in, r_out = form.ranks(cand, cfg.policy(), {"conv_ranks": "budget"})
    assert form._values(cand, (r_in, r_out)) <= budget
    # no pair within the budget keeps more of the two modes' energy (the HOSVD bound)
    tin, tout = form._tails(cand)
    best = min(tin[a_] + tout[b_] for a_ in range(1, 17) for b_ in range(1, 33)
               if form._values(cand, (a_, b_)) <= budget and a_ <= 9 * b_ and b_ <= 9 * a_)  # (the core's rank)
    assert tin[r_in] + tout[r_out] == pytest.approx(best)


def test_vbmf_and_fixed_ranks(tmp_path):
    rng = np.random.default_rng(1)
    core = rng.standard_normal((6, 4, 3, 3))
    w = np.einsum("bahw,ia,ob->oihw", core, np.linalg.qr(rng.standard_normal((16, 4)))[0] * 8,
                  np.linalg.qr(rng.standard_normal((24, 6)))[0] * 8) + 0.02 * rng.standard_normal((24, 16, 3, 3))
    m, shape = _model("stride-pads", weight=w.astype(np.float32), o=24, i=16)
    src = save(m, tmp_path / "m.onnx")
    _, (cand,), p = _rewrite(src, _config("tucker2", conv_ranks="vbmf"))
    assert p.records[0].info["ranks"] == "4x6" and p.records[0].rel_error < 0.01
    _, _, p = _rewrite(src, _config("tucker2", conv_ranks="3x5"))
    assert p.records[0].info["ranks"] == "3x5"
    _, _, p = _rewrite(src, _config("spatial", conv_ranks="7"))
    assert p.records[0].info["ranks"] == "7"
    _, _, p = _rewrite(src, CompileConfig(form="tucker2", energy=0.999, min_params=0))
    assert p.records[0].info["ranks"] == "4x6"


def test_other_layers_keep_the_default_form_and_2d_is_required(tmp_path):
    """--form tucker2 names what k x k convs become: a 1 x 1 conv and a Gemm keep lowrank; a 1-D
    conv too (the conv forms refuse it)."""
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], name="pw"),
             helper.make_node("Conv", ["h", "W3"], ["h2"], name="k3", pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["h2"], ["f"], name="fl"),
             helper.make_node("Gemm", ["f", "Wg"], ["y"], name="fc")]
    inits = [("W1", RNG.standard_normal((16, 8, 1, 1)).astype(np.float32)),
             ("W3", RNG.standard_normal((16, 16, 3, 3)).astype(np.float32)),
             ("Wg", RNG.standard_normal((16 * 5 * 5, 10)).astype(np.float32))]
    src = save(make_model(nodes, [vi("x", [1, 8, 5, 5])], [vi("y", [1, 10])], inits), tmp_path / "m.onnx")
    _, cands, p = _rewrite(src, _config("tucker2"))
    assert p.forms() == {"W1": "lowrank", "W3": "tucker2", "Wg": "lowrank"}
    conv1d = make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="c1")], [vi("x", [1, 8, 20])],
                        [vi("y", ["n", "c", "l"])], [("W", RNG.standard_normal((16, 8, 3)).astype(np.float32))])
    cfg = _config("cp")
    (cand,) = analyze(conv1d, cfg).candidates
    assert "2-D convs" in FORMS["cp"].refuses(cand, {"conv_ranks": "budget"})
    _, _, p = _rewrite(save(conv1d, tmp_path / "c1.onnx"), cfg)
    assert p.forms() == {"W": "lowrank"}


def test_bad_conv_ranks_is_one_clear_error():
    with pytest.raises(LrcError, match="--conv-ranks 'many'"):
        CompileConfig(form="tucker2", conv_ranks="many")
    with pytest.raises(LrcError, match="--max-error"):
        CompileConfig(form="tucker2", max_error=0.1)


@pytest.mark.parametrize("form", FORM_NAMES)
def test_byte_identical_reruns(tmp_path, form):
    m, shape = _model("groups")
    src = save(m, tmp_path / "m.onnx")
    digests = []
    for n in range(2):
        out = tmp_path / f"o{n}.onnx"
        lrcompile.compile(src, out, form=form, ratio=0.5, min_params=0, multiple=1)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_the_default_run_never_fits_a_conv_form(tmp_path, monkeypatch):
    """No new option: the conv forms are neither fitted nor priced (today's output stays today's)."""
    def boom(*a, **k):
        raise AssertionError("a conv form was asked without --form")

    for name in FORM_NAMES:
        monkeypatch.setattr(type(FORMS[name]), "fit", boom)
        monkeypatch.setattr(type(FORMS[name]), "fit_full", boom)
    m, _ = _model("groups")
    src = save(m, tmp_path / "m.onnx")
    lrcompile.compile(src, tmp_path / "o.onnx", ratio=0.5, min_params=0)
    lrcompile.compile(src, tmp_path / "p.onnx", params=0.5, min_params=0)


def _two_convs(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="c2", pads=[1, 1, 1, 1], strides=[2, 2])]
    rng = np.random.default_rng(2)
    w1 = np.einsum("bahw,ia,ob->oihw", rng.standard_normal((6, 4, 3, 3)), rng.standard_normal((16, 4)),
                   rng.standard_normal((32, 6))) + 0.01 * rng.standard_normal((32, 16, 3, 3))
    w2 = rng.standard_normal((32, 32, 3, 3))
    inits = [("W1", w1.astype(np.float32)), ("W2", w2.astype(np.float32))]
    return save(make_model(nodes, [vi("x", [1, 16, 8, 8])], [vi("y", ["n", "c", "h", "w"])], inits),
                tmp_path / "m.onnx")


@pytest.mark.parametrize("form", FORM_NAMES)
def test_planner_spends_one_budget_on_a_conv_form(tmp_path, form):
    """Under --params the planner prices the form's sizes (Tucker-2's rank pair is one size) and
    spends the budget: at most it, and most of it."""
    src = _two_convs(tmp_path)
    res = lrcompile.compile(src, tmp_path / "o.onnx", form=form, params=0.2, min_params=0, multiple=1,
                            allocation="error")
    t = res.report["totals"]
    assert 0.12 * t["params_before"] <= t["params_after"] <= 0.2 * t["params_before"]
    assert {(r.info or {}).get("form") for r in res.layers} == {form}
    c1 = [r for r in res.layers if r.node == "c1"][0]
    if form == "tucker2":  # c1 is a Tucker weight of ranks 4 x 6 (plus noise): the budget reaches it
        assert c1.rel_error < 0.01


def test_auto_prices_every_form_and_says_which_won(tmp_path):
    src = _two_convs(tmp_path)
    res = lrcompile.compile(src, tmp_path / "o.onnx", form="auto", params=0.12, min_params=0, multiple=1,
                            allocation="error")
    t = res.report["totals"]
    assert t.get("storage_params_after", t["params_after"]) <= 0.12 * t["params_before"] * 1.01
    chosen = {r.node: (r.info or {}).get("form", "lowrank") for r in res.layers if r.decision == "factorized"}
    assert set(chosen) == {"c1", "c2"}
    assert chosen["c1"] in ("tucker2", "cp", "spatial")  # low rank alone cannot store c1's structure in this
    out = run(tmp_path / "o.onnx", {"x": _x((1, 16, 8, 8))})["y"]
    assert np.all(np.isfinite(out))


def _fake_timings(slow_forms: set[str], seen: list):
    """Timings where the forms in ``slow_forms`` are never faster than dense, the others always."""
    from lrcompile import latency

    def fake(model, cands, feeds_by_batch, ranks_for, form="lowrank", **kw):
        seen.append(form)
        return {c.label: [latency.LayerTiming(node=c.label, batch=b, rows_shape=[b, 64], dense_ms=1.0,
                                              ranks=list(ranks_for[c.label]),
                                              factorized_ms=[2.0 if form in slow_forms else 0.2] * len(ranks_for[c.label]))
                          for b in feeds_by_batch] for c in cands}
    return fake


def test_latency_aware_planner_picks_a_fast_form_or_keeps_the_conv_dense(tmp_path, monkeypatch):
    from lrcompile import latency

    src = _two_convs(tmp_path)
    seen = []
    monkeypatch.setattr(latency, "time_layers", _fake_timings({"lowrank", "tucker2", "cp"}, seen))
    kw = dict(params=0.4, min_params=0, multiple=1, allocation="error", latency_aware=True, timing_cache="none")
    res = lrcompile.compile(src, tmp_path / "o.onnx", form="auto", **kw)
    assert {"tucker2", "cp", "spatial", "lowrank"} <= set(seen)  # every form timed with its own structure
    forms = {r.node: (r.info or {}).get("form") for r in res.layers if r.decision == "factorized"}
    assert forms and all(f not in ("tucker2", "cp", None) for f in forms.values())  # only the fast ones won
    seen.clear()
    monkeypatch.setattr(latency, "time_layers", _fake_timings({"tucker2"}, seen))
    with pytest.raises(LrcError, match="slow layers dense.*--size-only"):  # the only form is slow everywhere
        lrcompile.compile(src, tmp_path / "p.onnx", form="tucker2", **kw)


def test_latency_aware_rank_policy_times_the_planned_form(tmp_path, monkeypatch):
    from lrcompile import latency

    src = _two_convs(tmp_path)
    seen = []
    monkeypatch.setattr(latency, "time_layers", _fake_timings({"spatial"}, seen))
    with pytest.raises(LrcError, match="spatial size"):  # every conv slow in its form: the message names it
        lrcompile.compile(src, tmp_path / "o.onnx", form="spatial", ratio=0.5, min_params=0, latency_aware=True,
                          timing_cache="none")
    assert seen == ["spatial"]
    seen.clear()
    monkeypatch.setattr(latency, "time_layers", _fake_timings({"lowrank"}, seen))
    res = lrcompile.compile(src, tmp_path / "o.onnx", form="spatial", ratio=0.5, min_params=0, latency_aware=True,
                            timing_cache="none")
    assert seen == ["spatial"] and all(r.decision == "factorized" for r in res.layers)


def test_conv_form_micro_models_build_and_run(tmp_path):
    """What latency-aware mode times: the layer alone, with random parts of the form's structure."""
    from lrcompile import latency

    src = _two_convs(tmp_path)
    model = onnx.load(str(src))
    cfg = _config("tucker2")
    cands = analyze(model, cfg).candidates
    feeds = {1: {"x": _x((1, 16, 8, 8))}}
    for form in FORM_NAMES:
        t = latency.time_layers(model, cands, feeds, {c.label: [2, 4] for c in cands}, form=form,
                                form_options={"conv_ranks": "budget"}, repeats=2, budget_s=0.01)
        assert set(t) == {"c1", "c2"}
        assert all(np.all(np.isfinite(x.factorized_ms)) and len(x.factorized_ms) == 2 for v in t.values() for x in v)


def test_inspect_shows_vbmf_ranks_and_each_forms_error(tmp_path):
    from lrcompile.inspection import inspect_model, inspect_table

    src = _two_convs(tmp_path)
    rows = {r["node"]: r for r in inspect_model(src, ratio=0.5, min_params=0)}
    c1 = rows["c1"]["conv"]
    assert (c1["vbmf_rank_in"], c1["vbmf_rank_out"]) == (4, 6)  # the Tucker weight's own ranks
    for form in FORM_NAMES:  # the error a data-free compile at that ratio reports
        res = lrcompile.compile(src, tmp_path / f"{form}.onnx", form=form, ratio=0.5, min_params=0, multiple=1,
                                verify=False)
        rec = [r for r in res.layers if r.node == "c2"][0]
        assert rows["c2"]["conv"]["errors"][form] == pytest.approx(rec.rel_error, rel=1e-4)
    assert "err tucker2" in inspect_table(list(rows.values()))


@pytest.mark.parametrize("form", FORM_NAMES)
def test_sequential_target_correction_fits_the_original_outputs(form):
    """With the compressed model's inputs X' and the original's X on the same rows, the fit
    minimises ||X' W' - X W||: its reported objective is that error, and it beats fitting X' W."""
    from lrcompile.factorize import LayerStats, RankPolicy
    from lrcompile.factorize.convdecomp import as_matrix
    from lrcompile.factorize.patches import im2col

    m, _ = _model("stride-pads")
    cfg = _config(form)
    (cand,) = analyze(m, cfg).candidates
    rng = np.random.default_rng(3)
    img = rng.standard_normal((4, 8, 11, 10))
    geo = cand.details["geometry"]
    x = im2col(img, geo)[0]
    xp = im2col(img + 0.3 * rng.standard_normal(img.shape) + 0.2 * np.roll(img, 1, axis=1), geo)[0]
    corrected = LayerStats(count=len(x), gram=xp.T @ xp, cross=xp.T @ x, ref_gram=x.T @ x)
    plain = LayerStats(count=len(x), gram=xp.T @ xp)
    f = FORMS[form]
    pol = RankPolicy(ratio=0.5, multiple=1)
    b = cand.matrices[0].astype(np.float64)
    errs = []
    for st in (corrected, plain):
        (fit,) = f.fit(cand, pol, "whiten", [st], {"conv_ranks": "budget"})
        got = np.linalg.norm(xp @ as_matrix(fit.weight.astype(np.float64)) - x @ b) / np.linalg.norm(x @ b)
        errs.append(got)
        if st is corrected:
            assert fit.info.get("target_correction") and fit.objective_error == pytest.approx(got, rel=1e-4)
    assert errs[0] < errs[1]
