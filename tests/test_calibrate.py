"""Calibration: sources (.npz, Polygraphy JSON, .py loader), statistics against direct numpy
computation, mask handling, conv receptive fields, and one-line errors for bad files."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import lrcompile
from lrcompile.calibrate import CalibSource, StatRequest, collect_stats, iter_calibration
from lrcompile.factorize.patches import ConvGeometry, im2col
from helpers import make_model, save, trained_like, vi

RNG = np.random.default_rng(3)


@pytest.fixture()
def seq_model(tmp_path):
    """ids-free sequence model: x [b, t, 32] -> MatMul W1 -> Relu -> MatMul W2, with a mask input."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y0"], name="fc2"),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "ax"], ["m3"]), helper.make_node("Mul", ["y0", "m3"], ["y"])]
    inits = [("W1", trained_like(32, 64, 1)), ("W2", trained_like(64, 16, 2)), ("ax", np.array([2], np.int64))]
    m = make_model(nodes, [vi("x", ["b", "t", 32]), vi("attention_mask", ["b", "t"], TensorProto.INT64)],
                   [vi("y", ["b", "t", 16])], inits)
    return save(m, tmp_path / "seq.onnx")


def _calib(n=24, t=10):
    x = (RNG.standard_normal((n, t, 32)) @ np.diag(np.linspace(3, 0.1, 32))).astype(np.float32)
    lengths = RNG.integers(3, t + 1, n)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
    return x, mask


def test_stats_stream_equal_direct_and_mask_drops_padding(tmp_path, seq_model):
    x, mask = _calib()
    np.savez(tmp_path / "c.npz", x=x, attention_mask=mask)
    model = onnx.load(str(seq_model))
    src = CalibSource(str(tmp_path / "c.npz"), batch_size=5)  # uneven batches
    reqs = {"x": StatRequest("x", 32), "r": StatRequest("r", 64)}
    stats, info = collect_stats(model, reqs, iter_calibration(src, model), mask_input="attention_mask")
    keep = mask.reshape(-1) != 0
    rows = x.reshape(-1, 32)[keep].astype(np.float64)
    assert stats["x"][0].count == keep.sum() == info["mask_kept_rows"]
    np.testing.assert_allclose(stats["x"][0].gram, rows.T @ rows, rtol=1e-10)
    np.testing.assert_allclose(stats["x"][0].in_sum, rows.sum(0), rtol=1e-10)
    # the hidden activation, computed independently
    r = np.maximum(x.astype(np.float64) @ trained_like(32, 64, 1).astype(np.float64), 0).reshape(-1, 64)[keep]
    np.testing.assert_allclose(stats["r"][0].gram, r.T @ r, rtol=1e-4)
    # without the mask, padding rows enter
    stats2, _ = collect_stats(model, reqs, iter_calibration(src, model), mask_input=None)
    assert stats2["x"][0].count == x.shape[0] * x.shape[1]


def test_samples_limit_and_json_and_py_loader(tmp_path, seq_model):
    x, mask = _calib()
    model = onnx.load(str(seq_model))
    np.savez(tmp_path / "c.npz", x=x, attention_mask=mask)
    got = list(iter_calibration(CalibSource(str(tmp_path / "c.npz"), samples=7, batch_size=4), model))
    assert [f["x"].shape[0] for f in got] == [4, 3]
    from polygraphy.json import save_json

    save_json([{"x": x[:4], "attention_mask": mask[:4]}, {"x": x[4:6], "attention_mask": mask[4:6]}],
              str(tmp_path / "c.json"))
    got = list(iter_calibration(CalibSource(str(tmp_path / "c.json")), model))
    assert [f["x"].shape[0] for f in got] == [4, 2]
    (tmp_path / "loader.py").write_text(
        "import numpy as np\n"
        "def batches():\n"
        "    rng = np.random.default_rng(0)\n"
        "    for _ in range(3):\n"
        "        yield {'x': rng.standard_normal((2, 5, 32)).astype(np.float32),\n"
        "               'attention_mask': np.ones((2, 5), np.int64)}\n")
    got = list(iter_calibration(CalibSource(str(tmp_path / "loader.py") + ":batches"), model))
    assert len(got) == 3 and got[0]["x"].shape == (2, 5, 32)


@pytest.mark.parametrize("make,match", [
    (lambda p, x, m: np.savez(p, y=x, attention_mask=m), "missing ['x']"),
    (lambda p, x, m: np.savez(p, x=x[..., :16], attention_mask=m), "axis 2"),
    (lambda p, x, m: np.savez(p, x=x.astype(np.complex64), attention_mask=m), "expects float32"),
    (lambda p, x, m: np.savez(p, x=x, attention_mask=m[:3]), "share their first"),
    (lambda p, x, m: np.savez(p, x=np.array([{"a": 1}] * 24, dtype=object), attention_mask=m), "pickle"),
    (lambda p, x, m: p.write_bytes(b"PK\x03\x04 not really a zip"), "not a readable .npz"),
])
def test_bad_calibration_files_one_line_errors(tmp_path, seq_model, make, match):
    x, mask = _calib()
    p = tmp_path / "bad.npz"
    make(p, x, mask)
    with pytest.raises(lrcompile.LrcError, match=match.replace("[", r"\[").replace("]", r"\]")) as e:
        lrcompile.compile(seq_model, tmp_path / "o.onnx", calib=str(p), method="svd", min_params=0)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o.onnx").exists()


