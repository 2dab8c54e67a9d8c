"""End-to-end evaluation: a candidate model's task metric against the original's, on fixed data.

The accuracy-budget search (``--max-drop EPS --metric NAME``) and the per-layer sensitivity scan
score many compressed variants of one model on the same calibration (or validation) data. An
:class:`Evaluator` therefore does the fixed work once, in its constructor: it reads the data into
memory (a ``.py`` loader runs once, so every candidate sees the same rows), loads the labels, runs
the original model and keeps its output. Each :meth:`Evaluator.measure` then costs one session
creation and one forward pass of the candidate, fetching only the scored output.

Metrics (``METRICS``; the original's value, the *baseline*, in brackets):

- ``cosine`` [1]: mean over samples of the cosine between the candidate's and the original's
  output, each sample's output flattened into one vector (so a ``[batch, seq, dim]`` output gives
  one cosine per sample, not per token);
- ``top1`` [1]: fraction of rows (output reshaped to ``[-1, last_dim]``) whose argmax equals the
  original's;
- ``max-rel`` [0]: ``max |y - ref| / max |ref|`` over all elements (lower is better);
- ``rel-l2`` [0]: ``||y - ref|| / ||ref||`` (lower is better);
- ``auc`` / ``logloss`` [the original's own]: against 0/1 labels, one score per sample. The output
  holds probabilities when every value the *original* produced lies in ``[0, 1]``, else logits, to
  which a sigmoid is applied (for a two-column output: softmax rows, else two logits whose
  difference is the logit of class 1). The decision is made once, on the original, so every
  candidate is read the same way.

``drop`` is how much worse a candidate is than the original (``baseline - value`` when higher is
better, ``value - baseline`` otherwise): ``drop <= eps`` is the budget test. Every measurement
also carries ``rel_l2_sq`` (``sum ||y - ref||^2 / sum ||ref||^2``), a smooth proxy for metrics
that move in steps (``top1``, ``auc``; ``MetricInfo.smooth`` is False for those).

A user metric runs only when named explicitly (``--metric script --metric-script file.py[:func]``):
``func`` (default ``metric``) is called as ``func(outputs, reference, labels)`` with dicts of
output name -> array for the candidate and the original (all outputs, concatenated over the data)
and the labels or None, and returns a float, higher is better.
"""
from __future__ import annotations

import logging
import math
import numbers
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from tqdm.auto import tqdm

from .errors import LrcError
from .io import user_function
from .metrics import cosine_rows, logloss, output_error, roc_auc, top1_agreement

log = logging.getLogger(__name__)

# Option names used in messages (the CLI's spelling).
_OPT_METRIC, _OPT_OUTPUT, _OPT_SCRIPT, _OPT_LABELS = "--metric", "--metric-output", "--metric-script", "--labels"
#: Default function name in a metric script.
SCRIPT_FUNC = "metric"
#: Above this many bytes a ModelProto cannot be serialized to one protobuf (2 GiB): run it from a file.
_MAX_PROTO_BYTES = 2**31 - 2**20


@dataclass(frozen=True)
class MetricInfo:
    """What the planner needs to know about a metric.

    Attributes:
        name: the ``--metric`` value.
        higher_is_better: the direction of ``value`` (``drop`` is always >= 0 when worse).
        needs_labels: whether the data must carry labels.
        summary: one line for ``--help``.
        smooth: whether small weight changes move the value smoothly, so it can rank layer
            sensitivities; when False, rank by ``Measurement.rel_l2_sq`` instead.
    """

    name: str
    higher_is_better: bool
    needs_labels: bool
    summary: str
    smooth: bool


METRICS: dict[str, MetricInfo] = {m.name: m for m in (
    MetricInfo("cosine", True, False, "mean per-sample cosine of the output to the original's (1 = identical)", True),
    MetricInfo("top1", True, False, "fraction of rows whose argmax matches the original's", False),
    MetricInfo("max-rel", False, False, "max |y - ref| / max |ref| of the output (0 = identical)", True),
    MetricInfo("rel-l2", False, False, "||y - ref|| / ||ref|| of the output (0 = identical)", True),
    MetricInfo("auc", True, True, "ROC AUC of the output against 0/1 labels", False),
    MetricInfo("logloss", False, True, "binary log loss of the output against 0/1 labels", True),
)}
#: The user metric (``--metric script``); kept out of METRICS, which lists the built-in ones.
SCRIPT = MetricInfo("script", True, False, "a user function in --metric-script file.py[:func], higher is better",
                    False)


@dataclass(frozen=True)
class Measurement:
    """One candidate's score.

    Attributes:
        value: the metric of the candidate.
        drop: how much worse than the original (>= 0 means worse, negative means better).
        rel_l2_sq: ``sum ||y - ref||^2 / sum ||ref||^2`` over the metric output (smooth proxy).
        samples: samples evaluated.
    """

    value: float
    drop: float
    rel_l2_sq: float
    samples: int


