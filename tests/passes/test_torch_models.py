"""Lossless rewrites at full rank on models exported by torch.onnx.export, and a TensorRT build of
each compressed model (tensorrt-rtx on CPU)."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_lossless, compile_full, op_types

pytestmark = pytest.mark.torch


def _export(module, args, path, names, dynamic=None):
    import torch

    torch.manual_seed(0)
    module.eval()
    torch.onnx.export(module, args, str(path), input_names=names[0], output_names=names[1], opset_version=17,
                      dynamo=False, dynamic_axes=dynamic)
    return path


def _models():
    import torch
    from torch import nn

    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(500, 48)
            self.fc = nn.Linear(48, 32)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    class Block(nn.Module):
        """A pre-norm transformer encoder block (attention + MLP), written out so the export is plain."""

        def __init__(self, d=64, heads=4, hidden=128):
            super().__init__()
            self.h = heads
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.h) ** 0.5, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    return {
        "linear": (nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 40)),
                   rng.standard_normal((3, 64)).astype(np.float32), {"x": {0: "batch"}}),
        "conv": (nn.Sequential(
            nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(),
            nn.Conv2d(24, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, dilation=2, padding=2), nn.ReLU(),
            nn.Conv2d(32, 48, 3, groups=4, padding=1), nn.ReLU(),
            nn.Conv2d(48, 48, 3, groups=48, padding=1),  # depthwise: declined
            nn.Conv2d(48, 16, 1)),
            rng.standard_normal((2, 3, 20, 20)).astype(np.float32), {"x": {0: "batch"}}),
        "embedding": (Embed(), rng.integers(0, 500, (4, 7)).astype(np.int64), {"x": {0: "batch", 1: "seq"}}),
        "transformer": (Block(),
                        rng.standard_normal((2, 10, 64)).astype(np.float32), {"x": {0: "batch", 1: "seq"}}),
    }


@pytest.mark.parametrize("name", ["linear", "conv", "embedding", "transformer"])
def test_torch_export_lossless_full_rank(tmp_path, name):
    import torch

    module, x, dyn = _models()[name]
    src = _export(module, (torch.from_numpy(x),), tmp_path / f"{name}.onnx", (["x"], ["y"]), {**dyn, "y": {0: "batch"}})
    res = compile_full(src, tmp_path)
    done = [r for r in res.layers if r.decision == "factorized"]
    assert done, res.layers
    assert_lossless(src, res.output, {"x": x}, rtol=1e-5)
    if name == "conv":
        declined = {r.node: r.reason for r in res.layers if r.decision == "declined"}
        assert any("depthwise" in why for why in declined.values()), declined
        assert len(done) == 5
    if name == "embedding":
        assert "Gather" in op_types(res.output) and any(r.op == "Gather" for r in done)
    if name == "transformer":
        assert len(done) == 4


@pytest.mark.trt
@pytest.mark.parametrize("name", ["linear", "conv", "embedding", "transformer"])
def test_compressed_models_build_trt_engines(tmp_path, name):
    import torch

    import lrcompile

    module, x, dyn = _models()[name]
    src = _export(module, (torch.from_numpy(x),), tmp_path / f"{name}.onnx", (["x"], ["y"]), {**dyn, "y": {0: "batch"}})
    res = lrcompile.compile(src, tmp_path / f"{name}.lr.onnx", target="trt", ratio=0.5, min_params=0)
    eng = res.target["engine"]
    assert eng["engine_bytes"] > 0 and (tmp_path / f"{name}.lr.engine").stat().st_size == eng["engine_bytes"]
