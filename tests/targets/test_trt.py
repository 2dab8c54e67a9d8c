"""Tests for lrcompile.targets.trt and lrcompile.targets.fp16 (small models made here)."""
from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrcompile.errors import LrcError
from lrcompile.targets.fp16 import convert_fp16
from lrcompile.targets.trt import (
    TrtOptions,
    build_engine,
    format_shapes,
    import_tensorrt,
    parse_shapes,
)

HAS_TRT = any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx"))


def _has_cuda_device() -> bool:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def _weight(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    fan_in = shape[0] if len(shape) == 2 else int(np.prod(shape[1:]))
    return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)


def _save(path: Path, nodes, inputs, outputs, inits, **save_kw) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path, **save_kw)
    return path


def matmul_chain(path: Path, batch: int | str = 4, external: bool = False, dim: int = 256, rank: int = 64) -> Path:
    """y = x @ A @ B with A [dim, rank], B [rank, dim]: a low-rank chain."""
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    kw = dict(save_as_external_data=True, location=path.name + ".data", size_threshold=0) if external else {}
    return _save(
        path,
        [helper.make_node("MatMul", ["x", "A"], ["t"]), helper.make_node("MatMul", ["t", "B"], ["y"])],
        [vi("x", TensorProto.FLOAT, [batch, dim])],
        [vi("y", TensorProto.FLOAT, [batch, dim])],
        [_weight(rng, "A", dim, rank), _weight(rng, "B", rank, dim)],
        **kw,
    )


