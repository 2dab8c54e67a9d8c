"""Calibration data in, per-layer activation statistics out.

Sources (``--calib``):
- ``.npz``: named input arrays batched along axis 0 (split into ``batch_size`` slices);
  entries whose names start with ``__`` are ignored (room for labels). Never unpickled.
- ``.json``: Polygraphy's input format, a list of feed dicts (each one batch).
- ``.py`` or ``.py:func``: a data-loader script in Polygraphy's convention: ``func`` (default
  ``load_data``) yields feed dicts. Only run because the user named it explicitly.

Statistics come from one ONNX Runtime pass over the model with the candidate layers' input
tensors exposed as extra outputs; each batch is folded into float64 sums
(``lrcompile.factorize.stats``) and dropped, so memory is bounded by the sums, not the data.
A mask input (``attention_mask``) drops padding rows: its zeros remove the matching rows of every
activation whose leading dimensions match the mask.

With a ``reference`` model (sequential calibration: ``model`` is partly compressed, ``reference``
the original) both run on every batch and each request also accumulates the cross-Gram
``X'^T X`` and the original Gram ``X^T X`` of the same tensor (same rows, same mask), for target
correction (``lrcompile.factorize.whiten``). Rewrites only add tensors (the factor chains'
intermediates) and keep the names of the tensors they consume and produce, so a candidate's input
exists in both models; a request whose tensor the reference lacks is collected without them.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from tqdm.auto import tqdm

from .errors import LrcError
from .factorize import LayerStats
from .factorize.patches import ConvGeometry, im2col
from .factorize.stats import StatsAccumulator, merge
from .feeds import check_feeds, graph_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatRequest:
    """Statistics wanted for one weight's input: rows of ``tensor`` with ``k`` features, or, for a
    2-D Conv, its receptive fields per group (``conv`` geometry), or, with ``probs`` (attention
    probabilities ``[B, H, Tq, Tk]``), per head the rows of ``A_h X`` (``X = tensor`` ``[B, Tk, k]``:
    the value projection's input mixed as the head mixes it), padding queries dropped by the mask."""

    tensor: str
    k: int
    conv: ConvGeometry | None = None
    lookup: bool = False  # ``tensor`` holds indices into a k-row table: count them
    probs: str | None = None
    heads: int = 1

    @property
    def groups(self) -> int:
        return self.conv.group if self.conv else self.heads if self.probs else 1


@dataclass(frozen=True)
class CalibSource:
    path: str
    samples: int | None = None
    batch_size: int = 16
    flag: str = "--calib"  # the option named in messages


def feed_rows(feed: dict[str, np.ndarray]) -> int:
    return int(next(iter(feed.values())).shape[0]) if feed else 0


def iter_calibration(src: CalibSource, model: onnx.ModelProto) -> Iterator[dict[str, np.ndarray]]:
    """Yield checked feed dicts, at most ``src.samples`` rows in all."""
    p, _, func = src.path.partition(".py:")
    path = Path(p + ".py" if func else src.path)
    if not path.is_file():
        raise LrcError(f"{src.flag} {path}: no such file; pass an .npz, a Polygraphy JSON or a data-loader .py")
    left = src.samples if src.samples is not None else float("inf")
    for feed in _raw_batches(path, func or "load_data", src.batch_size, model, src.flag):
        if left <= 0:
            return
        n = feed_rows(feed)
        if n > left:
            feed = {k: v[: int(left)] for k, v in feed.items()}
            n = int(left)
        left -= n
        yield check_feeds(model, feed, f"{src.flag} {path.name}")


def _raw_batches(path: Path, func: str, batch_size: int, model: onnx.ModelProto, flag: str = "--calib"
                 ) -> Iterator[dict]:
    if path.suffix == ".npz":
        from .io import load_npz

        arrays = {k: v for k, v in load_npz(path, flag).items() if not k.startswith("__")}
        if not arrays:
            raise LrcError(f"{flag} {path} holds no arrays")
        lens = {k: v.shape[0] if v.ndim else None for k, v in arrays.items()}
        if len(set(lens.values())) != 1 or None in lens.values():
            raise LrcError(f"{flag} {path}: arrays must share their first (batch) axis, got {lens}")
        n = next(iter(lens.values()))
        for lo in range(0, n, batch_size):
            yield {k: v[lo:lo + batch_size] for k, v in arrays.items()}
    elif path.suffix == ".json":
        from .feeds import load_feeds

        yield from load_feeds(path)
    elif path.suffix == ".py":
        from .io import user_function

        fn = user_function(path, func, flag, "it to yield feed dicts")
        for feed in fn():
            if not isinstance(feed, dict):
                raise LrcError(f"{flag} {path}: {func}() must yield dicts of input name -> array")
            yield {k: np.asarray(v) for k, v in feed.items()}
    else:
        raise LrcError(f"{flag} {path}: unknown type {path.suffix!r}; use .npz, Polygraphy .json or a .py loader")


def feed_mask(feed: dict[str, np.ndarray], mask_input: str | None) -> np.ndarray | None:
    """The boolean keep-mask of one batch (``mask_input != 0``), or None without a mask input."""
    if mask_input is None:
        return None
    if mask_input not in feed:
        raise LrcError(f"--mask-input {mask_input!r} is not an input of the model")
    return np.asarray(feed[mask_input]) != 0


def row_mask(mask: np.ndarray | None, lead: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    if mask.shape == lead[: mask.ndim] and mask.ndim == len(lead):
        return mask
    if int(np.prod(lead)) == mask.size:
        return mask.reshape(lead)
    return None  # e.g. pooled activations [batch, K]: padding already excluded


#: Calibration batches per shard, the unit of parallel calibration (``--workers``, ``--ray``).
#: Fixed: each shard's sums start from zero and the shards are added in order, so the statistics,
#: and the output, are the same bytes whatever ran the shards.
SHARD_BATCHES = 16


@dataclass
class Partial:
    """One calibration shard's sums (or all of them, once merged in order)."""

    accs: dict[str, list[StatsAccumulator]]
    counts: dict[str, np.ndarray]
    seen: int = 0
    kept: int = 0
    unmasked: frozenset[str] = frozenset()

    @classmethod
    def empty(cls, requests: dict[str, StatRequest], paired: set[str]) -> "Partial":
        return cls({key: [StatsAccumulator(r.k, cross=key in paired) for _ in range(r.groups)]
                    for key, r in requests.items() if not r.lookup},
                   {key: np.zeros(r.k, np.float64) for key, r in requests.items() if r.lookup})

    def merged(self, other: "Partial") -> "Partial":
        """The sums of both (``self`` first: the order is part of the bytes)."""
        return Partial({k: [merge(a, b) for a, b in zip(v, other.accs[k])] for k, v in self.accs.items()},
                       {k: v + other.counts[k] for k, v in self.counts.items()},
                       self.seen + other.seen, self.kept + other.kept, self.unmasked | other.unmasked)


@dataclass(frozen=True)
class ShardJob:
    """What a shard needs besides its feeds: the models (paths of the copies with the requested
    tensors as outputs), the requests, and the mask input."""

    path: str
    names: tuple[str, ...]
    requests: dict[str, StatRequest]
    paired: frozenset[str]
    mask_input: str | None
    ref_path: str | None = None
    ref_names: tuple[str, ...] = ()


def shard_stats(job: ShardJob, feeds: list[dict[str, np.ndarray]], sessions: dict | None = None) -> Partial:
    """One shard's statistics, from zero: a task of ``lrcompile.parallel`` (``sessions``: ONNX
    Runtime sessions by path to reuse, in the calling process; a worker makes its own)."""
    from .sessions import session

    sessions = {} if sessions is None else sessions
    for p in (job.path, job.ref_path):
        if p is not None and p not in sessions:
            sessions[p] = session(p, ["CPUExecutionProvider"])
    sess, ref_sess = sessions[job.path], sessions.get(job.ref_path)
    part = Partial.empty(job.requests, set(job.paired))
    unmasked: set[str] = set()
    names, ref_names = list(job.names), list(job.ref_names)
    for feed in feeds:
        outs = dict(zip(names, sess.run(names, feed)))
        refs = dict(zip(ref_names, ref_sess.run(ref_names, feed))) if ref_sess is not None else {}
        mask = feed_mask(feed, job.mask_input)
        for key, req in job.requests.items():
            x = outs[req.tensor]
            xr = refs.get(req.tensor) if key in job.paired else None
            if xr is not None and xr.shape != x.shape:
                raise AssertionError(f"activation {req.tensor!r} is {x.shape} here, {xr.shape} in the reference")
            if req.lookup:
                m = row_mask(mask, x.shape)
                idx = (x[m] if m is not None else x).ravel() % req.k
                part.counts[key] += np.bincount(idx, minlength=req.k)
                continue
            if req.probs is not None:
                _update_heads(part.accs[key], x, outs[req.probs], req, mask)
                continue
            if req.conv is not None:
                for i in range(x.shape[0]):  # one image at a time bounds the im2col copy
                    ref_rows = im2col(xr[i:i + 1], req.conv) if xr is not None else [None] * req.groups
                    for acc, rows, rr in zip(part.accs[key], im2col(x[i:i + 1], req.conv), ref_rows):
                        acc.update(rows, ref=rr)
                continue
            if x.ndim < 1 or x.shape[-1] != req.k:
                raise AssertionError(f"activation {req.tensor!r} has shape {x.shape}, expected [..., {req.k}]")
            m = row_mask(mask, x.shape[:-1])
            if mask is not None and m is None:
                unmasked.add(req.tensor)
            part.accs[key][0].update(x, mask=m, ref=xr)
        part.seen += feed_rows(feed)
        if mask is not None:
            part.kept += int(mask.sum())
    part.unmasked = frozenset(unmasked)
    return part


def _shards(batches: Iterator[dict[str, np.ndarray]], size: int) -> Iterator[list[dict[str, np.ndarray]]]:
    shard: list = []
    for feed in batches:
        shard.append(feed)
        if len(shard) == size:
            yield shard
            shard = []
    if shard:
        yield shard


def collect_stats(
    model: onnx.ModelProto,
    requests: dict[str, StatRequest],
    batches: Iterator[dict[str, np.ndarray]],
    *,
    mask_input: str | None = None,
    progress: bool = False,
    total: int | None = None,
    reference: onnx.ModelProto | None = None,
    runner=None,
) -> tuple[dict[str, list[LayerStats]], dict]:
    """Accumulate second moments for each request over ``batches``.

    ``reference``: the original model, run on the same batches; its activations of the same
    tensors give each (non-lookup) request ``cross`` and ``ref_gram`` (module docstring).
    ``runner``: where the shards run (``lrcompile.parallel``; default here). The batches are cut
    into shards of ``SHARD_BATCHES``, a few shards per worker out at a time (``Runner.imap``: the
    data is read once, here, and never held whole); each shard's sums are added in order.

    Returns, by request key, one LayerStats per group (a single one except for grouped convs),
    and a summary (samples seen, rows kept by the mask, bytes held).
    """
    from .io import write_model
    from .parallel import InProcess, Task
    from .sessions import with_outputs

    runner = runner or InProcess()
    ref_names: list[str] = []
    if reference is not None:
        have = _tensor_names(reference)
        ref_names = sorted({r.tensor for r in requests.values() if not r.lookup and r.tensor in have})
    paired = frozenset(key for key, r in requests.items() if r.tensor in ref_names and r.probs is None)
    names = sorted({r.tensor for r in requests.values()} | {r.probs for r in requests.values() if r.probs})
    total_part = Partial.empty(requests, set(paired))
    local = isinstance(runner, InProcess)
    with tempfile.TemporaryDirectory(prefix="lrcompile-calib-") as tmp:
        path = Path(tmp) / "calib.onnx"
        write_model(with_outputs(model, names), path)
        ref_path = None
        if ref_names:
            ref_path = Path(tmp) / "reference.onnx"
            write_model(with_outputs(reference, ref_names), ref_path)
        job = ShardJob(str(path), tuple(names), dict(requests), paired, mask_input,
                       str(ref_path) if ref_path else None, tuple(ref_names))
        sessions: dict = {}  # in this process: one session for every shard
        bar = tqdm(total=total, desc="calibrate", unit="sample", disable=None if progress else True, leave=False)
        n_shards, shards = 0, _shards(batches, SHARD_BATCHES)
        if local:
            parts = (shard_stats(job, f, sessions) for f in shards)
        else:  # a few shards per worker out at a time: the data is read here as room frees up
            parts = runner.imap((Task(f"calibration shard {i}", shard_stats, (job, f)) for i, f in enumerate(shards)),
                                what="calibration")
        for part in parts:  # in order: the sums' order is part of the bytes
            total_part = total_part.merged(part)
            n_shards += 1
            bar.update(part.seen)
        bar.close()
        sessions.clear()
    if total_part.seen == 0:
        raise LrcError("--calib: the calibration source yielded no samples")
    accs, counts = total_part.accs, total_part.counts
    info = {"samples": total_part.seen, "mask_input": mask_input,
            "mask_kept_rows": total_part.kept if mask_input else None,
            "stats_bytes": int(sum(a.nbytes for group in accs.values() for a in group)
                               + sum(c.nbytes for c in counts.values())),
            "unmasked_tensors": sorted(total_part.unmasked), "layers": len(accs) + len(counts), "shards": n_shards}
    if reference is not None:
        info["target_corrected_layers"] = len(paired)
    out = {key: [a.result() for a in group] for key, group in accs.items()}
    out.update({key: [LayerStats(count=int(c.sum()), in_sum=c, abs_sum=c.copy())] for key, c in counts.items()})
    return out, info


def _update_heads(accs: list[StatsAccumulator], x: np.ndarray, probs: np.ndarray, req: StatRequest,
                  mask: np.ndarray | None) -> None:
    """Fold one batch of ``A_h X`` per head into ``accs`` (one accumulator per head)."""
    if probs.ndim != 4 or probs.shape[1] != req.heads:
        raise AssertionError(f"attention probabilities {req.probs!r} have shape {probs.shape}, expected "
                             f"[B, {req.heads}, Tq, Tk]")
    b, _, tq, tk = probs.shape
    if x.ndim == 2 and x.shape[0] == b * tk:  # projections on flattened rows [B T, K]
        x = x.reshape(b, tk, -1)
    if x.shape[:2] != (b, tk) or x.shape[-1] != req.k:
        raise AssertionError(f"activation {req.tensor!r} has shape {x.shape}, expected [{b}, {tk}, {req.k}]")
    m = row_mask(mask, (b, tq))
    x = x.astype(np.float64)  # once for every head
    for h, acc in enumerate(accs):
        acc.update(np.matmul(probs[:, h].astype(np.float64), x), mask=m)


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    return ({n for node in g.node for n in node.output} | {i.name for i in g.input}
            | {t.name for t in g.initializer})


def default_mask_input(model: onnx.ModelProto) -> str | None:
    """``attention_mask`` when the model has such an input (stated in the report)."""
    names = [vi.name for vi in graph_inputs(model)]
    return "attention_mask" if "attention_mask" in names else None
