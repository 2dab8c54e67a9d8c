"""``lrcompile bench``: measure compression configurations of one model on real evaluation data.

For the original model and for every configuration (a method and its options, e.g.
``whiten:ratio=0.9,0.7,0.5`` = three configurations) bench compiles the model, then measures:

- parameters (float initializers and Constant tensors, each counted once) of the whole model and
  of the factorized layers, FLOPs per sample (``lrcompile.flops``, at the eval feed's shapes with
  batch 1), and the file size;
- the task metric (``lrcompile.metrics``) on the eval feed, against the original's outputs and
  against the labels where there are labels, and the output error (max abs/rel, relative L2);
- ONNX Runtime CPU latency at batch 1 and at a large batch: original and compressed timed in the
  same run, interleaved, after a warm-up, median of the repeats, reported as compressed/original;
- TensorRT engine build (TensorRT for RTX builds on a CPU): success and engine size.

and writes ``results.json`` (rows, environment, settings), ``results.csv``, and the PNGs
``pareto.png``, ``ranks_<config>.png`` and ``spectra.png`` into the output folder. Input: a build
folder of ``models/build.py`` (its meta.json names the feeds, labels, task and scored output) or
a model with ``eval_feed=...``. A configuration that fails is recorded with its error, not fatal.
"""
from __future__ import annotations

import csv
import importlib.metadata as md
import itertools
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tabulate import tabulate
from tqdm.auto import tqdm

from .errors import LrcError, internal_error_line

log = logging.getLogger(__name__)

#: CompileConfig fields that bench sets itself.
RESERVED = {"target", "verify", "calib", "inputs", "method"}
#: Activation statistics that a .npz calibration feed provides (Fisher information needs gradients).
ACTIVATION_STATS = {"gram", "abs_sum", "in_sum", "out_sum", "out_gram"}
#: Statistics from gradients (torch via onnx2torch, the ``fisher`` extra); ``grad_gram`` needs no labels.
GRADIENT_STATS = {"fisher", "grad_gram"}
PROVIDERS = ["CPUExecutionProvider"]
TASK_COLUMNS = {"fidelity": ("cosine_mean", "cosine_p1"), "classification": ("top1", "top1_agreement"),
                "binary_classification": ("auc", "auc_delta", "logloss")}


# ------------------------------------------------------------------------------ configurations


@dataclass(frozen=True)
class BenchConfig:
    """One configuration: a method and CompileConfig options (e.g. ``(("ratio", 0.5),)``)."""

    method: str
    options: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        return " ".join([self.method] + [f"{k}={_fmt(v)}" for k, v in self.options])

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "_", self.label).strip("_")

    def compile_options(self) -> dict:
        return {"method": self.method, **dict(self.options)}


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return "+".join(map(str, v))
    return str(int(v)) if isinstance(v, bool) else str(v)


def _coerce(key: str, raw: str, text: str):
    """One value of a configuration, converted as every option is (``lrcompile.config.coerce``)."""
    from .config import coerce, specs

    names = [s.name for s in specs()]
    if key in RESERVED or key not in names:
        allowed = sorted(set(names) - RESERVED)
        raise LrcError(f"--config {text!r}: option {key!r} cannot be set here; use one of {', '.join(allowed)}")
    try:
        return coerce(key, raw, label=key)
    except LrcError as e:
        raise LrcError(f"--config {text!r}: {e}") from None


