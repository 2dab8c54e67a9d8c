"""Per-layer latency on the target, dense vs factorized, with a per-machine timing cache.

Fewer parameters do not always mean faster: a thin chain adds a kernel launch and an
intermediate tensor, and small or skinny GEMMs run far below peak (README: the digits CNN's
factorized convs run x1.1 to x1.5 *slower* on the CPU). The planner therefore asks the target
itself, layer by layer, for the user's shapes:

1. The original model runs once per batch with every candidate's inputs exposed as outputs, so
   each layer is timed on the array it really sees (real values matter: a Gather's indices must
   be valid rows).
2. Each candidate becomes a *micro model* holding only its node: the activation (and any other
   non-constant input) as graph inputs with symbolic dims, the weight and other constants folded
   to initializers. The dense variant is that model; the factorized variant at rank r is the same
   model run through the real pass rewrite (``analyze`` -> ``apply`` -> ``export``) with seeded
   random factors, so what is timed is exactly what the compiler emits (Gather -> Gather +
   MatMul, Conv -> Conv + 1x1 Conv, Gemm with its bias, ...). Latency does not depend on the
   factor values.
3. Every variant of one layer gets an ONNX Runtime session (graph optimization level ALL, default
   intra-op threads, no thread spinning: see ``_session``); after warm-up the variants run
   interleaved, in a seeded random order per round, and the median per variant is kept, so
   machine noise hits all of them alike. The number of rounds adapts to the measured run time
   (``budget_s`` per variant, between ``MIN_REPEATS`` and ``repeats``); runs far under a
   millisecond are repeated inside one sample so that timer resolution does not dominate.
4. Each measurement (the dense layer, or one rank) is cached by (model sha256, machine
   fingerprint, node, batch, activation shape and dtype, rank, thread count) in a JSON file;
   cached ones are not measured again. A different model or machine never hits the entries of
   another.

What a micro model cannot see: fusions ORT would make across the layer's boundary in the full
model (e.g. MatMul + Add bias into one kernel) and cache effects of the neighbouring layers. The
times include ONNX Runtime's per-call overhead (about 8 us on a 2-core EPYC), the same for every
variant, so a layer that takes microseconds looks less sped up than it is (it also matters little).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm.auto import tqdm

from . import __version__
from .engine import Plan, analyze, apply, context, export
from .sessions import capture, session
from .factorize import Factorization
from .forms import DEFAULT, FORMS, form_for
from .ir import Candidate, ConstantResolver, node_label

log = logging.getLogger(__name__)

#: The fields of :func:`machine_fingerprint`; a change in any one of them invalidates timings.
MACHINE_KEYS = ("cpu", "cores", "usable_cores", "os", "arch", "gpu", "onnxruntime", "providers", "lrcompile")
#: The fewest interleaved rounds per variant, whatever the time budget says.
MIN_REPEATS = 5
#: A sample shorter than this (ms) is made of several back-to-back runs.
MIN_SAMPLE_MS = 0.5
CACHE_FORMAT = 1
#: Part of every cache key: bump it when the way layers are timed changes, so that timings made
#: the old way are not mixed with new ones.
METHOD_VERSION = 1
#: Entries kept in the cache file (oldest dropped first): bounds the file on a long-lived machine.
MAX_CACHE_ENTRIES = 50_000


# --------------------------------------------------------------------------------------------
# machine fingerprint


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for field in ("model name", "Model", "Hardware", "cpu model", "CPU part"):
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == field and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def _gpu_models() -> list[str]:
    """Names of the NVIDIA GPUs the driver lists (no subprocess, no CUDA import)."""
    names = []
    root = Path("/proc/driver/nvidia/gpus")
    try:
        for info in sorted(root.glob("*/information")):
            for line in info.read_text(errors="replace").splitlines():
                key, sep, value = line.partition(":")
                if sep and key.strip() == "Model":
                    names.append(value.strip())
    except OSError:
        pass
    return names


def machine_fingerprint(providers: list[str]) -> dict:
    """What the timings of this machine depend on (keys: :data:`MACHINE_KEYS`).

    CPU model, logical and usable core counts (a container's CPU affinity may be smaller than the
    host's count), OS and architecture, the GPUs when a GPU provider is asked for, the
    onnxruntime and lrcompile versions (kernels change between releases) and the providers.
    Stable across calls on one machine; deliberately not the kernel release or hostname, which
    change without changing speed.

    Args:
        providers: the ONNX Runtime execution providers the timings are made with.
    """
    import onnxruntime

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    gpu_providers = any(p.split("ExecutionProvider")[0] in ("CUDA", "Tensorrt", "NvTensorRTRTX") for p in providers)
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "usable_cores": usable,
        "os": platform.system(),
        "arch": platform.machine(),
        "gpu": _gpu_models() if gpu_providers else [],
        "onnxruntime": onnxruntime.__version__,
        "providers": list(providers),
        "lrcompile": __version__,
    }


def describe_target(providers: list[str] | None = None) -> str:
    """The timing target in words, for reasons and reports, e.g.
    ``"ONNX Runtime 1.23.2 CPU on AMD EPYC 7B13 (2 cores)"``.

    Args:
        providers: the providers timed with (None: :func:`lrcompile.sessions.default_providers`).
    """
    from .sessions import default_providers

    fp = machine_fingerprint(list(providers) if providers is not None else default_providers())
    eps = "+".join(p.removesuffix("ExecutionProvider") for p in fp["providers"]) or "no provider"
    gpu = f", {', '.join(fp['gpu'])}" if fp["gpu"] else ""
    return f"ONNX Runtime {fp['onnxruntime']} {eps} on {fp['cpu']} ({fp['usable_cores']} cores{gpu})"


def fingerprint_digest(fingerprint: dict) -> str:
    """A short, stable digest of a fingerprint (what cache keys hold)."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_sha256(model: onnx.ModelProto) -> str:
    """sha256 of the model's deterministic serialization (a model over protobuf's 2 GiB limit is
    hashed graph first, then each tensor's bytes in order)."""
    try:
        return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    except ValueError:
        from .io import all_tensors

        h = hashlib.sha256()
        for t in all_tensors(model):
            h.update(t.name.encode())
            h.update(t.raw_data)
        stripped = onnx.ModelProto()
        stripped.CopyFrom(model)
        for t in all_tensors(stripped):
            t.ClearField("raw_data")
        h.update(stripped.SerializeToString(deterministic=True))
        return h.hexdigest()


# --------------------------------------------------------------------------------------------
# results


@dataclass
class LayerTiming:
    """Latency of one layer at one batch, dense and factorized at several ranks.

    Attributes:
        node: the candidate's label.
        batch: the batch size (the key of the feeds it was timed with).
        rows_shape: the shape of the activation the layer saw.
        dense_ms: median latency of the layer as it is.
        ranks: the ranks the factorized chain was timed at (ascending).
        factorized_ms: median latency at each rank, in the order of ``ranks``.
    """

    node: str
    batch: int
    rows_shape: list[int]
    dense_ms: float
    ranks: list[int]
    factorized_ms: list[float]

    def fast_rank(self, margin: float = 0.05, multiple: int = 1) -> int:
        """The largest rank at which the factorized chain beats the dense layer by ``margin``.

        Latency is taken as piecewise linear between the timed ranks (not extrapolated past the
        largest); the answer is the largest ``r`` in ``[min(ranks), max(ranks)]`` with
        ``t(r) <= (1 - margin) * dense_ms``, rounded down to a multiple of ``multiple``
        (hardware-friendly GEMM tiles; a smaller rank is no slower). 0 when no timed rank is fast
        enough, or when rounding leaves nothing.

        Args:
            margin: the relative speed-up required (0.05: at least 5% faster), so that timing
                noise does not turn a tie into a "faster" verdict.
            multiple: round the rank down to a multiple of this (1: no rounding).
        """
        if not self.ranks:
            return 0
        order = np.argsort(self.ranks, kind="stable")
        rs = [float(self.ranks[i]) for i in order]
        ts = [float(self.factorized_ms[i]) for i in order]
        limit = (1.0 - margin) * self.dense_ms
        best = None
        for i, (r, t) in enumerate(zip(rs, ts)):
            if t <= limit:
                best = r  # a timed rank that is fast enough
                if i + 1 < len(rs) and ts[i + 1] > limit and rs[i + 1] > r:
                    # crossing inside the next segment: the largest fast point of that segment
                    best = r + (limit - t) / (ts[i + 1] - t) * (rs[i + 1] - r)
        if best is None:
            return 0
        best = math.floor(best + 1e-9)
        if multiple > 1:
            best = best // multiple * multiple
        return int(max(best, 0))

    def to_dict(self) -> dict:
        return {"node": self.node, "batch": self.batch, "rows_shape": list(self.rows_shape),
                "dense_ms": self.dense_ms, "ranks": list(self.ranks), "factorized_ms": list(self.factorized_ms)}


# --------------------------------------------------------------------------------------------
# cache


def default_cache_path() -> Path:
    """``$LRCOMPILE_CACHE_DIR/timings.json``, else ``~/.cache/lrcompile/timings.json``."""
    base = os.environ.get("LRCOMPILE_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "lrcompile") / "timings.json"


def timing_key(model_sha: str, fingerprint: dict | str, node: str, batch: int, shape: list[int], dtype: str,
               rank: int | None, threads: int | None = None, form: str = DEFAULT) -> dict:
    """The cache key of one measurement (``rank`` None: the dense layer; ``threads`` None: ORT's
    default intra-op thread count; ``form``: the form the size is in, with its options, named in
    the key unless it is the default form)."""
    machine = fingerprint if isinstance(fingerprint, str) else fingerprint_digest(fingerprint)
    key = {"model": model_sha, "machine": machine, "node": node, "batch": int(batch),
           "shape": [int(d) for d in shape], "dtype": str(dtype), "rank": None if rank is None else int(rank),
           "threads": None if threads is None else int(threads), "method": METHOD_VERSION}
    if rank is not None and form != DEFAULT:
        key["form"] = form
    return key


def _key_text(key: dict) -> str:
    missing = [k for k in ("model", "machine") if not key.get(k)]
    if missing:
        # Without them an entry could be served to another model or machine.
        raise ValueError(f"timing cache key lacks {missing}; build it with timing_key()")
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


class TimingCache:
    """Measured latencies in a JSON file, keyed by model, machine, node, shapes and rank.

    Keys (see :func:`timing_key`) hold the model's sha256 and the digest of the machine
    fingerprint, so an entry made for another model or on another machine is never returned:
    changing either invalidates the timings without deleting anyone's entries (a home folder
    may be shared by several machines).

    The file is read once, on construction. A corrupt or unreadable file is ignored with a
    warning: it is only a cache. :meth:`save` merges with what is on disk at that moment (another
    run may have added entries), keeps the newest :data:`MAX_CACHE_ENTRIES`, and replaces the
    file atomically (temporary file + ``os.replace``), so a reader never sees half a file.

    Args:
        path: the JSON file (None: :func:`default_cache_path`).
        enabled: False: nothing is read, returned or written (``--no-cache``).

    Attributes:
        hits / misses: how many :meth:`get` calls found / did not find a value (for reports).
    """

    def __init__(self, path: str | Path | None = None, *, enabled: bool = True) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.enabled = enabled
        self._entries: dict[str, float] = self._read() if enabled else {}
        self._new: dict[str, float] = {}
        self.hits = self.misses = 0

    def _read(self) -> dict[str, float]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            log.warning("timing cache %s is unreadable (%s); ignoring it", self.path, e)
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
                raise ValueError(f"not a format-{CACHE_FORMAT} timing cache")
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise ValueError("entries is not an object")
            return {k: float(v) for k, v in entries.items()
                    if isinstance(v, (int, float)) and math.isfinite(v) and v > 0}
        except (ValueError, KeyError, TypeError) as e:
            log.warning("timing cache %s is corrupt (%s); ignoring it (it is rewritten on save)", self.path, e)
            return {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: dict) -> float | None:
        """The stored milliseconds for ``key``, or None (also when the cache is disabled)."""
        text = _key_text(key)
        value = self._entries.get(text) if self.enabled else None
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: dict, ms: float) -> None:
        """Store one measurement (kept in memory until :meth:`save`)."""
        if not self.enabled:
            return
        ms = float(ms)
        if not (math.isfinite(ms) and ms > 0):
            raise ValueError(f"a latency must be a positive finite number of ms, got {ms}")
        text = _key_text(key)
        self._entries[text] = self._new[text] = ms

    def save(self) -> None:
        """Merge the new entries into the file on disk, atomically. A failure to write (read-only
        folder, full disk) is logged, not raised: the timings were still returned."""
        if not self.enabled or not self._new:
            return
        merged = self._read()
        for k, v in self._new.items():
            merged.pop(k, None)
            merged[k] = v  # newest last: pruning drops the oldest
        if len(merged) > MAX_CACHE_ENTRIES:
            merged = dict(list(merged.items())[-MAX_CACHE_ENTRIES:])
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"format": CACHE_FORMAT, "entries": merged}, f, indent=0)
            os.replace(tmp, self.path)
            tmp = None
        except OSError as e:
            log.warning("cannot write timing cache %s (%s); timings are not cached", self.path, e)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        self._entries.update(merged)
        self._new.clear()


