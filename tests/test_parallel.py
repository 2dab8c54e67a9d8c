"""--workers N and --ray: the same units of work elsewhere, the same output bytes.

The fits, the planner's spectra and the calibration shards run in N spawned processes or as
Ray tasks; the output must be byte-identical whatever ran them. A unit that fails is retried,
then reported in one line naming its layer; an interrupt leaves no output behind.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import lrcompile
from lrcompile.cli import main as cli_main
from lrcompile.config import CompileConfig
from lrcompile.errors import LrcError
from lrcompile.parallel import InProcess, Processes, Task, TaskFailed, make_runner

ROOT = Path(__file__).resolve().parents[1]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny-transformer (fast build) with its calibration data."""
    d = tmp_path_factory.mktemp("tiny") / "tt"
    subprocess.run([sys.executable, str(ROOT / "models" / "build.py"), "tiny-transformer", "--out", str(d), "--fast"],
                   check=True, capture_output=True)
    return d


# ---------------------------------------------------------------------------------------------- runners


def square(x):
    return x * x


def slow_square(x):
    time.sleep(0.5)
    return x * x


def fails_on(x, bad):
    if x == bad:
        raise ValueError(f"unit {x} cannot be fitted")
    return x


def count_tries(x, folder):
    """Fails the first time it runs for ``x`` (a file in ``folder`` remembers), then succeeds."""
    mark = Path(folder) / f"tried-{x}"
    if not mark.exists():
        mark.write_text("1")
        raise RuntimeError("transient")
    return x


def test_results_come_back_in_task_order_whatever_finishes_first():
    tasks = [Task(f"t{i}", square, (i,)) for i in range(7)]
    with Processes(2) as pool:
        assert pool.map(tasks, what="fit") == [i * i for i in range(7)]
    assert InProcess().map(tasks, what="fit") == [i * i for i in range(7)]


def test_a_stream_read_in_part_leaves_the_pool_to_the_streams_around_it(caplog):
    """A trial built inside the stream of trials runs its fits through the same pool, and zip()
    leaves that inner stream unfinished: closing it must not stop the pool under the outer one."""
    with Processes(2) as pool:
        def outer():
            for i in range(4):
                inner = pool.imap((Task(f"fit {j}", square, (j,)) for j in range(3)), what="fit")
                assert [r for _, r in zip(range(3), inner)] == [0, 1, 4]
                del inner  # closed with GeneratorExit
                yield Task(f"trial {i}", slow_square, (i,))  # still running when the next inner stream ends
        assert list(pool.imap(outer(), what="trial")) == [0, 1, 4, 9]
    assert "retrying" not in caplog.text  # no trial lost its worker to the inner stream's end


def test_a_failing_unit_is_retried_then_named(tmp_path):
    with Processes(2) as pool:
        assert pool.map([Task(f"t{i}", count_tries, (i, str(tmp_path))) for i in range(3)], what="fit") == [0, 1, 2]
        with pytest.raises(TaskFailed, match=r"fit of layer/3 failed 2 times; last: ValueError: unit 3 cannot"):
            pool.map([Task(f"layer/{i}", fails_on, (i, 3)) for i in range(5)], what="fit")
        # the pool still serves after a failure
        assert pool.map([Task("a", square, (3,))], what="fit") == [9]


def test_options_are_checked():
    with pytest.raises(LrcError, match="--workers -1"):
        CompileConfig(workers=-1)
    with pytest.raises(LrcError, match="give one"):
        CompileConfig(workers=2, ray="auto")
    assert isinstance(make_runner(1), InProcess)


# ---------------------------------------------------------------------------------------------- compiles


CONFIGS = {
    "rank policy": {"method": "svd", "ratio": 0.5},
    # planner: calibration in 2 shards, spectra, sensitivity trials, then the fits
    "calibrated budget": {"params": 0.5, "calib_batch": 2},
    "sequential": {"sequential": True, "ratio": 0.5, "calib_batch": 2},  # shards against a reference
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_is_byte_identical_for_every_worker_count(tiny, tmp_path, name):
    opts = {**CONFIGS[name], "calib": str(tiny / "calib.npz")}
    outs = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}.onnx"
        res = lrcompile.compile(tiny / "model.onnx", out, workers=workers, **opts)
        assert res.status == "PASSED"
        assert res.report["parallel"]["workers"] == workers
        outs.append(_sha(out))
    assert len(set(outs)) == 1