def parse_config(text: str) -> list[BenchConfig]:
    """``METHOD[:KEY=V1,V2[;KEY=V...]]`` -> one BenchConfig per combination of the values.

    ``svd:ratio=0.9,0.7,0.5`` gives three; ``whiten:ratio=0.5;sequential=1`` one. Keys are
    CompileConfig fields (``-`` may stand for ``_``); values are converted as every option is
    (``lrcompile.config.coerce``): ``none`` means the default, and a list takes ``+``-separated
    values (``only=MatMul+Gemm``; ``,`` separates configurations), except a repeatable pattern
    option (``exclude``, ``include``, ``layer_methods``), whose value is one pattern.
    """
    from .factorize import METHODS

    method, _, rest = text.partition(":")
    method = method.strip()
    if method not in METHODS:
        raise LrcError(f"--config {text!r}: unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    axes = []
    for part in (p.strip() for p in rest.split(";")):
        if not part:
            continue
        key, sep, vals = part.partition("=")
        if not sep or not vals.strip():
            raise LrcError(f"--config {text!r}: expected KEY=V1,V2,... in {part!r} (e.g. 'svd:ratio=0.9,0.5')")
        key = key.strip().replace("-", "_")
        axes.append([(key, _coerce(key, v.strip(), text)) for v in vals.split(",") if v.strip()])
    return [BenchConfig(method, tuple(combo)) for combo in itertools.product(*axes)]


def method_availability(has_calib: bool, has_labels: bool = False) -> tuple[list[str], dict[str, str]]:
    """Registered methods bench can run, and the others with the reason (the data they need).

    Activation statistics need calibration data; Fisher information (``fwsvd``) is collected
    from the calibration data and its labels (``fisher=collect``), so it needs both; gradient
    statistics (``fwsvd``, ``kfac``) need torch and onnx2torch (``pip install 'lrcompile[fisher]'``)."""
    import importlib.util

    from .factorize import METHODS

    has_torch = all(importlib.util.find_spec(m) is not None for m in ("torch", "onnx2torch"))
    ok, skipped = [], {}
    for name, info in METHODS.items():
        if info.internal:
            continue
        extra = set(info.needs) - ACTIVATION_STATS - GRADIENT_STATS
        if extra:
            skipped[name] = f"needs {', '.join(sorted(extra))}, which bench does not provide"
        elif set(info.needs) & GRADIENT_STATS and not has_torch:
            skipped[name] = "needs gradients: pip install 'lrcompile[fisher]' (torch and onnx2torch)"
        elif "fisher" in info.needs and not (has_calib and has_labels):
            skipped[name] = "needs Fisher information: calibration data with labels (a labelled task)"
        elif info.needs and not has_calib:
            skipped[name] = "needs calibration data"
        else:
            ok.append(name)
    return ok, skipped


# ------------------------------------------------------------------------------------ dataset


@dataclass
class Dataset:
    """A model with its evaluation feed, the original's outputs on it, and labels."""

    name: str
    model: Path
    feed: dict[str, np.ndarray]
    output: str
    task: str
    reference: np.ndarray | None = None
    labels: np.ndarray | None = None
    calib: Path | None = None
    calib_labels: Path | None = None
    batch_size: int = 64
    source: dict | None = None

    @property
    def rows(self) -> int:
        return len(next(iter(self.feed.values())))


def load_dataset(target: str | Path, *, eval_feed: str | Path | None = None, reference: str | Path | None = None,
                 labels: str | Path | None = None, metric: str | None = None, calib: str | Path | None = None,
                 calib_labels: str | Path | None = None, output: str | None = None, rows: int | None = None,
                 batch_size: int | None = None) -> Dataset:
    """A build folder (meta.json gives the defaults) or a model file with ``eval_feed``; explicit
    arguments override the folder's. ``rows`` keeps the first rows of the eval feed."""
    from .feeds import check_feeds, load_feeds
    from .io import load_model
    from .metrics import task_of

    p = Path(target)
    meta: dict = {}
    if p.is_dir():
        try:
            meta = json.loads((p / "meta.json").read_text())
            files = meta["files"]
        except (OSError, ValueError, KeyError) as e:
            raise LrcError(f"{p}: not a build folder with a readable meta.json ({e}); "
                           "pass a model and --eval") from None
        model = p / files["model"]
        eval_feed = eval_feed or p / files["eval"]
        reference = reference or (p / files["eval_reference"] if files.get("eval_reference") else None)
        labels = labels or (p / files["eval_labels"] if files.get("eval_labels") else None)
        calib = calib or (p / files["calib"] if files.get("calib") else None)
        calib_labels = calib_labels or (p / files["calib_labels"] if files.get("calib_labels") else None)
        output = output or meta.get("metric", {}).get("output")
        batch_size = batch_size or meta.get("metric", {}).get("batch_size")
    else:
        model = p
        if eval_feed is None:
            raise LrcError(f"{p}: pass --eval FILE.npz (or a build folder of models/build.py)")
    proto = load_model(model)
    outputs = [o.name for o in proto.graph.output]
    output = output or outputs[0]
    if output not in outputs:
        raise LrcError(f"{model}: no output {output!r}; its outputs are {outputs}")
    try:
        task = task_of(metric or meta.get("task") or "cosine")
    except ValueError as e:
        raise LrcError(str(e)) from None
    feed = check_feeds(proto, load_feeds(eval_feed)[0], str(eval_feed))
    ref = None
    if reference is not None:
        refs = load_feeds(reference)[0]
        if output not in refs:
            raise LrcError(f"{reference}: no array {output!r} (the scored output); it holds {sorted(refs)}")
        ref = refs[output]
    lab = None
    if labels is not None:
        try:
            lab = np.load(labels, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise LrcError(f"{labels}: not a readable .npy of labels ({e})") from None
    ds = Dataset(name=meta.get("name") or model.stem, model=model, feed=feed, output=output, task=task,
                 reference=ref, labels=lab, calib=Path(calib) if calib else None,
                 calib_labels=Path(calib_labels) if calib_labels else None, batch_size=int(batch_size or 64),
                 source={"target": str(p), "eval": str(eval_feed), "reference": str(reference) if reference else None,
                         "labels": str(labels) if labels else None, "calib": str(calib) if calib else None,
                         "calib_labels": str(calib_labels) if calib_labels else None})
    n = ds.rows if rows is None else min(rows, ds.rows)
    ds.feed = {k: v[:n] for k, v in feed.items()}
    for name in ("reference", "labels"):
        arr = getattr(ds, name)
        if arr is not None:
            if len(arr) < n:
                raise LrcError(f"{name} has {len(arr)} rows, the eval feed {n}: they must be aligned on axis 0")
            setattr(ds, name, arr[:n])
    return ds


# -------------------------------------------------------------------------------- measuring


def environment() -> dict:
    """Date, machine and package versions, for the results."""
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name")) or cpu
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in ("lrcompile", "numpy", "onnx", "onnxruntime", "onnx-graphsurgeon", "tensorrt", "tensorrt-rtx",
                "torch", "matplotlib"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "platform": platform.platform(),
            "machine": platform.machine(), "cpu": cpu, "cpu_count": os.cpu_count(), "load_avg_1_5_15min": load,
            "python": platform.python_version(), "versions": versions}


def _take(feed: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` rows (cycling when the feed has fewer)."""
    return {k: v[np.arange(n) % len(v)] for k, v in feed.items()}


def run_outputs(path: Path, feed: dict[str, np.ndarray], output: str, batch_size: int, *,
                progress: bool = False, desc: str = "eval") -> np.ndarray:
    """The scored output of ``path`` on ``feed``, in batches (ONNX Runtime, CPU)."""
    from .targets.ort import session

    sess = session(path, PROVIDERS)
    n = len(next(iter(feed.values())))
    chunks = [sess.run([output], {k: v[i:i + batch_size] for k, v in feed.items()})[0]
              for i in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False,
                            disable=None if progress else True)]
    return np.concatenate(chunks)


def _original_outputs(ds: Dataset, progress: bool) -> np.ndarray:
    """The original's scored output on the eval feed: the given reference, after checking that the
    model reproduces its first batch (a stale or foreign reference file would skew every number);
    else computed (and then it is the reference)."""
    if ds.reference is None:
        ds.reference = run_outputs(ds.model, ds.feed, ds.output, ds.batch_size, progress=progress,
                                   desc="eval original")
        return ds.reference
    n = min(ds.batch_size, ds.rows)
    y = run_outputs(ds.model, {k: v[:n] for k, v in ds.feed.items()}, ds.output, n)
    from .metrics import output_error

    ref = ds.reference[:n]
    err = output_error(y, ref)["rel_l2"] if y.shape == ref.shape else float("inf")
    if not err <= 1e-3:
        raise LrcError(f"the reference outputs do not match the model's own on the first {n} eval rows "
                       f"(shape {ref.shape} vs {y.shape}, rel L2 {err:.2e}): "
                       "pass the reference of this model and eval feed, or none to compute it")
    return ds.reference


def _model_facts(path: Path, shapes: dict[str, tuple]) -> dict:
    from .flops import count_flops, param_count, weight_params
    from .io import load_model

    model = load_model(path)
    flops = count_flops(model, shapes)
    size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())
    return {"params": param_count(model)["float"], "weight_params": weight_params(model), "flops": flops["total"],
            "file_bytes": size,
            "flops_unknown_nodes": len(flops["unknown"])}


def _trt(path: Path, shapes: dict[str, tuple], engine: Path) -> dict:
    from .targets import trt as trt_target

    try:
        trt_target.import_tensorrt()
    except LrcError:
        return {"trt": "n/a: tensorrt not installed"}
    try:
        info = trt_target.build_engine(path, engine, trt_target.TrtOptions(), default_shapes=shapes)
        return {"trt": "ok", "trt_engine_bytes": info["engine_bytes"], "trt_build_s": info["build_seconds"]}
    except LrcError as e:
        return {"trt": f"failed: {e}"}
    finally:
        engine.unlink(missing_ok=True)


def _latency(orig: Path, comp: Path, feed: dict, batches: dict[str, tuple[int, int, int]],
             min_seconds: float = 0.0) -> dict:
    from .targets.ort import compare_latency

    out = {}
    for tag, (b, warmup, repeats) in batches.items():
        lat = compare_latency(orig, comp, _take(feed, b), warmup=warmup, repeats=repeats, providers=PROVIDERS,
                              min_seconds=min_seconds)
        out.update({f"lat_{tag}_orig_ms": lat["original"]["median_ms"], f"lat_{tag}_ms": lat["compressed"]["median_ms"],
                    f"lat_{tag}_ratio": lat["ratio"], f"lat_{tag}_repeats": lat["repeats"]})
    return out


def _score(ds: Dataset, y: np.ndarray, baseline: dict | None) -> dict:
    from .metrics import score

    m = score(ds.task, y, ds.reference if ds.reference is not None else y, ds.labels)
    if baseline is not None and "auc" in m and "auc" in baseline:
        m["auc_delta"] = m["auc"] - baseline["auc"]
    return m


def primary_metric(task: str, available) -> tuple[str, bool]:
    """The headline metric of ``task`` among ``available`` keys, and whether higher is better."""
    from .metrics import PRIMARY

    key, higher = PRIMARY[task]
    if key in available:
        return key, higher
    for k, h in (("top1_agreement", True), ("cosine_mean", True), ("rel_l2", False)):
        if k in available:
            return k, h
    return "rel_l2", False


def _data_options(ds: Dataset, opts: dict) -> dict:
    """``opts`` plus the calibration data (and Fisher collection, labels) the configuration needs;
    plain SVD under a rank policy gets none, so it does not pay for a calibration pass it would not
    use. A global budget gets the data for its sensitivity measurements and search, unless the
    configuration names a data-free allocation."""
    from .factorize import METHODS

    methods = {opts["method"]} | {lm.rpartition("=")[2] for lm in opts.get("layer_methods", ())}
    needs = set().union(*(METHODS[m].needs for m in methods))
    budget = any(opts.get(k) is not None for k in ("params", "flops", "max_drop")) and \
        opts.get("allocation", "auto") in ("auto", "sensitivity")
    if not needs and not budget and opts.get("prune_mlp") is None:
        return opts
    if ds.calib is None:
        raise LrcError(f"{', '.join(sorted(methods))} need calibration data: pass --calib (or a build folder)")
    opts = {"calib": str(ds.calib), **opts}
    if opts.get("metric") in ("auc", "logloss") and ds.calib_labels is not None:
        opts.setdefault("labels", str(ds.calib_labels))
    if "fisher" in needs and "fisher" not in opts:
        opts["fisher"] = "collect"
        opts.setdefault("fisher_output", ds.output)
        if ds.calib_labels is not None:
            opts.setdefault("labels", str(ds.calib_labels))
    if "grad_gram" in needs:  # probe the scored output
        opts.setdefault("metric_output", ds.output)
    return opts


def _layers(res) -> list[dict]:
    return [{"node": r.node, "op": r.op, "shape": r.shape, "rank": r.rank, "full_rank": min(r.shape),
             "break_even": r.break_even, "params_before": r.params_before, "params_after": r.params_after,
             "rel_error": r.rel_error, "method": r.method,
             **({"form": r.info["form"]} if (r.info or {}).get("form") else {}),
             **({"ranks": r.info["ranks"]} if (r.info or {}).get("ranks") else {})}
            for r in res.layers if r.decision == "factorized" and not r.shared_with]


def weight_spectra(model_path: Path, count: int, common: dict) -> dict[str, np.ndarray]:
    """Singular values of ``count`` candidate weights spread over the graph (first group of each)."""
    from .config import CompileConfig
    from .io import load_model
    from .engine import analyze

    cands = analyze(load_model(model_path), CompileConfig(**common)).candidates
    seen, uniq = set(), []
    for c in cands:
        if c.weight_key not in seen:
            seen.add(c.weight_key)
            uniq.append(c)
    picks = sorted({int(i) for i in np.linspace(0, len(uniq) - 1, min(count, len(uniq))).round()}) if uniq else []
    return {uniq[i].label: np.linalg.svd(uniq[i].matrices[0].astype(np.float64), compute_uv=False) for i in picks}


# -------------------------------------------------------------------------------------- bench


def run_bench(ds: Dataset, configs: list[BenchConfig], out: str | Path, *, common: dict | None = None,
              latency: bool = True, batch: int = 1, large_batch: int = 64, warmup: int = 3, repeats: int = 20,
              large_repeats: int | None = None, min_seconds: float = 0.0, trt: bool = True, plots: bool = True,
              rank_config: str | None = None,
              spectra_layers: int = 4, keep_models: bool = False, progress: bool = True) -> dict:
    """Measure the original and every configuration; write results.json/csv and the plots.

    Args:
        ds: the model and its evaluation data (:func:`load_dataset`).
        configs: configurations (:func:`parse_config`).
        out: output folder (created).
        common: CompileConfig options applied to every configuration (e.g. ``{"only": ("MatMul",)}``).
        latency / batch / large_batch / warmup / repeats: ORT CPU latency comparison settings;
            ``large_repeats`` (default ``repeats``) for the large batch, whose warm-up is one run
            per ten repeats (at least one); ``min_seconds``: keep repeating (interleaved) until the
            two models have been timed that long together at each batch (short runs get enough
            samples for a stable median).
        trt: build TensorRT engines (skipped with a note when TensorRT is not installed).
        plots: write the PNGs (needs matplotlib).
        rank_config: label of the configuration whose per-layer ranks are plotted (default: the
            last successful one of the default data-aware method, else the last successful one).
        spectra_layers: how many weights' singular values to plot.
        keep_models: keep the compressed models in ``out/models``.

    Returns:
        The content of results.json.
    """
    import lrcompile

    from .report import to_json

    t_start = time.perf_counter()
    if rank_config and rank_config not in [c.label for c in configs]:
        raise LrcError(f"--rank-config {rank_config!r} is not one of the configurations: "
                       f"{', '.join(c.label for c in configs)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(common or {})
    work = Path(tempfile.mkdtemp(prefix=".bench.", dir=out))
    shapes1 = {k: (1,) + v.shape[1:] for k, v in ds.feed.items()}
    shapes_big = {k: (large_batch,) + v.shape[1:] for k, v in ds.feed.items()}
    large_repeats = large_repeats or repeats
    batches = {f"b{batch}": (batch, warmup, repeats)}
    if large_batch != batch:
        batches[f"b{large_batch}"] = (large_batch, min(warmup, max(1, large_repeats // 10)), large_repeats)
    try:
        y0 = _original_outputs(ds, progress)
        base = _score(ds, y0, None)
        facts0 = _model_facts(ds.model, shapes1)
        orig = {"config": "original", "method": "original", "status": "ok", "factorized": 0,
                "factorized_params_ratio": 1.0, "factorized_storage_ratio": 1.0, "weight_params_ratio": 1.0, "params_ratio": 1.0, "flops_ratio": 1.0,
                "file_ratio": 1.0,
                **facts0, **base}
        if trt:
            orig.update(_trt(ds.model, shapes_big, work / "original.engine"))
        rows = [orig]
        layers: dict[str, list[dict]] = {}
        bar = tqdm(configs, desc=f"bench {ds.name}", unit="config", disable=None if progress else True)
        for cfg in bar:
            bar.set_postfix_str(cfg.label)
            row = {"config": cfg.label, "method": cfg.method, **dict(cfg.options)}
            opts = {**common, **cfg.compile_options()}
            dst = work / f"{cfg.slug}.onnx"
            t0 = time.perf_counter()

            def lap(name: str) -> None:  # seconds of each phase, into the row
                nonlocal t0
                row[f"{name}_s"] = round(time.perf_counter() - t0, 2)
                t0 = time.perf_counter()

            try:
                res = lrcompile.compile(ds.model, dst, verify=False, progress=progress, **_data_options(ds, opts))
                lap("compile")
                tot = res.report["totals"]
                row.update(status="ok", factorized=tot["factorized"], declined=tot["declined"],
                           factorized_params_before=tot["params_before"], factorized_params_after=tot["params_after"],
                           factorized_params_ratio=tot["params_ratio"],
                           # the forms' own storage with indices (sparse forms; else the file's count)
                           factorized_storage_ratio=(tot.get("storage_params_after", tot["params_after"])
                                                     / tot["params_before"]) if tot["params_before"] else None)
                dist = res.report.get("distillation")
                if dist:  # the held-out loss the training saw, and which epoch it kept
                    row.update(distill_loss_before=dist["held_out_loss_before"],
                               distill_loss_after=dist["held_out_loss_after"], distill_kept_epoch=dist["kept_epoch"],
                               distill_s=dist["seconds"])
                layers[cfg.label] = _layers(res)
                facts = _model_facts(dst, shapes1)
                # the whole model with each form's parts at their own storage (indices included),
                # where the file keeps N:M zeros and indexes sparse values its own way
                stored = facts["params"] - tot["params_after"] + tot.get("storage_params_after", tot["params_after"])
                row.update(facts, params_ratio=facts["params"] / facts0["params"],
                           storage_ratio=stored / facts0["params"],
                           weight_params_ratio=facts["weight_params"] / facts0["weight_params"]
                           if facts0["weight_params"] else None,
                           flops_ratio=facts["flops"] / facts0["flops"] if facts0["flops"] else None,
                           file_ratio=facts["file_bytes"] / facts0["file_bytes"])
                y = run_outputs(dst, ds.feed, ds.output, ds.batch_size, progress=progress, desc="eval")
                row.update(_score(ds, y, base))
                lap("eval")
                if latency:
                    row.update(_latency(ds.model, dst, ds.feed, batches, min_seconds))
                    lap("latency")
                if trt:
                    row.update(_trt(dst, shapes_big, work / f"{cfg.slug}.engine"))
                    lap("trt")
            except Exception as e:  # noqa: BLE001 - one configuration failing must not lose the others
                if not isinstance(e, LrcError):
                    log.error("configuration %s failed: %s", cfg.label, internal_error_line(e, "bench"))
                row["status"] = f"error: {e}"
                lap("failed_after")
            if keep_models and dst.exists():
                (out / "models").mkdir(exist_ok=True)
                for f in work.glob(dst.name + "*"):
                    shutil.move(str(f), out / "models" / f.name)
            for f in work.glob(dst.name + "*"):
                f.unlink()
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    primary, higher = primary_metric(ds.task, base)
    for key in [k for k in dict.fromkeys(k for r in rows for k in r) if k.endswith("_orig_ms")]:
        tag = key[len("lat_"):-len("_orig_ms")]
        orig[f"lat_{tag}_ms"] = float(np.median([r[key] for r in rows if key in r]))
        orig[f"lat_{tag}_ratio"] = 1.0
    for r in rows:
        if r.get(primary) is not None:
            r["primary"] = r[primary]
    from .config import DEFAULT_WITH_DATA

    ok = [r["config"] for r in rows[1:] if r["status"] == "ok"]
    preferred = [c for c in ok if c.split()[0] == DEFAULT_WITH_DATA] or ok
    rank_label = rank_config or (preferred[-1] if preferred else None)
    spectra = weight_spectra(ds.model, spectra_layers, common) if spectra_layers else {}
    results = {
        "lrcompile": lrcompile.__version__,
        "model": ds.name,
        "task": ds.task,
        "output": ds.output,
        "primary": primary,
        "higher_is_better": higher,
        "source": ds.source,
        "environment": environment(),
        "settings": {"eval_rows": ds.rows, "eval_batch_size": ds.batch_size, "flops_input_shapes": shapes1,
                     "common_options": {k: list(v) if isinstance(v, tuple) else v for k, v in common.items()},
                     "latency": {"batches": [b for b, _, _ in batches.values()],
                                 "warmup": [w for _, w, _ in batches.values()],
                                 "repeats": [r for _, _, r in batches.values()], "min_seconds": min_seconds,
                                 "providers": PROVIDERS, "interleaved": True} if latency else None,
                     "trt": trt},
        "rows": rows,
        "layers": layers,
        "rank_config": rank_label,
        "spectra": {k: v.tolist() for k, v in spectra.items()},
        "files": ["results.json", "results.csv"],
    }
    if plots:
        results["files"] += write_plots(results, out)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "results.json").write_text(to_json(results))
    write_csv(rows, out / "results.csv")
    return results


def write_plots(results: dict, out: Path) -> list[str]:
    """pareto.png, ranks_<config>.png, spectra.png from a results dict; returns the file names."""
    from . import plots

    name, primary, rows = results["model"], results["primary"], results["rows"]
    base = rows[0].get(primary)
    ok = [r for r in rows[1:] if r["status"] == "ok"]
    written = []
    plots.pareto(ok, out / "pareto.png", metric=primary, title=f"{name}: {primary} vs parameters kept",
                 baseline=base, higher_is_better=results["higher_is_better"])
    written.append("pareto.png")
    label = results["rank_config"]
    if label and results["layers"].get(label):
        fname = "ranks_" + re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_") + ".png"
        plots.rank_profile(results["layers"][label], out / fname, title=f"{name}: per-layer ranks, {label}")
        written.append(fname)
    if results["spectra"]:
        chosen = {r["node"]: r["rank"] for r in results["layers"].get(label) or []}
        plots.spectra({k: np.asarray(v) for k, v in results["spectra"].items()}, out / "spectra.png",
                      title=f"{name}: weight singular values" + (f" (dots: {label})" if chosen else ""), ranks=chosen)
        written.append("spectra.png")
    return written


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(v) if isinstance(v, tuple) else v for k, v in r.items()})


# -------------------------------------------------------------------------------------- table


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _si(v: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def _lat(r: dict, tag: str) -> str:
    """``ratio (compressed/original ms)`` of one batch size; the original row shows its median."""
    ratio, comp, orig = r.get(f"lat_{tag}_ratio"), r.get(f"lat_{tag}_ms"), r.get(f"lat_{tag}_orig_ms")
    if ratio is None:
        return "-"
    return f"{ratio:.2f} ({comp:.3g}/{orig:.3g} ms)" if orig is not None else f"{ratio:.2f} ({comp:.3g} ms)"


def results_table(results: dict, tablefmt: str = "simple") -> str:
    """The rows as a table: sizes as ratios to the original, the task metrics, latency ratios."""
    task = results["task"]
    metric_keys = [k for k in TASK_COLUMNS[task] if any(k in r for r in results["rows"])]
    if not metric_keys or results["primary"] not in metric_keys:
        metric_keys = [results["primary"]] + metric_keys
    lat = results["settings"]["latency"]
    tags = [f"b{b}" for b in lat["batches"]] if lat else []
    head = ["config", "fact. params", "storage", "model storage", "weights", "params", "FLOPs", "file MB", *metric_keys, "rel L2",
            *[f"lat {t} (comp/orig)" for t in tags], "TRT MB"]
    body = []
    for r in results["rows"]:
        if r["status"] != "ok":
            body.append([r["config"], r["status"]] + [""] * (len(head) - 2))
            continue
        fr = r.get("factorized_params_ratio")
        body.append([
            r["config"],
            f"{fr:.2f}" if fr is not None else "-",
            _num(r.get("factorized_storage_ratio", fr), ".2f"),
            _num(r.get("storage_ratio", r.get("params_ratio")), ".2f"),
            _num(r.get("weight_params_ratio"), ".3f"),
            f"{_si(r['params'])} ({r['params_ratio']:.2f})",
            f"{_si(r['flops'])} ({r['flops_ratio']:.2f})" if r.get("flops_ratio") is not None else "-",
            f"{r['file_bytes'] / 1e6:.2f}",
            *[_num(r.get(k), "+.4f" if k.endswith("_delta") else ".4f") for k in metric_keys],
            _num(r.get("rel_l2"), ".3g"),
            *[_lat(r, t) for t in tags],
            (f"{r['trt_engine_bytes'] / 1e6:.2f}" if r.get("trt") == "ok" else str(r.get("trt", "-"))[:40]),
        ])
    return tabulate(body, headers=head, tablefmt=tablefmt, disable_numparse=True)