# --------------------------------------------------------------------------------------------
# micro models


def _resolver(model: onnx.ModelProto) -> ConstantResolver:
    """A ConstantResolver for nodes of any graph imported from ``model``: it only needs the
    graph's inputs (tensors compare by name) and opset, not a second import of every weight."""
    inputs = [gs.Variable(i.name) for i in model.graph.input]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    return ConstantResolver(gs.Graph(inputs=inputs, opset=opset))


def layer_inputs(cand: Candidate, consts: ConstantResolver) -> tuple[list[str], dict[str, np.ndarray]]:
    """The node's non-constant inputs (to capture; the activation first) and its constant ones.

    Raises:
        ValueError: the candidate has no activation (nothing to feed a micro model with).
    """
    if cand.activation is None:
        raise ValueError(f"{cand.label}: no activation input to time the layer with")
    live, fixed = [cand.activation], {}
    for t in cand.node.inputs:
        if not t.name or t.name == cand.activation or t.name in fixed or t.name in live:
            continue
        v = consts.resolve(t).value
        if v is None:
            live.append(t.name)
        else:
            fixed[t.name] = v
    return live, fixed


def micro_model(model: onnx.ModelProto, cand: Candidate, examples: dict[str, np.ndarray],
                consts: ConstantResolver | None = None) -> onnx.ModelProto:
    """A model holding only ``cand``'s node: its non-constant inputs as graph inputs with
    symbolic dims (so one model serves every batch), its constant inputs as initializers (the
    value a constant subgraph feeding the weight evaluates to, as ORT's constant folding would
    leave it).

    Args:
        model: the model ``cand`` was found in (for opset and model-level fields).
        cand: a candidate from ``analyze(model, ...)``, not yet rewritten.
        examples: an array for each non-constant input (:func:`layer_inputs`), for its dtype and
            rank (the dims stay symbolic).
        consts: a resolver for the model's constants (None: a new one).
    """
    consts = consts or _resolver(model)
    live, fixed = layer_inputs(cand, consts)
    node = cand.node
    graph_in = {}
    for j, name in enumerate(live):
        x = examples[name]
        graph_in[name] = gs.Variable(name, dtype=x.dtype, shape=[f"in{j}_d{i}" for i in range(x.ndim)])
    inputs = []
    for t in node.inputs:
        if not t.name:
            inputs.append(gs.Variable.empty())
        elif t.name in graph_in:
            inputs.append(graph_in[t.name])
        else:
            inputs.append(gs.Constant(t.name, np.ascontiguousarray(fixed[t.name])))
    outs = [gs.Variable(o.name, dtype=np.dtype(cand.matrices[0].dtype)) for o in node.outputs]
    one = gs.Node(op=node.op, name=node.name or node_label(node), attrs=dict(node.attrs), inputs=inputs,
                  outputs=outs, domain=node.domain)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    g = gs.Graph(nodes=[one], inputs=[graph_in[n] for n in live], outputs=outs[:1], opset=opset,
                 name=f"micro_{_safe(node_label(node))}")
    m = gs.export_onnx(g, do_type_check=False)
    del m.opset_import[:]
    m.opset_import.extend(model.opset_import)
    m.ir_version = model.ir_version
    return m


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def random_factors(cand: Candidate, rank: int, *, seed: int = 0) -> list[Factorization]:
    """Seeded random factors of ``cand``'s weight at ``rank`` in its form (values do not matter
    for latency, and these cost no SVD)."""
    return form_for(cand.pass_name).random(cand, rank, seed=seed)


