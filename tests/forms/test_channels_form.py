"""The MLP hidden-channel form on a hand-built pair: sizes, storage and FLOPs by hand, the refit
exact at full width in ORT, the emitted constants equal to the numpy refit at a reduced width,
and a near-pair that is declined with its reason."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from helpers import make_model, run, save, vi
from lrcompile.engine import context, export
from lrcompile.factorize.stats import StatsAccumulator
from lrcompile.forms import FORMS
from lrcompile.ir import ConstantResolver
from lrcompile.passes import mlp

FORM = FORMS["channels"]
RNG = np.random.default_rng(3)


def _model(act="Relu"):
    w = lambda *s: (RNG.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["u"], name="up"),
             helper.make_node("Add", ["u", "b1"], ["ub"], name="up_bias"),
             helper.make_node(act, ["ub"], ["h"], name="act", **({"axis": -1} if act == "Softmax" else {})),
             helper.make_node("MatMul", ["h", "W2"], ["d"], name="down"),
             helper.make_node("Add", ["d", "b2"], ["y"], name="down_bias")]
    return make_model(nodes, [vi("x", ["n", 12])], [vi("y", ["n", 5])],
                      [("W1", w(12, 24)), ("b1", w(1, 24)[0]), ("W2", w(24, 5)), ("b2", w(1, 5)[0])])


def _pair(model):
    graph = gs.import_onnx(model)
    pairs, reasons = mlp.find_pairs(graph, ConstantResolver(graph), list(graph.nodes))
    return graph, pairs, reasons


def _stats(src, x):
    h = run(src, {"x": x})  # the hidden activation, exposed below
    acc = StatsAccumulator(24)
    acc.update(h["h"])
    return acc.result()


def _with_hidden(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(vi("h", ["n", 24]))
    return m


def test_sizes_storage_and_flops_by_hand():
    _, (pair,), _ = _pair(_model())
    assert pair.width == 24
    sizes = FORM.sizes(pair, 8)
    assert list(sizes) == [8, 16]  # below the full width
    np.testing.assert_array_equal(FORM.params(pair, sizes), sizes * (12 + 5))
    assert FORM.storage(pair, 8).params == 8 * 12 + 8 * 5 and FORM.layer_params(pair, 8) == (96, 40)
    dense, at = FORM.flops(pair, sizes, rows=3.0)
    assert dense == 2 * 3 * 17 * 24 and list(at) == [2 * 3 * 17 * 8, 2 * 3 * 17 * 16]
    assert FORM.probe_scale(pair) == 24.0


def test_full_width_refit_is_exact_and_a_reduced_width_emits_the_refit(tmp_path):
    model = _model()
    src = save(_with_hidden(model), tmp_path / "m.onnx")
    x = RNG.standard_normal((200, 12)).astype(np.float32)
    st = _stats(src, x)
    for width in (24, 10):
        graph, (pair,), _ = _pair(model)
        value = FORM.fit(pair, st, width)
        assert len(value.keep) == width
        FORM.emit(context(graph), pair, value)
        graph.cleanup().toposort()
        out = save(export(graph, model), tmp_path / f"w{width}.onnx")
        got, ref = run(out, {"x": x})["y"], run(src, {"x": x})["y"]
        if width == 24:
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
        else:
            h = np.maximum(x @ pair.up.weight + pair.up.bias, 0)[:, value.keep]
            np.testing.assert_allclose(got, h @ value.weight + value.bias, rtol=1e-4, atol=1e-4)
            rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert 0 < rel <= 1.0  # lossy, and no worse than dropping the layer


def test_a_channel_mixing_activation_is_no_pair():
    _, pairs, reasons = _pair(_model("Softmax"))
    assert not pairs and any("Softmax" in r or "channel" in r for r in reasons.values()), reasons