def conv_model(path: Path) -> Path:
    rng = np.random.default_rng(1)
    vi = helper.make_tensor_value_info
    bias = numpy_helper.from_array(np.zeros(16, np.float32), "b")
    return _save(
        path,
        [
            helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        [vi("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [vi("y", TensorProto.FLOAT, [1, 16, 32, 32])],
        [_weight(rng, "W", 16, 3, 3, 3), bias],
    )


def _check_engine(report: dict, engine: Path) -> None:
    assert engine.is_file() and engine.stat().st_size > 0
    assert report["engine_bytes"] == engine.stat().st_size
    assert report["backend"] in ("tensorrt", "tensorrt_rtx") and report["version"]
    assert report["num_layers"] >= 1 and report["build_seconds"] >= 0
    assert not [p for p in engine.parent.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------ parse_shapes


def test_parse_shapes_dynamic_and_static():
    shapes = parse_shapes("input_ids:[1,128],[4,128],[8,128]; pixel_values:[1,3,224,224] scalar:[]")
    assert shapes == {
        "input_ids": ((1, 128), (4, 128), (8, 128)),
        "pixel_values": ((1, 3, 224, 224),) * 3,
        "scalar": ((), (), ()),
    }
    assert parse_shapes(format_shapes(shapes)) == shapes


def test_parse_shapes_name_with_colon():
    assert parse_shapes("input:0:[2,3]") == {"input:0": ((2, 3),) * 3}


@pytest.mark.parametrize(
    "text",
    ["", "x", "x:[1,a]", "x:[1,2],[3,4]", "x:[4],[2],[8]", "x:[1],[1,2],[1,2]", "x:[1] x:[2]", "x:[-1]", ":[1]"],
)
def test_parse_shapes_rejects_garbage(text):
    with pytest.raises(LrcError) as err:
        parse_shapes(text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kw",
    [
        {"workspace_mb": 0},
        {"builder_optimization_level": 6},
        {"shapes": {"x": ((1, 2), (1, 2))}},
        {"shapes": {"x": ((2,), (1,), (4,))}},
    ],
)
def test_options_validated(kw):
    with pytest.raises(LrcError):
        TrtOptions(**kw)


def test_options_normalize_lists():
    assert TrtOptions(shapes={"x": [[1, 2], [2, 2], [4, 2]]}).shapes == {"x": ((1, 2), (2, 2), (4, 2))}


def test_missing_tensorrt_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(LrcError, match="TensorRT is not installed: pip install"):
        import_tensorrt()


# ------------------------------------------------------------------------------ fp16


def _run(path_or_model, feeds):
    data = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_convert_fp16_runs_in_ort(tmp_path):
    model = onnx.load(matmul_chain(tmp_path / "mm.onnx"))
    half = convert_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    assert {t.data_type for t in half.graph.initializer} == {TensorProto.FLOAT16}
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # io kept
    assert model.graph.initializer[0].data_type == TensorProto.FLOAT  # input untouched
    x = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    ref, got = _run(model, {"x": x}), _run(half, {"x": x})
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-2 * np.abs(ref).max())


def test_convert_fp16_inlines_local_functions():
    rng = np.random.default_rng(3)
    vi = helper.make_tensor_value_info
    body = [
        helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array(0.5, np.float32))),
        helper.make_node("MatMul", ["x", "U"], ["t"]),
        helper.make_node("MatMul", ["t", "V"], ["u"]),
        helper.make_node("Mul", ["u", "s"], ["y"]),
    ]
    fn = helper.make_function("lrcompile", "LowRank", ["x", "U", "V"], ["y"], body, [helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [helper.make_node("LowRank", ["x", "U", "V"], ["y"], domain="lrcompile")],
        "g",
        [vi("x", TensorProto.FLOAT, [2, 8])],
        [vi("y", TensorProto.FLOAT, [2, 4])],
        [_weight(rng, "U", 8, 3), _weight(rng, "V", 3, 4)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("lrcompile", 1)], functions=[fn]
    )
    half = convert_fp16(model)
    assert not half.functions
    x = rng.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(half, {"x": x}), _run(model, {"x": x}), atol=1e-2)


def test_convert_fp16_twice_is_user_error(tmp_path):
    half = convert_fp16(onnx.load(matmul_chain(tmp_path / "mm.onnx")))
    with pytest.raises(LrcError, match="float16 already"):
        convert_fp16(half)


# ------------------------------------------------------------------------------ engines


@pytest.mark.trt
@pytest.mark.skipif(not HAS_TRT, reason="neither tensorrt nor tensorrt_rtx is installed")
class TestEngines:
    def test_matmul_chain_report(self, tmp_path):
        report = build_engine(matmul_chain(tmp_path / "m.onnx"), tmp_path / "m.engine")
        _check_engine(report, tmp_path / "m.engine")
        assert report["inputs"] == [{"name": "x", "shape": [4, 256], "dtype": "float32"}]
        assert report["outputs"] == [{"name": "y", "shape": [4, 256], "dtype": "float32"}]
        assert report["profile"] == {} and report["fp16"] is False

    def test_conv(self, tmp_path):
        report = build_engine(conv_model(tmp_path / "c.onnx"), tmp_path / "c.engine")
        _check_engine(report, tmp_path / "c.engine")
        assert report["outputs"][0]["shape"] == [1, 16, 32, 32]

    def test_dynamic_batch_with_shapes(self, tmp_path):
        opts = TrtOptions(shapes=parse_shapes("x:[1,256],[4,256],[16,256]"))
        report = build_engine(matmul_chain(tmp_path / "d.onnx", batch="N"), tmp_path / "d.engine", opts)
        _check_engine(report, tmp_path / "d.engine")
        assert report["inputs"][0]["shape"] == [-1, 256]
        assert report["profile"] == {"x": [[1, 256], [4, 256], [16, 256]]}

    def test_dynamic_batch_from_default_shapes(self, tmp_path):
        onnx_path = matmul_chain(tmp_path / "d.onnx", batch="N")
        report = build_engine(onnx_path, tmp_path / "d.engine", default_shapes={"x": (8, 256)})
        assert report["profile"] == {"x": [[1, 256], [8, 256], [8, 256]]}

    def test_dynamic_batch_without_shapes(self, tmp_path):
        with pytest.raises(LrcError) as err:
            build_engine(matmul_chain(tmp_path / "d.onnx", batch="N"), tmp_path / "d.engine")
        msg = str(err.value)
        assert "\n" not in msg and "x [-1, 256]" in msg and "--shapes x:[min],[opt],[max]" in msg
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx"]

    @pytest.mark.parametrize(
        "shapes, match",
        [("y:[1,256]", "unknown input"), ("x:[1,128],[4,128],[8,128]", "do not fit"), ("x:[1,2,3]", "do not fit")],
    )
    def test_shapes_that_do_not_fit(self, tmp_path, shapes, match):
        with pytest.raises(LrcError, match=match):
            build_engine(
                matmul_chain(tmp_path / "d.onnx", batch="N"), tmp_path / "d.engine", TrtOptions(shapes=parse_shapes(shapes))
            )
        assert not (tmp_path / "d.engine").exists()

    def test_external_data(self, tmp_path):
        onnx_path = matmul_chain(tmp_path / "e.onnx", external=True)
        assert (tmp_path / "e.onnx.data").stat().st_size > onnx_path.stat().st_size
        report = build_engine(onnx_path, tmp_path / "e.engine")
        # the weights made it into the engine: same size as the inline-weights build
        inline = build_engine(matmul_chain(tmp_path / "i.onnx"), tmp_path / "i.engine")
        assert report["engine_bytes"] >= 256 * 64 * 2 * 4 and abs(report["engine_bytes"] - inline["engine_bytes"]) < 1024

    def test_fp16(self, tmp_path):
        # big enough that weights outweigh the ~130 kB TensorRT-RTX adds for the Cast layers
        fp32 = build_engine(matmul_chain(tmp_path / "m.onnx", dim=1024, rank=256), tmp_path / "m32.engine")
        report = build_engine(tmp_path / "m.onnx", tmp_path / "m16.engine", TrtOptions(fp16=True))
        _check_engine(report, tmp_path / "m16.engine")
        assert report["fp16"] is True and report["inputs"][0]["dtype"] == "float32"
        assert report["engine_bytes"] < 0.75 * fp32["engine_bytes"]  # half the weight bytes
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m16.engine", "m32.engine"]

    def test_sparse_weights_and_tuning_options(self, tmp_path):
        cache = tmp_path / "timing.cache"
        opts = TrtOptions(sparse_weights=True, workspace_mb=64, builder_optimization_level=1, timing_cache=str(cache))
        report = build_engine(matmul_chain(tmp_path / "m.onnx"), tmp_path / "m.engine", opts)
        _check_engine(report, tmp_path / "m.engine")
        assert "SPARSE_WEIGHTS" in report["flags"]
        if report["backend"] == "tensorrt_rtx":
            assert not cache.exists()  # TensorRT for RTX has no timing cache
        else:
            assert cache.stat().st_size > 0
            build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", opts)  # reads the cache back

    @pytest.mark.parametrize("form", ["nm", "lowrank+sparse", "dense-nm", "dictionary"])
    def test_sparse_forms_build(self, tmp_path, form):
        """Every sparse form's output builds (sparse Constants are handed to the parser dense, next
        to the engine, and the folder is left clean)."""
        import lrcompile

        src = matmul_chain(tmp_path / "m.onnx")
        out = tmp_path / "o.onnx"
        lrcompile.compile(src, out, form=form, ratio=0.5, min_params=0, multiple=1, verify=False)
        report = build_engine(out, tmp_path / "o.engine", TrtOptions(sparse_weights=True))
        _check_engine(report, tmp_path / "o.engine")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.engine", "o.onnx"]

    @pytest.mark.parametrize("content", [b"not an onnx model", None], ids=["garbage", "unsupported-op"])
    def test_broken_onnx(self, tmp_path, content):
        onnx_path = tmp_path / "bad.onnx"
        if content is None:
            vi = helper.make_tensor_value_info
            node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="nowhere")
            graph = helper.make_graph([node], "g", [vi("x", TensorProto.FLOAT, [2])], [vi("y", TensorProto.FLOAT, [2])])
            onnx.save(helper.make_model(graph), onnx_path)
        else:
            onnx_path.write_bytes(content)
        engine = tmp_path / "bad.engine"
        engine_before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(LrcError) as err:
            build_engine(onnx_path, engine)
        assert "\n" not in str(err.value) and "cannot parse bad.onnx" in str(err.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == engine_before

    def test_failed_build_keeps_old_engine(self, tmp_path):
        engine = tmp_path / "m.engine"
        engine.write_bytes(b"old")
        (tmp_path / "bad.onnx").write_bytes(b"junk")
        with pytest.raises(LrcError):
            build_engine(tmp_path / "bad.onnx", engine)
        assert engine.read_bytes() == b"old"

    def test_missing_paths(self, tmp_path):
        with pytest.raises(LrcError, match="does not exist"):
            build_engine(tmp_path / "nope.onnx", tmp_path / "m.engine")
        with pytest.raises(LrcError, match="does not exist"):
            build_engine(matmul_chain(tmp_path / "m.onnx"), tmp_path / "no" / "m.engine")


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.skipif(not _has_cuda_device(), reason="needs an NVIDIA GPU")
def test_engine_matches_ort(tmp_path):
    pytest.importorskip("tensorrt", reason="polygraphy's TrtRunner needs the full tensorrt package")
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    onnx_path = matmul_chain(tmp_path / "m.onnx", batch="N")
    build_engine(onnx_path, tmp_path / "m.engine", TrtOptions(shapes=parse_shapes("x:[1,256],[4,256],[8,256]")))
    x = np.random.default_rng(4).standard_normal((4, 256)).astype(np.float32)
    with TrtRunner(EngineFromBytes(BytesFromPath(str(tmp_path / "m.engine")))) as runner:
        got = runner.infer({"x": x})["y"]
    np.testing.assert_allclose(got, _run(onnx_path, {"x": x}), rtol=1e-3, atol=1e-3)
