"""The verdict (lrcompile.verdict) on hand-made comparisons, and through a compile: broken outputs
fail by default, lossy ones pass, NaN in the original is UNVERIFIED, user limits keep their meaning."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from onnx import helper

import lrcompile
from helpers import make_model, save, trained_like, vi
from click.testing import CliRunner
from lrcompile.cli import main
from lrcompile.errors import VerificationFailed
from lrcompile.verdict import judge
from lrcompile.verify import diff_outputs


def diff(got, ref, name="y"):
    return diff_outputs(name, np.asarray(got), np.asarray(ref)).to_dict()


RNG = np.random.default_rng(0)
REF = RNG.standard_normal((4, 32)).astype(np.float32)


def test_lossy_but_correlated_passes_by_default():
    """Heavy lossy error (rel L2 > 1) with a positive cosine is not broken: PASSED."""
    got = 0.3 * REF + RNG.standard_normal(REF.shape).astype(np.float32)
    d = diff(got, REF)
    assert d["rel_l2"] > 1 and 0 < d["cosine"] < 0.5
    v = judge([d])
    assert v.status == "PASSED" and v.rule == "default" and not v.failures
    assert "cosine > 0" in v.description and "not limited" in v.description


@pytest.mark.parametrize("got,match", [
    (np.zeros_like(REF), "same for all 4 samples"),                      # all zeros: rel L2 exactly 1
    (np.full_like(REF, 0.5), "no longer depends on the input"),          # a constant (bias alone)
    (np.tile(REF[:1], (4, 1)), "no longer depends on the input"),        # every sample the same
    (-REF, "cosine -1 <= 0"),                                             # sign flipped
])
def test_broken_outputs_fail_by_default(got, match):
    v = judge([diff(got, REF)])
    assert v.status == "FAILED", v
    assert match in v.failures[0], v.failures


def test_constant_without_batch_axis():
    ref = np.linspace(-1, 1, 16).astype(np.float32)
    v = judge([diff(np.full_like(ref, 0.25), ref)])
    assert v.status == "FAILED" and "is constant while the original's values span 2" in v.failures[0]


def test_nonfinite_compressed_fails():
    got = REF.copy()
    got[0, :3] = np.nan
    got[1, 0] = np.inf
    v = judge([diff(got, REF)])
    assert v.status == "FAILED"
    assert "holds 3 NaN and 1 Inf of 128 values where the original's are all finite" in v.failures[0]


def test_nonfinite_original_is_unverified_not_passed():
    ref = REF.copy()
    ref[0, 0] = np.nan
    d = diff(ref, ref)  # even an identical output: NaN in the original cannot be compared
    v = judge([d])
    assert v.status == "UNVERIFIED" and not v.failures
    assert "the original's output 'y' holds 1 NaN of 128 values" in v.unverified[0]
    assert "--inputs" in v.unverified[0]
    # with a user limit it cannot be shown to hold: FAILED, as a NaN failed the limit before
    v = judge([d], tolerance=0.1)
    assert v.status == "FAILED" and "the original's output 'y' holds 1 NaN" in v.failures[0]


def test_user_limits_keep_their_meaning():
    got = REF + 0.1 * RNG.standard_normal(REF.shape).astype(np.float32)
    d = diff(got, REF)
    assert judge([d], tolerance=0.5).status == "PASSED"
    v = judge([d], tolerance=1e-6)
    assert v.status == "FAILED" and v.rule == "limits"
    assert v.failures == [f"output 'y' rel L2 error {d['rel_l2']:.3e} > --tolerance 1e-06"]
    v = judge([d], min_cosine=0.99999)
    assert v.failures == [f"output 'y' cosine {d['cosine']:.6f} < --min-cosine 0.99999"]
    assert "--min-cosine 0.99999" in v.description
    # and a broken output still fails under a loose limit
    assert judge([diff(np.full_like(REF, 0.5), REF)], min_cosine=0.1).status == "FAILED"


def test_integer_outputs_are_not_judged_by_default():
    ref = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    assert judge([diff(ref, ref, "idx")]).status == "PASSED"  # identical: checked
    v = judge([diff(ref[:, ::-1].copy(), ref, "idx")])
    assert v.status == "UNVERIFIED" and v.outputs[0].status == "unjudged"
    assert "no output could be judged" in v.unverified[0]
    # next to a judged float output, an unjudged integer output does not hold the verdict back
    v = judge([diff(REF, REF), diff(ref[:, ::-1].copy(), ref, "idx")])
    assert v.status == "PASSED" and v.outputs[1].status == "unjudged"


def test_constant_original_identical_passes_and_different_is_unjudged():
    z = np.zeros((2, 8), np.float32)
    assert judge([diff(z, z)]).status == "PASSED"
    v = judge([diff(z + 1e-3, z), diff(REF, REF, "other")])
    assert v.status == "PASSED" and v.outputs[0].status == "unjudged"


def test_no_verification():
    v = judge(None)
    assert v.status == "UNVERIFIED" and v.rule == "none"


# -------------------------------------------------------------------------------------- compiles


def _model(tmp_path, weight, name="m.onnx", extra_nodes=(), out="y"):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"), *extra_nodes]
    if not extra_nodes:
        nodes.append(helper.make_node("Identity", ["h"], [out]))
    return save(make_model(nodes, [vi("x", ["batch", weight.shape[0]])], [vi(out, ["batch", weight.shape[1]])],
                           [("W", weight)]), tmp_path / name)


def test_compile_lossy_passes_and_reports_the_rule(tmp_path):
    p = _model(tmp_path, trained_like(128, 128, 5))
    res = lrcompile.compile(p, tmp_path / "o.onnx", rank=8)
    assert res.status == "PASSED" and (tmp_path / "o.onnx").is_file()
    v = res.report["verification"]["verdict"]
    assert v["rule"] == "default" and v["status"] == "PASSED" and v["outputs"][0]["status"] == "passed"
    out = res.report["verification"]["outputs"][0]
    assert out["nonfinite"] == {"original": {"nan": 0, "inf": 0}, "compressed": {"nan": 0, "inf": 0}}
    assert out["variation"]["original"] > 0 and out["dtype"] == "float32"


def test_compile_with_nan_in_the_original_is_unverified(tmp_path):
    """log(x) on N(0,1) inputs is NaN for half of them: the original's output cannot be compared."""
    w = trained_like(64, 64, 2)
    nodes = [helper.make_node("Log", ["h"], ["y"])]
    p = _model(tmp_path, w, extra_nodes=nodes)
    res = lrcompile.compile(p, tmp_path / "o.onnx", rank=16)
    assert res.status == "UNVERIFIED" and (tmp_path / "o.onnx").is_file()
    v = res.report["verification"]["verdict"]
    assert v["outputs"][0]["status"] == "unverified" and "NaN" in v["outputs"][0]["reasons"][0]
    assert any("holds" in n and "NaN" in n for n in res.report["notes"])
    with pytest.raises(VerificationFailed, match="the original's output 'y' holds"):
        lrcompile.compile(p, tmp_path / "p.onnx", rank=16, tolerance=10.0)
    assert not (tmp_path / "p.onnx").exists()


