"""Shapes that fit: verification and timing inputs at shapes the ORIGINAL model runs on.

Each model here fails in ONNX Runtime at the default dynamic dims (batch 2, others 16): an
upsample + Add that needs multiples of 32, a reflect Pad that needs more than 16 samples, a
Squeeze of the batch axis. lrcompile finds the shapes that fit; where none does, or the user's
--dim / --inputs do not fit, one line says that the ORIGINAL model fails and what to pass."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import make_model, save, trained_like, vi
from onnx import helper, numpy_helper

import lrcompile
from lrcompile.cli import main
from lrcompile.errors import LrcError
from lrcompile.feeds import fit_feeds, original_runner, random_feeds


def _pyramid(path, levels: int = 5):
    """1x1 Conv, then ``levels`` MaxPools (stride 2) and as many nearest Resizes (x2), added back
    to the Conv's output: H and W must be multiples of 2**levels (an FPN in miniature)."""
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="proj")]
    t = "c"
    for i in range(levels):
        nodes.append(helper.make_node("MaxPool", [t], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]))
        t = f"p{i}"
    for i in range(levels):
        nodes.append(helper.make_node("Resize", [t, "", "scales"], [f"u{i}"], mode="nearest"))
        t = f"u{i}"
    nodes.append(helper.make_node("Add", ["c", t], ["y"]))
    inits = [("W", trained_like(64, 64, 1).reshape(64, 64, 1, 1)), ("scales", np.array([1, 1, 2, 2], np.float32))]
    return save(make_model(nodes, [vi("x", ["batch", 64, "height", "width"])], [vi("y", ["batch", 64, "height", "width"])], inits), path)


def _reflect(path):
    """A reflect Pad of 20 samples on the time axis: more than 16 samples needed."""
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
             helper.make_node("MatMul", ["p", "W"], ["y"], name="fc")]
    inits = [("pads", np.array([0, 20, 0, 0, 20, 0], np.int64)), ("W", trained_like(64, 64, 2))]
    return save(make_model(nodes, [vi("x", ["batch", "time", 64])], [vi("y", ["batch", "padded", 64])], inits), path)


