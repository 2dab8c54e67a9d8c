"""Weights read from a model's external data lazily: memory-mapped, released after use.

A model loaded with ``io.load_model(path, lazy=True)`` keeps its external-data references (their
locations relative to the model's folder). Whoever reads their values needs that folder; it
travels one way, from the orchestrator down, as a context variable: ``compile_model`` runs its
stages inside ``with reading(model_folder):`` and every reader below asks :func:`folder`. Outside
such a block :func:`folder` is None, which is the eager world of today (``load_model`` without
``lazy`` loads all data into the protobuf, so no reference is left to resolve).

- :func:`to_array` gives any initializer's values: an external one as a read-only array mapped
  from its file (the bytes are ONNX's little-endian layout, so numpy reads them as they are), the
  others through ``onnx.numpy_helper``.
- :func:`import_graph` is ``gs.import_onnx`` whose external constants load through
  :class:`MappedValues`, a ``gs.LazyValues``: until read they stay lazy and the exporter writes
  their original ``TensorProto`` (the reference, not a copy); once read, ``Constant.values`` holds
  the mapped array. :func:`release_graph` puts such constants back to lazy and drops their pages
  (the exporter then writes the reference again); ``engine.export`` calls it.
- :func:`release` drops the resident pages of mapped arrays (``madvise(MADV_DONTNEED)`` on their
  mapping; the mapping stays valid and a later read faults the pages back in from the page cache).
  Arrays that are not mapped are left alone, so callers release whatever they were given.
  ``engine.analyze`` releases each weight once matched (the match reads it whole: a NaN check),
  ``engine.apply`` once rewritten.
- :func:`portable` turns a mapped array into a :class:`FileRef` (file, offset, shape, strides,
  dtype) that pickles in a few hundred bytes; :func:`resolve` maps it again in another process.
  Arrays not backed by a file pass through both unchanged.

Every mapping is one ``mmap`` per tensor; it is unmapped when the last array viewing it is gone.
"""
from __future__ import annotations

import mmap
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

_FOLDER: ContextVar[Path | None] = ContextVar("lrcompile_weights_folder", default=None)

#: Element types whose external bytes are numpy's own layout (little-endian, one element per item).
#: Others (bfloat16, float8, 4-bit, strings) are read through ``onnx.numpy_helper``.
_MAPPABLE = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
    onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL,
})


@contextmanager
def reading(base: str | os.PathLike | None) -> Iterator[None]:
    """Within the block, external-data references resolve against folder ``base`` (the model's)."""
    token = _FOLDER.set(Path(base).resolve() if base is not None else None)
    try:
        yield
    finally:
        _FOLDER.reset(token)


def folder() -> Path | None:
    """The folder external-data references resolve against here (None outside :func:`reading`)."""
    return _FOLDER.get()


class _Mapping(mmap.mmap):
    """A read-only file mapping that knows its file, where it starts in it, and (for a graph
    constant) the lazy values it was loaded for."""

    path: str
    start: int
    lazy: "MappedValues | None" = None


def _map(path: str, offset: int, length: int) -> tuple[_Mapping, int]:
    """A mapping of ``length`` bytes of ``path`` at ``offset``; and where those bytes start in it."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        m = _Mapping(f.fileno(), length + offset - start, access=mmap.ACCESS_READ, offset=start)
    m.path, m.start = path, start
    return m, offset - start


def _external(t: onnx.TensorProto, base: Path) -> tuple[str, int, int] | None:
    """``(file, offset, length)`` of an external tensor that can be mapped as numpy's layout."""
    if not uses_external_data(t) or t.data_type not in _MAPPABLE:
        return None
    info = ExternalDataInfo(t)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    need = int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize
    if need == 0 or (info.length is not None and info.length != need):
        return None
    return str(base / info.location), int(info.offset or 0), need


def _base(base) -> Path:
    b = Path(base) if base is not None else folder()
    if b is None:
        raise AssertionError("an external-data reference read outside weights.reading(folder)")
    return b


