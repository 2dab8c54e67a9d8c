#!/usr/bin/env python
"""Byte identity of compiled outputs: ``python benchmarks/byte_identity.py --record|--check FILE.json``.

A safety net for refactors of the compiler's internals: for every test-bed configuration (below)
it compiles the test-bed model through the public API (``lrcompile.compile(model, out,
target="onnx", verify=False, **options)``) and takes the sha256 of every file the compile writes
(the .onnx and any external-data file; no report is written, its timings would differ anyway).

    --record FILE.json   compile every configuration (twice by default, to show that the output is
                         byte-identical across reruns) and write the hashes, keyed by
                         ``model/config``; entries already in FILE that were not rerun are kept
    --check FILE.json    compile again and compare: a table ``model | config | same/DIFFERENT/
                         missing``, then ``N passed, N failed``; exit 1 on any difference

A configuration that fails to compile (e.g. DeepFM ``--params 0.25 --prune-mlp 0.25``, which the
planner refuses) is recorded with its error line, which the check compares too. Verification is
off: it only compares the written model with the original and never changes a byte.

Where the configurations come from (``--list`` prints them with their sources):

- ``benchmarks/run_all.py`` ``STANDARD``: per model, its op types, every factorization method that
  can run on the build's data (``lrcompile.bench.method_availability``) at each ``--ratio``;
- ``benchmarks/budgets.py`` ``PLANS``: its configurations per model (global budgets, allocations,
  ``--max-drop``, ``--sequential``, kfac), except its latency-aware rows (see below);
- the ``lrcompile bench`` commands cited in ``benchmarks/results/{kfac,prune_mlp,distill}/README.md``
  (transcribed in ``CITED``: kfac, ``--sequential``, ``--prune-mlp`` fractions and ``auto``,
  ``--flops``, ``--distill`` with its learning rates, batch and matched tensors);
- the README's quick start (tiny-mlp, ``--ratio 0.5 --calib``), plus cheap configurations that
  exercise paths no cited command does quickly: plain SVD without data, a forced external-data file,
  and MiniLM's heavy options on ``tiny-transformer`` (below).

Config strings are ``lrcompile bench --config`` strings, turned into options by
``lrcompile.bench.parse_config``; ``$BUILD`` stands for the model's build folder. The calibration
data (and labels, Fisher collection, probed output) each configuration needs are added the way
``lrcompile bench`` adds them, from the build folder (``models/common.py`` layout).

Reduced settings (so that ``--fast`` over all models takes about 15 minutes and the full-size run
about 45 on 2 cores; they change how much work a code path does, not which path runs):

- ``--distill`` (the configurations transcribed from the results): ``distill_epochs=1`` and
  ``distill_samples`` = 4 x ``distill_batch`` (four batches, the last held out): the cited runs
  train for 15-80 minutes each. Where one epoch does not lower the held-out loss the untrained
  rewrite is kept, so some of them write the same bytes as without ``--distill`` (the training
  still runs); the tiny-transformer ones are sized so that training is kept;
- latency-aware mode: ``timing_cache`` points to a cache that ``--record`` fills and stores inside
  FILE.json and ``--check`` restores, so the dense-or-factorized choice, which depends on timings
  that vary with machine noise, is reproducible. Only one latency-aware configuration is kept
  (``LATENCY_AWARE``: cnn-digits ``--params 0.5``, the planner's latency limits); the timings are
  keyed by the machine, so a check on another machine measures them again and says so.
- calibration data, sensitivity samples and search steps are those of the builds and the defaults
  (fewer sensitivity samples barely shorten a MiniLM budget: its 72 model builds and sessions
  dominate, hence ``--full`` below).

Heavy configurations: MiniLM's kfac, ``--sequential``, ``--distill``, ``--prune-mlp`` and global
budgets with measured sensitivities take one to several minutes each even on the ``--fast`` build
(its planner runs the 90 MB model some 72 times), ten or more on the full-size one; they run only
with ``--full`` and are otherwise skipped and counted. The same code paths run in seconds on
``tiny-transformer`` (one encoder block with an erf-GELU FFN), which the default run includes with
those options (``CITED``).

The compile runs with one BLAS thread (``OPENBLAS_NUM_THREADS=1``, forced here) so that numpy's
reductions, hence the factors, do not depend on the machine's thread count or load.

Model builds: ``--models DIR`` holds one ``models/build.py`` output folder per model (built there
with ``python models/build.py NAME --out DIR/NAME [--fast]`` when missing). The record keeps a digest
of each build's model and data arrays; a check on builds that differ stops with that reason instead
of reporting every output as different.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

# Forced, not defaulted: the factors must not depend on the BLAS thread count of whoever runs this.
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # run_all / budgets, for their configuration tables

FORMAT = 1
#: Output file name inside each configuration's temporary folder (external data is named after it).
OUT_NAME = "model.lr.onnx"
#: Test-bed models, cheapest first (any other model of run_all.STANDARD is appended).
ORDER = ("tiny-mlp", "tiny-transformer", "cnn-digits", "deepfm-ml100k", "dcnv2-ml100k", "minilm-l6")
#: Options applied to every configuration of a model (as in run_all / budgets / the cited commands).
COMMON = {"minilm-l6": {"only": ("MatMul",)}}
#: The one latency-aware configuration kept (budgets.py's others are left out: see the docstring).
LATENCY_AWARE = ("cnn-digits", "whiten:params=0.5;latency_aware=1;latency_batches=1+256")
#: Configurations cited in the results READMEs and the top-level README, by model and source.
CITED: dict[str, dict[str, list[str]]] = {
    "tiny-mlp": {
        "README.md quick start": ["whiten:ratio=0.5"],
        "extra coverage (data-free default, external data)": ["svd:ratio=0.5", "whiten:ratio=0.5;external_data=1"],
    },
    "tiny-transformer": {
        "extra coverage (MiniLM's --full options on a small transformer)": [
            "whiten:ratio=0.5", "kfac:ratio=0.5", "kfac:params=0.5", "whiten:params=0.5;sequential=1",
            "kfac:params=0.5;sequential=1", "kfac:params=0.7;prune_mlp=0.7", "kfac:params=0.5;prune_mlp=auto",
            "kfac:params=0.7;prune_mlp=auto;sequential=1", "whiten:flops=0.5;prune_mlp=auto",
            # eval.npz: the only feed apart from calib.npz (training on the calibration rows never
            # lowers the held-out loss, so the untrained rewrite would be kept); 3 epochs: fewer do not either
            "kfac:params=0.5;prune_mlp=auto;distill=$BUILD/eval.npz;distill_epochs=3;distill_batch=16",
            "kfac:params=0.5;prune_mlp=auto;distill=$BUILD/eval.npz;distill_epochs=3;distill_batch=16;"
            "distill_match=layers",
        ],
    },
    "minilm-l6": {
        "benchmarks/results/kfac/README.md": [
            "whiten:ratio=0.7,0.5", "kfac:ratio=0.7,0.5", "whiten:params=0.7,0.5", "kfac:params=0.7,0.5",
            "kfac:params=0.5,0.7;sequential=1", "kfac:ratio=0.5;probes=16", "kfac:ratio=0.5;sequential=1",
            'kfac:ratio=0.5;method_options={"out_damping":0.1}',
        ],
        "benchmarks/results/prune_mlp/README.md": [
            "whiten:params=0.7,0.5", "whiten:params=0.7;prune_mlp=0.7", "whiten:params=0.5;prune_mlp=0.5",
            "kfac:params=0.7;prune_mlp=0.7", "kfac:params=0.5;prune_mlp=0.5",
            "kfac:params=0.7;prune_mlp=0.7;sequential=1", "kfac:params=0.5;prune_mlp=0.5;sequential=1",
            "kfac:params=0.7,0.5;prune_mlp=auto", "kfac:params=0.7;prune_mlp=auto;sequential=1",
        ],
        "benchmarks/results/distill/README.md": [
            "kfac:params=0.5;prune_mlp=auto;distill=$BUILD/distill.npz;distill_lr=3e-4",
            "kfac:params=0.7;prune_mlp=auto;distill=$BUILD/distill.npz;distill_lr=3e-4;distill_epochs=4",
            "kfac:params=0.7;prune_mlp=auto;distill=$BUILD/distill.npz;distill_lr=1e-4;distill_epochs=8",
            "kfac:params=0.7;prune_mlp=auto;distill=$BUILD/calib.npz;distill_epochs=32",
            "kfac:params=0.7,0.5;prune_mlp=auto;distill=$BUILD/distill.npz;distill_samples=4096;distill_lr=1e-4;"
            "distill_match=layers",
        ],
    },
    "deepfm-ml100k": {
        "benchmarks/results/prune_mlp/README.md": [
            "whiten:params=0.25", "whiten:params=0.25;prune_mlp=0.25", "whiten:params=0.25;prune_mlp=auto",
            "whiten:max_drop=0.001;metric=auc", "whiten:max_drop=0.001;metric=auc;prune_mlp=auto",
            "whiten:flops=0.25", "whiten:flops=0.25;prune_mlp=auto",
        ],
        "benchmarks/results/distill/README.md": [
            "whiten:params=0.25,0.15",
            "whiten:params=0.25,0.15;distill=$BUILD/distill.npz;distill_batch=256;distill_lr=1e-3",
            "whiten:params=0.25,0.15;distill=$BUILD/distill.npz;distill_batch=256;distill_lr=1e-3;distill_match=layers",
            "whiten:params=0.25,0.15;distill=$BUILD/distill.npz;distill_batch=256;distill_lr=1e-4",
        ],
    },
    "dcnv2-ml100k": {
        "benchmarks/results/prune_mlp/README.md": [
            "whiten:params=0.25", "whiten:params=0.25;prune_mlp=0.25", "whiten:params=0.25;prune_mlp=auto",
            "whiten:max_drop=0.001;metric=auc", "whiten:max_drop=0.001;metric=auc;prune_mlp=auto",
            "whiten:flops=0.25", "whiten:flops=0.25;prune_mlp=auto",
        ],
    },
}
#: Reduced distillation (see the module docstring).
DISTILL_EPOCHS = 1
DISTILL_BATCHES = 4


class UsageError(Exception):
    """A user error: printed as one line, exit 2."""


@dataclass
class Case:
    """One configuration of one model.

    Attributes:
        model: test-bed model name.
        label: the configuration's name (``lrcompile bench`` label, after the reductions).
        method / options: the compile options before data options are added (``$BUILD`` unresolved).
        sources: where the configuration comes from.
        heavy: run on full-size builds only with ``--full``.
        latency: the latency-aware configuration (gets the timing cache).
    """

    model: str
    label: str
    method: str
    options: tuple
    sources: list[str] = field(default_factory=list)
    heavy: bool = False
    latency: bool = False

    @property
    def key(self) -> str:
        return f"{self.model}/{self.label}"


# ------------------------------------------------------------------------------ configurations


def model_names() -> list[str]:
    """Every test-bed model, in the deterministic run order."""
    from run_all import STANDARD

    return list(ORDER) + [m for m in STANDARD if m not in ORDER]


def _reduce(options: tuple) -> tuple:
    """The options with the reduced settings of the module docstring (order kept, new keys last)."""
    opts = dict(options)
    if opts.get("distill"):
        opts["distill_epochs"] = DISTILL_EPOCHS
        opts["distill_samples"] = DISTILL_BATCHES * int(opts.get("distill_batch", 32))
    return tuple(opts.items())


def _is_heavy(model: str, method: str, options: dict) -> bool:
    """MiniLM configurations that take minutes each even on the --fast build (``--full`` only): kfac
    (its output curvature), ``--sequential``, ``--distill``, ``--prune-mlp`` and global budgets with
    measured sensitivities (72 model runs of a 90 MB model); error-curve and threshold budgets stay in."""
    if model != "minilm-l6":
        return False
    measured = any(options.get(k) is not None for k in ("params", "flops", "max_drop")) and \
        options.get("allocation", "auto") in ("auto", "sensitivity")
    return method == "kfac" or measured or any(options.get(k) for k in ("sequential", "distill", "prune_mlp"))


def cases_for(model: str, has_calib: bool, has_labels: bool, fast: bool) -> list[Case]:
    """Every configuration of ``model`` from the sources of the module docstring, deduplicated
    (the same options in any order are one configuration; its sources are merged)."""
    from budgets import PLANS
    from run_all import STANDARD

    from lrcompile.bench import BenchConfig, method_availability, parse_config

    texts: list[tuple[str, str]] = []  # (source, config string)
    if model in STANDARD:
        methods, _ = method_availability(has_calib, has_labels)
        budgets = ",".join(map(str, STANDARD[model]["budgets"]))
        texts += [("run_all.STANDARD", f"{m}:ratio={budgets}") for m in methods]
        if dict(STANDARD[model]["common"]) != COMMON.get(model, {}):
            raise UsageError(f"run_all.STANDARD[{model!r}] common options {STANDARD[model]['common']} differ from "
                             f"byte_identity.COMMON; update COMMON")
    if model in PLANS:
        for text in PLANS[model]["configs"]:
            if "latency_aware" in text and (model, text) != LATENCY_AWARE:
                continue
            texts.append(("budgets.PLANS", text))
    for source, items in CITED.get(model, {}).items():
        texts += [(source, t) for t in items]

    cases: dict[tuple, Case] = {}
    for source, text in texts:
        for cfg in parse_config(text):
            extra = source.startswith("extra coverage")  # written small already: not reduced
            reduced = cfg if extra else BenchConfig(cfg.method, _reduce(cfg.options))
            canon = (reduced.method, tuple(sorted((k, repr(v)) for k, v in reduced.options)))
            if canon in cases:
                if source not in cases[canon].sources:
                    cases[canon].sources.append(source)
                continue
            opts = dict(reduced.options)
            cases[canon] = Case(model, reduced.label, reduced.method, reduced.options, [source],
                                heavy=_is_heavy(model, reduced.method, opts), latency=(model, text) == LATENCY_AWARE)
    labels = [c.label for c in cases.values()]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise UsageError(f"{model}: two configurations share the label(s) {dup}; make their strings differ")
    return list(cases.values())


def data_options(build: "Build", opts: dict) -> dict:
    """``opts`` plus the calibration data, labels, Fisher collection and probed output the
    configuration needs, as ``lrcompile bench`` adds them (plain SVD under a rank policy gets no
    data; a global budget gets it for its sensitivity measurements unless its allocation is
    data-free)."""
    from lrcompile.factorize import METHODS

    methods = {opts["method"]} | {lm.rpartition("=")[2] for lm in opts.get("layer_methods", ())}
    needs = set().union(*(METHODS[m].needs for m in methods))
    budget = any(opts.get(k) is not None for k in ("params", "flops", "max_drop")) and \
        opts.get("allocation", "auto") in ("auto", "sensitivity")
    if not needs and not budget and opts.get("prune_mlp") is None:
        return opts
    if build.calib is None:
        raise UsageError(f"{build.name}: the build has no calibration data, which {sorted(methods)} need")
    opts = {"calib": build.calib, **opts}
    if opts.get("metric") in ("auc", "logloss") and build.calib_labels is not None:
        opts.setdefault("labels", build.calib_labels)
    if "fisher" in needs and "fisher" not in opts:
        opts["fisher"] = "collect"
        opts.setdefault("fisher_output", build.output)
        if build.calib_labels is not None:
            opts.setdefault("labels", build.calib_labels)
    if "grad_gram" in needs:
        opts.setdefault("metric_output", build.output)
    return opts


# ------------------------------------------------------------------------------------ builds


@dataclass
class Build:
    """A model's build folder and what the compile options need from it."""

    name: str
    path: Path
    model: Path
    calib: str | None
    calib_labels: str | None
    output: str
    digest: dict


def _array_digest(path: Path) -> str:
    """sha256 of an .npz/.npy's arrays (names, dtypes, shapes, bytes): the zip's timestamps vary
    between identical builds, the arrays do not."""
    import numpy as np

    h = hashlib.sha256()
    data = np.load(path, allow_pickle=False)
    arrays = {"": data} if isinstance(data, np.ndarray) else {k: data[k] for k in sorted(data.files)}
    for k, a in arrays.items():
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_build(name: str, models: Path, fast: bool) -> Build:
    """The build folder of ``name`` under ``models``, built with models/build.py when missing."""
    from lrcompile.bench import load_dataset

    path = models / name
    if not (path / "meta.json").is_file():
        cmd = [sys.executable, str(ROOT / "models" / "build.py"), name, "--out", str(path)] + (["--fast"] * fast)
        print(f"building {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise UsageError(f"building {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
        print(f"built {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    meta = json.loads((path / "meta.json").read_text())
    built_fast = bool(meta.get("options", {}).get("fast"))
    if built_fast != fast:
        raise UsageError(f"{path} is a {'--fast' if built_fast else 'full-size'} build; this run wants "
                         f"{'--fast' if fast else 'full-size'} builds (pass another --models folder)")
    ds = load_dataset(path)
    digest = {"model.onnx": file_sha256(ds.model)}
    for key in ("calib", "calib_labels", "distill", "eval"):  # the data options can name
        rel = meta["files"].get(key)
        if rel:
            digest[rel] = _array_digest(path / rel)
    return Build(name, path, Path(ds.model), str(ds.calib) if ds.calib else None,
                 str(ds.calib_labels) if ds.calib_labels else None, ds.output, digest)


# ------------------------------------------------------------------------------------ running


def _portable(value, build: Build, timings: Path | None):
    """Option values with the machine's paths replaced by ``$BUILD`` / ``$TIMINGS`` (for the record)."""
    if isinstance(value, str):
        value = value.replace(str(build.path), "$BUILD")
        return value.replace(str(timings), "$TIMINGS") if timings else value
    if isinstance(value, tuple):
        return [_portable(v, build, timings) for v in value]
    return value


def compile_options(case: Case, build: Build, timings: Path | None) -> dict:
    """The ``lrcompile.compile`` options of ``case`` on ``build``."""
    opts = {**COMMON.get(case.model, {}), "method": case.method, **dict(case.options)}
    opts = data_options(build, opts)
    opts = {k: v.replace("$BUILD", str(build.path)) if isinstance(v, str) else v for k, v in opts.items()}
    if case.latency:
        opts["timing_cache"] = str(timings)
    return {**opts, "target": "onnx", "verify": False}


def compile_once(case: Case, build: Build, options: dict) -> dict:
    """Compile into a fresh folder; ``{"files": {name: sha256}}`` or ``{"error": line}``."""
    import lrcompile

    tmp = Path(tempfile.mkdtemp(prefix="byte_identity."))
    try:
        try:
            lrcompile.compile(build.model, tmp / OUT_NAME, **options)
        except lrcompile.LrcError as e:
            return {"error": f"{type(e).__name__}: {e}".replace(str(tmp), "$OUT").replace(str(build.path), "$BUILD")}
        except Exception as e:  # noqa: BLE001 - our bug: recorded (so the check compares it) and shown
            traceback.print_exc()
            return {"error": f"{type(e).__name__}: {e}".replace(str(tmp), "$OUT").replace(str(build.path), "$BUILD"),
                    "bug": True}
        return {"files": {p.relative_to(tmp).as_posix(): file_sha256(p)
                          for p in sorted(tmp.rglob("*")) if p.is_file()}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _outcome(entry: dict) -> dict:
    return {k: entry[k] for k in ("files", "error") if k in entry}


def environment() -> dict:
    import importlib.metadata as md

    import lrcompile

    versions = {}
    for pkg in ("numpy", "scipy", "onnx", "onnxruntime", "onnx-graphsurgeon", "torch", "onnx2torch"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "lrcompile": lrcompile.__version__,
            "lrcompile_path": str(Path(lrcompile.__file__).parent), "script_repo_commit": commit or None,
            "script_repo_dirty": bool(dirty), "versions": versions, "blas": blas_kernel()}


def blas_kernel() -> str | None:
    """numpy's BLAS and the kernel it runs (e.g. ``openblas SkylakeX``): another kernel (another
    CPU, or OPENBLAS_CORETYPE) gives other low bits, so outputs are compared only under the same one."""
    from threadpoolctl import threadpool_info

    for lib in threadpool_info():
        if lib.get("user_api") == "blas":
            return f"{lib.get('internal_api')} {lib.get('architecture')}"
    return None


# --------------------------------------------------------------------------------------- main


def _load_record(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file (record one with --record {path})") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable byte-identity record ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        raise UsageError(f"{path}: not a format-{FORMAT} byte-identity record (written by --record)")
    return data


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    head = ("model", "config", "status", "note")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]

    def line(r: tuple[str, ...]) -> str:
        return (" | ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + (f" | {r[3]}" if r[3] else "")).rstrip()

    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path, metavar="FILE.json", help="compile and write the hashes")
    mode.add_argument("--check", type=Path, metavar="FILE.json", help="compile and compare with FILE")
    mode.add_argument("--list", action="store_true", help="print the configurations and their sources, run nothing")
    parser.add_argument("--models", type=Path, help="folder of model builds, one folder per model, built when "
                        "missing (default: out/byte_identity/fast or full under the repository)")
    parser.add_argument("--fast", action="store_true", default=None,
                        help="the small builds (--check: default from FILE)")
    parser.add_argument("--full", action="store_true", help="also the heavy configurations of the full-size builds")
    parser.add_argument("--only", action="append", metavar="NAME", help="only this model (repeatable, or a,b)")
    parser.add_argument("--repeat", type=int, help="compiles per configuration (default: 2 with --record, "
                        "to check that reruns are byte-identical; 1 with --check)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except UsageError as e:
        print(f"byte_identity: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:  # noqa: C901 - one linear driver
    import lrcompile

    record = _load_record(args.check) if args.check else None
    if record is not None:
        if args.fast is None:
            args.fast = record["fast"]
        elif args.fast != record["fast"]:
            raise UsageError(f"{args.check} was recorded {'with' if record['fast'] else 'without'} --fast; "
                             f"check it the same way")
    fast = bool(args.fast)
    old = _load_record(args.record) if args.record and args.record.exists() else None
    if old is not None and old["fast"] != fast:
        raise UsageError(f"{args.record} holds {'--fast' if old['fast'] else 'full-size'} results; "
                         f"record into another file (or pass the same --fast)")
    repeat = args.repeat or (2 if args.record else 1)
    if repeat < 1:
        raise UsageError("--repeat must be >= 1")
    names = model_names()
    only = [n for o in (args.only or []) for n in o.split(",") if n]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise UsageError(f"--only: unknown model(s) {unknown}; choose from {', '.join(names)}")
    names = [n for n in names if not only or n in only]
    models = (args.models or ROOT / "out" / "byte_identity" / ("fast" if fast else "full")).resolve()
    models.mkdir(parents=True, exist_ok=True)

    builds = {n: ensure_build(n, models, fast) for n in names}
    plan: list[Case] = []
    for n in names:
        b = builds[n]
        plan += cases_for(n, b.calib is not None, b.calib_labels is not None, fast)
    run_cases = [c for c in plan if args.full or not c.heavy]
    skipped = [c for c in plan if c not in run_cases]

    if args.list:
        for c in plan:
            flag = " [heavy: --full]" if c.heavy else ""
            print(f"{c.key}{flag}  <- {', '.join(c.sources)}")
        counts = {n: sum(c.model == n for c in plan) for n in names}
        print(f"\n{len(plan)} configurations ({', '.join(f'{n} {k}' for n, k in counts.items())}); "
              f"{len(skipped)} heavy ones run only with --full")
        return 0

    print(f"lrcompile {lrcompile.__version__} from {Path(lrcompile.__file__).parent}; "
          f"{'--fast' if fast else 'full-size'} builds in {models}; {len(run_cases)} configurations"
          + (f" ({len(skipped)} heavy ones skipped: --full runs them)" if skipped else "")
          + f", {repeat} compile(s) each", flush=True)

    was = ((record or old or {}).get("environment") or {}).get("blas")
    if old is not None and was != blas_kernel():
        print(f"note: {args.check} was recorded under BLAS kernel {was}, this machine runs {blas_kernel()}: "
              "LAPACK's low bits differ across kernels, so DIFFERENT rows may be the machine's, not the code's",
              flush=True)
    work = Path(tempfile.mkdtemp(prefix="byte_identity_timings."))
    timings = work / "timings.json"
    cache_before = None
    seed_cache = (record or old or {}).get("timing_cache")
    if seed_cache:  # --check: the recorded timings; --record: keep the earlier record's, measure the rest
        timings.write_text(json.dumps(seed_cache))
        cache_before = timings.read_text()

    for n in names:
        want = (record or old or {}).get("builds", {}).get(n)
        if want is not None and want != builds[n].digest:
            changed = sorted(k for k in set(want) | set(builds[n].digest) if want.get(k) != builds[n].digest.get(k))
            raise UsageError(f"{builds[n].path} differs from the build {args.check or args.record} was recorded on "
                             f"({', '.join(changed)}); use the same builds (or record into a new file)")

    entries: dict[str, dict] = {}
    rows: list[tuple[str, str, str, str]] = []
    passed = failed = 0
    nondeterministic: list[str] = []
    t_all = time.perf_counter()
    try:
        for i, case in enumerate(run_cases, 1):
            b = builds[case.model]
            opts = compile_options(case, b, timings)
            t0 = time.perf_counter()
            outcomes = []
            for _ in range(repeat):
                outcomes.append(compile_once(case, b, opts))
            secs = (time.perf_counter() - t0) / repeat
            same_runs = all(o == outcomes[0] for o in outcomes[1:])
            entry = {**outcomes[0], "options": {k: _portable(v, b, timings) for k, v in opts.items()},
                     "sources": case.sources, "heavy": case.heavy, "seconds": round(secs, 1), "runs": repeat,
                     "deterministic": same_runs}
            if not same_runs:
                entry["other_runs"] = outcomes[1:]
                nondeterministic.append(case.key)
            entries[case.key] = entry
            what = "error" if "error" in outcomes[0] else f"{len(outcomes[0]['files'])} file(s)"
            status, note = "", ""
            if record is not None:
                base = record["entries"].get(case.key)
                if base is None:
                    status, note = "missing", "no entry in the record"
                elif _outcome(base) == _outcome(outcomes[0]) and same_runs:
                    status = "same"
                else:
                    status = "DIFFERENT"
                    if "error" in base or "error" in outcomes[0]:
                        was, now = base.get("error", "compiled"), outcomes[0].get("error", "compiled")
                        note = f"record: {was:.120} / now: {now:.120}"
                    if base.get("options") != entry["options"]:
                        note = (note + "; " if note else "") + "options differ from the record's"
                    if not same_runs:
                        note = (note + "; " if note else "") + "reruns differ"
                if status == "same":
                    passed += 1
                else:
                    failed += 1
                rows.append((case.model, case.label, status, note))
            det = "" if repeat == 1 else ("reruns identical" if same_runs else "RERUNS DIFFER")
            print(f"[{i:3d}/{len(run_cases)}] {case.key}: {what}"
                  + (f", {status}" if status else "") + (f", {det}" if det else "") + f"  {secs:.1f} s", flush=True)
            if "error" in outcomes[0]:
                print(f"          {outcomes[0]['error'][:300]}", flush=True)
    finally:
        cache_after = timings.read_text() if timings.is_file() else None
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t_all

    if args.record:
        # entries of the models run now that are no longer configurations (heavy ones stay) go
        planned = {c.key for c in plan}
        kept = {k: v for k, v in (old["entries"] if old else {}).items()
                if k.partition("/")[0] not in names or k in planned}
        dropped = len(old["entries"]) - len(kept) if old else 0
        merged = {**kept, **entries}
        out = {"format": FORMAT, "fast": fast,
               "about": "sha256 of every file lrcompile.compile writes, per model/config; "
                        "written and checked by benchmarks/byte_identity.py",
               "environment": environment(), "seconds": round(seconds, 1),
               "builds": {**(old or {}).get("builds", {}), **{n: b.digest for n, b in builds.items()}},
               "timing_cache": json.loads(cache_after) if cache_after else (old or {}).get("timing_cache"),
               "entries": dict(sorted(merged.items()))}
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")
        errors = sum("error" in e for e in entries.values())
        print(f"\nrecorded {len(entries)} configurations ({errors} ending in an error) into {args.record} "
              f"in {seconds / 60:.1f} min" + (f"; {len(merged) - len(entries)} earlier entries kept" if old else "")
              + (f"; {dropped} dropped (no longer configurations)" if dropped else ""))
        if nondeterministic:
            print(f"NOT DETERMINISTIC ({len(nondeterministic)}): reruns wrote different bytes for "
                  + ", ".join(nondeterministic))
            return 1
        return 0

    # --check
    ran = {c.key for c in run_cases}
    heavy_keys = {c.key for c in skipped}
    for key, base in record["entries"].items():
        model, _, label = key.partition("/")
        if model in names and key not in ran and key not in heavy_keys:
            if base.get("heavy") and not args.full:
                continue
            rows.append((model, label, "missing", "in the record, not among this run's configurations"))
            failed += 1
    print("\n" + _table(rows))
    if cache_before is not None and cache_after != cache_before:
        print("\nnote: the latency-aware configuration timed layers the recorded timing cache did not hold "
              "(another machine, or changed timing keys): its dense/factorized choice may differ for that reason")
    not_run = len([k for k in record["entries"] if k.partition("/")[0] in names and record["entries"][k].get("heavy")
                   and not args.full])
    if not_run:
        print(f"\n{not_run} heavy configurations of the record not run (pass --full)")
    print(f"\n{passed} passed, {failed} failed  ({seconds / 60:.1f} min)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
