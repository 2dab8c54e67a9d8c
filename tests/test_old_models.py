"""Old models: opsets 7 to 10 are converted with onnx.version_converter on load (one warning, one
report note, the output written at the converted opset); IR versions below 4 are raised to 4 in
the output (IR 3 wants every initializer listed as a graph input, which the rewrite does not keep).
Both lossless at full size. The light models of ONNX's backend test data are the slow test."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run, trained_like
from onnx import TensorProto, helper, numpy_helper

import lrcompile
from lrcompile.errors import LrcError
from lrcompile.io import CONVERT_TO_OPSET, load_model, opset_of


def _old_model(path: Path, *, opset: int = 9, ir: int = 3) -> Path:
    """x[2,64] -> MatMul W1 -> Clip(min, max as attributes: opset < 11) -> Gemm(W2 from
    ConstantOfShape: rank 1, as in the backend test data's models) -> y. At IR 3 every
    initializer is also listed as a graph input."""
    w1 = trained_like(64, 96, 3)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Clip", ["h"], ["c"], name="clip", min=-1.0, max=1.0) if opset < 11 else
             helper.make_node("Relu", ["h"], ["c"], name="clip"),
             helper.make_node("Gemm", ["c", "W2", "b2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(np.linspace(-1, 1, 80).astype(np.float32), "b2")]
    if opset >= 9:
        nodes.insert(2, helper.make_node("ConstantOfShape", ["W2_shape"], ["W2"], name="w2_fill",
                                         value=numpy_helper.from_array(np.array([0.01], np.float32))))
        inits.append(numpy_helper.from_array(np.array([96, 80], np.int64), "W2_shape"))
    else:  # ConstantOfShape came with opset 9
        inits.append(numpy_helper.from_array(np.full((96, 80), 0.01, np.float32), "W2"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])]
    if ir < 4:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    g = helper.make_graph(nodes, "old", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 80])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="old-exporter")
    m.ir_version = ir
    onnx.checker.check_model(m, full_check=True)
    path.write_bytes(m.SerializeToString())
    return path


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)


def test_opset9_ir3_converted_lossless_at_full_size(tmp_path, caplog):
    src = _old_model(tmp_path / "old.onnx")
    before = src.read_bytes()
    out = tmp_path / "o.onnx"
    with caplog.at_level(logging.WARNING, logger="lrcompile"):
        res = lrcompile.compile(src, out, energy=1.0, min_params=1000)
    assert src.read_bytes() == before
    new = onnx.load(str(out))
    onnx.checker.check_model(new, full_check=True)
    assert opset_of(new) == CONVERT_TO_OPSET == 11
    assert new.ir_version == 4 and new.producer_name == "old-exporter"
    assert [i.name for i in new.graph.input] == ["x"]
    warned = [r.getMessage() for r in caplog.records if "version_converter" in r.getMessage()]
    assert len(warned) == 1 and "opset 9 converted to opset 11" in warned[0] and "\n" not in warned[0]
    notes = res.report["notes"]
    assert any(n.startswith("opset 9 converted to opset 11 with onnx.version_converter") for n in notes), notes
    assert any(n.startswith("IR version 3 raised to 4") for n in notes), notes
    fc2 = next(r for r in res.layers if r.node.startswith("fc2"))
    assert fc2.decision == "factorized" and fc2.rank <= 8  # rank 1, rounded up to --multiple 8
    # lossless against the ORIGINAL file (opset 9, IR 3) in ONNX Runtime
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    ref, got = run(src, {"x": x})["y"], run(out, {"x": x})["y"]
    assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref)
    assert all(d["rel_l2"] <= 1e-5 for d in res.verification)
    assert _params(new) < 96 * 80


def test_ir3_at_a_supported_opset_is_raised_to_4(tmp_path):
    src = _old_model(tmp_path / "ir3.onnx", opset=13)
    res = lrcompile.compile(src, tmp_path / "o.onnx", energy=1.0, min_params=1000)
    new = onnx.load(str(tmp_path / "o.onnx"))
    onnx.checker.check_model(new, full_check=True)
    assert new.ir_version == 4 and opset_of(new) == 13
    assert not any("version_converter" in n for n in res.report["notes"])
    assert all(d["rel_l2"] <= 1e-5 for d in res.verification)


def test_supported_ir_and_opset_kept(tmp_path):
    src = _old_model(tmp_path / "new.onnx", opset=13, ir=8)
    res = lrcompile.compile(src, tmp_path / "o.onnx", energy=1.0, min_params=1000)
    new = onnx.load(str(tmp_path / "o.onnx"))
    assert new.ir_version == 8 and opset_of(new) == 13
    assert not any("IR version" in n or "version_converter" in n for n in res.report["notes"])


def test_load_model_converts_without_touching_the_file(tmp_path):
    src = _old_model(tmp_path / "old.onnx", opset=8)
    notes: list[str] = []
    m = load_model(src, notes=notes)
    assert opset_of(m) == 11 and notes == [
        "opset 8 converted to opset 11 with onnx.version_converter (the output is written at opset 11; "
        "verification runs the original)"]
    assert opset_of(onnx.load(str(src))) == 8


def test_opset_below_7_is_one_line(tmp_path):
    src = _old_model(tmp_path / "older.onnx", opset=6)
    with pytest.raises(LrcError, match=r"uses opset 6; lrcompile reads opsets 7 to 23 .*re-export the model") as e:
        load_model(src)
    assert "\n" not in str(e.value)


def test_converter_failure_is_one_line(tmp_path, monkeypatch):
    from onnx import version_converter

    def broken(model, target):
        raise RuntimeError("No Adapter For Clip\nmore detail")

    monkeypatch.setattr(version_converter, "convert_version", broken)
    src = _old_model(tmp_path / "old.onnx")
    with pytest.raises(LrcError) as e:
        lrcompile.compile(src, tmp_path / "o.onnx", energy=1.0)
    msg = str(e.value)
    assert "\n" not in msg and "uses opset 9" in msg and "converter failed (RuntimeError: No Adapter For Clip)" in msg
    assert msg.endswith("re-export the model at opset 11 or newer")
    assert not (tmp_path / "o.onnx").exists()


def test_complete_spectrum_rank_ignores_rounding_of_the_total():
    """A rank-1 weight at --energy 1.0 is rank 1: with every singular value known, the spectrum's
    own energy is the total. ||W||_F^2 summed over millions of entries differs from it by more
    than 1e-12 (the backend test data's 4096 x 1024 fc7: 2.7e-12), which used to keep it dense."""
    from lrcompile.factorize.svd import choose_rank
    from lrcompile.factorize.types import RankPolicy

    s = np.array([40.96, 2.7e-13, 1.3e-14])
    assert choose_rank(RankPolicy(energy=1.0, multiple=1), s, float(s[0] ** 2) * (1 + 3e-12), 4096, 3) == 1
    assert choose_rank(RankPolicy(energy=1.0, multiple=1), s[:2], float(s[0] ** 2) * (1 + 3e-12), 4096, 3) == 3


LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(p.name for p in LIGHT.glob("light_*.onnx")) if LIGHT.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_backend_light_models_lossless_at_full_size(name, tmp_path):
    """ONNX's backend test data (opset 9, IR 3, weights rank 1 from ConstantOfShape): converted,
    shrunk at --energy 1.0, and within 1e-5 relative L2 of the original in ONNX Runtime."""
    src = LIGHT / name
    out = tmp_path / name
    res = lrcompile.compile(src, out, energy=1.0)
    new = onnx.load(str(out))
    onnx.checker.check_model(new, full_check=True)
    assert opset_of(new) == 11 and new.ir_version == 4
    assert res.report["totals"]["params_after"] < res.report["totals"]["params_before"]
    assert not any("break-even" in r.reason for r in res.layers)  # rank 1 everywhere: none left dense
    assert all(d["rel_l2"] <= 1e-5 for d in res.verification), res.verification
    # most end in a Softmax whose output is near uniform (constant weights), so compare the logits too
    from lrcompile.sessions import session, with_outputs

    graph = onnx.load(str(src)).graph
    softmax = [n for n in graph.node if n.op_type == "Softmax"]
    logits = softmax[-1].input[0] if softmax else graph.output[0].name  # densenet121 ends in its logits
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    got = []
    for m in (onnx.load(str(src)), new):
        sess = session(with_outputs(m, [logits]), ["CPUExecutionProvider"])
        got.append(sess.run([logits], {sess.get_inputs()[0].name: x})[0].astype(np.float64))
    assert np.isfinite(got[0]).all() and np.linalg.norm(got[1] - got[0]) <= 1e-5 * np.linalg.norm(got[0])
