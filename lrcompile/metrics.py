"""Task metrics for benchmarks: a compressed model's outputs against the original's and the labels.

Pure numpy. Tasks (the ``task`` of a build folder's meta.json, or the bench ``--metric`` alias):

- ``fidelity`` (``cosine``): per-row cosine to the original's output (rows = the output reshaped to
  ``[-1, last_dim]``): mean and 1st percentile;
- ``classification`` (``top1``): top-1 agreement with the original's argmax, top-1 accuracy
  against the labels;
- ``binary_classification`` (``auc``): ROC AUC (Mann-Whitney rank formula, tied scores get their
  average rank: equal to sklearn's ``roc_auc_score``) and log loss against the 0/1 labels.

Every task also reports the output error: max abs, max rel (max |y - ref| / max |ref|, the
output's range: stable near zeros) and relative L2.
"""
from __future__ import annotations

import numpy as np

TASKS = {"cosine": "fidelity", "top1": "classification", "auc": "binary_classification"}
#: The headline metric of each task and whether higher is better.
PRIMARY = {"fidelity": ("cosine_mean", True), "classification": ("top1", True),
           "binary_classification": ("auc", True)}


def task_of(name: str) -> str:
    """The task for a task name or its alias (cosine, top1, auc)."""
    task = TASKS.get(name, name)
    if task not in PRIMARY:
        raise ValueError(f"unknown metric/task {name!r}; choose one of {', '.join(list(TASKS) + list(PRIMARY))}")
    return task


def _rows(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, np.float64)
    return y.reshape(-1, y.shape[-1]) if y.ndim else y.reshape(1, 1)


def cosine_rows(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine of matching rows (last axis); two zero rows count as 1, one zero row as 0."""
    a, b = _rows(y), _rows(ref)
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    same = np.all(a == b, axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), same.astype(np.float64))


def cosine_stats(y: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """``cosine_mean`` and ``cosine_p1`` (1st percentile, linear interpolation) of the row cosines."""
    c = cosine_rows(y, ref)
    return {"cosine_mean": float(c.mean()), "cosine_p1": float(np.percentile(c, 1))}


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax equals the label."""
    return float(np.mean(_rows(logits).argmax(axis=1) == np.asarray(labels).ravel()))


def top1_agreement(logits: np.ndarray, ref_logits: np.ndarray) -> float:
    """Fraction of rows whose argmax equals the original model's argmax."""
    return float(np.mean(_rows(logits).argmax(axis=1) == _rows(ref_logits).argmax(axis=1)))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the average of their ranks."""
    _, inv, counts = np.unique(np.asarray(x).ravel(), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inv]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC: ``(sum of positive ranks - P(P+1)/2) / (P N)``."""
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, np.float64).ravel()
    if y.size != s.size:
        raise ValueError(f"{y.size} labels for {s.size} scores")
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        raise ValueError("AUC needs both positive and negative labels")
    return float((average_ranks(s)[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy; probabilities clipped to ``[eps, 1 - eps]`` (eps of their dtype)."""
    p = np.asarray(probs)
    eps = float(np.finfo(p.dtype if p.dtype.kind == "f" else np.float64).eps)
    p = np.clip(p.astype(np.float64).ravel(), eps, 1.0 - eps)
    y = np.asarray(labels, np.float64).ravel()
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def output_error(y: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """``max_abs``, ``max_rel`` (relative to max |ref|) and ``rel_l2`` of ``y`` against ``ref``."""
    a, b = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    err = np.abs(a - b)
    max_abs = float(err.max()) if err.size else 0.0
    scale, norm = float(np.abs(b).max(initial=0.0)), float(np.linalg.norm(b))
    zero = 0.0 if max_abs == 0 else float("inf")
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else zero,
            "rel_l2": float(np.linalg.norm(a - b)) / norm if norm > 0 else zero}


def score(task: str, y: np.ndarray, ref: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """All metrics of output ``y`` for ``task`` against the original's ``ref`` and the labels."""
    task = task_of(task)
    y, ref = np.asarray(y), np.asarray(ref)
    if y.shape != ref.shape:
        raise ValueError(f"output shape {y.shape} differs from the reference's {ref.shape}")
    out = output_error(y, ref)
    if y.ndim and y.shape[-1] > 1:
        out.update(cosine_stats(y, ref))
    if task == "classification":
        out["top1_agreement"] = top1_agreement(y, ref)
        if labels is not None:
            out["top1"] = top1_accuracy(y, labels)
    elif task == "binary_classification" and labels is not None:
        out["auc"] = roc_auc(labels, y)
        out["logloss"] = logloss(labels, y)
    return out
