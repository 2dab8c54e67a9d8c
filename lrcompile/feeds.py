"""Inputs for verification and timing: seeded random feeds, or the user's .npz / Polygraphy JSON.

Generated feeds (the distribution is stated in the report):
- float inputs: standard normal N(0, 1), seeded;
- integer inputs that reach a Gather's indices (through Cast/Reshape/...): uniform in
  ``[0, table rows)``; inputs whose name contains "mask": all ones; other integers: uniform {0, 1};
- bool inputs: all True;
- dynamic dimensions: from ``dims`` by name (or ``input:axis`` keys), else 2 for the first axis
  and 16 for the others.

Shapes that fit (``fit_feeds``): the original model runs in ONNX Runtime on the generated feeds
first. When it fails there (a feature pyramid that needs multiples of 32, a reflect Pad that
needs more samples, a Concat of mismatched sizes), the dynamic dims the user did not give are
tried at the sizes the model's metadata names (``imgsz``, ``input_size``, ...), then at
``TRY_SIZES``, with the batch at 2 then 1; the first shapes it runs on are used. Where 16 works,
16 is used, so nothing changes for such models.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from .errors import LrcError

log = logging.getLogger(__name__)

PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten", "Expand"}
DEFAULT_DIMS = (2, 16)
#: Sizes tried for the dynamic dims past the first axis when the original fails at 16: multiples
#: of 32 (the stride of most feature pyramids and detectors) up to the usual image sizes.
TRY_SIZES = (32, 64, 128, 224, 256, 320, 384, 512, 640)
#: Batch sizes tried for a dynamic first axis, in order.
TRY_BATCHES = (2, 1)
#: Metadata keys whose integers name an input size (e.g. ultralytics' ``imgsz: [640, 640]``).
SIZE_KEYS = re.compile(r"(img|image|input)[_-]?(sz|size|shape|hw)|resolution|seq(uence)?[_-]?len(gth)?", re.I)
DISTRIBUTION = ("floats ~ N(0,1) seeded; integer indices uniform in [0, table rows); "
                "'mask' inputs all ones; other integers uniform {0,1}")


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_spec(vi: onnx.ValueInfoProto, dims: dict | None = None) -> tuple[tuple[int, ...], np.dtype]:
    """Concrete shape and numpy dtype of a graph input, dynamic dims filled from ``dims``."""
    tt = vi.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    shape = []
    for ax, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(d.dim_value)
            continue
        name = d.dim_param
        if dims and name in dims:
            shape.append(int(dims[name]))
        elif dims and f"{vi.name}:{ax}" in dims:
            shape.append(int(dims[f"{vi.name}:{ax}"]))
        else:
            shape.append(DEFAULT_DIMS[0] if ax == 0 else DEFAULT_DIMS[1])
    return tuple(shape), dtype


def _inferred_static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The fully static shapes ONNX shape inference finds for the main graph's tensors (none when
    it fails, e.g. on a model past protobuf's 2 GB)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is a help here, never a requirement
        return {}
    out = {}
    for vi in inferred.graph.value_info:
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out[vi.name] = tuple(d.dim_value for d in t.shape.dim)
    return out


def _index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For each graph input that feeds a Gather's indices, the size of the gathered axis.

    The table's shape is its initializer's or Constant's; a table computed from constants (an
    Identity, as torch's TorchScript exporter writes for a shared table, a Cast from float16, a
    Transpose) gets it from shape inference, so that verification looks up every row of it, not
    only rows 0 and 1."""
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    shapes[n.output[0]] = tuple(a.t.dims)
    if any(n.op_type == "Gather" and n.input and n.input[0] not in shapes for n in model.graph.node):
        shapes = {**_inferred_static_shapes(model), **shapes}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    bounds: dict[str, int] = {}
    for vi in graph_inputs(model):
        frontier, seen = [vi.name], set()
        while frontier:
            t = frontier.pop()
            if t in seen:
                continue
            seen.add(t)
            for n in consumers.get(t, []):
                if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == t and n.input[0] in shapes:
                    axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                    size = shapes[n.input[0]][axis]
                    bounds[vi.name] = min(bounds.get(vi.name, size), size)
                elif n.op_type in PASS_THROUGH and n.input[0] == t:
                    frontier.extend(n.output)
    return bounds