def _session(model: bytes | Path, providers: list[str]):
    """An ORT session with lrcompile's settings, from a file or serialized bytes."""
    from .sessions import session

    return session(model, providers)


def _concat(chunks: list[np.ndarray], name: str) -> np.ndarray:
    chunks = [c.reshape(1) if c.ndim == 0 else c for c in chunks]
    if len({c.shape[1:] for c in chunks}) > 1:
        raise LrcError(f"output {name!r} has different shapes across data batches "
                       f"({sorted({c.shape for c in chunks})}); give every batch the same non-batch dimensions")
    return np.concatenate(chunks, axis=0)


def _load_script(spec: str) -> Callable:
    """The function of ``file.py[:func]``; the file is run here, only because the user named it."""
    p, _, func = spec.partition(".py:")
    path = Path(p + ".py" if func else spec)
    func = func or SCRIPT_FUNC
    if path.suffix != ".py" or not path.is_file():
        raise LrcError(f"{_OPT_SCRIPT} {spec}: no such Python file; pass file.py or file.py:func")
    return user_function(path, func, _OPT_SCRIPT, f"{func}(outputs, reference, labels) -> float (higher is better)")


def _binary(p: np.ndarray) -> bool:
    return bool(np.all((p >= 0) & (p <= 1)))


class Evaluator:
    """Scores models against the original on a fixed data set. The original runs once (in __init__).

    Args:
        original: the uncompressed model.
        data: a calibration-format source: ``.npz``, Polygraphy ``.json`` or ``loader.py[:func]``.
        metric: a name in ``METRICS``, or ``"script"`` with ``script``.
        output: the model output the metric reads (None: the first output).
        labels: a ``.npy`` of labels, one row per sample (None: the ``.npz``'s ``__labels__``);
            needed by auc/logloss, optional for a script (None passed when absent).
        samples: evaluate at most this many samples (the first ones; labels are cut to match).
        batch_size: rows per run for ``.npz`` data (JSON and loaders keep their own batches).
        script: ``file.py[:func]`` for ``metric="script"``; never run otherwise.
        providers: ONNX Runtime providers (None: sessions.default_providers()).
        progress: show a progress bar per forward pass.

    Raises:
        LrcError: unknown metric or output, missing or bad labels, a bad script or data source.
    """

    def __init__(self, original: onnx.ModelProto, data: str, metric: str = "cosine", *, output: str | None = None,
                 labels: str | None = None, samples: int | None = None, batch_size: int = 16,
                 script: str | None = None, providers: list[str] | None = None, progress: bool = False) -> None:
        from .calibrate import CalibSource, iter_calibration
        from .sessions import default_providers

        if metric == SCRIPT.name:
            if script is None:
                raise LrcError(f"{_OPT_METRIC} script needs {_OPT_SCRIPT} file.py[:func] naming the metric function")
            self.info = SCRIPT
        elif metric in METRICS:
            if script is not None:
                raise LrcError(f"{_OPT_SCRIPT} is only used with {_OPT_METRIC} script, not {_OPT_METRIC} {metric}; "
                               f"drop one of them")
            self.info = METRICS[metric]
        else:
            raise LrcError(f"unknown {_OPT_METRIC} {metric!r}; choose one of {', '.join([*METRICS, SCRIPT.name])} "
                           f"(a user function: {_OPT_METRIC} script {_OPT_SCRIPT} file.py[:func])")
        if samples is not None and samples < 1:
            raise LrcError(f"samples must be >= 1, got {samples}")
        names = [o.name for o in original.graph.output]
        output = names[0] if output is None else output
        if output not in names:
            raise LrcError(f"{_OPT_OUTPUT} {output!r} is not an output of the model; its outputs are {names}")
        self.metric, self.output, self.data = metric, output, str(data)
        self.providers = list(providers) if providers is not None else default_providers()
        self.progress = progress
        self._script = _load_script(script) if script is not None else None
        self._script_spec = script
        self._fetch = names if self._script else [output]

        self._feeds = list(iter_calibration(CalibSource(str(data), samples, batch_size), original))
        self.samples = sum(int(next(iter(f.values())).shape[0]) if f else 0 for f in self._feeds)
        if self.samples == 0:
            raise LrcError(f"{data}: the data source yielded no samples")
        self.labels = self._load_labels(labels, samples)

        self.reference = self._outputs(original, "evaluate original")
        self._ref = self.reference[output]
        self._ref64 = self._ref.astype(np.float64)
        self._ref_sq = float(np.sum(self._ref64 ** 2))
        self._check_output()
        self.baseline = self._baseline()
        log.info("evaluator: %s of %r on %d samples of %s, baseline %.6g", metric, output, self.samples,
                 data, self.baseline)

    # ------------------------------------------------------------------------------- set-up

    def _load_labels(self, labels: str | None, samples: int | None) -> np.ndarray | None:
        from .fisher import load_labels

        if not self.info.needs_labels:
            if self.info is not SCRIPT:
                return None
            if labels is None:  # a script gets the .npz's labels when there are any, else None
                try:
                    return load_labels(self.data)[:samples]
                except LrcError:
                    return None
        try:
            y = load_labels(self.data, labels)
        except LrcError as e:
            what = "needs labels" if self.info.needs_labels else f"cannot read {_OPT_LABELS}"
            raise LrcError(f"{_OPT_METRIC} {self.metric} {what}: {e}") from None
        y = y[:samples]
        if y.shape[0] != self.samples:
            raise LrcError(f"{y.shape[0]} labels for {self.samples} evaluated samples; give one label row per "
                           f"sample of {Path(self.data).name} ({_OPT_LABELS} FILE.npy or __labels__ in the .npz)")
        if self.info.needs_labels:
            if y.size != self.samples:
                raise LrcError(f"{_OPT_METRIC} {self.metric} needs one 0/1 label per sample, got labels of shape "
                               f"{list(y.shape)}")
            bad = np.setdiff1d(np.unique(y), [0, 1])
            if bad.size:
                raise LrcError(f"{_OPT_METRIC} {self.metric} needs binary 0/1 labels, found {bad[:5].tolist()}; "
                               f"use {_OPT_METRIC} rel-l2/cosine, or a {_OPT_SCRIPT} for other tasks")
            y = y.reshape(-1)
            if y.min() == y.max():
                raise LrcError(f"{_OPT_METRIC} {self.metric}: every label is {y[0]:g}; the data needs both classes")
        return y

    def _check_output(self) -> None:
        ref, per_sample = self._ref, self._ref[0].size if self._ref.ndim else 1
        if self.metric == "cosine" and per_sample == 1:
            raise LrcError(f"{_OPT_METRIC} cosine of output {self.output!r} (one value per sample) only compares "
                           f"signs; use {_OPT_METRIC} rel-l2, max-rel, or auc/logloss with labels")
        if self.metric == "top1" and (ref.ndim == 0 or ref.shape[-1] < 2):
            raise LrcError(f"{_OPT_METRIC} top1 needs class scores on the last axis; output {self.output!r} has "
                           f"shape {list(ref.shape)}: pick another {_OPT_OUTPUT} or metric")
        if self.info.needs_labels:
            two = ref.ndim == 2 and ref.shape[1] == 2 and ref.shape[0] == self.samples
            if ref.size != self.samples and not two:
                raise LrcError(f"{_OPT_METRIC} {self.metric} reads one score per sample; output {self.output!r} "
                               f"has shape {list(ref.shape)} for {self.samples} samples: pick a [batch] or "
                               f"[batch, 1] output with {_OPT_OUTPUT}")
            if two:
                probs = _binary(ref) and np.allclose(ref.astype(np.float64).sum(axis=1), 1.0, atol=1e-3)
                self.scores = "softmax probabilities (column 1)" if probs else "two-class logits (sigmoid of l1 - l0)"
            else:
                self.scores = "probabilities" if _binary(ref) else "logits (sigmoid applied)"

    def _probabilities(self, y: np.ndarray) -> np.ndarray:
        """One probability of class 1 per sample, read as the original's output was (see module doc)."""
        if self.scores.startswith("softmax"):
            return y[:, 1]
        if self.scores.startswith("two-class"):
            z = y[:, 1].astype(np.float64) - y[:, 0]
        elif self.scores == "probabilities":
            return y.reshape(-1)
        else:
            z = y.reshape(-1).astype(np.float64)
        return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(y.dtype)  # sigmoid without overflow

    def _baseline(self) -> float:
        if self.metric in ("cosine", "top1"):
            return 1.0
        if self.metric in ("max-rel", "rel-l2"):
            return 0.0
        return self._value(self._ref, self.reference)

    # ------------------------------------------------------------------------------- running

    def _serialize(self, model: onnx.ModelProto | str | Path
                   ) -> tuple[bytes | Path, tempfile.TemporaryDirectory | None]:
        """Bytes for ORT when the model fits one protobuf, else a file with external data in a temp dir."""
        if isinstance(model, (str, Path)):
            return Path(model), None
        try:
            size = model.ByteSize()
        except Exception:  # noqa: BLE001 - some protobuf builds refuse to size a message over 2 GiB
            size = _MAX_PROTO_BYTES
        if size < _MAX_PROTO_BYTES:
            return model.SerializeToString(), None
        from .io import write_model

        tmp = tempfile.TemporaryDirectory(prefix="lrcompile-eval-")
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # write_model points the tensors at the data file: not the caller's model
        path = Path(tmp.name) / "model.onnx"
        write_model(copy, path, external_data=True)
        return path, tmp

    def _outputs(self, model: onnx.ModelProto | str | Path, desc: str) -> dict[str, np.ndarray]:
        """The fetched outputs of ``model`` over the data, each concatenated along the batch axis."""
        src, tmp = self._serialize(model)
        try:
            outs = self._run(src, desc)
        finally:
            if tmp is not None:
                tmp.cleanup()
        return {k: _concat(v, k) for k, v in outs.items()}

    def _run(self, model: bytes | Path, desc: str) -> dict[str, list[np.ndarray]]:
        sess = _session(model, self.providers)
        have = [o.name for o in sess.get_outputs()]
        missing = [n for n in self._fetch if n not in have]
        if missing:
            raise LrcError(f"the model has no output {missing}; its outputs are {have}")
        out: dict[str, list[np.ndarray]] = {n: [] for n in self._fetch}
        for feed in tqdm(self._feeds, desc=desc, unit="batch", leave=False, disable=None if self.progress else True):
            for n, y in zip(self._fetch, sess.run(self._fetch, feed)):
                out[n].append(y)
        return out

    def __getstate__(self) -> dict:
        """For a worker (``lrcompile.parallel``): the data, labels and reference outputs travel;
        the user's metric script does not: the worker loads it again from the file the user named."""
        state = dict(self.__dict__)
        state["_script"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._script_spec is not None:
            self._script = _load_script(self._script_spec)

    def measure(self, model: onnx.ModelProto | str | Path) -> Measurement:
        """Run ``model`` (same inputs and outputs as the original) on the data and score it.

        Raises:
            LrcError: the model cannot be loaded, lacks the output or changed its shape, or the
                user's metric script fails.
        """
        got = self._outputs(model, "evaluate")
        y = got[self.output]
        if y.shape != self._ref.shape:
            raise LrcError(f"output {self.output!r} has shape {list(y.shape)}, the original's "
                           f"{list(self._ref.shape)}; the model must keep the original's outputs")
        value = self._value(y, got)
        drop = self.baseline - value if self.info.higher_is_better else value - self.baseline
        diff_sq = float(np.sum((y.astype(np.float64) - self._ref64) ** 2))
        rel_l2_sq = diff_sq / self._ref_sq if self._ref_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
        return Measurement(value=float(value), drop=float(drop), rel_l2_sq=rel_l2_sq, samples=self.samples)

    def _value(self, y: np.ndarray, outputs: dict[str, np.ndarray]) -> float:
        m, ref = self.metric, self._ref
        if m == "cosine":
            n = y.shape[0] if y.ndim else 1
            a, b = y.reshape(n, -1), ref.reshape(n, -1)
            c = np.clip(cosine_rows(a, b), -1.0, 1.0)
            return float(np.where(np.all(a == b, axis=1), 1.0, c).mean())  # identical rows: exactly 1
        if m == "top1":
            return top1_agreement(y, ref)
        if m in ("max-rel", "rel-l2"):
            return output_error(y, ref)["max_rel" if m == "max-rel" else "rel_l2"]
        if m == "auc":
            return roc_auc(self.labels, self._probabilities(y))
        if m == "logloss":
            return logloss(self.labels, self._probabilities(y))
        return self._call_script(outputs)

    def _call_script(self, outputs: dict[str, np.ndarray]) -> float:
        what = f"{_OPT_SCRIPT} {self._script_spec}"
        try:
            v = self._script(outputs, self.reference, self.labels)
        except Exception as e:  # noqa: BLE001 - the user's function
            raise LrcError(f"{what}: the metric function raised {type(e).__name__}: {e}") from None
        if isinstance(v, np.ndarray) and v.size == 1:
            v = v.reshape(())[()]
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Real, np.number)):
            raise LrcError(f"{what}: the metric function returned {type(v).__name__}, not a number; "
                           f"return one float (higher is better)")
        if not math.isfinite(float(v)):
            raise LrcError(f"{what}: the metric function returned {float(v)}, not a finite number")
        return float(v)

    def describe(self) -> dict:
        """The evaluation set-up, for the JSON report."""
        d = {"metric": self.metric, "output": self.output, "data": self.data, "samples": self.samples,
             "baseline": self.baseline, "higher_is_better": self.info.higher_is_better,
             "smooth": self.info.smooth, "providers": self.providers}
        if self.info.needs_labels:
            d["scores"] = self.scores
        if self._script_spec is not None:
            d["script"] = self._script_spec
            d["labels"] = self.labels is not None
        return d
