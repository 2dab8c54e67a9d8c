"""Peak resident memory per phase (lrcompile.memory), and the bound of a compile that reads its
weights lazily: a model far larger than the bound compiles within it (slow)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import vi
from lrcompile.memory import MB, PhasePeaks, current_rss, peak_rss, reset_peak


def test_each_phase_gets_its_own_peak():
    peaks = PhasePeaks()
    if not peaks.resettable:
        pytest.skip("this system cannot reset the peak (/proc/self/clear_refs)")
    big = np.ones(300 * MB // 8)  # 300 MB, touched
    del big
    peaks.mark("big")
    small = np.ones(1000)
    peaks.mark("small")
    assert peaks.phases["big"]["rss_peak_mb"] > peaks.phases["small"]["rss_peak_mb"] + 250
    assert peaks.phases["small"]["children_rss_peak_mb"] is None  # no child ran
    del small


def test_reset_brings_the_peak_down_to_now():
    if not reset_peak():
        pytest.skip("this system cannot reset the peak")
    assert peak_rss() - current_rss() < 20 * MB


def _big_model(folder, layers: int, n: int):
    """``layers`` MatMuls with [n, n] float32 weights of rank ``RANK`` written straight to ``big.data`` (never all in
    memory), the model referring to it."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    with open(folder / "big.data", "wb") as f:
        for i in range(layers):
            offset = f.tell()
            a, b = rng.standard_normal((n, RANK), dtype=np.float32), rng.standard_normal((RANK, n), dtype=np.float32)
            (a @ b / np.float32(np.sqrt(n * RANK))).astype(np.float32).tofile(f)  # exactly rank RANK
            t = onnx.TensorProto(name=f"W{i}", data_type=onnx.TensorProto.FLOAT, dims=[n, n],
                                 data_location=onnx.TensorProto.EXTERNAL)
            for k, v in (("location", "big.data"), ("offset", offset), ("length", n * n * 4)):
                t.external_data.add(key=k, value=str(v))
            inits.append(t)
            nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"fc{i}"))
            x = f"h{i}"
    g = helper.make_graph(nodes, "big", [vi("x", [2, n])], [vi(x, [2, n])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "big.onnx"))
    return folder / "big.onnx"


#: 24 weights of 64 MiB: a 1.5 GiB model, against a bound of a few of its tensors.
LAYERS, N, RANK = 24, 4096, 16
TENSOR_MB = N * N * 4 / MB
#: The bound of the phases that hold weights one at a time: a few tensors (the weight, the
#: solver's work arrays) over what the process held after loading the model's protobuf.
BOUND_TENSORS = 4


@pytest.fixture(scope="module")
def big_compile(tmp_path_factory):
    """The 1.5 GiB model compiled at its exact rank, in a fresh process (what earlier tests left in
    this one would count in every phase): ``(report's memory phases, bound in MB)``."""
    tmp = tmp_path_factory.mktemp("big")
    src = _big_model(tmp, LAYERS, N)
    report = tmp / "report.json"
    subprocess.run([sys.executable, "-m", "lrcompile.cli", str(src), "-o", str(tmp / "out" / "big.lr.onnx"),
                    "--rank", str(RANK), "--solver", "randomized", "--external-data", "--report", str(report), "-q"],
                   check=True)
    rep = json.loads(report.read_text())
    assert rep["status"] == "PASSED" and all(r["decision"] == "factorized" for r in rep["layers"])
    phases = rep["memory"]["phases"]
    print("\npeak RSS per phase (MB):", {k: v["rss_peak_mb"] for k, v in phases.items()})
    if not rep["memory"]["peak_resettable"]:
        pytest.skip("this system cannot reset the peak per phase")
    bound = phases["load"]["rss_peak_mb"] + BOUND_TENSORS * TENSOR_MB
    assert bound < LAYERS * TENSOR_MB / 2  # the test means something: the model is far past the bound
    return phases, bound


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["analyze", "check"])
def test_phases_that_read_weights_one_at_a_time_stay_within_a_few_tensors(big_compile, phase):
    phases, bound = big_compile
    assert phases[phase]["rss_peak_mb"] < bound, (phase, phases[phase], bound)


@pytest.mark.slow
def test_verification_holds_the_whole_model(big_compile):
    """Verification runs both models in ONNX Runtime: the whole original is in memory there."""
    phases, _ = big_compile
    assert phases["verify"]["rss_peak_mb"] > LAYERS * TENSOR_MB * 0.9


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["factorize", "rewrite"])
def test_factorization_stays_within_a_few_tensors_of_a_model_larger_than_that(big_compile, phase):
    phases, bound = big_compile
    assert phases[phase]["rss_peak_mb"] < bound, (phase, phases[phase], bound)
