"""Build TensorRT engines from ONNX files.

The backend is full NVIDIA TensorRT (``tensorrt``) when it is importable, else TensorRT for RTX
(``tensorrt_rtx``), which builds engines ahead of time on a machine without a GPU. Running an
engine needs an NVIDIA GPU either way.

Networks are created strongly typed whenever the backend supports it (TensorRT for RTX always
is): the precision of every layer comes from the ONNX, so ``TrtOptions(fp16=True)`` converts the
ONNX to float16 first (:func:`lrcompile.targets.fp16.convert_fp16`) instead of setting a builder
precision flag.

Shapes: every input with a dynamic dimension needs an optimization profile (min, opt, max). They
come from ``TrtOptions.shapes`` (CLI: ``--shapes``, see :func:`parse_shapes`); else from the
``default_shapes`` a caller passes (e.g. the shapes of the verification feeds), with the policy
``opt = max = default`` and ``min = default`` except a dynamic first (batch) dimension, which
gets ``min = 1``; else the build stops with an error naming the input and its dynamic dims.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from lrcompile.errors import LrcError

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
Profile = tuple[Shape, Shape, Shape]

_MAX_ERRORS_SHOWN = 3


def import_tensorrt() -> ModuleType:
    """Return the TensorRT module: ``tensorrt`` if importable, else ``tensorrt_rtx``.

    Raises:
        LrcError: neither is installed.
    """
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        if hasattr(module, "Builder"):  # the PyPI `tensorrt` stub without libraries has none
            return module
    raise LrcError(
        "TensorRT is not installed: pip install 'lrcompile[trt]' (tensorrt-rtx builds engines "
        "without a GPU) or install NVIDIA TensorRT"
    )


def backend_info() -> tuple[str, str]:
    """Return ``(module name, version)`` of the TensorRT backend :func:`import_tensorrt` picks."""
    trt = import_tensorrt()
    return trt.__name__, trt.__version__


# ---------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class TrtOptions:
    """Engine build options; None means the backend's default.

    Attributes:
        fp16: convert the ONNX to float16 (inputs and outputs stay float32) before building.
        sparse_weights: let the builder use 2:4 structured-sparse kernels where weights allow.
        shapes: ``{input: (min, opt, max)}`` optimization-profile shapes.
        workspace_mb: workspace memory pool limit in MiB.
        builder_optimization_level: 0 (fast build) .. 5 (slow build, maybe faster engine).
        timing_cache: path of a timing cache file, read if it exists and written after the build
            (full TensorRT only; TensorRT for RTX does not time kernels and ignores it).
    """

    fp16: bool = False
    sparse_weights: bool = False
    shapes: dict[str, Profile] | None = None
    workspace_mb: int | None = None
    builder_optimization_level: int | None = None
    timing_cache: str | None = None

    def __post_init__(self) -> None:
        if self.shapes is not None:
            object.__setattr__(
                self, "shapes", {name: _check_profile(name, p) for name, p in self.shapes.items()}
            )
        if self.workspace_mb is not None and (
            not isinstance(self.workspace_mb, int) or self.workspace_mb <= 0
        ):
            raise LrcError(f"workspace_mb must be a positive integer (MiB), got {self.workspace_mb!r}")
        level = self.builder_optimization_level
        if level is not None and (not isinstance(level, int) or not 0 <= level <= 5):
            raise LrcError(f"builder_optimization_level must be an integer 0..5, got {level!r}")
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", str(self.timing_cache))


def _check_profile(name: str, profile: Any) -> Profile:
    try:
        lo, opt, hi = (tuple(int(d) for d in s) for s in profile)
    except (TypeError, ValueError):
        raise LrcError(
            f"shapes[{name!r}] must be three shapes (min, opt, max) of integers, got {profile!r}"
        ) from None
    if not len(lo) == len(opt) == len(hi):
        raise LrcError(f"shapes[{name!r}]: min, opt and max must have the same rank, got {profile!r}")
    if any(d < 0 for d in lo) or any(not a <= b <= c for a, b, c in zip(lo, opt, hi)):
        raise LrcError(f"shapes[{name!r}]: need 0 <= min <= opt <= max in every dim, got {profile!r}")
    return lo, opt, hi


_SPEC = re.compile(r"(?P<name>.+?):(?P<shapes>\[[^\]]*\](?:,\[[^\]]*\]){0,2})$")


def parse_shapes(text: str) -> dict[str, Profile]:
    """Parse the ``--shapes`` CLI syntax into ``{input: (min, opt, max)}``.

    Specs are separated by spaces or ``;``. A spec is ``name:[min],[opt],[max]`` for a dynamic
    input or ``name:[shape]`` for one fixed shape (min = opt = max), e.g.
    ``input_ids:[1,128],[4,128],[8,128] pixel_values:[1,3,224,224]``. Names may contain ``:``.
    :func:`format_shapes` writes the same syntax back.

    Raises:
        LrcError: the text does not follow the syntax, or a profile is inconsistent.
    """
    result: dict[str, Profile] = {}
    for spec in re.split(r"[;\s]+", text.strip()):
        if not spec:
            continue
        match = _SPEC.match(spec)
        if match is None:
            raise LrcError(
                f"cannot read shape spec {spec!r}: write name:[min],[opt],[max] or name:[shape], "
                "e.g. input_ids:[1,128],[4,128],[8,128]"
            )
        shapes = []
        for body in re.findall(r"\[([^\]]*)\]", match["shapes"]):
            dims = [d.strip() for d in body.split(",")] if body.strip() else []
            if not all(re.fullmatch(r"\d+", d) for d in dims):
                raise LrcError(f"shape [{body}] in {spec!r} must list non-negative integers")
            shapes.append(tuple(int(d) for d in dims))
        if len(shapes) == 2:
            raise LrcError(f"{spec!r} gives two shapes: give one (fixed) or three (min, opt, max)")
        name = match["name"]
        if name in result:
            raise LrcError(f"input {name!r} is given shapes twice in {text!r}")
        result[name] = _check_profile(name, shapes * 3 if len(shapes) == 1 else shapes)
    if not result:
        raise LrcError("no shapes given: write name:[min],[opt],[max] or name:[shape]")
    return result


def format_shapes(shapes: dict[str, Profile]) -> str:
    """Write ``shapes`` in the :func:`parse_shapes` syntax (one shape when min = opt = max)."""

    def fmt(s: Shape) -> str:
        return "[" + ",".join(map(str, s)) + "]"

    return " ".join(
        f"{name}:{fmt(p[0])}" if p[0] == p[1] == p[2] else f"{name}:" + ",".join(map(fmt, p))
        for name, p in shapes.items()
    )


# ---------------------------------------------------------------------------------- building

_LOGGER = None


def _logger(trt: ModuleType) -> Any:
    """One process-wide TensorRT logger that forwards to ``logging`` and keeps recent errors."""
    global _LOGGER
    if _LOGGER is None:

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                S = trt.ILogger.Severity
                if severity in (S.INTERNAL_ERROR, S.ERROR):
                    self.errors.append(msg)
                    log.error("TensorRT: %s", msg)
                elif severity == S.WARNING:
                    log.warning("TensorRT: %s", msg)
                elif severity == S.INFO:
                    log.info("TensorRT: %s", msg)
                else:
                    log.debug("TensorRT: %s", msg)

        _LOGGER = _Logger()
    return _LOGGER


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).rsplit(".", 1)[-1].lower()
    return {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp8": "float8e4m3"}.get(
        name, name
    )


def _profiles(
    network: Any, options: TrtOptions, default_shapes: dict[str, Shape] | None
) -> dict[str, Profile]:
    """Choose (min, opt, max) for every input with a dynamic dim (see the module docstring)."""
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    given = dict(options.shapes or {})
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        raise LrcError(f"--shapes names unknown input(s) {unknown}; the model's inputs are {sorted(inputs)}")
    chosen: dict[str, Profile] = {}
    missing: list[tuple[str, str]] = []
    for name, dims in inputs.items():
        if name in given:
            profile = given[name]
        elif -1 not in dims:
            continue
        elif default_shapes and name in default_shapes:
            opt = tuple(int(d) for d in default_shapes[name])
            lo = (1, *opt[1:]) if dims and dims[0] == -1 and opt else opt
            profile = (lo, opt, opt)
        else:
            missing.append((name, f"{name} {list(dims)} (dynamic dims {[i for i, d in enumerate(dims) if d == -1]})"))
            continue
        for shape in profile:
            if len(shape) != len(dims) or any(d not in (-1, s) for d, s in zip(dims, shape)):
                raise LrcError(
                    f"shapes for input {name!r} {format_shapes({name: profile})} do not fit its "
                    f"shape {list(dims)} (-1 = dynamic); fix --shapes"
                )
        chosen[name] = profile
    if missing:
        example = " ".join(f"{name}:[min],[opt],[max]" for name, _ in missing)
        raise LrcError(
            f"input(s) with dynamic dims need shapes: {'; '.join(m for _, m in missing)}; "
            f"pass --shapes {example}"
        )
    return chosen


def _read_timing_cache(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise LrcError(f"cannot read timing cache {path}: {exc.strerror}; fix the path or delete it") from None


def _write_atomic(path: Path, data: Any) -> None:
    """Write ``data`` (bytes-like) to ``path`` through a temp file in the same directory."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:  # not mkstemp: that makes the file private (0600)
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    options: TrtOptions = TrtOptions(),
    *,
    default_shapes: dict[str, Shape] | None = None,
) -> dict[str, Any]:
    """Parse an ONNX file and write a serialized TensorRT engine.

    External data next to the ONNX file is found by the parser. The engine file is written
    atomically: on any failure no (partial) engine file is left.

    Args:
        onnx_path: the ONNX model.
        engine_path: where to write the engine (its directory must exist).
        options: build options.
        default_shapes: fallback shapes for dynamic inputs without ``options.shapes``.

    Returns:
        A JSON-able report: backend, version, engine_path, engine_bytes, build_seconds,
        num_layers, inputs/outputs ([{name, shape, dtype}], -1 = dynamic), profile, flags.

    Raises:
        LrcError: TensorRT missing, unreadable ONNX, unsupported op, missing shapes, failed build.
    """
    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise LrcError(f"ONNX model {onnx_path} does not exist; check the path")
    if not engine_path.parent.is_dir():
        raise LrcError(f"cannot write engine {engine_path}: directory {engine_path.parent} does not exist")

    sparse = has_sparse_constants(onnx_path)
    if not options.fp16 and not sparse:
        return _build(trt, onnx_path, engine_path, options, default_shapes)
    from lrcompile.targets.fp16 import convert_fp16_file

    # next to the engine, not in /tmp: the copies are as large as the model's weights
    with tempfile.TemporaryDirectory(dir=engine_path.parent, prefix=f".{engine_path.name}.") as tmp:
        path = onnx_path
        if sparse:  # TensorRT's parser takes no sparse Constant: give it the dense values
            path = densify_file(path, Path(tmp) / "dense" / onnx_path.name)
        if options.fp16:
            path = convert_fp16_file(path, Path(tmp) / onnx_path.name)
        return _build(trt, path, engine_path, options, default_shapes)