def factorized_micro(micro: onnx.ModelProto, rank: int, *, facts: list[Factorization] | None = None,
                     seed: int = 0, form: str = DEFAULT, options: dict | None = None) -> onnx.ModelProto:
    """``micro`` (one candidate node) rewritten by its pass at ``rank``: what the compiler emits.

    Args:
        micro: a model from :func:`micro_model`.
        rank: the rank of the factorized chain (another form: its size on the chain's scale).
        facts: the factorizations to insert (one per group); None: :func:`random_factors`.
        seed: seed of the random factors.
        form: the form to emit (random values of its structure at ``rank``), with its ``options``.

    Raises:
        ValueError: the node is no longer a candidate in isolation (should not happen).
    """
    from .config import CompileConfig

    analysis = analyze(micro, CompileConfig(min_params=0, keep_unprofitable=True, verify=False))
    if len(analysis.candidates) != 1:
        why = "; ".join(d.reason for d in analysis.declines) or "no match"
        raise ValueError(f"micro model {micro.graph.name}: its node is not a candidate in isolation ({why})")
    (cand,) = analysis.candidates
    if facts is None:
        facts = (random_factors(cand, rank, seed=seed) if form == DEFAULT
                 else FORMS[form].random(cand, rank, seed=seed, options=options))
    plan = Plan()
    plan.put(cand, facts, rank, form=form)
    ctx = context(analysis.graph)
    apply(ctx, [cand], plan)
    return export(analysis.graph, micro, ctx.sparse)


