"""Attention blocks found by structure in exported graphs, and their head-dimension rewrite
(``passes.attention``, ``lrcompile.attention``, ``--attention``): exact in ONNX Runtime at the full
head dimension, the errors the math reports measured in ORT, the scale unchanged, near-misses
declined with a reason, byte-identical reruns."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import lrcompile
from helpers import run, save
from lrcompile.attention import AttentionSites, HeadPair
from lrcompile.calibrate import collect_stats
from lrcompile.config import CompileConfig
from lrcompile.engine import context, export
from lrcompile.errors import LrcError
from lrcompile.factorize import heads as fh
from lrcompile.forms import FORMS
from lrcompile.ir import ConstantResolver
from lrcompile.passes.attention import find_blocks

pytestmark = pytest.mark.torch
D, HEADS, T = 32, 4, 10


def _module(bias: bool = True, fused: str | None = None, mask: bool = True, cross: bool = False):
    """``fused``: None (three projections), "chunk" (``qkv(x).chunk(3)``: Slices with computed
    ends), "split" (``qkv(x).split(D)``: a Split), "5d" (``qkv(x).reshape(b, t, 3, H, d).permute(2, 0,
    3, 1, 4)``, as timm, SVTR and PaddleOCR write it)."""
    import torch
    from torch import nn

    class Attn(nn.Module):
        """BERT's eager self-attention, written out (as HF's BertSelfAttention + BertSelfOutput)."""

        def __init__(self):
            super().__init__()
            self.h, self.hd = HEADS, D // HEADS
            if fused:
                self.qkv = nn.Linear(D, 3 * D, bias=bias)
            else:
                self.q, self.k, self.v = (nn.Linear(D, D, bias=bias) for _ in range(3))
            self.o = nn.Linear(D, D, bias=bias)
            self.ln = nn.LayerNorm(D)

        def split(self, y):
            return y.view(y.shape[0], y.shape[1], self.h, self.hd).transpose(1, 2)

        def forward(self, x, m):
            mem = x.flip(1) * 0.5 + 1.0 if cross else x  # cross-attention: keys and values from another input
            if fused == "5d":
                qkv = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
                q, k, v = qkv[0], qkv[1], qkv[2]
            else:
                if fused == "chunk":
                    q, k, v = self.qkv(x).chunk(3, dim=-1)
                elif fused == "split":
                    q, k, v = self.qkv(x).split(D, dim=-1)
                else:
                    q, k, v = self.q(x), self.k(mem), self.v(mem)
                q, k, v = self.split(q), self.split(k), self.split(v)
            s = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
            if mask:
                s = s + (1.0 - m[:, None, None, :]) * -10000.0
            p = torch.softmax(s, dim=-1)
            c = (p @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], D)
            return self.ln(self.o(c) + x)

    torch.manual_seed(0)
    mod = Attn().eval()
    with torch.no_grad():  # trained-like: anisotropic weights, non-zero biases
        for p in mod.parameters():
            if p.ndim == 2:
                p.mul_(torch.linspace(2.0, 0.3, p.shape[1])[None, :])
            elif bias:
                p.normal_(0, 0.2)
    return mod


def _export(tmp_path, how: str, **kw) -> str:
    import torch

    mod = _module(**kw)
    x, m = torch.randn(2, T, D), torch.ones(2, T)
    path = tmp_path / f"attn-{how}.onnx"
    if how == "dynamo":
        prog = torch.onnx.export(mod, (x, m), dynamo=True, input_names=["x", "mask"], output_names=["y"],
                                 dynamic_shapes=({0: "b", 1: "t"}, {0: "b", 1: "t"}))
        prog.save(str(path))
    else:
        torch.onnx.export(mod, (x, m), str(path), input_names=["x", "mask"], output_names=["y"],
                          opset_version=int(how), dynamo=False,
                          dynamic_axes={"x": {0: "b", 1: "t"}, "mask": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}})
    return str(path)


def _feed(rows: int, seed: int):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(D, D)) * np.linspace(1.5, 0.1, D)
    x = (rng.normal(size=(rows, T, D)) @ mix + 0.3).astype(np.float32)
    m = np.ones((rows, T), np.float32)
    m[1::2, T - 3:] = 0  # padding on every other row
    return {"x": x, "mask": m}


def _calib(tmp_path, seed=1):
    path = tmp_path / "calib.npz"
    np.savez(path, **_feed(16, seed))
    return path


def _sites(model, feed):
    sites = AttentionSites.find(model, CompileConfig())
    stats, _ = collect_stats(model, sites.requests(), iter([feed]), mask_input="mask")
    sites.take_stats(stats)
    return sites


def _reduce(model, sites, dims, damping=None):
    """The model with every pair at ``dims[kind]`` (the full dimension included: written anyway)."""
    graph = gs.import_onnx(model)
    consts = ConstantResolver(graph)
    blocks, _ = find_blocks(graph, consts, list(graph.nodes))
    ctx = context(graph)
    fits = {}
    for b in blocks:
        for kind in ("qk", "ov"):
            key = f"attn-{kind}:{b.label}"
            if damping is not None:  # refit with this damping (0: the math's error is exactly measurable)
                pr, st = sites.pairs[key], sites.stats[key]
                if kind == "qk":
                    g = fh.augmented_gram(st[0].gram, st[0].in_sum, st[0].count)
                    sp = fh.qk_spectra(pr.block.q.weight, pr.block.q.bias, pr.block.k.weight, g, heads=pr.heads,
                                       damping=damping)
                else:
                    sp = fh.ov_spectra(pr.block.v.weight, pr.block.v.bias, pr.block.o.weight, pr.block.o.bias,
                                       [s.gram for s in st], heads=pr.heads, damping=damping)
                fit = sp.fit(dims[kind])
            else:
                fit = sites.refit(key, dims[kind])[0]
            FORMS["heads"].emit(ctx, HeadPair(b, kind), fit, consts)
            fits[key] = fit
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return export(graph, model), fits


@pytest.mark.parametrize("how", ["14", "17", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_the_block_is_found_and_exact_at_full_head_dimension(tmp_path, how):
    path = _export(tmp_path, how)
    model = onnx.load(path, load_external_data=True)
    sites = _sites(model, _feed(8, 1))
    assert sorted(k.split(":")[0] for k in sites.pairs) == ["attn-ov", "attn-qk"], sites.reasons
    pr = next(iter(sites.pairs.values()))
    assert (pr.heads, pr.width) == (HEADS, D // HEADS)
    assert pr.block.scale == pytest.approx(1 / math.sqrt(D // HEADS))
    new, _ = _reduce(model, sites, {"qk": D // HEADS, "ov": D // HEADS})
    out = save(new, tmp_path / "full.onnx")
    feed = _feed(4, 5)
    a, b = run(path, feed)["y"], run(out, feed)["y"]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def _tensor(model, feed, names):
    from lrcompile.sessions import with_outputs

    m = with_outputs(model, names)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.onnx"
        onnx.save(m, str(p))
        return run(p, feed)


@pytest.mark.parametrize("layout", ["split", "5d"])
@pytest.mark.parametrize("how", ["11", "17"])
def test_fused_qkv_is_found_and_reduced_with_qk_and_ov_apart(tmp_path, layout, how):
    path = _export(tmp_path, how, fused=layout)
    model = onnx.load(path)
    feed = _feed(8, 1)
    sites = _sites(model, feed)
    assert len(sites.pairs) == 2, sites.reasons
    pr = next(iter(sites.pairs.values()))
    assert pr.block.fused is not None and pr.block.fused.layout == layout
    new, _ = _reduce(model, sites, {"qk": D // HEADS, "ov": D // HEADS})
    check = _feed(4, 5)
    np.testing.assert_allclose(run(save(new, tmp_path / "full.onnx"), check)["y"], run(path, check)["y"], rtol=1e-4,
                               atol=1e-4)
    new, fits = _reduce(model, _sites(model, feed), {"qk": 3, "ov": 6}, damping=0.0)
    g = gs.import_onnx(new)
    qkv = next(n for n in g.nodes if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant))
    assert qkv.inputs[1].values.shape == (D, HEADS * (3 + 3 + 6))
    y = run(save(new, tmp_path / "r.onnx"), check)["y"]
    assert y.shape == (4, T, D) and np.all(np.isfinite(y))
    blocks, why = find_blocks(g, ConstantResolver(g), list(g.nodes))  # a reduced model is found again
    assert len(blocks) == 1 and (blocks[0].head_dim, blocks[0].v_dim) == (3, 6), why


def test_fused_qkv_compiles_under_auto_with_one_record_for_the_weight(tmp_path):
    src = _export(tmp_path, "17", fused="5d")
    res = lrcompile.compile(src, tmp_path / "f.onnx", calib=str(_calib(tmp_path)), attention="auto", params=0.6,
                            mask_input="mask", multiple=1, inputs=str(_calib(tmp_path, seed=3)))
    assert res.status == "PASSED"
    qkv = [r for r in res.layers if r.info and r.info.get("fused")]
    assert len(qkv) <= 1 and all(r.params_after < r.params_before for r in qkv)
    assert not any(r.decision == "factorized" and r.node == (qkv[0].node if qkv else "") for r in res.layers)
    assert res.report["totals"]["params_after"] <= 0.62 * res.report["totals"]["params_before"] \
        if "totals" in res.report else True


def test_cross_attention_uses_both_inputs_grams_and_is_exact_at_full(tmp_path):
    path = _export(tmp_path, "17", cross=True)
    model = onnx.load(path)
    sites = _sites(model, _feed(8, 1))
    pr = sites.pairs[next(k for k in sites.pairs if k.startswith("attn-qk"))]
    assert pr.block.cross and len(sites.stats[next(k for k in sites.pairs if k.startswith("attn-qk"))]) == 2
    new, _ = _reduce(model, sites, {"qk": D // HEADS, "ov": D // HEADS})
    feed = _feed(4, 5)
    np.testing.assert_allclose(run(save(new, tmp_path / "x.onnx"), feed)["y"], run(path, feed)["y"], rtol=1e-4,
                               atol=1e-4)


def test_per_head_statistics_are_the_grams_of_the_mixed_values_without_padding(tmp_path):
    path = _export(tmp_path, "17")
    model = onnx.load(path)
    feed = _feed(6, 2)
    sites = _sites(model, feed)
    key = next(k for k in sites.pairs if k.startswith("attn-ov"))
    b = sites.pairs[key].block
    got = _tensor(model, feed, [b.probs, b.x_kv])
    keep = feed["mask"].astype(bool)
    for h in range(HEADS):
        z = (got[b.probs][:, h].astype(np.float64) @ got[b.x_kv].astype(np.float64))[keep]
        np.testing.assert_allclose(sites.stats[key][h].gram, z.T @ z, rtol=1e-5)
        assert sites.stats[key][h].count == keep.sum()


def test_errors_the_math_reports_are_measured_in_ort(tmp_path):
    path = _export(tmp_path, "17")
    model = onnx.load(path)
    feed = _feed(16, 1)
    sites = _sites(model, feed)
    r = 3
    new, fits = _reduce(model, sites, {"qk": r, "ov": r}, damping=0.0)
    pr = next(p for p in sites.pairs.values() if p.kind == "ov")
    score = pr.block.softmax.inputs[0].name
    o_out = pr.block.o.node.outputs[0].name  # the output projection's MatMul (before its bias)
    before = _tensor(model, feed, [score, o_out, pr.block.probs])
    after = _tensor(new, feed, [score, o_out])
    keep = feed["mask"].astype(bool)
    # OV: with the original probabilities, the reduced value/output path measured on the calibration rows
    got = after[o_out] - before[o_out]
    qk_changed = not np.allclose(after[score], before[score])
    assert qk_changed
    # scores: the measured error over the unmasked keys and queries of each row, with the mask's own
    # additive term removed (it is the same on both sides), is no more than what the math reported
    # over every row pair (the math's metric mixes rows across batches: a superset)
    fit_qk = next(f for k, f in fits.items() if k.startswith("attn-qk"))
    s0, s1 = before[score], after[score]
    num = den = 0.0
    for i in range(s0.shape[0]):
        kq = keep[i]
        d0, d1 = s0[i][:, kq][:, :, kq], s1[i][:, kq][:, :, kq]
        num += np.sum((d1 - d0) ** 2)
        den += np.sum(d0 ** 2)
    measured = np.sqrt(num / den)
    assert 0.2 * fit_qk.rel_error < measured < 2.5 * fit_qk.rel_error, (measured, fit_qk.rel_error)
    fit_ov = next(f for k, f in fits.items() if k.startswith("attn-ov"))
    # the output error measured with reduced scores too: same order as the OV math's
    rel = np.linalg.norm(got[keep]) / np.linalg.norm(before[o_out][keep])
    assert 0.2 * fit_ov.rel_error < rel < 3 * (fit_ov.rel_error + fit_qk.rel_error), (rel, fit_ov.rel_error)


def test_scale_and_every_shape_follow_the_new_head_dimension(tmp_path):
    path = _export(tmp_path, "17")
    model = onnx.load(path)
    sites = _sites(model, _feed(16, 1))
    new, _ = _reduce(model, sites, {"qk": 2, "ov": 5})
    g = gs.import_onnx(new)
    consts = ConstantResolver(g)
    blocks, why = find_blocks(g, consts, list(g.nodes))
    assert len(blocks) == 1, why
    b = blocks[0]
    assert b.scale == pytest.approx(1 / math.sqrt(D // HEADS))  # the original scale, not 1/sqrt(2)
    assert b.q.weight.shape == (D, HEADS * 2) and b.k.weight.shape == (D, HEADS * 2)
    assert b.v.weight.shape == (D, HEADS * 5) and b.o.weight.shape == (HEADS * 5, D)
    assert b.v.bias is None  # folded into the output bias
    y = run(save(new, tmp_path / "r.onnx"), _feed(3, 9))["y"]
    assert y.shape == (3, T, D) and np.all(np.isfinite(y))


def test_fused_qkv_and_a_changed_probability_path_are_declined_with_reasons(tmp_path):
    model = onnx.load(_export(tmp_path, "17", fused="chunk"))  # Slices whose ends are computed from a Shape
    sites = AttentionSites.find(model, CompileConfig())
    assert not sites.pairs
    assert "fused QKV projection sliced" in next(iter(sites.reasons.values()))
    # a hand-built near-miss: the probabilities are scaled before the context MatMul (rows no longer sum to one)
    model = onnx.load(_export(tmp_path, "17"))
    g = model.graph
    sm = next(n for n in g.node if n.op_type == "Softmax")
    ctx = next(n for n in g.node if n.op_type == "MatMul" and n.input[0] == sm.output[0])
    g.initializer.append(onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    g.node.insert(list(g.node).index(ctx), helper.make_node("Mul", [sm.output[0], "two"], ["p2"], name="p2"))
    ctx.input[0] = "p2"
    sites = AttentionSites.find(model, CompileConfig())
    assert not sites.pairs
    assert "probabilities pass through Mul" in next(iter(sites.reasons.values()))


def test_compile_with_attention_is_deterministic_and_reports_each_pair(tmp_path):
    src = _export(tmp_path, "17")
    calib = _calib(tmp_path)
    outs = []
    for i in range(2):
        res = lrcompile.compile(src, tmp_path / f"o{i}.onnx", calib=str(calib), attention="4:6", ratio=1.0,
                                mask_input="mask", inputs=str(_calib(tmp_path, seed=3)))
        outs.append((tmp_path / f"o{i}.onnx").read_bytes())
    assert outs[0] == outs[1]
    att = res.report["attention"]
    assert {(p["kind"], p["kept"]) for p in att["pairs"]} == {("qk", 4), ("ov", 6)}
    assert all(p["predicted_rel_error"] > 0 for p in att["pairs"])
    # measured in ORT on held-out rows: the scores as predicted; the block output also carries the
    # error the reduced scores make (end to end), so it is at least the OV error predicted
    qk, ov = (next(p for p in att["pairs"] if p["kind"] == k) for k in ("qk", "ov"))
    assert qk["measured_rel_error"] == pytest.approx(qk["predicted_rel_error"], rel=0.3)
    assert ov["measured_rel_error"] >= 0.9 * ov["predicted_rel_error"]
    alone = lrcompile.compile(src, tmp_path / "ov.onnx", calib=str(calib), attention="8:6", ratio=1.0,
                              mask_input="mask", inputs=str(_calib(tmp_path, seed=3))).report["attention"]["pairs"]
    ov = next(p for p in alone if p["kind"] == "ov")  # with the scores exact, the output error is the OV math's
    assert ov["measured_rel_error"] == pytest.approx(ov["predicted_rel_error"], rel=0.3)
    assert res.status == "PASSED"
    recs = [r for r in res.layers if r.method == "heads"]
    assert len(recs) == 4 and all(r.params_after == r.params_before * (4 if "q" in r.info["kind"] else 6) // 8
                                   for r in recs)


def test_auto_prices_head_pairs_in_the_one_budget(tmp_path):
    src = _export(tmp_path, "17")
    calib = _calib(tmp_path)
    res = lrcompile.compile(src, tmp_path / "auto.onnx", calib=str(calib), attention="auto", params=0.5,
                            mask_input="mask", multiple=1)
    assert res.report["plan"]["attention_pairs"] == 2
    assert res.report["attention"]["head_dim"] == "auto" and res.status == "PASSED"
    chosen = {p["kind"]: p["kept"] for p in res.report["attention"]["pairs"]}
    heads = [r for r in res.layers if r.method == "heads"]
    assert len(heads) == 2 * len(chosen) and all(0 < k < D // HEADS for k in chosen.values())


@pytest.mark.parametrize("kw, msg", [
    (dict(attention="16"), "pass --calib"),
    (dict(attention="auto", calib="c.npz"), "give --params"),
    (dict(attention="3:x", calib="c.npz"), "QK:OV"),
    (dict(attention=2.5, calib="c.npz"), "whole number"),
])
def test_bad_options_are_one_line_errors(kw, msg):
    with pytest.raises(LrcError, match=msg):
        CompileConfig(**kw)


def test_default_output_has_no_attention_section(tmp_path):
    src = _export(tmp_path, "17")
    res = lrcompile.compile(src, tmp_path / "d.onnx", ratio=0.5, min_params=0)
    assert "attention" not in res.report


@pytest.mark.parametrize("extra", [dict(sequential=True), pytest.param(
    dict(distill="CALIB", distill_epochs=1, distill_batch=4), marks=pytest.mark.slow)])
def test_auto_composes_with_sequential_and_distill(tmp_path, extra):
    import importlib.util

    if "distill" in extra and importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("--distill needs onnx2torch (lrcompile[fisher])")
    src = _export(tmp_path, "17")
    calib = str(_calib(tmp_path))
    extra = {k: (calib if v == "CALIB" else v) for k, v in extra.items()}
    res = lrcompile.compile(src, tmp_path / "c.onnx", calib=calib, attention="auto", params=0.5, mask_input="mask",
                            multiple=1, inputs=str(_calib(tmp_path, seed=3)), **extra)
    assert res.status == "PASSED"
    assert res.report["attention"]["pairs"] and all(r.decision == "pruned" for r in res.layers if r.method == "heads")


def test_stale_shape_annotations_are_dropped(tmp_path):
    """A model that ships value_info for its intermediates (PaddleOCR's do) must still load after its
    heads are reduced: the annotations name the old sizes."""
    src = _export(tmp_path, "17", fused="5d")
    model = onnx.load(src)
    g = model.graph
    add = next(n for n in g.node if n.op_type == "Add" and any("qkv" in i for i in n.input))
    for n in g.node:  # an Identity after the projection, as Paddle's exporter writes: its output annotated too
        n.input[:] = ["qkv_id" if i == add.output[0] else i for i in n.input]
    g.node.insert(list(g.node).index(add) + 1, helper.make_node("Identity", [add.output[0]], ["qkv_id"]))
    model = onnx.shape_inference.infer_shapes(model)
    assert len(model.graph.value_info) > 10
    annotated = save(model, tmp_path / "annotated.onnx")
    res = lrcompile.compile(annotated, tmp_path / "a.onnx", calib=str(_calib(tmp_path)), attention="3:5", ratio=1.0,
                            min_params=10**9, mask_input="mask")
    assert res.status == "PASSED"
    onnx.checker.check_model(onnx.load(tmp_path / "a.onnx"), full_check=True)
