"""Fisher information of constant weights, for Fisher-weighted SVD (FWSVD).

Definition (empirical Fisher at batch level): for each named weight tensor ``W``,
``F = sum_b (dL_b/dW)^2`` (elementwise), where ``L_b`` is the *mean* loss over batch ``b`` of the
calibration data against its labels. It is accumulated in float64 and returned in the layout of the
tensor as the model holds it (a Gemm ``transB=1`` weight stays ``[N, K]``, a Conv weight
``[O, I/g, k...]``); :func:`fisher_for_candidate` maps it onto a candidate's ``[K, N]`` matrices.
The scale depends on the batch size and the number of batches; FWSVD only uses relative row
importances, so it does not matter.

Gradients come from torch: the ONNX model is converted with onnx2torch (optional dependency:
``pip install 'lrcompile[fisher]'``). Each named weight is *lifted* first: its consumers read a new
graph input instead of the initializer, and that input is fed a leaf tensor with
``requires_grad``, so the gradient arrives in the stored layout whatever onnx2torch does with
MatMul/Gemm weights (buffers, ``nn.Linear`` with a transposed or alpha-scaled copy), and a weight
shared by several nodes gets its total gradient. Conv/ConvTranspose weights cannot be lifted
(onnx2torch bakes them into ``nn.ConvNd`` modules, same layout): their gradient is read from those
modules' ``weight`` parameters.

Conversion: a model onnx2torch refuses is normalised for the torch-side copy only (the model that is
rewritten and written stays the user's) and converted again; see :func:`normalised`. A model that
still does not convert raises :class:`Unconvertible`, and each torch-side step declines with that
reason instead of ending the compile: kfac's layers fall back to whiten, fwsvd's to plain SVD, and
``--distill`` keeps the rewrite's weights (``lrcompile.distill``).

Labels (the convention): a calibration ``.npz`` may carry the labels as the array ``__labels__``
(one row per sample, aligned with the inputs; names starting with ``__`` are not model inputs), or
the user passes a separate ``.npy`` (``--labels``). Losses: ``bce`` (a probability output with one
value per sample, clamped to ``[1e-7, 1 - 1e-7]``), ``ce`` (logits ``[..., C]`` with integer labels
``[...]``), ``mse`` (float labels with as many values as the output), ``auto`` (chosen from the
first batch: integer labels with a ``[..., C>1]`` output -> ce; 0/1 labels with an output in
[0, 1] -> bce; float labels -> mse).
"""
from __future__ import annotations

import logging
import sys
import time
import types
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper
from tqdm.auto import tqdm

from .errors import LrcError
from .io import in_memory, load_npz
from .weights import import_graph, to_array

if TYPE_CHECKING:
    from .ir import Candidate

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'lrcompile[fisher]' (torch and onnx2torch)"
LOSSES = ("auto", "bce", "ce", "mse")
LABELS_KEY = "__labels__"
#: Ops whose onnx2torch converter copies these weight inputs into module parameters.
BAKED = {"Conv": (1,), "ConvTranspose": (1,)}
#: Ops whose converter needs these inputs as initializers and hides them from autograd.
UNSUPPORTED = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
               "Conv": (2,), "ConvTranspose": (2,)}
_EPS = 1e-7


# ----------------------------------------------------------------------------- user-supplied Fisher