# --------------------------------------------------------------------------------------------
# timing


class OrtTiming:
    """The timing backend of ONNX Runtime: each variant a session (see :func:`_session`).

    A timing backend answers ``name``, ``fingerprint()`` (what its timings depend on: part of
    every cache key, so two backends never share entries), ``describe()`` (the target in words)
    and ``load(model, tmp, feeds)`` (something whose ``run(None, feed)`` runs the micro model once
    on any of ``feeds``, one per batch: what :func:`measure` times). :class:`TrtTiming` is the other one."""

    name = "onnxruntime"

    def __init__(self, providers: list[str] | None = None, threads: int | None = None) -> None:
        from .sessions import default_providers

        self.providers = list(providers) if providers is not None else default_providers()
        self.threads = threads

    def fingerprint(self) -> dict:
        return machine_fingerprint(self.providers)

    def describe(self) -> str:
        return describe_target(self.providers)

    def load(self, model: onnx.ModelProto, tmp: Path, feeds: list[dict[str, np.ndarray]]):
        return _session(model, self.providers, tmp, self.threads)


class TrtTiming:
    """The timing backend of TensorRT: each variant an engine built by Polygraphy's loaders
    (``EngineFromNetwork(NetworkFromOnnxPath(...))``, one optimization profile spanning the shapes
    of every batch) and run by its ``TrtRunner`` on inputs already on the device; a run is one
    inference and its synchronisation. Needs the full ``tensorrt`` package and a GPU
    (:meth:`unavailable`); imported only here. UNVERIFIED: no GPU ran it where it was written;
    its logic is the ORT backend's (same :func:`time_layers`), which the tests run."""

    name = "tensorrt"

    def __init__(self) -> None:
        import tensorrt

        self.version = tensorrt.__version__

    @staticmethod
    def unavailable() -> str | None:
        """None when TensorRT engines can be built and run here, else why not."""
        from .comparison import trt_available

        return trt_available()

    def fingerprint(self) -> dict:
        return {**machine_fingerprint(["CUDAExecutionProvider"]), "backend": self.name, "tensorrt": self.version}

    def describe(self) -> str:
        fp = self.fingerprint()
        return f"TensorRT {self.version} on {', '.join(fp['gpu']) or 'a GPU'}"

    def load(self, model: onnx.ModelProto, tmp: Path, feeds: list[dict[str, np.ndarray]]):
        from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner

        path = tmp / f"trt_{len(list(tmp.iterdir()))}.onnx"
        onnx.save(model, str(path))
        prof = Profile()
        for name in feeds[0]:
            shapes = np.array([f[name].shape for f in feeds])
            lo, hi = tuple(int(v) for v in shapes.min(0)), tuple(int(v) for v in shapes.max(0))
            prof.add(name, min=lo, opt=hi, max=hi)
        runner = TrtRunner(EngineFromNetwork(NetworkFromOnnxPath(str(path)), config=CreateConfig(profiles=[prof])))
        runner.activate()
        return _TrtRun(runner)


