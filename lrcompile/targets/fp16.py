"""Convert an ONNX model's float32 tensors to float16 (inputs and outputs stay float32).

Needed for fp16 TensorRT engines because the networks are strongly typed: precision comes from
the ONNX. The conversion is onnxconverter-common's ``convert_float_to_float16`` with
``keep_io_types=True`` and its defaults otherwise: its default op block list (Resize, Range, TopK,
Min, Max, CumSum, ... stay float32 behind Casts) and constants clamped into
[1e-7, 1e4] in magnitude (so float32 ``-inf``-like attention masks stay finite in float16).
Model-local functions are inlined first: the converter does not look into function bodies, so a
float32 constant inside one would clash with float16 inputs; inlined nodes left unnamed get names.
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import onnx
import onnx.inliner

from lrcompile.errors import LrcError

log = logging.getLogger(__name__)

# protobuf cannot serialize a message of 2 GiB or more; stay clear of it
_EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)


def convert_fp16(model: onnx.ModelProto, *, op_block_list: list[str] | None = None) -> onnx.ModelProto:
    """Return a float16 copy of ``model`` whose inputs and outputs keep their float32 type.

    Args:
        model: the model, with its external data loaded.
        op_block_list: op types to keep in float32 (None: onnxconverter-common's default list).

    Raises:
        LrcError: onnxconverter-common is missing, or the model is float16 already.
    """
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise LrcError(
            "fp16 conversion needs onnxconverter-common: pip install onnxconverter-common"
        ) from None
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    if model_copy.functions:
        log.info("inlining %d model-local function(s) before fp16 conversion", len(model_copy.functions))
        model_copy = onnx.inliner.inline_local_functions(model_copy)
        _name_unnamed(model_copy.graph)
    try:
        return float16.convert_float_to_float16(
            model_copy,
            keep_io_types=True,
            op_block_list=op_block_list,
            # shape inference serializes the model: impossible at 2 GiB and beyond
            disable_shape_infer=model_copy.ByteSize() >= _EXTERNAL_DATA_THRESHOLD,
        )
    except ValueError as exc:
        if "already converted to float16" in str(exc):
            raise LrcError("the model is float16 already; leave out --fp16") from None
        raise


def _name_unnamed(graph: onnx.GraphProto) -> None:
    """Give every node without a name a unique one (``<op>_inlined_<i>``). Inlined function bodies
    can leave nodes unnamed, and the converter names its Casts after the consuming node: two
    unnamed consumers of one input would get Casts of the same output name."""
    used = {n.name for n in graph.node}
    for i, n in enumerate(graph.node):
        if not n.name:
            name, k = f"{n.op_type}_inlined_{i}", 1
            while name in used:
                k += 1
                name = f"{n.op_type}_inlined_{i}_{k}"
            n.name = name
            used.add(name)


def convert_fp16_file(src: str | Path, dst: str | Path) -> Path:
    """Convert the ONNX file ``src`` (external data included) and save the result to ``dst``.

    The result keeps its weights in a ``<dst name>.data`` file next to it when it is large.
    """
    src, dst = Path(src), Path(dst)
    try:
        model = onnx.load(src)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a bad file
        raise LrcError(f"cannot load ONNX model {src}: {exc}; check the file") from None
    converted = convert_fp16(model)
    large = converted.ByteSize() >= _EXTERNAL_DATA_THRESHOLD
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        onnx.save(
            converted,
            tmp,
            save_as_external_data=large,
            all_tensors_to_one_file=True,
            location=f"{dst.name}.data",
        )
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst
