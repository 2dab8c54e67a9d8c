"""Inputs for verification and timing: seeded random feeds, or the user's .npz / Polygraphy JSON.

Generated feeds (the distribution is stated in the report):
- float inputs: standard normal N(0, 1), seeded;
- integer inputs that reach a Gather's indices (through Cast/Reshape/...): uniform in
  ``[0, table rows)``; inputs whose name contains "mask": all ones; other integers: uniform {0, 1};
- bool inputs: all True;
- dynamic dimensions: from ``dims`` by name (or ``axis0`` style keys), else 2 for the first axis
  and 16 for the others.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import LrcError

PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten", "Expand"}
DEFAULT_DIMS = (2, 16)
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


def _index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For each graph input that feeds a Gather's indices, the size of the gathered axis."""
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    shapes[n.output[0]] = tuple(a.t.dims)
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


def load_feeds(path: str | Path) -> list[dict[str, np.ndarray]]:
    """Load user inputs: an .npz of named arrays, or a Polygraphy JSON input file (list of feed dicts)."""
    p = Path(path)
    if not p.is_file():
        raise LrcError(f"{p}: no such input file; pass an .npz of named arrays or a Polygraphy JSON input file")
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
    raise LrcError(f"{p}: unknown input file type {p.suffix!r}; use .npz or Polygraphy .json")


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
