"""The factorization math never imports graph or runtime libraries (see lrcompile.factorize)."""
from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("onnx", "onnx_graphsurgeon", "onnxruntime", "tensorrt", "tensorrt_rtx", "torch")

# every lrcompile.factorize submodule, found by walking the package (so new modules are covered)
SCRIPT = f"""
import importlib, json, pkgutil, sys
import lrcompile.factorize as pkg
names = [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(json.dumps({{"modules": names, "loaded": [m for m in {FORBIDDEN!r} if m in sys.modules]}}))
"""


def test_factorize_imports_no_graph_or_runtime_library():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "lrcompile.factorize.svd" in out["modules"]
    assert out["loaded"] == [], f"lrcompile.factorize pulled in {out['loaded']}"