def random_feeds(model: onnx.ModelProto, *, seed: int = 0, dims: dict | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs for every graph input (see the module docstring)."""
    rng = np.random.default_rng(seed)
    bounds = _index_bounds(model)
    feeds = {}
    for vi in graph_inputs(model):
        shape, dtype = input_spec(vi, dims)
        if dtype.kind == "f":
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            if "mask" in vi.name.lower():
                feeds[vi.name] = np.ones(shape, dtype)
            else:
                feeds[vi.name] = rng.integers(0, bounds.get(vi.name, 2), size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[vi.name] = np.ones(shape, bool)
        else:
            raise LrcError(f"input {vi.name!r} has dtype {dtype}, which lrcompile cannot generate; pass --inputs FILE.npz")
    return feeds


#: Runs the original model on one feed: None when it ran, else ONNX Runtime's message in one line.
Runner = Callable[[dict[str, np.ndarray]], "str | None"]


def original_runner(path: str | Path) -> Runner | None:
    """A ``Runner`` for the model file at ``path`` (one ONNX Runtime session, its log silenced:
    a failure is the answer, not an error); None when ONNX Runtime cannot load the model (then
    whatever runs it later says so)."""
    import onnxruntime as ort

    from .sessions import session

    try:
        sess = session(path, log_level=4)  # 4: fatal only
    except LrcError:
        return None
    names = [o.name for o in sess.get_outputs()]
    opts = ort.RunOptions()
    opts.log_severity_level = 4

    def run(feed: dict[str, np.ndarray]) -> str | None:
        try:
            sess.run(names, feed, opts)
        except Exception as e:  # noqa: BLE001 - ORT raises Fail, InvalidArgument, RuntimeException...
            return ort_message(e)
        return None

    return run


def ort_message(e: Exception) -> str:
    """ONNX Runtime's error in one short line: its status prefix and source locations dropped."""
    msg = " ".join(str(e).split()) or type(e).__name__
    msg = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", msg)
    msg = re.sub(r"/\S+\.(?:h|cc|cpp|hpp):\d+ (?:[^.]*? was false\. )?", "", msg)
    msg = re.sub(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: ",
                 r"\1 node '\2': ", msg)
    return msg if len(msg) <= 300 else msg[:297] + "..."


@dataclass(frozen=True)
class FittedFeeds:
    """Feeds the original model runs on, and how they were found."""

    feeds: dict[str, np.ndarray]
    #: the value of each dynamic dim lrcompile chose (its name, or ``input:axis`` when unnamed).
    dims: dict[str, int]
    #: one line for the report when the shapes are not the defaults, else None.
    note: str | None = None


def _free_dims(model: onnx.ModelProto, dims: dict | None) -> dict[str, int]:
    """The dynamic dims the user did not give: key (dim name, or ``input:axis``) -> the axis of
    its first occurrence (0 marks a batch-like dim)."""
    dims = dims or {}
    out: dict[str, int] = {}
    for vi in graph_inputs(model):
        for ax, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            if (d.dim_param and d.dim_param in dims) or f"{vi.name}:{ax}" in dims:
                continue
            out.setdefault(d.dim_param or f"{vi.name}:{ax}", ax)
    return out


def _metadata_sizes(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    """Sizes the model's metadata names (``imgsz: [640, 640]``, ``input_size: 320``), in order."""
    out = []
    for p in model.metadata_props:
        if SIZE_KEYS.search(p.key):
            nums = tuple(int(x) for x in re.findall(r"\d+", p.value) if 1 <= int(x) <= 8192)
            if nums and nums not in out:
                out.append(nums)
    return out


#: At most this many non-batch dynamic dims are each tried as a batch dim too (see ``_trials``).
MAX_BATCH_GUESSES = 4


def _trials(free: dict[str, int], hints: list[tuple[int, ...]]) -> list[dict[str, int]]:
    """Assignments of the free dims to try after the defaults: metadata sizes first, then
    ``TRY_SIZES``; each with the batch-like dims at 2, then 1. Duplicates dropped.

    Then the same sizes with one non-batch dim at a time set to the batch value: a dim that is not
    an input's first axis can still be the batch (a recurrent state ``[layers, batch, hidden]``, as
    silero-vad's ``state [2, ?, 128]`` beside ``input [?, ?]``), and giving it a spatial size makes
    every trial fail on mismatched batches."""
    rest = [k for k, ax in free.items() if ax != 0]
    batches = TRY_BATCHES if any(ax == 0 for ax in free.values()) else TRY_BATCHES[:1]
    sizes: list[tuple[int, ...]] = []
    for h in hints:  # one value per dim in order when they match in number, else each on all
        sizes += [h] if len(h) == len(rest) and len(h) > 1 else [(v,) * len(rest) for v in h]
    sizes += [(DEFAULT_DIMS[1],) * len(rest)] + [(v,) * len(rest) for v in TRY_SIZES]
    guesses = [None] + (rest if 1 < len(rest) <= MAX_BATCH_GUESSES else [])
    out: list[dict[str, int]] = []
    for as_batch in guesses:
        for size in sizes:
            for b in batches:
                a = {k: (b if ax == 0 or k == as_batch else size[rest.index(k)]) for k, ax in free.items()}
                if a not in out:
                    out.append(a)
    return out


def _shapes(feeds: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())


def fit_feeds(model: onnx.ModelProto, runs: Runner | None, *, seed: int = 0, dims: dict | None = None,
              required: bool = True) -> FittedFeeds:
    """Seeded random feeds (``random_feeds``) at shapes the original model runs on (see the
    module docstring). ``runs`` runs the original (None: no check, the defaults as they are).

    Raises:
        LrcError: with ``required``, when the original fails on every shape tried: one line that
            names them and the ``--dim`` / ``--inputs`` options. Without ``required`` (nothing
            runs the feeds later) the defaults are kept with a warning.
    """
    first = random_feeds(model, seed=seed, dims=dims)
    free = _free_dims(model, dims)
    defaults = {k: DEFAULT_DIMS[0] if ax == 0 else DEFAULT_DIMS[1] for k, ax in free.items()}
    if runs is None:
        return FittedFeeds(first, defaults)
    error = runs(first)
    if error is None:
        return FittedFeeds(first, defaults)
    tried = 1
    for a in _trials(free, _metadata_sizes(model)):
        if a == defaults:
            continue
        feeds = random_feeds(model, seed=seed, dims={**(dims or {}), **a})
        tried += 1
        if runs(feeds) is None:
            chosen = ", ".join(f"{k}={v}" for k, v in a.items())
            note = (f"verification inputs at {chosen} ({_shapes(feeds)}): the original model fails in ONNX Runtime "
                    f"at the default dims ({error}); {tried} shapes tried")
            log.warning("%s", note)
            return FittedFeeds(feeds, a, note)
    line = no_fit_message(model, first, error, free, dims, tried)
    if required:
        raise LrcError(line)
    log.warning("%s (kept for --flops)", line)
    return FittedFeeds(first, defaults)


def no_fit_message(model: onnx.ModelProto, first: dict[str, np.ndarray], error: str, free: dict[str, int],
                   dims: dict | None, tried: int) -> str:
    """The one line when the ORIGINAL model fails on every shape tried."""
    given = ", ".join(f"--dim {k}={v}" for k, v in (dims or {}).items())
    if not free:
        where = f"on the shapes {'from ' + given if given else 'it declares'} ({_shapes(first)})"
    else:
        rest = [k for k, ax in free.items() if ax != 0]
        batch = [k for k, ax in free.items() if ax == 0]
        sizes = sorted({v for h in _metadata_sizes(model) for v in h} | {DEFAULT_DIMS[1], *TRY_SIZES})
        varied = ([f"{', '.join(rest)} at {', '.join(map(str, sizes))}"] if rest else []) \
            + ([f"{', '.join(batch)} at {', '.join(map(str, TRY_BATCHES))}"] if batch else [])
        guessed = "; each of those also at the batch size" if 1 < len(rest) <= MAX_BATCH_GUESSES else ""
        where = (f"on every input shape tried ({tried}: {_shapes(first)}, then {' with '.join(varied)}{guessed}"
                 + (f"; given: {given}" if given else "") + ")")
    names = sorted({d.dim_param or f"{vi.name}:{ax}" for vi in graph_inputs(model)
                    for ax, d in enumerate(vi.type.tensor_type.shape.dim) if not d.dim_value})
    return (f"the ORIGINAL model fails in ONNX Runtime {where}, before any compression: {error}; "
            f"pass shapes it accepts with --dim NAME=INT" + (f" (its dynamic dims: {', '.join(names)})" if names else "")
            + " or real inputs with --inputs FILE.npz")


def check_runs(runs: Runner | None, feeds_list: list[dict[str, np.ndarray]], source: str) -> None:
    """One line when the original model fails on the user's inputs (one feed per distinct set of
    shapes is run)."""
    if runs is None:
        return
    seen = set()
    for feeds in feeds_list:
        key = tuple((k, v.shape) for k, v in feeds.items())
        if key in seen:
            continue
        seen.add(key)
        error = runs(feeds)
        if error is not None:
            raise LrcError(f"the ORIGINAL model fails in ONNX Runtime on the inputs of {source} ({_shapes(feeds)}), "
                           f"before any compression: {error}; pass inputs it accepts with --inputs")


#: The function a data-loader script defines when its path names none (Polygraphy's default).
LOADER_FUNC = "load_data"


def split_script(path: str | Path) -> tuple[Path, str] | None:
    """``(script, function)`` for a Polygraphy data-loader script spec (``loader.py`` or
    ``loader.py:make_feeds``); None for any other path."""
    text = str(path)
    head, sep, func = text.rpartition(":")
    if sep and head.endswith(".py") and func.isidentifier():
        return Path(head), func
    return (Path(text), LOADER_FUNC) if text.endswith(".py") else None


def load_feeds(path: str | Path) -> list[dict[str, np.ndarray]]:
    """Load user inputs: an .npz of named arrays, a Polygraphy JSON input file (list of feed dicts),
    or a Polygraphy data-loader script (``loader.py[:func]``, ``func`` default ``load_data``,
    returning or yielding feed dicts)."""
    script = split_script(path)
    if script is not None:
        return _script_feeds(*script)
    p = Path(path)
    if not p.is_file():
        raise LrcError(f"{p}: no such input file; pass an .npz of named arrays, a Polygraphy JSON input file "
                       "or a data-loader script (loader.py[:func])")
    if p.suffix == ".npz":
        from .io import load_npz

        return [load_npz(p, "--inputs")]
    if p.suffix == ".json":
        from polygraphy.json import load_json

        try:
            data = load_json(str(p))
        except Exception as e:  # noqa: BLE001 - polygraphy raises its own exception types
            raise LrcError(f"{p} is not a Polygraphy JSON input file ({type(e).__name__}); save it with polygraphy's save_json") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise LrcError(f"{p}: expected a list of {{input name: array}} dicts (Polygraphy's input format)")
        return [{k: np.asarray(v) for k, v in d.items()} for d in data]
    raise LrcError(f"{p}: unknown input file type {p.suffix!r}; use .npz, Polygraphy .json or a loader .py")


def _script_feeds(path: Path, func: str) -> list[dict[str, np.ndarray]]:
    """The feeds a data-loader script's ``func()`` returns or yields, as Polygraphy's
    ``--data-loader-script`` reads them."""
    from .io import user_function

    if not path.is_file():
        raise LrcError(f"{path}: no such data-loader script")
    fn = user_function(path, func, "--inputs", "it to return or yield {input name: array} dicts")
    try:
        feeds = list(fn())
    except Exception as e:  # noqa: BLE001 - the user's script
        raise LrcError(f"--inputs {path}: {func}() failed: {type(e).__name__}: {e}") from None
    if not feeds or not all(isinstance(d, dict) for d in feeds):
        raise LrcError(f"--inputs {path}: {func}() must return or yield at least one {{input name: array}} dict")
    return [{k: np.asarray(v) for k, v in d.items()} for d in feeds]


def check_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Check names, ranks and dtypes of user feeds against the model's inputs; cast safe mismatches."""
    want = {vi.name: vi for vi in graph_inputs(model)}
    missing = sorted(set(want) - set(feeds))
    extra = sorted(set(feeds) - set(want))
    if missing or extra:
        raise LrcError(f"{source}: inputs do not match the model: missing {missing}, unexpected {extra}; "
                       f"the model's inputs are {sorted(want)}")
    out = {}
    for name, vi in want.items():
        arr = np.asarray(feeds[name])
        shape, dtype = input_spec(vi)
        tt = vi.type.tensor_type
        if len(shape) != arr.ndim:
            raise LrcError(f"{source}: input {name!r} has {arr.ndim} dims, the model expects {len(shape)}")
        for ax, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0 and arr.shape[ax] != d.dim_value:
                raise LrcError(f"{source}: input {name!r} has shape {arr.shape}, the model expects {d.dim_value} on axis {ax}")
        if arr.dtype != dtype:
            if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
                raise LrcError(f"{source}: input {name!r} is {arr.dtype}, the model expects {dtype}")
            arr = arr.astype(dtype)
        out[name] = arr
    return out


def describe(feeds: dict[str, np.ndarray]) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()}
