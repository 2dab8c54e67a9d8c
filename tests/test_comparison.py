"""``lrcompile compare``: the same verdict as the compile's own verification on a test-bed pair,
Polygraphy's tolerance semantics, exit codes, and the printed ``polygraphy run`` lines run as printed."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import lrcompile
from lrcompile.cli import main
from lrcompile.comparison import CompareOptions, compare_models

ROOT = Path(__file__).resolve().parents[1]
POLYGRAPHY = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The test bed's tiny-mlp and its compile at ratio 0.5 (plain SVD), with the compile's report."""
    tmp = tmp_path_factory.mktemp("pair")
    build = tmp / "tiny"
    subprocess.run([sys.executable, str(ROOT / "models" / "build.py"), "tiny-mlp", "--out", str(build), "--fast"],
                   check=True, capture_output=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    src, out = build / "model.onnx", tmp / "model.lr.onnx"
    res = lrcompile.compile(src, out, ratio=0.5)
    return src, out, res, build


def test_same_numbers_and_verdict_as_the_compile(pair):
    src, out, res, _ = pair
    cmp = compare_models(src, out, CompareOptions(repeats=3))
    assert cmp.status == res.status == "PASSED"
    (ort,) = cmp.runners
    (mine,), (theirs,) = ort.outputs, res.verification
    for k in ("rel_l2", "cosine", "max_abs"):  # the same inputs (seed 0), so the same metrics
        assert mine[k] == pytest.approx(theirs[k], rel=1e-6), k
    rel = theirs["rel_l2"]
    assert 0.05 < rel < 5  # a lossy compile: a real error to judge
    # a tolerance below the error: the compile fails (nothing written), and so does compare
    with pytest.raises(lrcompile.VerificationFailed):
        lrcompile.compile(src, out.with_name("never.onnx"), ratio=0.5, tolerance=rel * 0.9)
    assert not out.with_name("never.onnx").exists()
    assert compare_models(src, out, CompareOptions(tolerance=rel * 0.9, repeats=0)).status == "FAILED"
    assert compare_models(src, out, CompareOptions(tolerance=rel * 1.1, repeats=0)).status == "PASSED"
    assert compare_models(src, out, CompareOptions(min_cosine=mine["cosine"] + 1e-3, repeats=0)).status == "FAILED"


def test_polygraphy_tolerances_decide_once_given(pair):
    src, out, _, _ = pair
    cmp = compare_models(src, out, CompareOptions(repeats=0))
    p = cmp.runners[0].outputs[0]["polygraphy"]
    assert not p["passed"] and cmp.status == "PASSED"  # reported at Polygraphy's defaults, not judged
    assert p["max_absdiff"] == pytest.approx(cmp.runners[0].outputs[0]["max_abs"], rel=1e-6)
    above, below = p["max_absdiff"] * 1.01, p["max_absdiff"] * 0.99
    assert compare_models(src, out, CompareOptions(atol=above, repeats=0)).status == "PASSED"
    failed = compare_models(src, out, CompareOptions(atol=below, repeats=0))
    assert failed.status == "FAILED" and failed.runners[0].verdict["polygraphy"]["failed_outputs"] == ["logits"]
    # "mean" checks the mean absolute error: between mean and max it passes where elemwise fails
    mid = (p["mean_absdiff"] + p["max_absdiff"]) / 2
    assert compare_models(src, out, CompareOptions(atol=mid, check_error_stat="mean", repeats=0)).status == "PASSED"
    assert compare_models(src, out, CompareOptions(atol=mid, repeats=0)).status == "FAILED"


def test_latency_of_both_models(pair):
    src, out, _, _ = pair
    lat = compare_models(src, out, CompareOptions(warmup=1, repeats=5)).runners[0].latency
    assert lat["original"]["runs"] == lat["compressed"]["runs"] == 5
    assert lat["original"]["median_ms"] > 0 and lat["compressed"]["median_ms"] > 0
    assert lat["speedup"] == pytest.approx(lat["original"]["median_ms"] / lat["compressed"]["median_ms"])


def test_cli_table_json_exit_codes_and_runnable_polygraphy_lines(pair, tmp_path):
    src, out, res, _ = pair
    rel = res.verification[0]["rel_l2"]
    inputs, report = tmp_path / "in.json", tmp_path / "cmp.json"
    r = CliRunner().invoke(main, ["compare", str(src), str(out), "--save-inputs", str(inputs), "--json", str(report),
                                  "--repeats", "3", "--tolerance", str(rel * 1.1)])
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith("PASSED") and "original ms" in r.output and "polygraphy run" in r.output
    data = json.loads(report.read_text())
    assert data["status"] == "PASSED" and data["runners"][0]["runner"] == "onnxrt"
    assert data["runners"][0]["outputs"][0]["rel_l2"] == pytest.approx(rel, rel=1e-6)

    r = CliRunner().invoke(main, ["compare", str(src), str(out), "--repeats", "0", "--tolerance", str(rel * 0.9)])
    assert r.exit_code == 3 and r.output.strip().endswith("FAILED")
    assert "rel L2 error" in r.output

    # the printed ORT lines, run as printed: Polygraphy's verdict on the same tolerance agrees with ours
    max_abs = data["runners"][0]["outputs"][0]["polygraphy"]["max_absdiff"]
    for atol, want in ((max_abs * 1.01, 0), (max_abs * 0.99, 1)):
        cmp = compare_models(src, out, CompareOptions(atol=atol, repeats=0, save_inputs=str(inputs)))
        assert cmp.status == ("PASSED" if want == 0 else "FAILED")
        save, load = [shlex.split(c) for c in cmp.commands if "--onnxrt" in c]
        assert save[:2] == load[:2] == ["polygraphy", "run"]
        for argv, rc in ((save, 0), (load, want)):
            p = subprocess.run(POLYGRAPHY + argv[1:], capture_output=True, text=True, cwd=ROOT)
            assert (p.returncode == 0) == (rc == 0), (argv, p.stdout[-2000:], p.stderr[-2000:])


def test_inputs_npz_json_and_data_loader_script_agree(pair, tmp_path):
    src, out, _, build = pair
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    (tmp_path / "loader.py").write_text(
        "import numpy as np\n"
        "def feeds():\n"
        f"    yield {{'x': np.load({str(tmp_path / 'x.npz')!r})['x']}}\n")
    from polygraphy.json import save_json

    save_json([{"x": x}], str(tmp_path / "x.json"))
    got = {}
    for spec in ("x.npz", "x.json", "loader.py:feeds"):
        cmp = compare_models(src, out, CompareOptions(inputs=str(tmp_path / spec), repeats=0))
        assert cmp.inputs["inputs"]["x"]["shape"] == [4, 256]
        got[spec] = cmp.runners[0].outputs[0]["rel_l2"]
    assert got["x.npz"] == got["x.json"] == got["loader.py:feeds"]
    cmd = compare_models(src, out, CompareOptions(inputs=str(tmp_path / "loader.py:feeds"), repeats=0)).commands[0]
    assert "--data-loader-script" in cmd and "loader.py:feeds" in cmd


@pytest.mark.parametrize("args, words", [
    (["missing.onnx"], "no such model file"),
    (["--inputs", "nope.npz"], "no such input file"),
    (["--check-error-stat", "max", "--atol", "-1"], "--atol must be >= 0"),
    (["--save-inputs", "in.npz"], "use a .json path"),
])
def test_bad_input_is_one_line(pair, tmp_path, args, words):
    src, out, _, _ = pair
    argv = ["compare", str(src)] + ([str(tmp_path / args[0])] if args[0].endswith(".onnx") else [str(out)])
    rest = [a if not a.endswith((".npz",)) else str(tmp_path / a) for a in args if not a.endswith(".onnx")]
    r = CliRunner().invoke(main, argv + rest + ["--repeats", "0"])
    assert r.exit_code == 2, r.output
    assert words in r.output and "Traceback" not in r.output


def test_wrong_model_pair_is_a_user_error(pair, tmp_path):
    src, _, _, _ = pair
    from lrcompile.errors import LrcError
    from helpers import make_model, save, vi

    import onnx

    other = make_model([onnx.helper.make_node("Identity", ["y"], ["z"])], [vi("y", [2, 3])], [vi("z", [2, 3])])
    with pytest.raises(LrcError, match="inputs do not match"):
        compare_models(src, save(other, tmp_path / "other.onnx"), CompareOptions(repeats=0))


def test_api_facade(pair):
    src, out, _, _ = pair
    cmp = lrcompile.compare(src, out, repeats=0, dims={})
    assert cmp.status == "PASSED" and cmp.to_dict()["polygraphy_commands"]
    with pytest.raises(lrcompile.LrcError, match="unknown compare option"):
        lrcompile.compare(src, out, ratio=0.5)


@pytest.mark.slow
@pytest.mark.torch
def test_minilm_same_verdict_as_the_compile(tmp_path):
    """The real test-bed transformer (MiniLM-L6, --fast build): compile with --plugins on its eval
    inputs, then compare on the same file: the same error, the same verdict either side of it."""
    build = tmp_path / "minilm"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "models" / "build.py"), "minilm-l6", "--out", str(build), "--fast"],
                   check=True, capture_output=True, env=env)
    src, inputs = build / "model.onnx", str(build / "eval.npz")
    res = lrcompile.compile(src, tmp_path / "m.lr.onnx", calib=str(build / "calib.npz"), ratio=0.5, only="MatMul",
                            plugins=True, inputs=inputs)
    rel = res.verification[0]["rel_l2"]
    for tol, want in ((rel * 1.05, "PASSED"), (rel * 0.95, "FAILED")):
        cmp = compare_models(src, res.output, CompareOptions(inputs=inputs, tolerance=tol, repeats=0))
        assert cmp.status == want
        assert cmp.runners[0].outputs[0]["rel_l2"] == pytest.approx(rel, rel=1e-6)


def test_asking_for_tensorrt_where_it_cannot_run_is_one_line(pair):
    from lrcompile.comparison import trt_available

    why = trt_available()
    if why is None:
        pytest.skip("TensorRT runs here")
    src, out, _, _ = pair
    r = CliRunner().invoke(main, ["compare", str(src), str(out), "--trt", "--repeats", "0"])
    assert r.exit_code == 2 and "--trt: TensorRT cannot run here" in r.output and "Traceback" not in r.output
    # without --trt the TensorRT runner is skipped with its reason, and the rest runs
    r = CliRunner().invoke(main, ["compare", str(src), str(out), "--repeats", "0"])
    assert r.exit_code == 0 and "trt runner skipped" in r.output