def test_two_node_ray_cluster_gives_the_same_bytes(tiny, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    # every node on loopback: Ray's switch for single-machine clusters (else it binds the outward address)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray.cluster_utils import Cluster

    opts = {"calib": str(tiny / "calib.npz"), "params": 0.5}
    ref = lrcompile.compile(tiny / "model.onnx", tmp_path / "ref.onnx", **opts)
    local = {"num_cpus": 1}  # two nodes on this machine
    cluster = Cluster(initialize_head=True, head_node_args=local)
    try:
        cluster.add_node(**local)
        cluster.wait_for_nodes()
        address = cluster.address
        res = lrcompile.compile(tiny / "model.onnx", tmp_path / "ray.onnx", ray=cluster.address, **opts)
        import ray

        ray.shutdown()
    finally:
        cluster.shutdown()
    assert res.report["parallel"] == {"runner": "ray", "address": address, "nodes": 2, "cpus": 2}
    assert _sha(res.output) == _sha(ref.output)


def boom(*args):
    raise ValueError("the fit blew up")


def test_a_unit_that_fails_everywhere_is_one_line_naming_the_layer(tiny, tmp_path, monkeypatch):
    import importlib

    plan = importlib.import_module("lrcompile.engine.plan")

    monkeypatch.setattr(plan, "fit_unit", boom)  # pickled by reference: the workers run it too
    monkeypatch.setenv("LRCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "o.onnx"
    r = CliRunner().invoke(cli_main, [str(tiny / "model.onnx"), "-o", str(out), "--workers", "2", "--method", "svd"])
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    assert "fit of " in lines[0] and "failed 2 times; last: ValueError: the fit blew up" in lines[0]
    assert "details saved to" in lines[0] and "Traceback" not in r.output
    assert not out.exists() and not list(tmp_path.glob(".o.onnx.*"))


def test_an_interrupt_leaves_no_output_and_no_worker(tmp_path):
    """SIGINT while the workers fit a model with many weights: exit 130, nothing written."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from helpers import vi

    rng = np.random.default_rng(0)
    n, layers = 1024, 48  # exact SVDs of 1024 x 1024: many seconds of fits, however loaded the machine
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"fc{i}"))
        x = f"h{i}"
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [vi("x", ["b", n])], [vi(x, ["b", n])], inits),
                                opset_imports=[helper.make_opsetid("", 17)]), str(src))
    out = tmp_path / "out" / "m.lr.onnx"
    proc = subprocess.Popen(["lrcompile", str(src), "-o", str(out), "--workers", "2",
                             "--solver", "exact", "--method", "svd", "--no-verify"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the workers: the fits have begun
        group = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if len(group) >= 3 or proc.poll() is not None:
            break
        time.sleep(0.2)
    time.sleep(0.3)
    assert proc.poll() is None, "the compile ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())
    time.sleep(1)
    left = subprocess.run(["pgrep", "-a", "-g", str(proc.pid)], capture_output=True, text=True)
    running = [ln for ln in left.stdout.splitlines() if "<defunct>" not in ln]  # exited, not yet reaped: gone
    assert running == [], "worker processes outlived the interrupt"


def test_a_model_with_external_data_under_a_budget(tiny, tmp_path):
    """Mapped weights travel to the fits and the planner's spectra as file references: the same
    bytes with and without workers, and the same graph as from the model with its weights inline."""
    import onnx

    src = tmp_path / "ext" / "model.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(str(tiny / "model.onnx")), str(src), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    opts = {"calib": str(tiny / "calib.npz"), "params": 0.5, "calib_batch": 2}
    outs = [lrcompile.compile(src, tmp_path / f"w{w}.onnx", workers=w, **opts) for w in (1, 2)]
    assert all(r.status == "PASSED" for r in outs)
    assert _sha(outs[0].output) == _sha(outs[1].output)
    inline = lrcompile.compile(tiny / "model.onnx", tmp_path / "inline.onnx", **opts)
    assert [(r.node, r.decision, r.rank) for r in outs[0].layers] == [(r.node, r.decision, r.rank) for r in inline.layers]