def test_bad_loader_script(tmp_path, seq_model):
    (tmp_path / "l.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(lrcompile.LrcError, match="failed to import: RuntimeError: boom"):
        lrcompile.compile(seq_model, tmp_path / "o.onnx", calib=str(tmp_path / "l.py"), method="svd", min_params=0)
    (tmp_path / "m.py").write_text("x = 1\n")
    with pytest.raises(lrcompile.LrcError, match="defines no function load_data"):
        lrcompile.compile(seq_model, tmp_path / "o.onnx", calib=str(tmp_path / "m.py"), method="svd", min_params=0)


@pytest.mark.parametrize("kw,geo", [
    ({"pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2], "group": 2},
     ConvGeometry((3, 2), (2, 1), (1, 2), (1, 0, 2, 1), "NOTSET", 2)),
    ({"auto_pad": "SAME_UPPER", "strides": [2, 3], "group": 2}, ConvGeometry((3, 2), (2, 3), (1, 1), (0,) * 4, "SAME_UPPER", 2)),
    ({"auto_pad": "SAME_LOWER", "strides": [2, 3], "group": 1}, ConvGeometry((3, 2), (2, 3), (1, 1), (0,) * 4, "SAME_LOWER", 1)),
    ({"auto_pad": "VALID", "group": 3}, ConvGeometry((3, 2), (1, 1), (1, 1), (0,) * 4, "VALID", 3)),
])
def test_im2col_rows_reproduce_conv(kw, geo):
    g = kw["group"]
    w = RNG.standard_normal((6 * g, 12 // g, 3, 2)).astype(np.float32)
    x = RNG.standard_normal((2, 12, 11, 9)).astype(np.float32)
    m = make_model([helper.make_node("Conv", ["x", "W"], ["y"], **kw)], [vi("x", list(x.shape))],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [("W", w)])
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    og = w.shape[0] // g
    outs = [rows @ w[i * og:(i + 1) * og].reshape(og, -1).T for i, rows in enumerate(im2col(x, geo))]
    got = np.concatenate(outs, 1).reshape(2, y.shape[2], y.shape[3], -1).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)


def test_lookup_counts_and_rowfreq_equals_whitening_by_one_hot_rows(tmp_path):
    from lrcompile.factorize import RankPolicy, factorize
    from lrcompile.factorize.types import LayerStats

    v, d = 50, 12
    table = trained_like(v, d, 4)
    m = make_model([helper.make_node("Gather", ["E", "ids"], ["y"], name="emb")],
                   [vi("ids", ["b", 6], TensorProto.INT64)], [vi("y", ["b", 6, d])], [("E", table)])
    ids = RNG.zipf(1.5, (40, 6)).clip(max=v) - 1
    np.savez(tmp_path / "c.npz", ids=ids.astype(np.int64))
    reqs = {"k": StatRequest("ids", v, lookup=True)}
    stats, _ = collect_stats(m, reqs, iter_calibration(CalibSource(str(tmp_path / "c.npz"), batch_size=7), m))
    counts = stats["k"][0].in_sum
    np.testing.assert_array_equal(counts, np.bincount(ids.ravel(), minlength=v))
    # rowfreq == whitened SVD with the one-hot Gram diag(counts + smoothing*mean)
    pol = RankPolicy(rank=5, multiple=1)
    f = factorize(table, pol, "rowfreq", LayerStats(count=int(counts.sum()), in_sum=counts), smoothing=0.1)
    g = np.diag(counts + 0.1 * counts.mean())
    w = factorize(table, pol, "whiten", LayerStats(count=int(counts.sum()), gram=g), damping=0.0)
    np.testing.assert_allclose(f.a @ f.c, w.a @ w.c, rtol=1e-6, atol=1e-6)


def test_shared_weight_calibrated_on_all_its_inputs(tmp_path):
    """One weight used by two MatMuls with differently distributed inputs: its whitening uses the
    sum of both inputs' Grams, the statistics of everything it multiplies."""
    from onnx import numpy_helper

    from lrcompile.factorize import RankPolicy, factorize
    from lrcompile.factorize.types import LayerStats

    w = trained_like(24, 24, 5)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["p"], name="a"), helper.make_node("MatMul", ["z", "W"], ["q"], name="b"),
             helper.make_node("Add", ["p", "q"], ["y"])]
    src = save(make_model(nodes, [vi("x", ["n", 24]), vi("z", ["n", 24])], [vi("y", ["n", 24])], [("W", w)]),
               tmp_path / "shared.onnx")
    x = (RNG.standard_normal((64, 24)) * np.linspace(4, 0.1, 24)).astype(np.float32)
    z = (RNG.standard_normal((64, 24)) * np.linspace(0.1, 4, 24)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x, z=z)
    res = lrcompile.compile(src, tmp_path / "o.onnx", method="whiten", calib=str(tmp_path / "c.npz"), rank=6,
                            multiple=1, min_params=0)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(res.output)).graph.initializer}
    a, c = inits["a/lr_A"], inits["a/lr_C"]
    g = x.astype(np.float64).T @ x + z.astype(np.float64).T @ z
    want = factorize(w, RankPolicy(rank=6, multiple=1), "whiten", LayerStats(count=128, gram=g))
    np.testing.assert_allclose(a @ c, want.a @ want.c, rtol=1e-4, atol=1e-5)