class _TrtRun:
    """``run(None, feed)`` on an active ``TrtRunner``, the feed copied to the device once."""

    def __init__(self, runner) -> None:
        self.runner, self._feed_id, self._device = runner, None, None

    def run(self, _names, feed: dict[str, np.ndarray]):
        if self._feed_id != id(feed):
            from polygraphy import cuda

            self._device = {k: cuda.DeviceArray(shape=v.shape, dtype=v.dtype).copy_from(np.ascontiguousarray(v))
                            for k, v in feed.items()}
            self._feed_id = id(feed)
        return self.runner.infer(self._device, copy_outputs_to_host=False)

    def __del__(self) -> None:
        try:
            self.runner.deactivate()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass


def timing_backend(name: str | None, target: str | None = None):
    """The timing backend ``name`` (``"ort"``, ``"trt"``; None or ``"auto"``: TensorRT for
    ``target == "trt"`` where it can run, else ONNX Runtime), or a user error when ``"trt"``
    cannot run here."""
    from .errors import LrcError

    if name in (None, "auto"):
        if target == "trt" and TrtTiming.unavailable() is None:
            return TrtTiming()
        return OrtTiming()
    if name == "ort":
        return OrtTiming()
    if name == "trt":
        why = TrtTiming.unavailable()
        if why is not None:
            raise LrcError(f"--latency-backend trt: TensorRT cannot time layers here: {why}; use ort")
        return TrtTiming()
    raise LrcError(f"--latency-backend {name!r}: use auto, ort or trt")


