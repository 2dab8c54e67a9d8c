"""The TensorRT glue (``tensorrt.plugin``): runs only where the full ``tensorrt`` package (10.7+),
Triton and a GPU are present; skipped otherwise (tensorrt-rtx rejects plugin layers). UNVERIFIED
on the machines this was written on."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

trtp = pytest.importorskip("tensorrt.plugin")
torch = pytest.importorskip("torch")
pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)


def test_engine_runs_the_plugin_and_matches_ort(tmp_path):
    import lrcompile
    from helpers import plugin_mlp, run
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from lrcompile.plugins.trt import plugin_calls

    src = plugin_mlp(tmp_path)
    res = lrcompile.compile(src, tmp_path / "m.lr.onnx", ratio=0.5, min_params=0, plugins=True, target="trt")
    info = res.target["engine"]["plugins"]
    assert plugin_calls(res.output) == ["LowRankGemm"] and info["registered"] == ["lrcompile::LowRankGemm"]
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}
    want = run(res.output, feeds)["y"]
    engine = EngineFromBytes(open(res.target["engine"]["engine_path"], "rb").read())
    with TrtRunner(engine) as r:
        got = r.infer(feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))
