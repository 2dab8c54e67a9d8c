"""Numerical verification: the original and the compressed model on the same inputs in ONNX Runtime.

Per output we report ``max_abs`` (max |a - b|), ``max_rel`` (max |a - b| / max |b|, relative to
the output's range, stable near zeros), ``rel_l2`` (||a - b|| / ||b||) and ``cosine`` (of the
flattened outputs), plus the per-sample cosine (mean and min over the first axis) when batched;
and the facts a verdict needs beyond the error (``lrcompile.verdict``): the output's ``dtype``,
its NaN and Inf counts in each model (``nonfinite``), and how much it varies in each
(``variation``: the largest |x - x[0]| over the samples of the first axis when there are two or
more, else max - min of the values; None when some value is not finite).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .metrics import cosine_rows, output_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputDiff:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    rel_l2: float
    cosine: float
    sample_cosine_mean: float | None
    sample_cosine_min: float | None
    dtype: str = "float32"
    nonfinite: dict = field(default_factory=lambda: {"original": {"nan": 0, "inf": 0},
                                                     "compressed": {"nan": 0, "inf": 0}})
    variation: dict = field(default_factory=lambda: {"original": None, "compressed": None})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def run_model(path: str | Path, feeds_list: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    from .targets.ort import session

    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, f))) for f in feeds_list]


def nonfinite_counts(x: np.ndarray) -> dict[str, int]:
    """How many values of ``x`` are NaN and how many are +-Inf (0 and 0 for integer outputs)."""
    x = np.asarray(x)
    if x.dtype.kind not in "fc":
        return {"nan": 0, "inf": 0}
    return {"nan": int(np.isnan(x).sum()), "inf": int(np.isinf(x).sum())}


def variation(x: np.ndarray) -> float | None:
    """How much ``x`` varies: the largest |x - x[0]| over the samples of the first axis when there
    are two or more (0: the output does not depend on the input), else max - min of its values
    (0: constant). None when some value is NaN or Inf."""
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return 0.0
    if not np.isfinite(x).all():
        return None
    if x.ndim >= 2 and x.shape[0] >= 2:
        return float(np.abs(x - x[:1]).max())
    return float(x.max() - x.min())


def diff_outputs(name: str, got: np.ndarray, ref: np.ndarray) -> OutputDiff:
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf outputs give NaN metrics, counted below
        return _diff_outputs(name, got, ref)


def _diff_outputs(name: str, got: np.ndarray, ref: np.ndarray) -> OutputDiff:
    err = output_error(got, ref)
    s_mean = s_min = None
    if ref.ndim >= 2 and ref.shape[0] >= 1:
        sc = cosine_rows(got.reshape(got.shape[0], -1), ref.reshape(ref.shape[0], -1))
        s_mean, s_min = float(sc.mean()), float(sc.min())
    return OutputDiff(
        name=name,
        shape=tuple(ref.shape),
        **err,
        cosine=float(cosine_rows(got.reshape(1, -1), ref.reshape(1, -1))[0]),
        sample_cosine_mean=s_mean,
        sample_cosine_min=s_min,
        dtype=str(np.asarray(ref).dtype),
        nonfinite={"original": nonfinite_counts(ref), "compressed": nonfinite_counts(got)},
        variation={"original": variation(ref), "compressed": variation(got)},
    )


def compare(original: str | Path, compressed: str | Path, feeds_list: list[dict[str, np.ndarray]]) -> list[OutputDiff]:
    """Run both models on every feed and compare outputs (concatenated over feeds along axis 0)."""
    ref = run_model(original, feeds_list)
    got = run_model(compressed, feeds_list)
    diffs = []
    for name in ref[0]:
        r = [x[name] for x in ref]
        g = [x[name] for x in got]
        if g[0].shape != r[0].shape:
            raise AssertionError(f"output {name!r} changed shape: {r[0].shape} -> {g[0].shape}")
        cat = (lambda xs: np.concatenate([x.reshape(1, *x.shape) if x.ndim == 0 else x for x in xs], axis=0))
        diffs.append(diff_outputs(name, cat(g), cat(r)))
    return diffs
