"""ONNX Runtime target: consistent sessions, latency comparison, optimized-model export.

Default providers: CUDA (then CPU) when the installed onnxruntime offers CUDA, else CPU.
TensorRT's execution provider is used only when asked for (``providers=[...]``): it builds an
engine at session creation, which takes minutes and needs TensorRT's libraries.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from lrcompile import sessions
from lrcompile.sessions import default_providers
from lrcompile.errors import LrcError

log = logging.getLogger(__name__)

_EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)


def session(
    path: str | Path,
    providers: list[str] | None = None,
    *,
    intra_op_threads: int | None = None,
    options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """Make an InferenceSession with lrcompile's settings (:func:`lrcompile.sessions.session`)
    from a file: graph optimization level ALL, log severity warning, an explicit provider list
    (None: :func:`default_providers`).

    Raises:
        LrcError: the file is missing, or ORT cannot load it or offers none of the providers.
    """
    return sessions.session(Path(path), providers, threads=intra_op_threads, options=options)


def _check_feeds(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], label: str) -> dict[str, np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise LrcError(f"feeds lack input(s) {missing} of the {label} model; its inputs are {names}")
    return {n: feeds[n] for n in names}


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "median_ms": float(np.median(a)),
        "p10_ms": float(np.percentile(a, 10)),
        "p90_ms": float(np.percentile(a, 90)),
        "mean_ms": float(a.mean()),
    }


def compare_latency(
    original_path: str | Path,
    compressed_path: str | Path,
    feeds: dict[str, np.ndarray],
    *,
    warmup: int = 5,
    repeats: int = 30,
    providers: list[str] | None = None,
    intra_op_threads: int | None = None,
    min_seconds: float = 0.0,
    max_repeats: int = 20000,
) -> dict[str, Any]:
    """Time two models on the same feeds, interleaved so that drift hits both alike.

    Each repeat runs both models once, in an order drawn from a seeded RNG (reproducible, and
    neither model always runs second with warm caches). After ``repeats``, repeating goes on until
    both models together have been timed for ``min_seconds`` (at most ``max_repeats``): a model
    that runs in 0.1 ms then gets thousands of samples instead of a few dozen, and the median is
    not at the mercy of a handful of interrupted runs.

    Returns:
        ``{"original": stats, "compressed": stats, "ratio": compressed/original median,
        "speedup": original/compressed median, "providers", "warmup", "repeats"}``; stats hold
        median_ms, p10_ms, p90_ms, mean_ms.

    Raises:
        LrcError: a model cannot be loaded, feeds miss an input, or warmup/repeats are invalid.
    """
    if warmup < 0 or repeats < 1 or min_seconds < 0:
        raise LrcError(f"need warmup >= 0, repeats >= 1 and min_seconds >= 0, got warmup={warmup}, "
                       f"repeats={repeats}, min_seconds={min_seconds}")
    providers = list(providers) if providers is not None else default_providers()
    runs = {}
    for label, path in (("original", original_path), ("compressed", compressed_path)):
        sess = session(path, providers, intra_op_threads=intra_op_threads)
        runs[label] = (sess, _check_feeds(sess, feeds, label))
    for _ in range(warmup):
        for sess, f in runs.values():
            sess.run(None, f)
    times: dict[str, list[float]] = {label: [] for label in runs}
    rng = np.random.default_rng(0)
    labels = list(runs)
    done, spent = 0, 0.0
    while done < repeats or (spent < min_seconds * 1e3 and done < max_repeats):
        for i in rng.permutation(len(labels)):
            sess, f = runs[labels[i]]
            t0 = time.perf_counter()
            sess.run(None, f)
            ms = (time.perf_counter() - t0) * 1e3
            times[labels[i]].append(ms)
            spent += ms
        done += 1
    orig, comp = _stats(times["original"]), _stats(times["compressed"])
    return {
        "original": orig,
        "compressed": comp,
        "ratio": comp["median_ms"] / orig["median_ms"],
        "speedup": orig["median_ms"] / comp["median_ms"],
        "providers": providers,
        "warmup": warmup,
        "repeats": done,
    }


def _uses_external_data(path: Path) -> bool:
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # not an ONNX file: ORT will say so
        return False
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    ) or any(
        a.t.data_location == onnx.TensorProto.EXTERNAL
        for n in model.graph.node
        for a in n.attribute
        if a.type == onnx.AttributeProto.TENSOR
    )


def save_optimized(
    model_path: str | Path, out_path: str | Path, *, providers: list[str] | None = None
) -> Path:
    """Write the model as ONNX Runtime optimizes it (level ALL) to ``out_path``, atomically.

    The result may hold ORT-only ops and layouts for the providers (and CPU) it was made on.
    Weights go to ``<out name>.data`` next to it when the input uses external data or is over
    1.8 GB.

    Raises:
        LrcError: the model cannot be loaded, or ``out_path``'s directory does not exist.
    """
    model_path, out_path = Path(model_path), Path(out_path)
    if not out_path.parent.is_dir():
        raise LrcError(f"cannot write {out_path}: directory {out_path.parent} does not exist")
    if not model_path.is_file():
        raise LrcError(f"ONNX model {model_path} does not exist; check the path")
    external = model_path.stat().st_size > _EXTERNAL_DATA_THRESHOLD or _uses_external_data(model_path)
    data_name = f"{out_path.name}.data"
    tmp_dir = Path(tempfile.mkdtemp(dir=out_path.parent, prefix=f".{out_path.name}."))
    try:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_dir / out_path.name)
        if external:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
        session(model_path, providers, options=so)
        if (tmp_dir / data_name).exists():
            os.replace(tmp_dir / data_name, out_path.parent / data_name)
        os.replace(tmp_dir / out_path.name, out_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_path
