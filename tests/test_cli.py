"""The command line: each bad input gives one line and an exit code, and leaves no output file.

The commands run in-process (click's runner); two tests run the installed ``lrcompile`` entry
point in a subprocess, since that is what users type.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from helpers import make_model, save, trained_like, vi
from lrcompile.cli import main


def cli(*args):
    """``lrcompile ARGS`` in this process: returncode, stdout and stderr as a subprocess gives them."""
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def entry_point(*args):
    """The installed ``lrcompile`` script (``python -m lrcompile.cli`` where it is not on the PATH)."""
    exe = Path(sys.executable).with_name("lrcompile")
    exe = str(exe) if exe.is_file() else shutil.which("lrcompile")
    cmd = [exe] if exe else [sys.executable, "-m", "lrcompile.cli"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture()
def mlp(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    inits = [("W1", trained_like(128, 256, 1)), ("W2", trained_like(256, 64, 2))]
    return save(make_model(nodes, [vi("x", ["batch", 128])], [vi("y", ["batch", 64])], inits), tmp_path / "mlp.onnx")


def one_line_error(r, code=2, match=""):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("lrcompile: error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert match in lines[0], lines[0]


def test_entry_point_help():
    r = entry_point("--help")
    assert r.returncode == 0, r.stderr
    assert "inspect" in r.stdout and "compile" in r.stdout
    r = entry_point("compile", "--help")
    assert r.returncode == 0 and "--latency-aware / --size-only" in r.stdout and "[default: 4096]" in r.stdout


def test_compile_default_command_and_report(tmp_path, mlp):
    """Through the installed entry point; the replay runs in-process, and must give the same bytes."""
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = entry_point(mlp, "-o", out, "--ratio", "0.5", "--report", rep, "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "PASSED"
    report = json.loads(rep.read_text())
    assert report["config"]["ratio"] == 0.5 and report["totals"]["factorized"] == 2
    assert report["output_sha256"] and report["verification"]["outputs"][0]["name"] == "y"
    # replay from the report gives the byte-identical file
    out2 = tmp_path / "o2.onnx"
    r2 = cli("compile", mlp, "-o", out2, "--config", rep, "-q")
    assert r2.returncode == 0, r2.stderr
    assert out2.read_bytes() == out.read_bytes()


def test_table_output(tmp_path, mlp):
    r = cli(mlp, "-o", tmp_path / "o.onnx", "--rank", "32")
    assert r.returncode == 0, r.stderr
    assert "fc1" in r.stdout and "factorized" in r.stdout and "rel L2" in r.stdout
    assert "\nverdict: default check (no --tolerance/--min-cosine)" in r.stdout  # which rule judged it


def test_inspect_writes_nothing(tmp_path, mlp):
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cli("inspect", mlp)
    assert r.returncode == 0, r.stderr
    assert "fc1" in r.stdout and "break-even" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_tolerance_failure_exit_code_and_no_output(tmp_path, mlp):
    out = tmp_path / "o.onnx"
    r = cli(mlp, "-o", out, "--rank", "8", "--tolerance", "1e-6", "-q")
    one_line_error(r, code=3, match="--tolerance")
    assert r.stdout.strip().splitlines()[-1] == "FAILED"
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mlp.onnx"]
    # the report still says what failed
    rep = tmp_path / "r.json"
    r = cli(mlp, "-o", out, "--rank", "8", "--tolerance", "1e-6", "-q", "--report", rep)
    assert r.returncode == 3 and not out.exists()
    report = json.loads(rep.read_text())
    assert report["status"] == "FAILED" and report["output"] is None


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"this is not an onnx file at all" * 10, "not a readable ONNX model"),
])
def test_garbage_files(tmp_path, content, match):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    one_line_error(cli(bad, "-o", tmp_path / "o.onnx"), match=match)
    assert not (tmp_path / "o.onnx").exists()


def test_truncated_file(tmp_path, mlp):
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(mlp.read_bytes()[: mlp.stat().st_size // 2])
    one_line_error(cli(bad, "-o", tmp_path / "o.onnx"), match="truncated")
    assert not (tmp_path / "o.onnx").exists()


def test_missing_file(tmp_path):
    one_line_error(cli(tmp_path / "nope.onnx"), match="no such file")


def _external(tmp_path, location):
    w = trained_like(128, 128, 3)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [vi("x", [2, 128])],
                   [vi("y", [2, 128])], [("W", w)])
    d = tmp_path / "model"
    d.mkdir()
    onnx.save(m, str(d / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    return d / "m.onnx"


def test_missing_external_data(tmp_path):
    p = _external(tmp_path, "m.data")
    (p.parent / "m.data").unlink()
    one_line_error(cli(p, "-o", tmp_path / "o.onnx"), match="missing")


def test_external_data_escaping_folder(tmp_path):
    p = _external(tmp_path, "m.data")
    m = onnx.load(str(p), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    p.write_bytes(m.SerializeToString())
    one_line_error(cli(p, "-o", tmp_path / "o.onnx"), match="outside the model's folder")


def test_external_data_model_compiles_and_keeps_input(tmp_path):
    p = _external(tmp_path, "m.data")
    before = {f.name: f.read_bytes() for f in p.parent.iterdir()}
    out = tmp_path / "out" / "c.onnx"
    r = cli(p, "-o", out, "--rank", "16", "--external-data", "-q")
    assert r.returncode == 0, r.stderr
    assert (out.parent / "c.onnx.data").is_file()
    assert {f.name: f.read_bytes() for f in p.parent.iterdir()} == before


def test_unsupported_opset(tmp_path):
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", [2, 64])], [vi("y", [2, 64])],
                   [("W", trained_like(64, 64))], opset=6)  # 7 to 10 are converted (tests/test_old_models.py)
    p = tmp_path / "old.onnx"
    onnx.save(m, str(p))
    one_line_error(cli(p, "-o", tmp_path / "o.onnx"), match="opset 6")


def test_no_candidates(tmp_path):
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 4])], [vi("y", [2, 4])])
    p = save(m, tmp_path / "relu.onnx")
    one_line_error(cli(p, "-o", tmp_path / "o.onnx"), match="nothing to compress")
    assert not (tmp_path / "o.onnx").exists()


def test_never_overwrites_input(tmp_path, mlp):
    before = mlp.read_bytes()
    one_line_error(cli(mlp, "-o", mlp), match="never overwrites")
    assert mlp.read_bytes() == before


@pytest.mark.parametrize("args,match", [
    (["--ratio", "1.5"], "ratio"),
    (["--rank", "8", "--ratio", "0.5"], "exactly one"),
    (["--exclude", "("], "pattern"),
    (["--only", "Softmax"], "unsupported op"),
    (["--method", "magic"], "unknown method"),
    (["--dim", "batch"], "NAME=INT"),
    (["--latency-batches", "1,x"], "comma-separated integers"),
    (["--method-option", "damping"], "KEY=VALUE"),
    (["--prune-mlp", "most"], "--prune-mlp 'most'"),
])
def test_bad_options(tmp_path, mlp, args, match):
    one_line_error(cli(mlp, "-o", tmp_path / "o.onnx", *args), match=match)


def test_bad_inputs_file(tmp_path, mlp):
    np.savez(tmp_path / "wrong.npz", other=np.zeros((2, 128), np.float32) + 1)
    one_line_error(cli(mlp, "-o", tmp_path / "o.onnx", "--inputs", tmp_path / "wrong.npz"), match="missing ['x']")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}], dtype=object))
    one_line_error(cli(mlp, "-o", tmp_path / "o.onnx", "--inputs", tmp_path / "pickled.npz"), match="pickle")


def test_user_inputs_npz_and_polygraphy_json(tmp_path, mlp):
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    r = cli(mlp, "-o", tmp_path / "a.onnx", "--inputs", tmp_path / "in.npz", "--report", tmp_path / "a.json", "-q")
    assert r.returncode == 0, r.stderr
    from polygraphy.json import save_json

    save_json([{"x": x}, {"x": x[:1]}], str(tmp_path / "in.json"))
    r = cli(mlp, "-o", tmp_path / "b.onnx", "--inputs", tmp_path / "in.json", "--report", tmp_path / "b.json", "-q")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "b.json").read_text())
    assert rep["verification"]["feeds"]["batches"] == 2
    assert rep["verification"]["outputs"][0]["shape"] == [4, 64]


def test_target_ort_reports_latency_and_writes_optimized_model(tmp_path, mlp):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    # --size-only: this toy's layers take microseconds, and factorized they are not faster, so the
    # latency-aware default of --target ort would keep every one dense (tests/test_planner.py)
    r = cli(mlp, "-o", out, "--target", "ort", "--rank", "32", "--size-only", "--report", rep)
    assert r.returncode == 0, r.stderr
    assert "ORT latency" in r.stdout and "speedup" in r.stdout
    lat = json.loads(rep.read_text())["target"]["latency"]
    assert lat["original"]["median_ms"] > 0 and lat["compressed"]["median_ms"] > 0
    assert (tmp_path / "o.ort.onnx").is_file()


@pytest.mark.trt
def test_target_trt_fp16_with_shapes(tmp_path, mlp):
    out = tmp_path / "o.onnx"
    r = cli(mlp, "-o", out, "--target", "trt", "--rank", "32", "--fp16", "--shapes", "x:[1,128],[4,128],[8,128]", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.engine").stat().st_size > 0 and out.is_file()


def test_exclude_and_only_select_nodes(tmp_path, mlp):
    rep = tmp_path / "r.json"
    r = cli(mlp, "-o", tmp_path / "o.onnx", "--rank", "32", "--exclude", "^fc2$", "--report", rep, "-q")
    assert r.returncode == 0, r.stderr
    layers = {x["node"]: x for x in json.loads(rep.read_text())["layers"]}
    assert layers["fc1"]["decision"] == "factorized"
    assert layers["fc2"]["decision"] == "declined" and "--exclude" in layers["fc2"]["reason"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node]
    assert ops.count("MatMul") == 3
    r = cli(mlp, "-o", tmp_path / "p.onnx", "--rank", "32", "--only", "Gemm", "-q")
    one_line_error(r, match="every candidate was declined")