def _session(model: onnx.ModelProto, providers: list[str], tmp: Path, threads: int | None = None):
    """An ORT session with lrcompile's settings and no thread spinning.

    No spinning: the variants' sessions run interleaved, and each session's idle pool threads
    would spin on the cores the next session needs (measured: MiniLM's FFN MatMul at batch 16
    took 40 ms instead of 11 on 2 cores). Without it the micro-model times match ORT's own
    profile of the layer inside the full model (0.213 vs 0.206 ms at batch 1, 11.2 vs 11.1 ms
    at batch 16)."""
    return session(model, providers, threads=threads, spinning=False, tmp=tmp)


def _run_ms(sess, feed: dict[str, np.ndarray], n: int) -> float:
    """Mean ms of ``n`` back-to-back runs."""
    t0 = time.perf_counter()
    for _ in range(n):
        sess.run(None, feed)
    return (time.perf_counter() - t0) * 1e3 / n


def measure(runs: dict[Any, tuple[Any, dict[str, np.ndarray]]], *, repeats: int = 20, warmup: int = 2,
            budget_s: float = 0.25, seed: int = 0) -> dict[Any, float]:
    """Median ms of each ``(session, feed)`` in ``runs``, run interleaved.

    After ``warmup`` runs each, every round runs each variant once (one sample: several
    back-to-back runs when one run is under :data:`MIN_SAMPLE_MS`) in a seeded random order.
    The number of rounds is what ``budget_s`` per variant allows at the warm-up speed, within
    ``[min(MIN_REPEATS, repeats), repeats]``.
    """
    if not runs:
        return {}
    labels = list(runs)
    est = {}
    for lab in labels:
        sess, feed = runs[lab]
        for _ in range(max(warmup - 1, 0)):
            sess.run(None, feed)
        est[lab] = max(_run_ms(sess, feed, 1), 1e-3)
    inner = {lab: max(1, math.ceil(MIN_SAMPLE_MS / est[lab])) for lab in labels}
    per_round_s = sum(est[lab] * inner[lab] for lab in labels) / 1e3
    rounds = int(budget_s * len(labels) / per_round_s) if per_round_s > 0 else repeats
    rounds = max(min(MIN_REPEATS, repeats), min(repeats, rounds))
    rng = np.random.default_rng(seed)
    samples: dict[Any, list[float]] = {lab: [] for lab in labels}
    for _ in range(rounds):
        for i in rng.permutation(len(labels)):
            lab = labels[i]
            sess, feed = runs[lab]
            samples[lab].append(_run_ms(sess, feed, inner[lab]))
    return {lab: float(np.median(v)) for lab, v in samples.items()}