def _fixed_length(path, **meta):
    """A learned table of 50 positions added after the MatMul: only time = 50 (or 1) runs."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"), helper.make_node("Add", ["h", "pos"], ["y"])]
    inits = [("W", trained_like(64, 64, 3)), ("pos", np.ones((1, 50, 64), np.float32))]
    m = make_model(nodes, [vi("x", ["batch", "time", 64])], [vi("y", ["batch", 50, 64])], inits)
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    return save(m, path)


def _batch_one(path):
    """Squeezes the batch axis: only batch 1 runs."""
    nodes = [helper.make_node("Squeeze", ["x", "axes"], ["s"]), helper.make_node("MatMul", ["s", "W"], ["y"], name="fc")]
    inits = [("axes", np.array([0], np.int64)), ("W", trained_like(64, 64, 4))]
    return save(make_model(nodes, [vi("x", ["batch", "time", 64])], [vi("y", ["time", 64])], inits), path)


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def one_line(r, match: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("lrcompile: error:"), r.stderr
    assert "Traceback" not in r.stderr and match in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("build, shape", [(_pyramid, (2, 64, 32, 32)), (_reflect, (2, 32, 64)),
                                          (_batch_one, (1, 16, 64))])
def test_shapes_found_where_the_defaults_fail(tmp_path, build, shape):
    src = build(tmp_path / "m.onnx")
    runs = original_runner(src)
    model = onnx.load(str(src))
    assert runs(random_feeds(model)) is not None  # the original fails at the defaults
    res = lrcompile.compile(src, tmp_path / "o.onnx", rank=64, multiple=1, min_params=0, keep_unprofitable=True)
    assert res.feeds["inputs"]["x"]["shape"] == list(shape)
    note = next(n for n in res.report["notes"] if n.startswith("verification inputs at"))
    assert "the original model fails in ONNX Runtime at the default dims" in note and "\n" not in note
    assert all(d["rel_l2"] <= 1e-5 for d in res.verification)


def test_defaults_kept_where_they_fit(tmp_path):
    src = _pyramid(tmp_path / "m.onnx", levels=3)  # multiples of 8: 16 fits
    model = onnx.load(str(src))
    calls = []
    fitted = fit_feeds(model, lambda f: calls.append(f) or None)
    assert len(calls) == 1 and fitted.note is None and fitted.dims == {"batch": 2, "height": 16, "width": 16}
    want = random_feeds(model)
    assert all(np.array_equal(fitted.feeds[k], want[k]) for k in want)
    res = lrcompile.compile(src, tmp_path / "o.onnx", ratio=0.5)
    assert res.feeds["inputs"]["x"]["shape"] == [2, 64, 16, 16]
    assert not any(n.startswith("verification inputs") for n in res.report["notes"])


def test_metadata_size_tried_first(tmp_path):
    src = _fixed_length(tmp_path / "m.onnx", input_size="50")
    res = lrcompile.compile(src, tmp_path / "o.onnx", ratio=0.5)
    assert res.feeds["inputs"]["x"]["shape"] == [2, 50, 64]
    assert "2 shapes tried" in next(n for n in res.report["notes"] if n.startswith("verification inputs"))


def test_no_shape_fits_one_line(tmp_path):
    src = _fixed_length(tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    line = one_line(cli(src, "-o", out, "--ratio", "0.5"), "the ORIGINAL model fails in ONNX Runtime on every input shape tried")
    for part in ("x [2, 16, 64]", "then time at 16, 32, 64, 128", "640 with batch at 2, 1", "--dim NAME=INT",
                 "(its dynamic dims: batch, time)", "--inputs FILE.npz", "16 by 50"):
        assert part in line, (part, line)
    assert not out.exists()


def test_user_dims_used_as_given(tmp_path):
    src = _fixed_length(tmp_path / "m.onnx")
    res = lrcompile.compile(src, tmp_path / "o.onnx", ratio=0.5, dims={"time": 50, "batch": 3})
    assert res.feeds["inputs"]["x"]["shape"] == [3, 50, 64]
    line = one_line(cli(src, "-o", tmp_path / "o2.onnx", "--dim", "time=40", "--dim", "batch=2"),
                    "the ORIGINAL model fails in ONNX Runtime on the shapes from --dim time=40, --dim batch=2")
    assert "x [2, 40, 64]" in line and "--dim NAME=INT" in line
    # a partial --dim: the rest is searched, the given value is kept
    line = one_line(cli(src, "-o", tmp_path / "o3.onnx", "--dim", "time=40"), "on every input shape tried")
    assert "given: --dim time=40" in line


def test_user_inputs_that_the_original_rejects(tmp_path):
    src = _reflect(tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 12, 64), np.float32))
    line = one_line(cli(src, "-o", tmp_path / "o.onnx", "--inputs", tmp_path / "in.npz"),
                    "the ORIGINAL model fails in ONNX Runtime on the inputs of --inputs")
    assert "x [2, 12, 64]" in line and "pass inputs it accepts with --inputs" in line


def test_not_required_keeps_the_defaults(tmp_path):
    src = _fixed_length(tmp_path / "m.onnx")
    model = onnx.load(str(src))
    fitted = fit_feeds(model, original_runner(src), required=False)
    assert fitted.feeds["x"].shape == (2, 16, 64)
    with pytest.raises(LrcError, match="every input shape tried"):
        fit_feeds(model, original_runner(src))


@pytest.mark.parametrize("value", ["0", "-1"])
def test_dim_must_be_positive(tmp_path, value):
    src = _reflect(tmp_path / "m.onnx")
    one_line(cli(src, "-o", tmp_path / "o.onnx", "--dim", f"batch={value}"), "the value must be a positive integer")
