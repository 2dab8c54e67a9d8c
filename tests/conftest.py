import os
import sys
from pathlib import Path

# Two test workers on two cores: multi-threaded BLAS would oversubscribe the machine, and
# OpenBLAS's busy-waiting threads then run tens of times slower. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    try:
        from lrcompile.targets.trt import import_tensorrt

        import_tensorrt()
        has_trt = True
    except Exception:  # noqa: BLE001
        has_trt = False
    for item in items:
        if "torch" in item.keywords and not has_torch:
            item.add_marker(pytest.mark.skip(reason="torch is not installed (pip install torch==2.13.0)"))
        if "trt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="neither tensorrt nor tensorrt-rtx is installed"))


@pytest.fixture(autouse=True)
def _private_timing_cache(tmp_path, monkeypatch):
    """Latency-aware runs write a per-user timing cache; tests keep theirs in the test's folder."""
    monkeypatch.setenv("LRCOMPILE_CACHE_DIR", str(tmp_path / "lrcompile-cache"))