def time_layers(model: onnx.ModelProto, cands: list[Candidate], feeds_by_batch: dict[int, dict[str, np.ndarray]],
                ranks_for: dict[str, list[int]], *, providers: list[str] | None = None,
                cache: TimingCache | None = None, model_sha: str | None = None, repeats: int = 20,
                progress: bool = False, warmup: int = 2, budget_s: float = 0.25,
                intra_op_threads: int | None = None, form: str = DEFAULT, form_options: dict | None = None,
                backend: OrtTiming | TrtTiming | None = None) -> dict[str, list[LayerTiming]]:
    """Time each candidate, dense and factorized at each of its ranks, for each batch of feeds.

    See the module docstring for the method. Measurements found in ``cache`` are not repeated;
    new ones are added to it and saved. A candidate without an activation input (a left-side
    MatMul weight, a 1-D/3-D conv) cannot be fed in isolation and is skipped (logged), as is one
    whose micro model ONNX Runtime rejects.

    Args:
        model: the original model (as loaded: its weights in memory).
        cands: candidates from ``analyze(model, config)``, before any rewrite.
        feeds_by_batch: batch size -> feeds of the model's inputs at that batch.
        ranks_for: label -> ranks to time the factorized form at (a label not in it: dense only).
        providers: ONNX Runtime providers (None: :func:`lrcompile.sessions.default_providers`).
        cache: where to look up and store measurements (None: measure everything, store nothing).
        model_sha: the model's sha256 for cache keys (None: computed from ``model``).
        repeats: the most interleaved rounds per variant (fewer when ``budget_s`` runs out).
        progress: show a progress bar (stderr).
        warmup: untimed runs per variant before timing.
        budget_s: timing budget per variant and batch, in seconds (sets the number of rounds).
        intra_op_threads: ORT threads per op (None: ORT's default, one per physical core, as
            deployed). 1 gives steadier numbers on a busy machine, but not the deployed ones.
        form: the form the sizes in ``ranks_for`` are in (``lrcompile.forms``), with its
            ``form_options`` (its knobs); its values are random, of its structure.
        backend: what runs the variants (:class:`OrtTiming` on ``providers`` and
            ``intra_op_threads`` when None, or :class:`TrtTiming`); its fingerprint keys the cache.

    Returns:
        label -> one LayerTiming per batch (in ``feeds_by_batch`` order), ranks ascending.
    """
    backend = backend if backend is not None else OrtTiming(providers, intra_op_threads)
    todo = [c for c in cands if c.activation is not None]
    for c in cands:
        if c.activation is None:
            log.info("%s: no activation input to feed it in isolation; not timed", c.label)
    if not todo or not feeds_by_batch:
        return {}
    fingerprint = backend.fingerprint()
    fp = fingerprint_digest(fingerprint)
    if isinstance(backend, OrtTiming):  # ORT captures the layers' inputs (on the timing providers when ORT times)
        providers = backend.providers
    else:
        from .sessions import default_providers

        providers = default_providers()
    _warn_if_busy(fingerprint["usable_cores"])
    sha = model_sha or (model_sha256(model) if cache is not None else "uncached")
    consts = _resolver(model)
    inputs = {}
    for c in list(todo):
        try:
            inputs[c.label] = layer_inputs(c, consts)
        except Exception as e:  # noqa: BLE001 - a weight that does not fold: leave the layer out
            log.warning("%s: cannot isolate the layer (%s); not timed", c.label, e)
            todo.remove(c)
    names = list(dict.fromkeys(n for c in todo for n in inputs[c.label][0]))
    out: dict[str, list[LayerTiming]] = {}
    with tempfile.TemporaryDirectory(prefix="lrcompile-latency-") as tmpdir:
        tmp = Path(tmpdir)
        captured = {b: capture(model, names, feeds, providers, tmp) for b, feeds in feeds_by_batch.items()}
        try:
            for cand in tqdm(todo, desc="time layers", unit="layer", disable=None if progress else True, leave=False):
                ranks = sorted(set(ranks_for.get(cand.label, ())))
                timing = _time_one(model, cand, inputs[cand.label], captured, ranks, backend=backend,
                                   cache=cache, sha=sha, fp=fp, tmp=tmp, consts=consts, repeats=repeats,
                                   warmup=warmup, budget_s=budget_s, threads=intra_op_threads,
                                   form=(form, form_options))
                if timing is not None:
                    out[cand.label] = timing
        finally:
            if cache is not None:
                cache.save()
    return out


