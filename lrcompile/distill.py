"""Distillation of a compressed model's new weights against the original (``--distill DATA``).

One-shot factorization fits each layer on its own; the errors then add up through the network.
This step trains only the tensors the rewrite introduced (low-rank factors, pruned weights and
biases) plus the biases added right after them, so that the compressed model reproduces the
original on unlabeled data: the teacher is the original model run in ONNX Runtime, the student
the compressed one converted with onnx2torch (the optional ``[fisher]`` extra: torch and
onnx2torch). Nothing else of the model changes.

Loss: for each matched tensor the relative squared error ``sum (student - teacher)^2 / sum
teacher^2`` over the batch (rows where the mask input is 0 dropped), averaged over the tensors.
Matched are the model outputs (``match="outputs"``, the default), or also the output of each
rewritten layer, which keeps its original name and shape (``"layers"``: denser supervision that
ties each layer to the original's; on DeepFM at 10% of the weights it kept less AUC than matching
the outputs alone, on MiniLM the two tied). Adam with a cosine-decayed learning rate; batches in a seeded
order, so the same data and options give the same weights. With a 2-D mask input the rows are
batched by length and each batch cut to its longest row, which spends no compute on padding.

When onnx2torch cannot convert the compressed model even normalised (``fisher.Unconvertible``), the
step is skipped with a warning and the report's ``distillation`` says why: the rewrite's weights
are kept and the compile goes on.

Guard: the data's last tenth (at least one batch) is held out. Its loss is measured before
training and after each epoch, and the weights with the lowest held-out loss are returned: when
training does not help on unseen data, the model comes back as the rewrite made it.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx
from onnx import numpy_helper
from tqdm.auto import tqdm

from .config import DISTILL_MATCHES
from .errors import LrcError
from .weights import to_array

log = logging.getLogger(__name__)

#: Ops whose inputs onnx2torch copies into module parameters (read back from the module).
BAKED = {"Conv": (1, 2), "ConvTranspose": (1, 2)}
#: Ops whose converter keeps these inputs out of autograd: such a tensor is not trained.
FROZEN = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2)}
_BIAS_OPS = ("Add",)
#: The teacher's outputs are computed once per batch and kept up to this size (MiniLM's pooled
#: embedding: 6 MB for 4,096 reviews); past it, the rest are recomputed every epoch.
TEACHER_CACHE_BYTES = 1 << 30


@dataclass
class DistillResult:
    """What :func:`distill` did (the ``distillation`` section of the report)."""

    model: onnx.ModelProto
    info: dict = field(default_factory=dict)


def check_available() -> None:
    """One line when torch or onnx2torch is missing (called before the compile spends any time)."""
    import importlib.util

    from .fisher import INSTALL_HINT

    missing = [m for m in ("torch", "onnx2torch") if importlib.util.find_spec(m) is None]
    if missing:
        raise LrcError(f"--distill trains with torch; {' and '.join(missing)} not installed: {INSTALL_HINT}")


def trainable_tensors(original: onnx.ModelProto, compressed: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """The float initializers of ``compressed`` that distillation trains, and the tensors it matches.

    Trained: initializers the original does not hold (the rewrite's factors, pruned weights and
    biases), and a 1-D initializer added by an ``Add`` to the output of a node that reads one of
    those (the layer's bias). Matched: each tensor both graphs produce whose producer in the
    compressed graph reads a trained tensor or a tensor the original lacks (the rewritten layer's
    output, e.g. the second factor's product or the bias add), plus the model outputs.
    """
    old = {i.name for i in original.graph.initializer}
    old_tensors = old | {t for n in original.graph.node for t in n.output} | {i.name for i in original.graph.input}
    inits = {i.name: i for i in compressed.graph.initializer}
    floats = {n for n, i in inits.items() if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                             onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)}
    frozen = {n.input[i] for n in compressed.graph.node for i in FROZEN.get(n.op_type, ()) if i < len(n.input)}
    trained = {n for n in inits if n not in old and n in floats and n not in frozen}
    reads_new = {o for n in compressed.graph.node if any(i in trained for i in n.input) for o in n.output}
    for n in compressed.graph.node:
        if n.op_type in _BIAS_OPS and any(i in reads_new for i in n.input):
            for i in n.input:
                if i in floats and i not in frozen and len(inits[i].dims) == 1:
                    trained.add(i)
    names = [i.name for i in compressed.graph.initializer if i.name in trained]  # file order: deterministic
    matched = []
    for n in compressed.graph.node:
        if any(i in trained or (i and i not in old_tensors) for i in n.input):
            matched += [o for o in n.output if o in old_tensors]
    outputs = [o.name for o in compressed.graph.output]
    return names, list(dict.fromkeys(matched + outputs))


def _prepared(model: onnx.ModelProto, lift: list[str], baked: set[str]):
    """``model`` for onnx2torch: Constant nodes as initializers, each lifted tensor read from a new
    graph input (so its gradient arrives in the stored layout); returns (model, input by tensor)."""
    from .fisher import for_torch

    m = for_torch(model, [o.name for o in model.graph.output])
    used = {t for n in m.graph.node for t in (*n.input, *n.output)} | {i.name for i in m.graph.initializer}
    used |= {i.name for i in m.graph.input}
    inputs = {}
    values = {i.name: i for i in m.graph.initializer}
    for w in lift:
        if w in baked:
            continue
        new = w + "__lrc_distill"
        while new in used:
            new += "_"
        used.add(new)
        inputs[w] = new
        for node in m.graph.node:
            for i, t in enumerate(node.input):
                if t == w:
                    node.input[i] = new
        m.graph.input.append(onnx.helper.make_tensor_value_info(new, values[w].data_type, list(values[w].dims)))
    keep = [i for i in m.graph.initializer if i.name not in inputs]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m, inputs


def _trimmed(feed: dict[str, np.ndarray], mask_input: str | None) -> dict[str, np.ndarray]:
    """The batch without its trailing all-padding columns: a 2-D mask's columns past the last nonzero
    one are cut from every input of the mask's shape (teacher and student see the same feed, so the
    loss stays consistent; padded sequence models train faster on the shorter batch)."""
    mask = feed.get(mask_input) if mask_input else None
    if mask is None or mask.ndim != 2:
        return feed
    cols = np.flatnonzero(np.asarray(mask != 0).any(axis=0))
    keep = int(cols[-1]) + 1 if cols.size else mask.shape[1]
    if keep == mask.shape[1]:
        return feed
    return {k: (v[:, :keep] if v.shape[:2] == mask.shape else v) for k, v in feed.items()}


def _groupable(feeds: list[dict[str, np.ndarray]], mask_input: str | None) -> bool:
    """Whether :func:`_grouped` can re-batch ``feeds``: a 2-D mask input, and every feed with the
    same inputs and the same shapes past the batch axis."""
    mask = feeds[0].get(mask_input) if mask_input and feeds else None
    if mask is None or mask.ndim != 2 or len(feeds) < 2:
        return False
    keys = list(feeds[0])
    return all(list(f) == keys and all(f[k].shape[1:] == feeds[0][k].shape[1:] for k in keys) for f in feeds)


def _grouped(feeds: list[dict[str, np.ndarray]], mask_input: str) -> list[dict[str, np.ndarray]]:
    """The same rows re-batched by length, each batch then trimmed (see :func:`_trimmed`): rows
    sorted by their last unpadded position (stable, so deterministic), cut into batches of the first
    feed's size. On MiniLM's reviews this cuts the mean batch from 128 tokens to 81."""
    keys = list(feeds[0])
    rows = {k: np.concatenate([f[k] for f in feeds]) for k in keys}
    m = np.asarray(rows[mask_input] != 0)
    length = np.where(m.any(axis=1), m.shape[1] - np.argmax(m[:, ::-1], axis=1), 0)
    order = np.argsort(length, kind="stable")
    size = len(feeds[0][mask_input])
    return [_trimmed({k: v[order[i:i + size]] for k, v in rows.items()}, mask_input)
            for i in range(0, len(order), size)]


def _split(feeds: list[dict[str, np.ndarray]]) -> tuple[list, list]:
    if not feeds:
        raise LrcError("--distill: the data source yielded no samples")
    if len(feeds) < 2:
        raise LrcError(f"--distill: {len(next(iter(feeds[0].values())))} samples make one batch; give at least "
                       f"two batches (the last tenth is held out to check the training) or a smaller --distill-batch")
    n_val = max(1, len(feeds) // 10)
    return feeds[:-n_val], feeds[-n_val:]


def _skipped(compressed: onnx.ModelProto, why: Exception, t0: float) -> DistillResult:
    """The compressed model as the rewrite made it, when the torch side declines it."""
    log.warning("--distill skipped: %s; the rewritten weights are kept", why)
    return DistillResult(compressed, {"skipped": str(why), "seconds": round(time.perf_counter() - t0, 3)})


def distill(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    epochs: int = 2,
    lr: float = 1e-4,
    seed: int = 0,
    match: str = "outputs",
    mask_input: str | None = None,
    group_lengths: bool = True,
    progress: bool = False,
) -> DistillResult:
    """Train the compressed model's new tensors to reproduce the original (see the module doc).

    Args:
        original: the teacher (not modified).
        compressed: the rewritten model (not modified); its new tensors are trained.
        batches: feed dicts (``iter_calibration``); held in memory, the last tenth held out.
        epochs: passes over the training batches.
        lr: Adam's initial learning rate (cosine-decayed to zero over the run).
        seed: seed of the batch order.
        match: ``outputs`` (the model outputs) or ``layers`` (also every rewritten layer's output).
        mask_input: input whose zeros mark padding rows, or None.
        group_lengths: with a 2-D mask input, batch rows of similar length together (then every
            batch is cut to its longest row; the batch order is still shuffled each epoch).
        progress: show a progress bar.

    Returns:
        A :class:`DistillResult` with a new model (the input's other tensors byte-identical).
    """
    if epochs < 1:
        raise LrcError(f"--distill-epochs {epochs}: give at least one epoch")
    if not lr > 0:
        raise LrcError(f"--distill-lr {lr}: give a positive learning rate")
    if match not in DISTILL_MATCHES:
        raise LrcError(f"--distill-match {match!r}: choose one of {', '.join(DISTILL_MATCHES)}")
    from .fisher import Unconvertible, frozen_module, import_convert, modules_by_output, run_module

    convert = import_convert()
    import torch

    from .calibrate import feed_mask, row_mask
    from .sessions import ERROR, session, with_outputs

    t0 = time.perf_counter()
    names, matched = trainable_tensors(original, compressed)
    outputs = [o.name for o in compressed.graph.output]
    if match == "outputs":
        matched = [t for t in matched if t in outputs]
    if not names:
        raise LrcError("--distill: the compressed model has no new weights to train (nothing was rewritten)")
    inits = {i.name: i for i in compressed.graph.initializer}
    for w in names:
        if inits[w].data_type != onnx.TensorProto.FLOAT:
            raise LrcError(f"--distill trains float32 weights; {w!r} is "
                           f"{onnx.TensorProto.DataType.Name(inits[w].data_type)} (distill before converting to fp16)")
    baked = {n.input[i] for n in compressed.graph.node for i in BAKED.get(n.op_type, ()) if i < len(n.input)}
    baked &= set(names)
    # student: the compressed model in torch, its new tensors leaves (or baked module parameters);
    # converted first, so that a model the torch side declines costs no data reading or teacher
    prepared, lifted = _prepared(compressed, names, baked)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = frozen_module(convert, prepared)
    except Unconvertible as e:
        return _skipped(compressed, e, t0)
    feeds = list(batches)
    train, val = _split(feeds)
    grouped = group_lengths and _groupable(train, mask_input)

    def batched(part: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        if grouped and _groupable(part, mask_input):
            return _grouped(part, mask_input)
        return [_trimmed(f, mask_input) for f in part]

    train, val = batched(train), batched(val)

    # teacher: the original with the matched tensors exposed, in ONNX Runtime
    teacher = session(with_outputs(original, matched).SerializeToString(), ["CPUExecutionProvider"],
                      log_level=ERROR)
    teacher_in = [i.name for i in teacher.get_inputs()]
    teacher_out = [o.name for o in teacher.get_outputs()]

    torch.manual_seed(seed)
    leaves = {w: torch.nn.Parameter(torch.from_numpy(to_array(inits[w]).copy())) for w in lifted}
    by_output = modules_by_output(gm)
    baked_params: dict[str, torch.nn.Parameter] = {}
    for node in compressed.graph.node:
        for i in BAKED.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] in baked:
                owner = by_output.get(node.output[0])
                mod = next((c for c in owner.modules() if isinstance(c, torch.nn.modules.conv._ConvNd)), None) \
                    if owner is not None else None
                if mod is None:
                    raise LrcError(f"--distill: onnx2torch made no torch conv module of {node.name or node.op_type!r}, "
                                   f"so its factor {node.input[i]!r} cannot be trained; exclude it (--exclude)")
                p = mod.weight if i == 1 else mod.bias
                p.requires_grad_(True)
                baked_params[node.input[i]] = p
    single = modules_by_output(gm, single=True)
    hooked = [t for t in matched if t not in outputs and t in single]
    captured: dict[str, object] = {}

    def hook_for(name: str):
        def hook(_mod, _inp, out):
            captured[name] = out
        return hook

    handles = [single[t].register_forward_hook(hook_for(t)) for t in hooked]
    used = outputs + hooked
    order = [i.name for i in prepared.graph.input]
    by_input = {v: w for w, v in lifted.items()}

    cache: dict[int, dict[str, np.ndarray]] = {}
    cached = 0

    def teacher_of(key: int, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The teacher's tensors for one batch, kept while they fit TEACHER_CACHE_BYTES in all."""
        nonlocal cached
        if key in cache:
            return cache[key]
        want = dict(zip(teacher_out, teacher.run(teacher_out, {k: feed[k] for k in teacher_in})))
        size = sum(v.nbytes for v in want.values())
        if cached + size <= TEACHER_CACHE_BYTES:
            cache[key] = want
            cached += size
        return want

    def loss_of(key: int, feed: dict[str, np.ndarray]):
        want = teacher_of(key, feed)
        captured.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = [leaves[by_input[n]] if n in by_input else torch.from_numpy(np.ascontiguousarray(feed[n]))
                    for n in order]
            res = run_module(gm, args)
        res = list(res) if isinstance(res, (tuple, list)) else [res]
        got = dict(zip(outputs, res)) | captured
        mask = feed_mask(feed, mask_input)
        terms = []
        for t in used:
            y, ref = got.get(t), want.get(t)
            if not isinstance(y, torch.Tensor) or ref is None or tuple(y.shape) != ref.shape or not y.is_floating_point():
                continue
            r = torch.from_numpy(np.ascontiguousarray(ref)).to(y.dtype)
            d, r2 = (y - r) ** 2, r ** 2
            m = row_mask(mask, tuple(y.shape[:-1])) if y.ndim >= 2 else None
            if m is not None:
                keep = torch.from_numpy(np.ascontiguousarray(m)).unsqueeze(-1).to(y.dtype)
                d, r2 = d * keep, r2 * keep
            terms.append(d.sum() / r2.sum().clamp_min(1e-12))
        if not terms:
            raise LrcError("--distill: no model output or rewritten layer output could be matched to the original")
        return sum(terms) / len(terms), len(terms)

    params = list(leaves.values()) + list(baked_params.values())
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))

    def held_out() -> float:
        with torch.no_grad():
            return float(np.mean([loss_of(-1 - i, f)[0].item() for i, f in enumerate(val)]))

    def snapshot() -> dict[str, np.ndarray]:
        return {w: p.detach().numpy().copy() for w, p in (leaves | baked_params).items()}

    bar = tqdm(total=steps, desc="distill", unit="batch", disable=None if progress else True, leave=False)
    try:
        history = [{"epoch": 0, "held_out_loss": held_out()}]
        best, best_epoch = snapshot(), 0
        with torch.no_grad():
            n_terms = loss_of(-1, val[0])[1]
        for epoch in range(1, epochs + 1):
            total = 0.0
            for b in np.random.default_rng(seed + epoch).permutation(len(train)):
                loss, _ = loss_of(int(b), train[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4g}")
            h = held_out()
            history.append({"epoch": epoch, "train_loss": total / len(train), "held_out_loss": h})
            if h < min(r["held_out_loss"] for r in history[:-1]):
                best, best_epoch = snapshot(), epoch
    except Unconvertible as e:
        return _skipped(compressed, e, t0)
    finally:
        bar.close()
        for hd in handles:
            hd.remove()

    out = onnx.ModelProto()
    out.CopyFrom(compressed)
    for init in out.graph.initializer:
        if init.name in best:
            init.CopyFrom(numpy_helper.from_array(best[init.name].astype(np.float32), init.name))
    rows = sum(int(next(iter(f.values())).shape[0]) for f in feeds)
    info = {
        "samples": rows, "held_out_batches": len(val), "epochs": epochs, "lr": lr, "seed": seed, "match": match,
        "length_grouped": bool(grouped),
        "tensors_trained": len(names), "params_trained": int(sum(np.prod(inits[w].dims) for w in names)),
        "tensors_matched": n_terms, "kept_epoch": best_epoch, "history": history,
        "held_out_loss_before": history[0]["held_out_loss"],
        "held_out_loss_after": history[best_epoch]["held_out_loss"],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if best_epoch == 0:
        log.warning("--distill: training did not lower the held-out loss (%.4g); the rewritten weights are kept",
                    history[0]["held_out_loss"])
    return DistillResult(out, info)