def test_compile_broken_output_fails_with_no_output(tmp_path, monkeypatch):
    """A compressed model whose output became all zeros fails by default: exit 3, nothing written."""
    import lrcompile.verify as verify

    real = verify.run_model

    def zeroed(path, feeds):  # the compressed model's outputs forced to zeros (the PP-OCR case)
        outs = real(path, feeds)
        return [{k: np.zeros_like(v) for k, v in o.items()} for o in outs] if "o.onnx" in str(path) else outs

    monkeypatch.setattr(verify, "run_model", zeroed)
    p = _model(tmp_path, trained_like(128, 128, 5))
    with pytest.raises(VerificationFailed) as e:
        lrcompile.compile(p, tmp_path / "o.onnx", rank=8)
    assert "same for all 2 samples" in str(e.value) and "broken, not merely lossy" in str(e.value)
    assert not (tmp_path / "o.onnx").exists()
    rep = e.value.result.report
    assert rep["status"] == "FAILED" and rep["output"] is None
    assert json.loads(json.dumps(rep["verification"]["verdict"]))["outputs"][0]["status"] == "failed"


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def test_cli_says_unverified_and_why(tmp_path):
    p = _model(tmp_path, trained_like(64, 64, 2), extra_nodes=[helper.make_node("Log", ["h"], ["y"])])
    r = cli(p, "-o", tmp_path / "o.onnx", "--rank", "16", "-q")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "UNVERIFIED"
    assert lines[-2].startswith("UNVERIFIED: the original's output 'y' holds ") and "NaN" in lines[-2]
    assert (tmp_path / "o.onnx").is_file()


def test_cli_broken_output_fails_with_one_line(tmp_path, monkeypatch):
    import lrcompile.verify as verify

    real = verify.run_model
    monkeypatch.setattr(verify, "run_model", lambda path, feeds: [
        {k: np.zeros_like(v) for k, v in o.items()} for o in real(path, feeds)] if "o.onnx" in str(path)
        else real(path, feeds))
    p = _model(tmp_path, trained_like(128, 128, 5))
    r = cli(p, "-o", tmp_path / "o.onnx", "--rank", "8", "-q", "--report", tmp_path / "r.json")
    assert r.returncode == 3 and r.stdout.strip().splitlines()[-1] == "FAILED"
    line, = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert line.startswith("lrcompile: error: verification FAILED: output 'y' is the same for all 2 samples")
    assert not (tmp_path / "o.onnx").exists()
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["verdict"]["rule"] == "default"
