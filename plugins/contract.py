"""What every plugin declares once: its contract (TensorRT's and ONNX's view of one op).

A ``Contract`` names the op (``name``: the ONNX op type and the TensorRT plugin name), its
``namespace`` (the ONNX function domain and the TensorRT plugin namespace, both ``lrcompile``),
its ``version``, its inputs and outputs in order, and its attributes. Everything else reads it: the
ONNX emission (``lrcompile.engine.functions``: the model-local function's signature and the call's
attributes), the TensorRT glue (``tensorrt.plugin`` registration: ``"<namespace>::<name>"``), the
references' and kernels' argument order, and the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

#: The ONNX domain of the model-local functions and the TensorRT plugin namespace.
NAMESPACE = "lrcompile"
#: Element types the kernels take (ONNX / numpy names).
FLOATS = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Port:
    """One input or output: its name, its shape in symbols (``("M", "K")``; ``...`` leading
    batch axes), its element types, and what it holds."""

    name: str
    shape: tuple[str, ...]
    dtypes: tuple[str, ...]
    doc: str


@dataclass(frozen=True)
class Attribute:
    """One attribute: name, ONNX type (``"int"``, ``"float"``, ``"string"``), default, meaning."""

    name: str
    kind: str
    default: object
    doc: str


@dataclass(frozen=True)
class Contract:
    name: str
    version: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    attributes: tuple[Attribute, ...] = ()
    doc: str = ""
    namespace: str = NAMESPACE

    @property
    def qualified(self) -> str:
        """The ``tensorrt.plugin`` id: ``"lrcompile::LowRankGemm"``."""
        return f"{self.namespace}::{self.name}"

    @property
    def input_names(self) -> list[str]:
        return [p.name for p in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [p.name for p in self.outputs]

    def call_attributes(self) -> dict[str, str]:
        """The attributes every ONNX call of the op carries: TensorRT's ONNX parser reads
        ``plugin_namespace`` and ``plugin_version`` to pick the registered plugin creator; ONNX
        Runtime and the full checker accept them on a model-local function call (tested)."""
        return {"plugin_namespace": self.namespace, "plugin_version": self.version}
