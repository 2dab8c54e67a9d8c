"""Plumbing shared by the builders: where the data lives, and writing one build folder.

A builder returns a :class:`Built` (the ONNX model, calib/eval feeds, optional labels and its own
part of ``meta.json``); :func:`write_build` writes the folder::

    model.onnx          the model (its weights in model.onnx.data for builders that save external data)
    calib.npz           input name -> array, batched on axis 0 (for calibration)
    eval.npz            input name -> array (for evaluation)
    eval_reference.npz  output name -> the model's ONNX Runtime outputs on eval.npz
    calib_labels.npy    labels of the calib rows   (labelled tasks only)
    eval_labels.npy     labels of the eval rows    (labelled tasks only)
    distill.npz         more unlabeled inputs, disjoint from both (builders that have them; for
                        ``--distill``)
    meta.json           name, inputs/outputs, task, metric definitions, baseline, seed, data, options

The baseline in ``meta.json`` scores the reference outputs (ONNX Runtime, CPU) against the labels,
so ``metrics.evaluate`` of the written model on the folder reproduces it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

import metrics

DATA_ENV = "LRCOMPILE_DATA"
OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; keeps older runtimes happy


class BuildError(Exception):
    """A user error (missing data, missing optional package): printed as one line."""


def data_dir(override: str | Path | None = None) -> Path:
    """The shared data folder: ``override``, else ``$LRCOMPILE_DATA``, else ``<repo>/../shared/data``."""
    path = Path(override or os.environ.get(DATA_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not path.is_dir():
        raise BuildError(f"data folder {path} not found: set {DATA_ENV} or pass --data")
    return path


def data_file(data: Path, rel: str) -> Path:
    """A file in the data folder, with a clear error when it is missing."""
    path = data / rel
    if not path.is_file():
        raise BuildError(f"data file {path} not found: set {DATA_ENV} or pass --data")
    return path


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file, recorded in meta.json for provenance."""
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def require(module: str, hint: str):
    """Import an optional dependency or raise a one-line BuildError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BuildError(f"this builder needs {module} ({e}); {hint}") from None


@dataclass
class Built:
    """What a builder produces; ``write_build`` turns it into a build folder.

    Attributes:
        model: the ONNX model.
        calib: calibration feed, input name -> array batched on axis 0.
        eval: evaluation feed, same layout.
        task: "fidelity", "binary_classification" or "classification" (see metrics.TASK_METRICS).
        output: the output that the metrics score.
        primary: the headline metric key.
        data: where the feeds and any training data came from (files, slices, split rules).
        extra: builder-specific facts for meta.json (training log, checks, sizes).
        calib_labels / eval_labels: labels of the feed rows for labelled tasks.
        batch_size: rows per ONNX Runtime call when evaluating.
        torch_output: the source framework's output on the eval feed, to record the export error.
        distill: more unlabeled inputs, disjoint from calib and eval (``--distill`` data), or None.
        external_data: the file beside ``model.onnx`` that holds the weights (as the dynamo exporter
            saves them), or None to keep them in ``model.onnx``.
        weights_file: for models too large to hold in memory (models/big.py): the external-data file
            the builder has already written (in the output folder, under a temporary name), which the
            model's initializers reference as ``external_data``; ``write_build`` moves it into place
            and saves the model as it is. None: the weights are in the proto.
    """

    model: onnx.ModelProto
    calib: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    task: str
    output: str
    primary: str
    data: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    calib_labels: np.ndarray | None = None
    eval_labels: np.ndarray | None = None
    batch_size: int | None = None
    torch_output: np.ndarray | None = None
    distill: dict[str, np.ndarray] | None = None
    external_data: str | None = None
    weights_file: str | Path | None = None


def _tensor_specs(values) -> list[dict]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
        specs.append({"name": v.name, "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name,
                      "shape": dims})
    return specs


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("numpy", "onnx", "onnxruntime", "torch", "transformers", "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write_build(built: Built, out: Path, *, name: str, seed: int, options: dict) -> dict:
    """Write the build folder (see the module docstring) and return its meta.json content."""
    out.mkdir(parents=True, exist_ok=True)
    graph = built.model.graph
    if built.weights_file is not None:
        if not built.external_data:
            raise ValueError("weights_file needs external_data, the name the initializers reference")
        os.replace(built.weights_file, out / built.external_data)  # same folder: a rename
        onnx.save_model(built.model, out / "model.onnx")  # the initializers only reference the file
    elif built.external_data:
        (out / built.external_data).unlink(missing_ok=True)  # onnx appends to an existing data file
        copy = onnx.ModelProto()
        copy.CopyFrom(built.model)  # saving moves the weights out of the proto it is given
        onnx.save_model(copy, out / "model.onnx", save_as_external_data=True, location=built.external_data)
    else:
        onnx.save_model(built.model, out / "model.onnx")
    np.savez(out / "calib.npz", **built.calib)
    np.savez(out / "eval.npz", **built.eval)
    files = {"model": "model.onnx", "calib": "calib.npz", "eval": "eval.npz",
             "eval_reference": "eval_reference.npz", "calib_labels": None, "eval_labels": None, "distill": None}
    if built.external_data:
        files["model_data"] = built.external_data
    if built.distill is not None:
        np.savez(out / "distill.npz", **built.distill)
        files["distill"] = "distill.npz"
    for split, labels in (("calib", built.calib_labels), ("eval", built.eval_labels)):
        if labels is not None:
            files[f"{split}_labels"] = f"{split}_labels.npy"
            np.save(out / f"{split}_labels.npy", labels)
    ref = metrics.run_model(out / "model.onnx", built.eval, built.batch_size)
    np.savez(out / "eval_reference.npz", **ref)
    baseline = metrics.score(ref[built.output], ref[built.output], built.task, built.eval_labels)
    baseline["n"] = len(ref[built.output])
    extra = dict(built.extra)
    checks = extra.pop("checks", {})
    if built.torch_output is not None:
        checks["ort_vs_torch_max_abs_diff"] = float(np.abs(ref[built.output] - built.torch_output).max())

    meta = {
        "name": name,
        "task": built.task,
        "opset": next(o.version for o in built.model.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": _tensor_specs(graph.input),
        "outputs": _tensor_specs(graph.output),
        "metric": {
            "output": built.output,
            "primary": built.primary,
            "higher_is_better": built.primary not in ("logloss", "max_abs_diff", "mean_abs_diff"),
            "batch_size": built.batch_size,
            "definitions": {k: metrics.DEFINITIONS[k] for k in baseline if k != "n"},
            "how": "metrics.evaluate(model_path, build_dir) in models/metrics.py (ONNX Runtime, CPU)",
            "baseline_runtime": metrics.runtime(),
        },
        "baseline": baseline,
        "seed": seed,
        "options": options,
        "files": files,
        "labels": ("calib_labels.npy / eval_labels.npy: one label per feed row, aligned with axis 0"
                   if built.eval_labels is not None else None),
        "feeds": {split: {k: {"dtype": v.dtype.name, "shape": list(v.shape)} for k, v in feed.items()}
                  for split, feed in (("calib", built.calib), ("eval", built.eval), ("distill", built.distill))
                  if feed is not None},
        "data": built.data,
        "checks": checks,
        **extra,
        "versions": _versions(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def make_model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    """Wrap a graph as an opset-17 / IR-8 model with a stable producer stamp."""
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="lrcompile-models", producer_version="1", doc_string=doc)
    model.ir_version = IR_VERSION
    return model

