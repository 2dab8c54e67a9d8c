"""No traceback, ever: the CLI's guard (lrcompile.cli._run) on every command.

User errors stay one line (exit 2); a place that cannot be written is one of them, with its own
line; anything else is an internal error: one line naming the stage and node, the traceback saved
to a log file, exit 4, and no output file.
"""
from __future__ import annotations

import dataclasses
import errno
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from onnx import helper

import lrcompile
import lrcompile.pipeline as pipeline
from helpers import make_model, save, trained_like, vi
from lrcompile.cli import main

LINE = re.compile(r"^lrcompile: internal error in (?P<stage>[\w-]+)(?: on (?P<node>.+?))?: (?P<msg>.+); "
                  r"details saved to (?P<path>\S+); please report it$")


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


@pytest.fixture()
def mlp(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    inits = [("W1", trained_like(128, 256, 1)), ("W2", trained_like(256, 64, 2))]
    d = tmp_path / "in"
    d.mkdir()
    return save(make_model(nodes, [vi("x", ["batch", 128])], [vi("y", ["batch", 64])], inits), d / "mlp.onnx")


def stderr_lines(r) -> list[str]:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    return [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]


def internal_error(r) -> re.Match:
    """The run ended in exactly one internal-error line, exit 4, and its log holds the traceback."""
    assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
    lines = stderr_lines(r)
    assert len(lines) == 1, lines
    m = LINE.match(lines[0])
    assert m, lines[0]
    log = Path(m["path"]).read_text()
    assert "Traceback (most recent call last)" in log and m["msg"].split(":")[0] in log
    return m


def user_error(r, match: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = stderr_lines(r)
    assert len(lines) == 1 and lines[0].startswith("lrcompile: error: "), lines
    assert match in lines[0], lines[0]
    return lines[0]


def nothing_written(folder: Path) -> None:
    """No output, no temporary folder, no probe file left in ``folder``."""
    assert [p.name for p in folder.iterdir()] == [], list(folder.iterdir())


def _raise(exc):
    def run(*_a, **_k):
        raise exc
    return run


def _with_stage(monkeypatch, name: str, exc: Exception) -> None:
    monkeypatch.setattr(pipeline, "STAGES", tuple(dataclasses.replace(s, run=_raise(exc)) if s.name == name else s
                                                  for s in pipeline.STAGES))


# ------------------------------------------------------------------------------------ internal errors


def test_internal_error_in_a_stage(tmp_path, mlp, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    _with_stage(monkeypatch, "measure", RuntimeError("injected\nover two lines"))
    r = cli(mlp, "-o", out / "o.onnx", "--ratio", "0.5", "--report", out / "r.json")
    m = internal_error(r)
    assert m["stage"] == "measure" and m["node"] is None
    assert m["msg"] == "RuntimeError: injected over two lines"
    # the log: where, what was typed, the traceback; in $LRCOMPILE_CACHE_DIR/errors (conftest sets it)
    log = Path(m["path"])
    assert log.parent == tmp_path / "lrcompile-cache" / "errors"
    text = log.read_text()
    assert "stage: measure" in text and "versions: lrcompile" in text and "RuntimeError: injected" in text
    nothing_written(out)


def test_internal_error_in_a_form_names_the_node(tmp_path, mlp, monkeypatch):
    from lrcompile.forms.lowrank import LowRankForm

    out = tmp_path / "out"
    monkeypatch.setattr(LowRankForm, "emit", _raise(ValueError("emit exploded")))
    m = internal_error(cli(mlp, "-o", out / "o.onnx", "--ratio", "0.5", "-q"))
    assert m["stage"] == "factorize"
    assert m["node"] == "fc1 (matmul pass, lowrank form)"
    assert m["msg"] == "ValueError: emit exploded"
    assert "node: fc1 (matmul pass, lowrank form)" in Path(m["path"]).read_text()
    assert not (out / "o.onnx").exists()


def test_internal_error_while_writing_leaves_no_output(tmp_path, mlp, monkeypatch):
    """After the model is written, checked and verified, a failure in the target step or the report
    leaves nothing: the files move into place last."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(pipeline, "build_report", _raise(KeyError("totals")))
    m = internal_error(cli(mlp, "-o", out / "o.onnx", "--ratio", "0.5", "-q"))
    assert m["stage"] == "write" and m["msg"] == "KeyError: 'totals'"
    nothing_written(out)


def test_api_keeps_the_exception_and_notes_the_stage(tmp_path, mlp, monkeypatch):
    _with_stage(monkeypatch, "analyze", RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom") as e:
        lrcompile.compile(mlp, tmp_path / "o.onnx", ratio=0.5)
    assert e.value.lrcompile_stage == "analyze"


def test_internal_error_in_inspect_and_bench(tmp_path, mlp, monkeypatch):
    import lrcompile.bench
    import lrcompile.inspection

    monkeypatch.setattr(lrcompile.inspection, "inspect_model", _raise(IndexError("list index out of range")))
    m = internal_error(cli("inspect", mlp))
    assert m["stage"] == "inspect" and m["msg"] == "IndexError: list index out of range"
    monkeypatch.setattr(lrcompile.bench, "load_dataset", _raise(ZeroDivisionError("division by zero")))
    m = internal_error(cli("bench", mlp.parent, "-o", tmp_path / "bench", "--no-plots", "--no-trt"))
    assert m["stage"] == "bench"


def test_log_folder_unwritable(tmp_path, mlp, monkeypatch):
    import lrcompile.errors

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(lrcompile.errors, "details_dir", lambda: [blocker / "errors"])
    _with_stage(monkeypatch, "measure", RuntimeError("boom"))
    r = cli(mlp, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "-q")
    assert r.returncode == 4
    line, = stderr_lines(r)
    assert line.startswith("lrcompile: internal error in measure: RuntimeError: boom; details could not be saved (")
    assert line.endswith("; please report it")


# --------------------------------------------------------------------------------- unwritable places


def test_output_folder_under_a_file(tmp_path, mlp):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    line = user_error(cli(mlp, "-o", blocker / "sub" / "o.onnx", "--ratio", "0.5"), "cannot write to")
    assert line == (f"lrcompile: error: cannot write to {blocker / 'sub'}: a part of the path is a file, not a "
                    "folder; choose another -o")
    assert blocker.read_text().startswith("a file")


def test_report_under_a_file_fails_before_compiling(tmp_path, mlp):
    blocker = tmp_path / "rep"
    blocker.write_text("")
    user_error(cli(mlp, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--report", blocker / "r.json"),
               "; choose another --report")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("err,reason,hint", [
    (errno.EACCES, "permission denied", "choose another -o"),
    (errno.EROFS, "read-only file system", "choose another -o"),
    (errno.ENOSPC, "no space left on device", "free some space or choose another -o"),
])
def test_write_errors_late_in_the_compile(tmp_path, mlp, monkeypatch, err, reason, hint):
    """The atomic temporary folder cannot be made or written (as root, chmod does not stop a write,
    so the error is injected where the OS would raise it)."""
    import lrcompile.io as io

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(io.tempfile, "mkdtemp", _raise(OSError(err, "injected", str(out / ".o.onnx.x"))))
    line = user_error(cli(mlp, "-o", out / "o.onnx", "--ratio", "0.5", "-q"), reason)
    assert line == f"lrcompile: error: cannot write to {out}: {reason}; {hint}"
    nothing_written(out)


def test_disk_full_while_writing_the_model(tmp_path, mlp, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(pipeline, "write_model", _raise(OSError(errno.ENOSPC, "No space left on device")))
    user_error(cli(mlp, "-o", out / "o.onnx", "--ratio", "0.5", "-q"), "no space left on device; free some space")
    nothing_written(out)


def test_report_write_fails_late(tmp_path, mlp, monkeypatch):
    """The report's folder passes the early check but the write fails: one line, no partial report."""
    import lrcompile.cli as cli_mod

    real = cli_mod._write_text

    def full(path, text, option):
        if option == "--report":
            raise cli_mod.write_error(OSError(errno.ENOSPC, "No space left on device"), path, option)
        return real(path, text, option)

    monkeypatch.setattr(cli_mod, "_write_text", full)
    rep = tmp_path / "r.json"
    user_error(cli(mlp, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "-q", "--report", rep), "--report")
    assert not rep.exists()


def test_report_is_written_atomically(tmp_path, mlp):
    rep = tmp_path / "reports" / "deep" / "r.json"
    r = cli(mlp, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "-q", "--report", rep)
    assert r.returncode == 0, r.stderr
    assert rep.is_file() and [p.name for p in rep.parent.iterdir()] == ["r.json"]


def test_generic_write_error_elsewhere_is_a_user_error(tmp_path, mlp, monkeypatch):
    """A write error the compile did not name (here: inside a stage) still gets one user-error line."""
    _with_stage(monkeypatch, "evidence", PermissionError(errno.EACCES, "Permission denied", "/somewhere/x.bin"))
    line = user_error(cli(mlp, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "-q"), "/somewhere/x.bin")
    assert line == "lrcompile: error: cannot access /somewhere/x.bin: permission denied; choose another path"
