"""The one place lrcompile builds ONNX Runtime sessions.

Every session gets the same settings: graph optimization level ALL, ORT's log at warning (or a
quieter level when asked), an explicit provider list (``default_providers``: CUDA then CPU when
the installed onnxruntime offers CUDA, else CPU), optional intra-op threads and thread spinning.
A model may be given as a path (external data beside it is found by ORT), as serialized bytes, or
as a ``ModelProto``: in memory when it fits protobuf's limit, else through a file in ``tmp``.
``with_outputs`` and ``capture`` expose intermediate tensors for calibration, timing and distill.
A model given in memory whose tensors are references to external data (a lazily loaded model,
``lrcompile.weights``) is read by ORT from the folder ``lrcompile.weights.folder()`` names, through
the session config entry ``session.model_external_initializers_file_folder_path``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from .errors import LrcError

#: ORT log severity: 0 verbose, 1 info, 2 warning, 3 error.
WARNING = 2
ERROR = 3
#: Models at or above this many bytes go through a file instead of bytes (protobuf's limit).
INLINE_LIMIT = 1_800_000_000
#: The session config entry that says where a model given as bytes finds its external data.
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def default_providers() -> list[str]:
    """CUDA then CPU when onnxruntime offers CUDA, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session_options(*, threads: int | None = None, spinning: bool = True, log_level: int = WARNING,
                    options=None):
    """lrcompile's ``SessionOptions`` (optionally on top of ``options``)."""
    import onnxruntime as ort

    so = options or ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = log_level
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        so.intra_op_num_threads = threads
    return so


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name) or "model"


def session(model: str | Path | bytes | onnx.ModelProto, providers: list[str] | None = None, *,
            threads: int | None = None, spinning: bool = True, log_level: int = WARNING, options=None,
            tmp: Path | None = None, label: str | None = None):
    """An ``InferenceSession`` with lrcompile's settings.

    Args:
        model: a path, serialized bytes, or a ``ModelProto`` (one past protobuf's limit is written
            to ``tmp`` with external data; ``tmp`` is then required).
        providers: execution providers in priority order (None: :func:`default_providers`).
        threads: intra-op threads (None: ORT's default, one per physical core).
        spinning: let idle pool threads spin (ORT's default); interleaved timing turns it off.
        log_level: ORT's log severity.
        options: ``SessionOptions`` to start from (e.g. with ``optimized_model_filepath`` set).
        label: how messages name the model (default: the file name, or "the model").

    Raises:
        LrcError: the file is missing, or ORT cannot load it or offers none of the providers.
    """
    import onnxruntime as ort

    if isinstance(model, (str, Path)):
        model = Path(model)
        if not model.is_file():
            raise LrcError(f"ONNX model {model} does not exist; check the path")
        label = label or model.name
    providers = list(providers) if providers is not None else default_providers()
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise LrcError(f"onnxruntime offers no {missing}; available: {ort.get_available_providers()} "
                       "(GPU providers need onnxruntime-gpu instead of onnxruntime)")
    so = session_options(threads=threads, spinning=spinning, log_level=log_level, options=options)
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() < INLINE_LIMIT:
            model = model.SerializeToString()
        else:
            if tmp is None:
                raise AssertionError("a model past protobuf's limit needs a folder for its file")
            from .io import write_model

            path = Path(tmp) / f"{_safe(model.graph.name)}.onnx"
            write_model(model, path, external_data=True)
            model = path
    if not isinstance(model, Path):
        from .weights import folder

        if folder() is not None:  # references to external data resolve in the model's folder
            so.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(folder()))
    try:
        return ort.InferenceSession(str(model) if isinstance(model, Path) else model, so, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/... types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LrcError(f"ONNX Runtime cannot load {label or 'the model'}: {msg}; check it with onnx.checker") from None


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the tensors ``names`` (intermediate ones too)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return m


def capture(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray], providers: list[str],
            tmp: Path | None = None) -> dict[str, np.ndarray]:
    """The arrays of tensors ``names`` when ``model`` runs on ``feeds`` (graph inputs are taken
    from the feeds; the rest are exposed as extra outputs for one run, through a file)."""
    from .io import write_model

    from .io import all_tensors

    got = {n: np.asarray(feeds[n]) for n in names if n in feeds}
    rest = [n for n in names if n not in got]
    if rest and any(uses_external_data(t) for t in all_tensors(model)):  # small in memory: no file needed
        sess = session(with_outputs(model, rest), providers, tmp=tmp)
        graph_in = {i.name for i in sess.get_inputs()}
        got.update(zip(rest, sess.run(rest, {k: v for k, v in feeds.items() if k in graph_in})))
        del sess
    elif rest:
        with tempfile.TemporaryDirectory(prefix="lrcompile-capture-", dir=tmp) as d:
            path = Path(d) / "capture.onnx"
            write_model(with_outputs(model, rest), path)
            sess = session(path, providers)
            graph_in = {i.name for i in sess.get_inputs()}
            got.update(zip(rest, sess.run(rest, {k: v for k, v in feeds.items() if k in graph_in})))
            del sess
    return got


__all__ = ["ERROR", "EXTERNAL_FOLDER_KEY", "INLINE_LIMIT", "WARNING", "capture", "default_providers", "session", "session_options",
           "with_outputs"]