def has_sparse_constants(path: Path) -> bool:
    """Whether the model stores a tensor as a Constant with a sparse value (``forms.sparse``)."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable file: TensorRT's parser reports it in one line
        return False
    return any(n.op_type == "Constant" and any(a.name == "sparse_value" for a in n.attribute) for n in m.graph.node)


def densify_file(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose sparse Constants are dense initializers (same names, same values)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    keep = []
    for n in m.graph.node:
        sv = next((a.sparse_tensor for a in n.attribute if a.name == "sparse_value"), None)
        if n.op_type != "Constant" or sv is None:
            keep.append(n)
            continue
        values, idx = numpy_helper.to_array(sv.values), numpy_helper.to_array(sv.indices)
        dense = np.zeros(int(np.prod(sv.dims)), values.dtype)
        dense[idx.reshape(-1) if idx.ndim == 1 else np.ravel_multi_index(idx.T, tuple(sv.dims))] = values
        m.graph.initializer.append(numpy_helper.from_array(dense.reshape(tuple(sv.dims)), n.output[0]))
    del m.graph.node[:]
    m.graph.node.extend(keep)
    dst.parent.mkdir(parents=True, exist_ok=True)
    large = m.ByteSize() > 1 << 30
    onnx.save(m, str(dst), save_as_external_data=large, location=dst.name + ".data" if large else None)
    return dst


def _build(
    trt: ModuleType,
    onnx_path: Path,
    engine_path: Path,
    options: TrtOptions,
    default_shapes: dict[str, Shape] | None,
) -> dict[str, Any]:
    logger = _logger(trt)
    logger.errors.clear()
    builder = trt.Builder(logger)
    flags = 0
    F = trt.NetworkDefinitionCreationFlag
    if hasattr(F, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(F.EXPLICIT_BATCH)  # implicit batch is gone from TensorRT 10 on
    if hasattr(F, "STRONGLY_TYPED"):
        flags |= 1 << int(F.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    from ..plugins.trt import prepare

    plugins = prepare(trt, parser, onnx_path)  # --plugins models: the fused kernels, or why the bodies are inlined

    t0 = time.perf_counter()
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(min(parser.num_errors, _MAX_ERRORS_SHOWN)):
            e = parser.get_error(i)
            node = e.node_name() or f"#{e.node()}"
            where = f"node {node} ({e.node_operator()}): " if e.node_operator() else ""
            errors.append(where + " ".join(e.desc().split()))
        more = f" (+{parser.num_errors - _MAX_ERRORS_SHOWN} more)" if parser.num_errors > _MAX_ERRORS_SHOWN else ""
        raise LrcError(
            f"TensorRT ({trt.__name__}) cannot parse {onnx_path.name}: {' | '.join(errors)}{more}; "
            "check the model with onnx.checker and that every op is supported by TensorRT"
        )

    config = builder.create_builder_config()
    strong = hasattr(F, "STRONGLY_TYPED") and network.get_flag(F.STRONGLY_TYPED)
    used_flags = ["STRONGLY_TYPED"] if strong else []
    if options.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        used_flags.append("SPARSE_WEIGHTS")
    if options.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.builder_optimization_level is not None:
        config.builder_optimization_level = options.builder_optimization_level
    cache = None
    if options.timing_cache is not None and trt.__name__ == "tensorrt_rtx":
        log.warning("TensorRT for RTX has no timing cache (it picks kernels without timing); ignoring %s", options.timing_cache)
    elif options.timing_cache is not None:
        cache = config.create_timing_cache(_read_timing_cache(options.timing_cache))
        config.set_timing_cache(cache, ignore_mismatch=True)

    profiles = _profiles(network, options, default_shapes)
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profiles.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - t0
    if serialized is None:
        detail = " ".join(logger.errors[0].split()) if logger.errors else "no error message"
        raise LrcError(
            f"TensorRT ({trt.__name__}) failed to build an engine from {onnx_path.name}: {detail}; "
            "run with -v for the builder log"
        )
    _write_atomic(engine_path, serialized)
    if cache is not None:
        _write_atomic(Path(options.timing_cache), cache.serialize())

    def io(tensors: list[Any]) -> list[dict[str, Any]]:
        return [{"name": t.name, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for t in tensors]

    report = {
        "backend": trt.__name__,
        "version": trt.__version__,
        "engine_path": str(engine_path),
        "engine_bytes": engine_path.stat().st_size,
        "build_seconds": round(build_seconds, 3),
        "num_layers": network.num_layers,
        "inputs": io([network.get_input(i) for i in range(network.num_inputs)]),
        "outputs": io([network.get_output(i) for i in range(network.num_outputs)]),
        "profile": {n: [list(s) for s in p] for n, p in profiles.items()},
        "flags": used_flags,
        "fp16": options.fp16,
    }
    if plugins is not None:
        report["plugins"] = plugins
    log.info("built %s engine %s (%d bytes) in %.2fs", trt.__name__, engine_path, report["engine_bytes"], build_seconds)
    return report