def load_fisher_npz(path: str | Path, weights: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Read a user-supplied Fisher ``.npz``.

    Args:
        path: the file; keys are weight tensor (initializer) names, values the sums of squared loss
            gradients **in the layout the model stores the tensor** (a Gemm ``transB=1`` weight is
            ``[N, K]``, a Conv weight ``[O, I/g, k...]``), not the ``[K, N]`` candidate layout.
        weights: name -> stored shape of every weight the file may describe.

    Returns:
        name -> float64 Fisher, for the names the file holds (weights it omits are absent).

    Raises:
        LrcError: missing/unreadable file, pickled objects, unknown keys, wrong shapes, values that
            are not real numbers, negative or non-finite.
    """
    p = Path(path)
    if not p.is_file():
        raise LrcError(f"--fisher {p}: no such file; save name -> squared-gradient sums with np.savez")
    if not zipfile.is_zipfile(p):
        raise LrcError(f"--fisher {p} is not an .npz archive; save name -> Fisher arrays with np.savez")
    raw = load_npz(p, "--fisher")
    unknown = sorted(set(raw) - set(weights))
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise LrcError(f"--fisher {p}: {', '.join(map(repr, unknown[:5]))}{more} name no factorizable weight; "
                       f"keys must be weight initializer names")
    out = {}
    for k, v in raw.items():
        want = tuple(weights[k])
        if v.shape != want:
            raise LrcError(f"--fisher {p}: {k!r} has shape {list(v.shape)}, expected the stored weight shape {list(want)}")
        if v.dtype.kind not in "biuf":
            raise LrcError(f"--fisher {p}: {k!r} has dtype {v.dtype}; Fisher values must be real numbers")
        v = v.astype(np.float64)
        if not np.all(np.isfinite(v)):
            raise LrcError(f"--fisher {p}: {k!r} holds NaN or Inf; Fisher values must be finite")
        if np.any(v < 0):
            raise LrcError(f"--fisher {p}: {k!r} holds negative values; a Fisher is a sum of squares")
        out[k] = v
    return out


def fisher_for_candidate(cand: Candidate, fisher: np.ndarray) -> list[np.ndarray]:
    """Map a stored-layout Fisher onto ``cand.matrices`` (one ``[K, N]`` per group).

    Mirrors the passes: a key ending in ``:T`` (Gemm ``transB``, MatMul with the weight on the
    left) is transposed; a Conv weight ``[O, I/g, k...]`` splits into groups, each ``[I/g*k.., O/g]``.
    """
    g = len(cand.matrices)
    if fisher.ndim > 2:
        og = fisher.shape[0] // g
        mats = [fisher[i * og:(i + 1) * og].reshape(og, -1).T for i in range(g)]
    else:
        mats = [fisher.T if cand.weight_key.endswith(":T") else fisher]
    got, want = [m.shape for m in mats], [m.shape for m in cand.matrices]
    if got != want:
        raise AssertionError(f"{cand.label}: Fisher maps to {got}, the candidate's matrices are {want}")
    return [np.ascontiguousarray(m) for m in mats]


# ----------------------------------------------------------------------------- labels

def load_labels(calib_path: str | Path, labels_path: str | Path | None = None) -> np.ndarray:
    """All labels: ``labels_path`` (a ``.npy``) when given, else the calibration ``.npz``'s ``__labels__``."""
    if labels_path is not None:
        p = Path(labels_path)
        if not p.is_file():
            raise LrcError(f"--labels {p}: no such file; save the labels with np.save (one row per sample)")
        try:
            y = np.load(p, allow_pickle=False)
        except ValueError as e:
            raise LrcError(f"--labels {p}: holds pickled objects ({e}); save a plain array with np.save") from None
        except Exception as e:  # noqa: BLE001
            raise LrcError(f"--labels {p} is not a readable .npy ({type(e).__name__}); save it with np.save") from None
        if not isinstance(y, np.ndarray):
            raise LrcError(f"--labels {p}: expected one array (.npy), got an archive; save it with np.save")
    calib = Path(calib_path)
    arrays = load_npz(calib, "--calib") if calib.suffix == ".npz" and (labels_path is None or calib.is_file()) else None
    if labels_path is None:
        if arrays is None:
            raise LrcError(f"--calib {calib}: only an .npz carries labels ({LABELS_KEY}); pass --labels FILE.npy")
        if LABELS_KEY not in arrays:
            raise LrcError(f"--calib {calib} holds no {LABELS_KEY} array; add it (one row per sample) "
                           f"or pass --labels FILE.npy")
        y = arrays[LABELS_KEY]
    if y.ndim == 0 or y.dtype.kind not in "biuf":
        raise LrcError(f"labels: expected a numeric array with one row per sample, got {y.dtype} {list(y.shape)}")
    rows = {v.shape[0] for k, v in (arrays or {}).items() if not k.startswith("__") and v.ndim}
    if rows and rows != {y.shape[0]}:
        raise LrcError(f"labels: {y.shape[0]} rows, but --calib {calib.name} holds {sorted(rows)[0]} samples")
    return y


def iter_labels(calib_path: str | Path, labels_path: str | Path | None = None, *, batch_size: int = 16,
                samples: int | None = None) -> Iterator[np.ndarray]:
    """Label batches aligned with ``iter_calibration(CalibSource(calib_path, samples, batch_size))``.

    Exact for ``.npz`` sources (same slicing). For ``.json``/``.py`` sources, whose batches are the
    source's own, pass the whole :func:`load_labels` array to :func:`collect_fisher` instead.
    """
    y = load_labels(calib_path, labels_path)
    n = y.shape[0] if samples is None else min(samples, y.shape[0])
    for lo in range(0, n, batch_size):
        yield y[lo:min(lo + batch_size, n)]


# ----------------------------------------------------------------------------- torch side

def import_convert():
    """onnx2torch's ``convert``; an install hint when torch/onnx2torch are missing.

    onnx2torch imports torchvision at import time, only for its NMS and RoiAlign converters. When
    torchvision is missing or broken (e.g. a CUDA torchvision over a CPU torch), onnx2torch is
    imported with a temporary stand-in whose ops raise if a model uses them.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        raise LrcError(f"gradient statistics (fwsvd --fisher collect, kfac) need torch: {INSTALL_HINT}") from None
    try:
        from onnx2torch import convert

        _alias_converters()
        return convert
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] in ("onnx2torch", "torch"):
            raise LrcError(f"gradient statistics (fwsvd --fisher collect, kfac) need onnx2torch: {INSTALL_HINT}") from None
        cause = e
    except Exception as e:  # noqa: BLE001 - a broken torchvision raises RuntimeError/OSError at import
        cause = e
    log.info("onnx2torch imported without torchvision (%s: %s); NMS/RoiAlign unavailable", type(cause).__name__, cause)

    def unavailable(*_a, **_k):
        raise LrcError(f"this model uses NMS/RoiAlign, which needs a working torchvision ({cause})")

    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.batched_nms = unavailable
    tv.ops = ops
    saved = {k: sys.modules.pop(k) for k in list(sys.modules)
             if k.split(".")[0] in ("onnx2torch", "torchvision")}
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops})
    try:
        from onnx2torch import convert

        _alias_converters()
        return convert
    except Exception as e:  # noqa: BLE001
        raise LrcError(f"onnx2torch failed to import ({type(e).__name__}: {e}): {INSTALL_HINT}") from None
    finally:
        for k in ("torchvision", "torchvision.ops"):
            sys.modules.pop(k, None)
        sys.modules.update({k: v for k, v in saved.items() if k.split(".")[0] == "torchvision"})


#: Op versions that only widened the type list (bfloat16) over one onnx2torch converts: same semantics,
#: so the older converter serves them (opset 16+ exporters write GreaterOrEqual-16, e.g. MiniLM's mask).
CONVERTER_ALIASES = (("GreaterOrEqual", 12, 16), ("LessOrEqual", 12, 16))


def _alias_converters() -> None:
    try:
        from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription
    except ImportError:  # another onnx2torch layout: leave it as it is
        return
    for op, have, want in CONVERTER_ALIASES:
        old, new = OperationDescription("", op, have), OperationDescription("", op, want)
        if old in _CONVERTER_REGISTRY and new not in _CONVERTER_REGISTRY:
            _CONVERTER_REGISTRY[new] = _CONVERTER_REGISTRY[old]


def _constant_values(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    inits = {i.name: i for i in model.graph.initializer}
    out, rest = {}, []
    for n in names:
        if n in inits:
            out[n] = to_array(inits[n])
        else:
            rest.append(n)
    if rest:
        from .ir import ConstantResolver

        graph = import_graph(model)
        tensors, consts = graph.tensors(), ConstantResolver(graph)
        for n in rest:
            r = consts.resolve(tensors[n]) if n in tensors else None
            if r is None or r.value is None:
                raise LrcError(f"weight {n!r} is not a constant tensor of the model "
                               f"({r.reason if r is not None else 'no such tensor'})")
            out[n] = r.value
    for n, v in out.items():
        if v.dtype.kind != "f":
            raise LrcError(f"weight {n!r} has dtype {v.dtype}; Fisher needs float weights")
    return out


def _lift(model: onnx.ModelProto, values: dict[str, np.ndarray], output: str):
    """A copy of ``model`` with one output and each weight's consumers reading a new graph input.

    Returns (model, lifted input name by weight, baked consumers' first outputs by weight).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    keep = [o for o in g.output if o.name == output]
    del g.output[:]
    g.output.extend(keep)
    used = {t for node in g.node for t in (*node.input, *node.output)} | {i.name for i in g.input}
    used |= {i.name for i in g.initializer}
    inits = {i.name for i in g.initializer}
    lifted, baked = {}, {}
    for w, value in values.items():
        new = w + "__lrc_fisher"
        while new in used:
            new += "_"
        used.add(new)
        init_name = w
        uses = 0
        for node in g.node:
            for i, t in enumerate(node.input):
                if t != w:
                    continue
                uses += 1
                if i in UNSUPPORTED.get(node.op_type, ()):
                    raise LrcError(f"weight {w!r} feeds {node.op_type} input {i}, which onnx2torch keeps out of "
                                   f"autograd; Fisher is collected for MatMul/Gemm/Conv weights")
                if i in BAKED.get(node.op_type, ()):
                    if w not in inits:  # onnx2torch bakes only initializers: give the value one
                        init_name = new + "_init"
                        if init_name not in inits:
                            g.initializer.append(numpy_helper.from_array(value, init_name))
                            inits.add(init_name)
                    node.input[i] = init_name
                    baked.setdefault(w, []).append(node.output[0])
                else:
                    node.input[i] = new
                    lifted[w] = new
        if not uses:
            raise LrcError(f"weight {w!r} is used by no node of the main graph")
        if w in lifted:
            elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
            g.input.append(onnx.helper.make_tensor_value_info(new, elem, list(value.shape)))
    return m, lifted, baked


class Unconvertible(LrcError):
    """onnx2torch cannot convert the model (or its module fails on the data), even normalised: the
    torch-side methods decline it with this message as the reason."""


#: The newest opset whose op versions onnx2torch 1.5.15 converts: opset 18 moved the Reduce* axes,
#: Split's sizes and Pad's axes into inputs and revised Resize and ScatterND, and onnx2torch has no
#: converter for those versions (nor for the opset 19-21 versions of Reshape, Cast, Shape, ...).
TORCH_OPSET = 17


def normalised(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` that onnx2torch converts where it refused the original, and what changed.

    Two rewrites, each the same function on every input the model accepts:

    - above opset :data:`TORCH_OPSET`, the model is converted down to it with ``onnx.version_converter``
      (constant axes inputs become attributes; a reduction with ``noop_with_empty_axes=1`` and no axes,
      which the adapter leaves as an all-axes reduction, becomes the ``Identity`` it is);
    - ``Reshape(allowzero=1)`` becomes ``allowzero=0`` where the two modes agree on every run. They
      differ only at a 0 in the shape: ``allowzero=1`` keeps it, ``allowzero=0`` copies the data's
      dim at that position. So they agree when the shape holds no 0 (constant entries other than 0),
      when it holds a ``-1`` (the spec makes a 0 beside a -1 invalid under ``allowzero=1``), and at an
      entry read by ``Shape`` that is the data's own dim at that position (the same symbol after
      shape inference: a 0 there is the 0 that ``allowzero=0`` copies). The dynamo exporter writes
      every ``view`` this way: ``Concat(Shape(t)[0:1], Shape(t)[1:2], [heads], [size])`` of a tensor
      whose batch and sequence dims are those symbols.

    Returns:
        (model, notes); no notes and ``model`` itself when nothing applied.
    """
    from onnx import version_converter

    from .io import opset_of

    notes = []
    m = model
    opset = opset_of(model)
    if opset > TORCH_OPSET:
        try:
            m = version_converter.convert_version(model, TORCH_OPSET)
        except Exception as e:  # noqa: BLE001 - no adapter for some node: leave the opset
            log.info("onnx.version_converter %d -> %d failed (%s: %s)", opset, TORCH_OPSET, type(e).__name__, e)
        else:
            identities = _reductions_after_downgrade(m)
            notes.append(f"opset {opset} -> {TORCH_OPSET} (onnx.version_converter"
                         + (f"; {identities} no-op reductions as Identity)" if identities else ")"))
    zero_free = _zero_free_reshapes(m)
    if zero_free:
        m = _copy(model) if m is model else m
        for i in zero_free:
            for a in m.graph.node[i].attribute:
                if a.name == "allowzero":
                    a.i = 0
        notes.append(f"{len(zero_free)} Reshape allowzero=1 -> 0 (where both modes agree)")
    return (m, notes) if notes else (model, [])


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _reductions_after_downgrade(m: onnx.ModelProto) -> int:
    """Drop the ``noop_with_empty_axes`` attribute the version adapter leaves on reductions that had
    none before opset 18 (all but ReduceSum); one set to 1 with no axes is the identity, and becomes
    ``Identity``. Returns how many became ``Identity``."""
    identities = 0
    for node in m.graph.node:
        if not node.op_type.startswith("Reduce") or node.op_type == "ReduceSum" or node.domain not in ("", "ai.onnx"):
            continue
        attr = {a.name: a for a in node.attribute}
        noop = attr.get("noop_with_empty_axes")
        if noop is None:
            continue
        if noop.i and not (attr.get("axes") and attr["axes"].ints):
            node.op_type = "Identity"
            del node.attribute[:]
            del node.input[1:]
            identities += 1
        else:
            node.attribute.remove(noop)
    return identities


def _zero_free_reshapes(m: onnx.ModelProto) -> list[int]:
    """Indices of the ``Reshape(allowzero=1)`` nodes that ``allowzero=0`` computes alike (see
    :func:`normalised`): the shape is built of constants (a Concat of constants and ``Shape`` reads
    also counts), and either holds a ``-1`` or every entry that may be 0 is the data's own dim at that
    position (the same symbol in shape inference), so a 0 copied under ``allowzero=0`` is that 0."""
    reshapes = [i for i, n in enumerate(m.graph.node) if n.op_type == "Reshape" and n.domain in ("", "ai.onnx")
                and len(n.input) > 1 and any(a.name == "allowzero" and a.i for a in n.attribute)]
    if not reshapes:
        return []
    inits = {i.name: i for i in m.graph.initializer}
    consts = {n.output[0]: a.t for n in m.graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
              for a in n.attribute if a.name == "value"}
    producer = {o: n for n in m.graph.node for o in n.output}
    dims = _symbolic_dims(m)

    def entries(name: str) -> list | None:
        """The shape tensor's entries: ``("c", int)`` for a constant, ``("d", dim)`` for a dim read by
        Shape (``dim`` an int, a symbol name, or None when unknown); None when not of that form."""
        t = inits.get(name) or consts.get(name)
        if t is not None:
            v = to_array(t)
            return [("c", int(x)) for x in v.reshape(-1)] if v.ndim <= 1 and v.dtype.kind in "iu" else None
        src = producer.get(name)
        if src is None or src.domain not in ("", "ai.onnx"):
            return None
        if src.op_type == "Concat":
            parts = [entries(i) for i in src.input]
            return None if any(q is None for q in parts) else [e for q in parts for e in q]
        if src.op_type == "Shape":
            d = dims.get(src.input[0])
            if d is None:
                return None
            attr = {a.name: a.i for a in src.attribute}
            return [("d", x) for x in d[slice(attr.get("start", 0), attr.get("end"))]]
        return None

    def same(node: onnx.NodeProto) -> bool:
        es = entries(node.input[1])
        if es is None:
            return False
        if ("c", -1) in es:  # with allowzero=1 a 0 beside a -1 is invalid: no valid run has a 0 here
            return True
        data = dims.get(node.input[0]) or []
        for i, (kind, v) in enumerate(es):
            if kind == "c" and v != 0:
                continue
            if kind == "d" and (isinstance(v, int) and v > 0 or isinstance(v, str) and i < len(data) and data[i] == v):
                continue
            return False
        return True

    return [i for i in reshapes if same(m.graph.node[i])]


def _symbolic_dims(m: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Tensor name -> its dims from shape inference (an int, a symbol name, or None when unknown), for
    the tensors whose rank is known. Symbols are the model's own (exporters write value_info, and
    ``data_prop`` carries them through Shape/Concat/Reshape); equal names are equal sizes."""
    g = m.graph
    try:
        light = onnx.ModelProto()
        light.CopyFrom(m)
        for t in light.graph.initializer:  # the weights' values are not needed for shapes, only small constants
            if int(np.prod(t.dims)) > 64:
                t.CopyFrom(onnx.TensorProto(name=t.name, dims=t.dims, data_type=t.data_type))
        g = onnx.shape_inference.infer_shapes(light, data_prop=True).graph
    except Exception as e:  # noqa: BLE001 - the model's own value_info then
        log.info("shape inference for the Reshape check failed (%s: %s)", type(e).__name__, e)
    out = {}
    for v in (*g.input, *g.value_info, *g.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    for t in m.graph.initializer:
        out[t.name] = list(t.dims)
    return out


def frozen_module(convert, model: onnx.ModelProto):
    """The onnx2torch module of ``model`` in eval mode, its own parameters frozen (gradients flow only
    to what the caller marks). A model onnx2torch refuses is converted again :func:`normalised`
    (same tensor names, same inputs and outputs); :class:`Unconvertible` when that fails too.
    A lazily loaded model's external data is read in first: torch holds every weight anyway."""
    model = in_memory(model)
    try:
        gm = convert(model, attach_onnx_mapping=True)
    except LrcError:
        raise
    except Exception as e:  # noqa: BLE001 - an op onnx2torch cannot convert
        first = f"{type(e).__name__}: {e}"
        again, notes = normalised(model)
        if not notes:
            raise Unconvertible(f"onnx2torch cannot convert this model ({first})") from None
        try:
            gm = convert(again, attach_onnx_mapping=True)
        except LrcError:
            raise
        except Exception as e2:  # noqa: BLE001
            raise Unconvertible(f"onnx2torch cannot convert this model ({type(e2).__name__}: {e2}; "
                                f"tried after {', '.join(notes)})") from None
        log.info("onnx2torch converted the torch-side copy after %s (it refused the model as it is: %s)",
                 ", ".join(notes), first)
    gm.eval()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm


def run_module(gm, args: list):
    """``gm(*args)``; :class:`Unconvertible` when onnx2torch's module fails on the data (it converted
    an op it cannot run at these shapes)."""
    try:
        return gm(*args)
    except LrcError:
        raise
    except Exception as e:  # noqa: BLE001
        raise Unconvertible(f"the torch module onnx2torch made of this model fails on the calibration data "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def modules_by_output(gm, *, single: bool = False) -> dict:
    """ONNX output name -> the onnx2torch module that computes it (its first output; with ``single``
    only modules with exactly one output)."""
    by_output = {}
    for mod in gm.modules():
        mapping = getattr(mod, "onnx_mapping", None)
        if mapping is not None and mapping.outputs and (len(mapping.outputs) == 1 or not single):
            by_output[mapping.outputs[0]] = mod
    return by_output


def _choose_loss(out, y: np.ndarray) -> str:
    binary = y.size > 0 and bool(np.all((y == 0) | (y == 1)))
    probs = bool(((out >= 0) & (out <= 1)).all())
    if y.dtype.kind in "biu":
        if out.ndim >= 1 and out.shape[-1] > 1 and tuple(out.shape[:-1]) == y.shape:
            return "ce"
        if out.numel() == y.size and binary and probs:
            return "bce"
    elif out.numel() == y.size:
        return "bce" if binary and probs else "mse"
    raise LrcError(f"--loss auto: cannot pair an output of shape {list(out.shape)} with {y.dtype} labels of shape "
                   f"{list(y.shape)}; pass --loss bce|ce|mse with matching labels")


def _loss(kind: str, out, y: np.ndarray):
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(y))
    if kind == "ce":
        if y.dtype.kind not in "biu" or tuple(out.shape[:-1]) != y.shape:
            raise LrcError(f"--loss ce: needs integer labels of shape {list(out.shape[:-1])} for logits "
                           f"{list(out.shape)}, got {y.dtype} {list(y.shape)}")
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1).long())
    if out.numel() != y.size:
        raise LrcError(f"--loss {kind}: labels {list(y.shape)} do not match the output {list(out.shape)} element for element")
    t = t.reshape(out.shape).to(out.dtype)
    if kind == "bce":
        return F.binary_cross_entropy(out.clamp(_EPS, 1 - _EPS), t)
    return F.mse_loss(out, t)


def collect_fisher(
    model: onnx.ModelProto,
    weight_names: list[str],
    batches: Iterable[dict[str, np.ndarray]],
    labels: Iterable[np.ndarray] | np.ndarray,
    *,
    loss: str = "auto",
    output: str | None = None,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, np.ndarray]:
    """Empirical Fisher ``sum_b (dL_b/dW)^2`` of each named constant weight (see the module doc).

    Args:
        model: the ONNX model (not modified).
        weight_names: initializer names (or other constant tensors: Constant outputs, folded
            Transposes); duplicates are collected once.
        batches: feed dicts (``iter_calibration``).
        labels: label batches aligned with ``batches`` (``iter_labels``), or one array of all
            labels, consumed row by row in the batches' order.
        loss: ``auto``, ``bce``, ``ce`` or ``mse``.
        output: the model output the loss reads (default: the first).
        progress: show a progress bar; ``total`` is its sample count.

    Returns:
        name -> float64 Fisher in the tensor's stored layout; empty, with a warning, when the torch
        side declines the model (:class:`Unconvertible`): the layers fall back to plain SVD.
    """
    try:
        return _collect_fisher(model, weight_names, batches, labels, loss=loss, output=output, progress=progress,
                               total=total)
    except Unconvertible as e:
        log.warning("Fisher (fwsvd --fisher collect) declined: %s; its layers fall back to plain SVD", e)
        return {}


def _collect_fisher(model: onnx.ModelProto, weight_names: list[str], batches: Iterable[dict[str, np.ndarray]],
                    labels: Iterable[np.ndarray] | np.ndarray, *, loss: str, output: str | None, progress: bool,
                    total: int | None) -> dict[str, np.ndarray]:
    if loss not in LOSSES:
        raise LrcError(f"--loss {loss!r}: choose one of {', '.join(LOSSES)}")
    convert = import_convert()
    import torch

    outs = [o.name for o in model.graph.output]
    output = output or outs[0]
    if output not in outs:
        raise LrcError(f"--fisher-output {output!r} is not a model output; choose one of {outs}")
    names = list(dict.fromkeys(weight_names))
    values = _constant_values(model, names)
    prepared, lifted, baked = _lift(model, values, output)
    gm = frozen_module(convert, prepared)
    torch.manual_seed(0)
    by_output = modules_by_output(gm)
    params = {w: [next(c.weight for c in by_output[o].modules() if isinstance(c, torch.nn.modules.conv._ConvNd))
                  for o in outs_] for w, outs_ in baked.items()}
    for ps in params.values():
        for p in ps:
            p.requires_grad_(True)
    leaves = {w: torch.from_numpy(np.array(values[w], order="C")).requires_grad_(True) for w in lifted}
    tracked = {w: ([leaves[w]] if w in leaves else []) + params.get(w, []) for w in names}
    inits = {i.name for i in prepared.graph.initializer}
    order = [i.name for i in prepared.graph.input if i.name not in inits]
    by_input = {v: w for w, v in lifted.items()}
    producer = next((n for n in prepared.graph.node if output in n.output), None)
    out_index = list(producer.output).index(output) if producer is not None else 0

    fisher = {w: np.zeros(values[w].shape, np.float64) for w in names}
    all_labels = labels if isinstance(labels, np.ndarray) else None
    label_iter = None if all_labels is not None else iter(labels)
    seen, kind = 0, None
    bar = tqdm(total=total, desc="fisher", unit="sample", disable=None if progress else True, leave=False)
    for feed in batches:
        missing = [n for n in order if n not in by_input and n not in feed]
        if missing:
            raise LrcError(f"calibration batch lacks model inputs {missing}")
        rows = int(next(iter(feed.values())).shape[0])
        if all_labels is not None:
            y = all_labels[seen:seen + rows]
        else:
            y = next(label_iter, None)
            if y is None:
                raise LrcError(f"labels ran out after {seen} samples; give one label row per calibration sample")
        y = np.asarray(y)
        if y.ndim == 0 or y.shape[0] != rows:
            raise LrcError(f"labels: batch at sample {seen} has {y.shape[0] if y.ndim else 0} label rows "
                           f"for {rows} samples; labels must align with the calibration batches")
        args = [leaves[by_input[n]] if n in by_input else torch.from_numpy(np.ascontiguousarray(feed[n]))
                for n in order]
        res = run_module(gm, args)
        if isinstance(res, (tuple, list)):
            res = res[out_index]
        if y.dtype.kind in "biu" and y.ndim == res.ndim > 1 and y.shape[-1] == 1 < res.shape[-1]:
            y = y[..., 0]  # class ids saved as a column
        if kind is None:
            kind = _choose_loss(res.detach(), y) if loss == "auto" else loss
            log.info("Fisher loss: %s on output %r", kind, output)
        _loss(kind, res, y).backward()
        for w, ts in tracked.items():  # a shared weight's gradient is the sum over its uses
            grads = [t.grad for t in ts if t.grad is not None]
            if grads:
                fisher[w] += np.square(sum(g.double() for g in grads).numpy())
            for t in ts:
                t.grad = None
        seen += rows
        bar.update(rows)
    bar.close()
    if seen == 0:
        raise LrcError("Fisher: the calibration source yielded no samples")
    return fisher


# ----------------------------------------------------------------------------- output curvature (kfac)

#: Ops whose candidate output is the module output ``x @ B`` (Gemm: ``alpha x B + beta c``, whose
#: gradient with respect to ``x B`` is the output gradient times ``alpha``: a scale kfac ignores).
CURVATURE_OPS = ("MatMul", "Gemm")


@dataclass
class OutputCurvature:
    """Output-gradient Grams ``sum_rows g g^T`` by tensor name (see :func:`collect_output_curvature`).

    Attributes:
        grams: tensor name -> ``[N, N]`` float64 (mean over probes of the sum over kept rows).
        reasons: tensor name -> why no Gram was collected for it (the layer falls back).
        tensor_of: candidate label -> the output tensor its statistics are read from.
        info: summary for the report (output, probes, samples, rows kept, seconds).
    """

    grams: dict[str, np.ndarray] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    tensor_of: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def for_torch(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy with just ``outputs``, prepared for onnx2torch: ``Constant`` nodes of the main graph
    become initializers and trailing omitted optional inputs are dropped (its Clip converter takes
    min/max only from initializers and reads ``""`` as a tensor name)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [o for o in m.graph.output if o.name in outputs]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    nodes = []
    for node in m.graph.node:
        attr = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in attr and len(node.output) == 1:
            t = onnx.TensorProto()
            t.CopyFrom(attr["value"].t)
            t.name = node.output[0]
            m.graph.initializer.append(t)
        else:
            while node.input and node.input[-1] == "":  # trailing omitted optionals (Clip(x, min, ""))
                del node.input[-1]
            nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    _flatten_edges_as_reshape(m)
    return m


def _flatten_edges_as_reshape(m: onnx.ModelProto) -> None:
    """``Flatten`` with ``axis`` 0 or equal to the input's rank becomes ``Reshape`` to ``[1, -1]`` /
    ``[-1, 1]`` (same result; onnx2torch's Flatten fails on those edge axes, e.g. MiniLM's mask)."""
    flats = [n for n in m.graph.node if n.op_type == "Flatten" and n.domain in ("", "ai.onnx")]
    if not flats:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
    except Exception:  # noqa: BLE001 - leave the model as it is
        return
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim)
             for vi in [*inferred.graph.value_info, *inferred.graph.input]
             if vi.type.tensor_type.HasField("shape")}
    used = {t for n in m.graph.node for t in (*n.input, *n.output)} | {i.name for i in m.graph.initializer}
    for node in flats:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        rank = ranks.get(node.input[0])
        if rank is None:
            continue
        axis = axis + rank if axis < 0 else axis
        if axis not in (0, rank):
            continue
        name = f"{node.output[0]}__lrc_shape"
        while name in used:
            name += "_"
        used.add(name)
        m.graph.initializer.append(numpy_helper.from_array(np.array([1, -1] if axis == 0 else [-1, 1], np.int64), name))
        node.op_type = "Reshape"
        del node.attribute[:]
        node.input.append(name)


def collect_output_curvature(
    model: onnx.ModelProto,
    tensors: list[str],
    batches: Iterable[dict[str, np.ndarray]],
    *,
    output: str | None = None,
    probes: int = 4,
    seed: int = 0,
    mask_input: str | None = None,
    progress: bool = False,
    total: int | None = None,
) -> OutputCurvature:
    """Gauss-Newton output curvature at each named tensor: ``sum_rows E_v[g g^T]``.

    Without labels the loss is a random probe of the chosen output, ``L = sum(v * f)`` with
    ``v ~ N(0, I)`` drawn from a generator seeded with ``seed``; ``g = dL/dy = J^T v`` at each row of
    the tensor ``y`` (its leading dimensions flattened), so ``E_v[g g^T] = J^T J`` row by row, the
    output side of the Kronecker-factored curvature ``kfac`` uses. Each probe is one backward pass
    through a graph built once per batch; the Gram is the mean over the probes of
    ``sum_rows g g^T``, accumulated in float64. Rows where ``mask_input`` is 0 (padding tokens)
    are dropped when the tensor's leading dimensions match the mask's.

    The gradient at a tensor is read from the torch module onnx2torch made of the ONNX node that
    produces it (a forward hook adds a zero leaf so the output joins the autograd graph without
    cutting it); a tensor no single module produces is reported in ``reasons``.

    Args:
        model: the ONNX model (not modified).
        tensors: names of the tensors (layer outputs) to collect.
        batches: feed dicts (``iter_calibration``).
        output: the model output probed (default: the first).
        probes: backward passes per batch.
        seed: seed of the probes.
        mask_input: input whose zeros mark padding rows, or None.
        progress: show a progress bar; ``total`` is its sample count.

    Returns:
        An :class:`OutputCurvature` (``tensor_of`` left for the caller to fill).
    """
    if probes < 1:
        raise LrcError(f"--probes {probes}: give at least one probe per batch")
    convert = import_convert()
    import torch

    from .calibrate import feed_mask, feed_rows, row_mask

    t0 = time.perf_counter()
    outs = [o.name for o in model.graph.output]
    output = output or outs[0]
    if output not in outs:
        raise LrcError(f"the probed output {output!r} (--metric-output) is not a model output; choose one of {outs}")
    res = OutputCurvature(info={"output": output, "probes": probes, "seed": seed, "mask_input": mask_input})

    def declined(e: Unconvertible) -> OutputCurvature:
        """Every tensor without a Gram, for this reason: the layers fall back (Evidence.for_layer:
        kfac -> whiten) and the compile goes on."""
        log.warning("output curvature (kfac) declined: %s; its layers fall back to whiten", e)
        info = {**res.info, "declined": str(e), "tensors": 0, "seconds": round(time.perf_counter() - t0, 3)}
        return OutputCurvature(reasons={t: str(e) for t in tensors}, info=info)

    try:
        gm = frozen_module(convert, for_torch(model, [output]))
    except Unconvertible as e:
        return declined(e)
    by_output = modules_by_output(gm, single=True)
    names = []
    for t in dict.fromkeys(tensors):
        if t in by_output:
            names.append(t)
        else:
            res.reasons[t] = "its producer is not one converted torch module"
    captured: dict[str, object] = {}
    zero = torch.zeros((), requires_grad=True)

    def hook_for(name: str):
        def hook(_mod, _inp, out):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            out = out + zero.to(out.dtype)  # joins autograd without cutting the graph upstream
            captured[name] = out
            return out
        return hook

    handles = [by_output[t].register_forward_hook(hook_for(t)) for t in names]
    inits = {i.name for i in model.graph.initializer}
    order = [i.name for i in model.graph.input if i.name not in inits]
    gen = torch.Generator().manual_seed(seed)
    grams: dict[str, torch.Tensor] = {}
    seen = kept = 0
    bar = tqdm(total=total, desc="output curvature", unit="sample", disable=None if progress else True, leave=False)
    try:
        for feed in batches:
            missing = [n for n in order if n not in feed]
            if missing:
                raise LrcError(f"calibration batch lacks model inputs {missing}")
            mask = feed_mask(feed, mask_input)
            captured.clear()
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # onnx2torch's tracing notes, one per batch
                out = run_module(gm, [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in order])
                if isinstance(out, (tuple, list)):
                    out = out[0]
                live = [t for t in names if t in captured]
                for t in names:
                    if t not in captured:
                        res.reasons.setdefault(t, "its module returned no float tensor")
                keeps = {}
                for t in live:
                    y = captured[t]
                    m = row_mask(mask, tuple(y.shape[:-1])) if y.ndim >= 2 else None
                    keeps[t] = None if m is None else torch.from_numpy(np.ascontiguousarray(m).reshape(-1))
                for i in range(probes):
                    v = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.dtype)
                    grads = torch.autograd.grad(out, [captured[t] for t in live], grad_outputs=v,
                                                retain_graph=i < probes - 1, allow_unused=True)
                    for t, g in zip(live, grads):
                        y = captured[t]
                        n = int(y.shape[-1]) if y.ndim else 1
                        if g is None:
                            g = torch.zeros_like(y)  # the probed output does not depend on it
                        rows = g.detach().reshape(-1, n).double()
                        if keeps[t] is not None:
                            rows = rows[keeps[t]]
                        acc = rows.T @ rows
                        grams[t] = acc if t not in grams else grams[t] + acc
            n_rows = feed_rows(feed)
            seen += n_rows
            kept += int(mask.sum()) if mask is not None else 0
            bar.update(n_rows)
    except Unconvertible as e:
        return declined(e)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    if seen == 0:
        raise LrcError("--calib: the calibration source yielded no samples")
    res.grams = {t: (0.5 * (g + g.T) / probes).numpy() for t, g in grams.items()}
    res.info.update({"samples": seen, "mask_kept_rows": kept if mask_input else None, "tensors": len(res.grams),
                     "seconds": round(time.perf_counter() - t0, 3)})
    return res

