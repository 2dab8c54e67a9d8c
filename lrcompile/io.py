"""Loading and saving ONNX models: validation with one-line errors, external data, atomic writes.

Loading never modifies the input file. Saving is atomic (everything is written into a temporary
folder beside the destination and moved into place only once complete) and deterministic
(protobuf's deterministic serialization, stable external-data layout).

``load_model(path, lazy=True)`` leaves external data where it is: the tensors keep their
references, relative to the model's folder, and readers resolve them inside
``lrcompile.weights.reading(folder)``. ``write_model`` copies such a tensor from its file into the
output's data file in chunks, so no tensor is copied whole into memory; a model written without
external data (under protobuf's limit) has its referenced tensors read in first. Either way the
bytes are those an eager load would have written.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from .errors import LrcError

log = logging.getLogger(__name__)

MIN_OPSET = 11
MAX_OPSET = 23
#: Opsets from here to ``MIN_OPSET - 1`` are converted on load with onnx.version_converter.
#: ONNX Runtime, which verifies the output against the original, guarantees opset 7 and up.
MIN_CONVERTIBLE_OPSET = 7
#: What an older model is converted to: the lowest supported opset, so the converter runs the
#: fewest adapters (9 -> 10 -> 11) and the output stays as close to the original as it can.
CONVERT_TO_OPSET = MIN_OPSET
#: Above this many bytes of tensors a model is saved with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def in_memory(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> onnx.ModelProto:
    """``model`` itself when it holds every tensor, else a copy with its external data read in
    (from ``base_dir``, default ``lrcompile.weights.folder()``): for the tools that need every
    weight in memory anyway (onnx2torch, for Fisher, curvature and distillation)."""
    if not any(uses_external_data(t) for t in all_tensors(model)):
        return model
    from .weights import folder

    base = base_dir if base_dir is not None else folder()
    if base is None:
        raise AssertionError("a model with external-data references read in without their folder")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    onnx.load_external_data_for_model(m, str(base))
    return m


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> list[Path]:
    """Check that every external-data reference stays inside ``base_dir`` and exists.

    Returns the referenced files. Raises LrcError on a path that escapes or is missing.
    """
    files: list[Path] = []
    root = base_dir.resolve()
    for t in all_tensors(model):
        if not uses_external_data(t):
            continue
        loc = ExternalDataInfo(t).location
        p = Path(loc)
        target = (root / p).resolve()
        if p.is_absolute() or root not in target.parents and target != root:
            raise LrcError(
                f"tensor {t.name!r} points to external data {loc!r} outside the model's folder; "
                "external data must sit beside the model (re-save it with a relative location)"
            )
        if not target.is_file():
            raise LrcError(
                f"external data file {loc!r} for tensor {t.name!r} is missing; "
                f"copy it next to the model into {root}"
            )
        if target not in files:
            files.append(target)
    return files


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise LrcError("the model imports no default ONNX opset; re-export it with opset 11 to 23")


def load_model(path: str | os.PathLike, *, notes: list[str] | None = None, lazy: bool = False) -> onnx.ModelProto:
    """Load and validate an ONNX model, with its external data (``lazy``: its references, checked
    but not read; read them inside ``lrcompile.weights.reading(path's folder)``).

    A model at opset ``MIN_CONVERTIBLE_OPSET`` to ``MIN_OPSET - 1`` comes back converted to
    ``CONVERT_TO_OPSET`` with onnx.version_converter (the file is not touched); one warning is
    logged and, when ``notes`` is given, one line appended to it.

    Raises:
        LrcError: for a missing, garbage or truncated file, bad external data, an unsupported
            opset or one the converter cannot convert.
    """
    p = Path(path)
    if not p.exists():
        raise LrcError(f"{p}: no such file; pass the path of an .onnx model")
    if p.is_dir():
        raise LrcError(f"{p} is a folder; pass the path of an .onnx model file")
    if p.stat().st_size == 0:
        raise LrcError(f"{p} is empty; re-export the model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise LrcError(
            f"{p} is not a readable ONNX model ({type(e).__name__}); the file may be truncated or not ONNX: re-export it"
        ) from None
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise LrcError(f"{p} holds no ONNX graph; the file may be truncated or not ONNX: re-export it")
    opset = opset_of(model)
    if opset > MAX_OPSET:
        raise LrcError(
            f"{p} uses opset {opset}; lrcompile supports opsets {MIN_OPSET} to {MAX_OPSET}: "
            "re-export the model or convert it with onnx.version_converter"
        )
    if opset < MIN_CONVERTIBLE_OPSET:
        raise LrcError(
            f"{p} uses opset {opset}; lrcompile reads opsets {MIN_CONVERTIBLE_OPSET} to {MAX_OPSET} "
            f"(below {MIN_OPSET} converted with onnx.version_converter; ONNX Runtime, which verifies the output, "
            f"guarantees opset {MIN_CONVERTIBLE_OPSET} and up): re-export the model at a newer opset"
        )
    check_external_data(model, p.parent)
    if not lazy or opset < MIN_OPSET:  # the version converter rewrites tensors: it needs them in memory
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError) as e:
            raise LrcError(f"{p}: cannot read its external data ({e}); check the files beside the model") from None
    else:
        check_lengths(model, p.parent, p)
    if opset < MIN_OPSET:
        model = convert_opset(model, p)
        line = (f"opset {opset} converted to opset {CONVERT_TO_OPSET} with onnx.version_converter "
                f"(the output is written at opset {CONVERT_TO_OPSET}; verification runs the original)")
        log.warning("%s: %s", p.name, line)
        if notes is not None:
            notes.append(line)
    return model


def convert_opset(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """``model`` converted to ``CONVERT_TO_OPSET`` with onnx.version_converter, checked by the
    ONNX checker; one LrcError line naming the opset when the converter cannot do it."""
    from onnx import version_converter

    opset = opset_of(model)
    try:
        new = version_converter.convert_version(model, CONVERT_TO_OPSET)
        onnx.checker.check_model(new)
    except Exception as e:  # noqa: BLE001 - the converter raises RuntimeError, ConvertError, ValueError...
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise LrcError(
            f"{path} uses opset {opset}, which lrcompile converts to opset {CONVERT_TO_OPSET} with "
            f"onnx.version_converter, and the converter failed ({type(e).__name__}: {msg}); "
            f"re-export the model at opset {MIN_OPSET} or newer"
        ) from None
    return new


def load_npz(path: Path, what: str) -> dict:
    """The arrays of a user's .npz, never unpickled; one-line LrcErrors for pickles or a bad file.

    ``what`` names the option in messages (e.g. ``"--calib"``).
    """
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        raise LrcError(f"{what} {path}: holds pickled objects ({e}); save plain arrays with np.savez") from None
    except Exception as e:  # noqa: BLE001 - corrupt zip/npy, or a bare .npy
        raise LrcError(f"{what} {path} is not a readable .npz ({type(e).__name__}); save it with np.savez") from None


def check_lengths(model: onnx.ModelProto, base_dir: Path, p: Path) -> None:
    """One LrcError line when an external tensor's bytes run past the end of its file (what an
    eager load finds while reading)."""
    for t in all_tensors(model):
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            end = int(info.offset or 0) + external_length(t)
            if end > (base_dir / info.location).stat().st_size:
                raise LrcError(f"{p}: cannot read its external data (tensor {t.name!r} runs past the end of "
                               f"{info.location}); check the files beside the model")


def external_length(t: onnx.TensorProto) -> int:
    """The bytes of an external tensor: its recorded length, else what its shape and type take."""
    info = ExternalDataInfo(t)
    if info.length is not None:
        return int(info.length)
    return int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def tensor_bytes(model: onnx.ModelProto) -> int:
    """The bytes of the model's tensors, those stored as external data too."""
    return sum(len(t.raw_data) if t.HasField("raw_data") else external_length(t) if uses_external_data(t) else 0
               for t in all_tensors(model))


@contextmanager
def atomic_output(dest: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success the caller moves files from it.

    The folder is removed whatever happens, so no partial output is left behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: Tensors of at least this many bytes (as ``sys.getsizeof`` counts their raw data, as onnx's
#: ``convert_model_to_external_data`` does) go to the external data file.
EXTERNAL_SIZE_THRESHOLD = 1024
#: External tensors are copied into the output's data file this many bytes at a time.
COPY_CHUNK = 16 << 20


def write_model(model: onnx.ModelProto, path: Path, *, external_data: bool | None = None,
                base_dir: Path | None = None) -> list[Path]:
    """Serialize ``model`` to ``path`` (a fresh path, typically inside an atomic_output folder).

    With external data (forced, or automatic past ~1.8 GB of tensors) all tensors over 1 KiB go to
    ``<name>.data`` beside the file, in the order of ``all_tensors``, each appended at the end (the
    layout onnx's ``convert_model_to_external_data`` + ``write_external_data_tensors`` give).
    Tensors that are references to external data (a lazily loaded model) resolve against
    ``base_dir`` (default: ``lrcompile.weights.folder()``): with external data they are copied
    from their file in chunks of ``COPY_CHUNK`` bytes; without, they are read into the model first.
    Returns the files written. ``model`` is modified in place (its in-memory tensors then point to
    the data file; its references are restored to their source), so pass a copy you own.
    """
    use_ext = external_data if external_data is not None else tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    refs = [t for t in all_tensors(model) if uses_external_data(t)]
    if refs:
        from .weights import folder

        base_dir = Path(base_dir) if base_dir is not None else folder()
        if base_dir is None:
            raise AssertionError("a model with external-data references written without their folder")
    if not use_ext:
        for t in refs:
            onnx.external_data_helper.load_external_data_for_tensor(t, str(base_dir))
        path.write_bytes(model.SerializeToString(deterministic=True))
        return [path]
    data_name = path.name + ".data"
    sources = {id(t): list(t.external_data) for t in refs}
    try:
        with open(path.parent / data_name, "wb") as out:
            for t in all_tensors(model):
                if id(t) in sources:
                    if external_length(t) + sys.getsizeof(b"") < EXTERNAL_SIZE_THRESHOLD:
                        onnx.external_data_helper.load_external_data_for_tensor(t, str(base_dir))
                        sources.pop(id(t))  # small: kept in the model, as an eager load would
                        continue
                    offset = out.tell()
                    _copy_range(t, base_dir, out)
                    _point(t, data_name, offset, out.tell() - offset)
                elif t.HasField("raw_data") and sys.getsizeof(t.raw_data) >= EXTERNAL_SIZE_THRESHOLD:
                    offset = out.tell()
                    out.write(t.raw_data)
                    onnx.external_data_helper.set_external_data(t, data_name, offset, out.tell() - offset)
                    t.ClearField("raw_data")
        path.write_bytes(model.SerializeToString(deterministic=True))
    finally:
        for t in refs:  # the model still reads its references from their source
            if id(t) in sources:
                del t.external_data[:]
                t.external_data.extend(sources[id(t)])
    return [path, path.parent / data_name]


def _copy_range(t: onnx.TensorProto, base_dir: Path, out) -> None:
    """Append external tensor ``t``'s bytes to file ``out``, ``COPY_CHUNK`` bytes at a time."""
    info = ExternalDataInfo(t)
    left = external_length(t)
    with open(base_dir / info.location, "rb") as f:
        f.seek(int(info.offset or 0))
        while left:
            chunk = f.read(min(COPY_CHUNK, left))
            if not chunk:
                raise OSError(f"external data {info.location} ends before tensor {t.name!r} does")
            out.write(chunk)
            left -= len(chunk)


def _point(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``t``'s external data entries ``location``, ``offset``, ``length`` (in that order, as
    ``onnx.external_data_helper.set_external_data`` writes them)."""
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", offset), ("length", length)):
        e = t.external_data.add()
        e.key, e.value = k, str(v)


def commit(files: list[Path], dest_dir: Path) -> list[Path]:
    """Move files written in a temporary folder (under their final names) into ``dest_dir``.

    Data files move first, the .onnx last, so a reader never sees a model without its data.
    """
    out = []
    for f in sorted(files, key=lambda f: f.suffix == ".onnx"):
        target = dest_dir / f.name
        os.replace(f, target)
        out.append(target)
    return out


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def user_function(path: Path, func: str, option: str, define: str):
    """The function ``func`` of the user's Python file ``path``, run only because the user named it
    (``--calib loader.py``, ``--metric-script metric.py``); one line when it fails to import or lacks it.

    Args:
        path: the script.
        func: the function's name.
        option: the command-line option that named the script (for the error line).
        define: how to define the function, for the error line (e.g. ``"it to yield feed dicts"``).
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"lrcompile_user_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001 - the user's script
        raise LrcError(f"{option} {path}: the script failed to import: {type(e).__name__}: {e}") from None
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise LrcError(f"{option} {path}: defines no function {func}(); define {define}")
    return fn