def _warn_if_busy(cores: int) -> None:
    """Timings taken while other processes compete for the cores are slow and noisy (and get
    cached): say so. Interleaving keeps the dense/factorized comparison fair, not the absolute
    numbers."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return
    if cores and load > cores:
        log.warning("machine is busy (1-minute load %.1f on %d cores): layer timings will be slow and noisy",
                    load, cores)


def _time_one(model, cand: Candidate, layer_io: tuple[list[str], dict], captured: dict[int, dict[str, np.ndarray]],
              ranks: list[int], *, backend, cache, sha, fp, tmp, consts, repeats, warmup, budget_s, threads,
              form: tuple[str, dict | None] = (DEFAULT, None)) -> list[LayerTiming] | None:
    live, _ = layer_io
    keys, known = {}, {}
    name, options = form
    tag = name if name == DEFAULT else f"{name}{json.dumps(options or {}, sort_keys=True)}"
    for b, arrays in captured.items():
        x = arrays[cand.activation]
        for r in [None, *ranks]:
            k = timing_key(sha, fp, cand.label, b, list(x.shape), str(x.dtype), r, threads, form=tag)
            keys[b, r] = k
            hit = cache.get(k) if cache is not None else None
            if hit is not None:
                known[b, r] = hit
    missing = [br for br in keys if br not in known]
    if missing:
        try:
            micro = micro_model(model, cand, captured[next(iter(captured))], consts)
            variants = {}
            for r in dict.fromkeys(r for _, r in missing):
                try:
                    variants[r] = micro if r is None else factorized_micro(micro, r, seed=r, form=name, options=options)
                except ValueError as e:  # a size a sparse form cannot take (no rank left beside S...)
                    if name == DEFAULT:
                        raise
                    log.info("%s: %s at size %s: %s; not timed there", cand.label, name, r, e)
            ranks = [r for r in ranks if r in variants or all((b, r) in known for b in captured)]
            missing = [(b, r) for b, r in missing if r in variants]
            feeds = [{n: arrays[n] for n in live} for arrays in captured.values()]
            sessions = {r: backend.load(m, tmp, feeds) for r, m in variants.items()}
        except Exception as e:  # noqa: BLE001 - ORT rejects the isolated node: report, do not stop
            log.warning("%s: cannot build or load its micro model (%s); not timed", cand.label, e)
            return None
        for b, arrays in captured.items():
            want = [r for bb, r in missing if bb == b]
            if not want:
                continue
            feed = {n: arrays[n] for n in live}
            got = measure({r: (sessions[r], feed) for r in want}, repeats=repeats, warmup=warmup,
                          budget_s=budget_s, seed=b)
            for r, ms in got.items():
                known[b, r] = ms
                if cache is not None:
                    cache.put(keys[b, r], ms)
        del sessions
    return [LayerTiming(node=cand.label, batch=int(b), rows_shape=[int(d) for d in arrays[cand.activation].shape],
                        dense_ms=known[b, None], ranks=list(ranks), factorized_ms=[known[b, r] for r in ranks])
            for b, arrays in captured.items()]
