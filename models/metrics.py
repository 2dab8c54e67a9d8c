"""Task metrics for the example models, and ``evaluate``: score any model against a build folder.

A build folder (written by ``models/build.py``) holds the eval feed (``eval.npz``), the original
model's outputs on it (``eval_reference.npz``), optional labels (``eval_labels.npy``) and
``meta.json``, whose ``metric`` entry names the scored output and the task. ``evaluate`` runs a
model with the same inputs and outputs as the original (the original itself, or a compressed
copy) in ONNX Runtime and returns:

- fidelity to the original's outputs, always: ``cosine_mean`` / ``cosine_p1`` (cosine over the
  last axis, leading axes flattened into rows; only when the last axis is longer than 1),
  ``max_abs_diff`` and ``mean_abs_diff``;
- task metrics where there are labels: ``auc`` and ``logloss`` (binary classification on a
  probability output), ``top1`` and ``top1_agreement`` (multi-class logits).

Only numpy, onnx and onnxruntime are needed (no sklearn, no torch; without onnxruntime, onnx's
reference runtime); the tests check ``auc`` and ``logloss`` against scikit-learn.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The metric math is the installed package's (one definition for builders, bench and tests).
from lrcompile.metrics import cosine_stats, logloss, roc_auc, top1_accuracy, top1_agreement  # noqa: F401

#: What each metric key means; builders copy the relevant ones into meta.json.
DEFINITIONS = {
    "cosine_mean": "mean over rows of cos(y, y_ref), rows = output reshaped to [-1, last_dim]",
    "cosine_p1": "1st percentile (numpy linear interpolation) of the same per-row cosines",
    "max_abs_diff": "max |y - y_ref| over all elements",
    "mean_abs_diff": "mean |y - y_ref| over all elements",
    "auc": "ROC AUC of the probability output against the 0/1 labels (rank formula, ties "
    "averaged; equals sklearn.metrics.roc_auc_score)",
    "logloss": "mean binary cross-entropy of the probability output clipped to [eps, 1-eps], eps of "
    "its dtype (equals sklearn.metrics.log_loss)",
    "top1": "fraction of rows whose argmax over the logits equals the label",
    "top1_agreement": "fraction of rows whose argmax equals the original model's argmax",
}

TASK_METRICS = {
    "fidelity": (),
    "binary_classification": ("auc", "logloss"),
    "classification": ("top1", "top1_agreement"),
}


def run_model(model, feed: dict[str, np.ndarray], batch_size: int | None = None,
              providers: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run an ONNX model (path, bytes or an ``InferenceSession``) on ``feed`` in chunks.

    Uses ONNX Runtime; where it is not installed, onnx's own numpy reference runtime (slow, but
    enough for the synthetic models on a machine with only numpy and onnx).

    Args:
        model: the model file, its serialized bytes, or a ready session.
        feed: input name -> array, all batched on the first axis.
        batch_size: rows per ``session.run`` call; None runs the whole feed at once.
        providers: ONNX Runtime execution providers; None means CPU.

    Returns:
        Output name -> array, chunks concatenated along the first axis.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is None:
        import onnx
        from onnx.reference import ReferenceEvaluator

        sess = ReferenceEvaluator(onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model))
        names = list(sess.output_names)
    else:
        if isinstance(model, ort.InferenceSession):
            sess = model
        else:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                        providers=providers or ["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
    n = len(next(iter(feed.values())))
    step = batch_size or n
    chunks = [sess.run(names, {k: v[i:i + step] for k, v in feed.items()}) for i in range(0, n, step)]
    return {name: np.concatenate([c[j] for c in chunks]) for j, name in enumerate(names)}


def runtime() -> str:
    """The runtime ``run_model`` uses here, e.g. ``"onnxruntime 1.32.0"``."""
    try:
        import onnxruntime as ort
    except ImportError:
        import onnx

        return f"onnx.reference {onnx.__version__} (onnxruntime not installed)"
    return f"onnxruntime {ort.__version__}"


def load_meta(build_dir: str | Path) -> dict:
    """The ``meta.json`` of a build folder."""
    return json.loads((Path(build_dir) / "meta.json").read_text())


def score(y: np.ndarray, ref: np.ndarray, task: str, labels: np.ndarray | None = None) -> dict[str, float]:
    """All metrics of one output ``y`` against the reference output and, if given, the labels."""
    if y.shape != ref.shape:
        raise ValueError(f"output shape {y.shape} differs from the reference's {ref.shape}")
    diff = np.abs(np.asarray(y, np.float64) - np.asarray(ref, np.float64))
    out: dict[str, float] = {}
    if y.shape[-1] > 1:
        out.update(cosine_stats(y, ref))
    out.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()))
    if labels is not None and task == "binary_classification":
        out.update(auc=roc_auc(labels, y), logloss=logloss(labels, y))
    elif labels is not None and task == "classification":
        out.update(top1=top1_accuracy(y, labels), top1_agreement=top1_agreement(y, ref))
    return out


def evaluate(model_path: str | Path, build_dir: str | Path, *, max_rows: int | None = None,
             providers: list[str] | None = None) -> dict[str, float]:
    """Score a model on a build folder's eval feed (see the module docstring for the keys).

    Args:
        model_path: an ONNX model with the original's inputs and outputs (e.g. a compressed copy).
        build_dir: the folder written by ``models/build.py`` for the original model.
        max_rows: score only the first rows of the eval feed (quick checks); None means all.
        providers: ONNX Runtime execution providers; None means CPU.

    Returns:
        Metric name -> value, plus ``n`` (rows scored). The same keys as ``meta["baseline"]``.
    """
    build_dir = Path(build_dir)
    meta = load_meta(build_dir)
    spec = meta["metric"]
    with np.load(build_dir / meta["files"]["eval"]) as z:
        feed = {k: z[k][:max_rows] for k in z.files}
    with np.load(build_dir / meta["files"]["eval_reference"]) as z:
        ref = z[spec["output"]][:max_rows]
    labels = None
    if meta["files"].get("eval_labels"):
        labels = np.load(build_dir / meta["files"]["eval_labels"])[:max_rows]
    outputs = run_model(model_path, feed, spec.get("batch_size"), providers)
    if spec["output"] not in outputs:
        raise ValueError(f"{model_path} has no output {spec['output']!r} (has {sorted(outputs)})")
    result = score(outputs[spec["output"]], ref, meta["task"], labels)
    result["n"] = int(len(ref))
    return result