def to_array(t: onnx.TensorProto, base: str | os.PathLike | None = None) -> np.ndarray:
    """The values of initializer ``t``: mapped read-only when it is external data numpy can read
    as stored, else through ``onnx.numpy_helper.to_array`` (``base``: the folder its references
    resolve against, default :func:`folder`)."""
    if not uses_external_data(t):
        return onnx.numpy_helper.to_array(t)
    b = _base(base)
    where = _external(t, b)
    if where is None:
        return onnx.numpy_helper.to_array(t, base_dir=str(b))
    m, at = _map(*where)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).newbyteorder("<")
    return np.frombuffer(m, dtype=dtype, count=where[2] // dtype.itemsize, offset=at).reshape(tuple(t.dims))


class MappedValues(LazyValues):
    """The lazy values of a graph constant stored as external data: loaded as a read-only mapped
    array (:func:`to_array`); the exporter writes an untouched one as its original reference."""

    def __init__(self, tensor: onnx.TensorProto, base: Path) -> None:
        super().__init__(tensor)
        self.base = base

    def load(self) -> np.ndarray:
        a = to_array(self.tensor, self.base)
        m = _mapping_of(a)
        if m is not None:
            m.lazy = self
        return a


def _constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    for g in (graph, *graph.subgraphs(recursive=True)):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant):
                yield t


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """``gs.import_onnx(model)`` whose constants stored as external data load mapped
    (:class:`MappedValues`) from :func:`folder`."""
    graph = gs.import_onnx(model)
    base = folder()
    if base is None:
        return graph
    for c in _constants(graph):
        lazy = c._values
        if isinstance(lazy, LazyValues) and not isinstance(lazy, (MappedValues, SparseValues)) \
                and uses_external_data(lazy.tensor):
            c.values = MappedValues(lazy.tensor, base)
    return graph


def _mapping_of(a) -> _Mapping | None:
    while isinstance(a, np.ndarray):
        a = a.base
    if isinstance(a, memoryview):
        a = a.obj
    return a if isinstance(a, _Mapping) else None


def release(*arrays) -> int:
    """Drop the resident pages of the mapped arrays among ``arrays`` (others are left alone);
    the arrays stay valid. Returns the bytes of mapping released."""
    done = 0
    for a in arrays:
        m = _mapping_of(a)
        if m is not None and hasattr(mmap, "MADV_DONTNEED") and not m.closed:
            m.madvise(mmap.MADV_DONTNEED)
            done += len(m)
    return done


def release_constants(tensors) -> int:
    """:func:`release` the loaded mapped values of the constants among ``tensors`` (a node's
    inputs, say) without loading any; returns the bytes of mapping released."""
    return release(*(t._values for t in tensors if isinstance(t, gs.Constant) and isinstance(t._values, np.ndarray)))


def release_graph(graph: gs.Graph) -> int:
    """Put every constant of ``graph`` (subgraphs too) that holds its loaded mapped values back to
    lazy, releasing their pages, so that the exporter writes the original reference. Returns how
    many constants were put back."""
    n = 0
    for c in _constants(graph):
        v = c._values
        m = _mapping_of(v)
        if m is not None and m.lazy is not None and isinstance(v, np.ndarray) and v.shape == tuple(m.lazy.shape):
            release(v)
            c.values = m.lazy
            n += 1
    return n


@dataclass(frozen=True)
class FileRef:
    """Where a mapped array's bytes are: enough to map it again in another process."""

    path: str
    offset: int  # file offset of the array's lowest byte
    length: int  # bytes from there to its highest byte
    first: int  # offset of element [0, ..., 0] from the lowest byte
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str


def portable(a):
    """A small picklable :class:`FileRef` for an array viewing a file mapping; anything else as it is."""
    m = _mapping_of(a)
    if m is None:
        return a
    lo, hi = np.lib.array_utils.byte_bounds(a)
    base = np.frombuffer(m, dtype=np.uint8).__array_interface__["data"][0]
    first = a.__array_interface__["data"][0]
    return FileRef(m.path, m.start + lo - base, hi - lo, first - lo, tuple(a.shape), tuple(a.strides), a.dtype.str)


def resolve(ref):
    """The read-only array a :class:`FileRef` points to, mapped here; anything else as it is."""
    if not isinstance(ref, FileRef):
        return ref
    m, at = _map(ref.path, ref.offset, max(ref.length, 1))
    return np.ndarray(ref.shape, dtype=np.dtype(ref.dtype), buffer=m, offset=at + ref.first, strides=ref.strides)


__all__ = ["FileRef", "MappedValues", "folder", "import_graph", "portable", "reading", "release", "release_constants",
           "release_graph", "resolve", "to_array"]