def test_reference_model_gives_cross_gram_streamed_and_masked(tmp_path, seq_model):
    """Sequential target correction: the compressed model's inputs X' against the original's X of
    the same tensor, same rows, same mask; streamed sums equal the all-at-once products."""
    x, mask = _calib()
    np.savez(tmp_path / "c.npz", x=x, attention_mask=mask)
    ref = onnx.load(str(seq_model))
    comp = onnx.load(str(seq_model))
    w1c = trained_like(32, 64, 1) + 0.1 * RNG.standard_normal((32, 64)).astype(np.float32)
    for init in comp.graph.initializer:
        if init.name == "W1":
            init.CopyFrom(onnx.numpy_helper.from_array(w1c.astype(np.float32), "W1"))
    comp.graph.node.append(helper.make_node("Identity", ["x"], ["x_only_here"]))  # a tensor the reference lacks
    src = CalibSource(str(tmp_path / "c.npz"), batch_size=7)
    reqs = {"r": StatRequest("r", 64), "xo": StatRequest("x_only_here", 32)}
    stats, info = collect_stats(comp, reqs, iter_calibration(src, comp), mask_input="attention_mask",
                                reference=ref)
    keep = mask.reshape(-1) != 0
    x64 = x.astype(np.float64)
    r = np.maximum(x64 @ trained_like(32, 64, 1).astype(np.float64), 0).reshape(-1, 64)[keep]
    rc = np.maximum(x64 @ w1c.astype(np.float64), 0).reshape(-1, 64)[keep]
    st = stats["r"][0]
    assert st.count == keep.sum() and info["target_corrected_layers"] == 1
    np.testing.assert_allclose(st.gram, rc.T @ rc, rtol=1e-4)
    np.testing.assert_allclose(st.cross, rc.T @ r, rtol=1e-4, atol=1e-6 * np.abs(rc.T @ r).max())
    np.testing.assert_allclose(st.ref_gram, r.T @ r, rtol=1e-4)
    assert stats["xo"][0].cross is None  # not in the reference: plain statistics
    # one batch holding everything gives the same sums
    whole, _ = collect_stats(comp, reqs, iter_calibration(CalibSource(str(tmp_path / "c.npz"), batch_size=100), comp),
                             mask_input="attention_mask", reference=ref)
    np.testing.assert_allclose(whole["r"][0].cross, st.cross, rtol=1e-9, atol=1e-9)


def test_sequential_fits_later_layers_to_the_original_outputs(tmp_path, seq_model):
    """--sequential: after fc1 is compressed, fc2 is fitted to the original's fc2 output from the
    compressed model's inputs (target correction), so on the calibration rows the model's output
    error is below one-shot's (which fits fc2 to inputs it never gets)."""
    rng = np.random.default_rng(11)  # own generator: the margin must not depend on test order
    x = (rng.standard_normal((40, 12, 32)) @ np.diag(np.linspace(3, 0.1, 32))).astype(np.float32)
    mask = (np.arange(12)[None, :] < rng.integers(3, 13, 40)[:, None]).astype(np.int64)
    np.savez(tmp_path / "c.npz", x=x, attention_mask=mask)
    opts = dict(method="whiten", calib=str(tmp_path / "c.npz"), rank=6, multiple=1, min_params=0, verify=False)
    seq = lrcompile.compile(seq_model, tmp_path / "s.onnx", sequential=True, **opts)
    one = lrcompile.compile(seq_model, tmp_path / "o.onnx", **opts)
    stages = seq.report["calibration"]["stages"]
    assert [s.get("target_corrected_layers") for s in stages] == [None, 1]  # stage 1 has nothing upstream
    rec = {r.node: r for r in seq.layers}
    assert rec["fc2"].info.get("target_correction") is True and "target_correction" not in rec["fc1"].info
    feed = {"x": x, "attention_mask": mask}

    def err(path):
        y = ort.InferenceSession(str(path)).run(None, feed)[0]
        y0 = ort.InferenceSession(str(seq_model)).run(None, feed)[0]
        return float(np.linalg.norm(y - y0) / np.linalg.norm(y0))
    e_seq, e_one = err(seq.output), err(one.output)
    assert e_seq < 0.97 * e_one
    # fc2's reported objective is the end-to-end one: ||X' A C - X B|| / ||X B|| on the kept rows
    assert 0 < rec["fc2"].objective_error < 1
