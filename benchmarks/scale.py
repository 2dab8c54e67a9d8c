#!/usr/bin/env python
"""Scale evidence (issue 21): ``python benchmarks/scale.py MODEL.onnx [options] [-- COMPILE OPTIONS]``.

Compiles one model with the ``lrcompile`` CLI under several configurations in one run, each as a
fresh process, back to back (``--repeat N``: N rounds, the order rotated every round, so slow drift
of the machine falls on every configuration alike), and records for each:

- the wall time of the whole process, and its peak RSS from the outside: ``/usr/bin/time -v``'s
  "Maximum resident set size" (the largest single process of the tree) where that binary exists,
  and ``tree_rss_peak_mb``, the largest sum of the RSS of the CLI and all its descendants, sampled
  from /proc every 0.2 s (for ``ray`` the processes of the local cluster are added: Ray's workers
  are the raylet's children, not the CLI's);
- from the report (``--report``): the seconds of each phase (deltas of ``timings_s``, which holds the
  cumulative time at each phase mark), the ``memory`` section where the compiler writes one
  (``memory.phases``: per phase ``rss_peak_mb`` / ``children_rss_peak_mb``), and the per-layer
  factorization seconds summarized by weight shape (see ``--layer-costs``);
- the sha256 of every file the compile wrote (the .onnx and its external-data file), and whether all
  configurations wrote the same bytes.

Configurations (``--configs``, comma-separated; default ``workers1,workers2,ray``):

    plain       no scale option (today's CLI)
    workersN    --workers N (e.g. workers1, workers2, workers4)
    ray         --ray ADDRESS, against a two-node local Ray cluster this script starts
                (``ray.cluster_utils.Cluster`` in a helper process, one CPU per node, no dashboard),
                and shuts down at the end, also on error or Ctrl-C; ``--ray-address A`` uses a
                running cluster instead
    rayN        --ray ADDRESS --workers N

Every option after ``--`` goes to every compile (e.g. ``-- --rank 128 --solver randomized`` or
``-- --calib data.npz``). Each compile runs with one BLAS thread (``OPENBLAS_NUM_THREADS``, MKL,
OMP; ``--blas-threads``) so that parallelism comes from the option under test and the factors do
not depend on the thread count. The script asks ``lrcompile compile --help`` first and stops with one
line if the CLI lacks an option a configuration needs.

Outputs (``--out DIR``, default benchmarks/results/scale): ``<name>.json`` (everything above, plus the
environment) and ``<name>.md`` (a table), ``<name>`` from ``--name`` (default: the model's folder
name; ``--reports`` keeps each compile's report in ``<name>.reports/``). Each configuration's
compiled files are deleted once hashed unless ``--keep`` (they go to
``DIR/<name>.outputs/<config>.r<round>/``, else to a temporary folder beside them, on the same disk).

``--layer-costs REPORT.json [...]``: no compile; summarize the per-layer ``seconds`` of existing
reports (``report["layers"]``, factorized layers) by op, shape and rank: count, total, mean, median,
max, and ``ns_per_mnr`` (mean seconds / (m n r) in ns: a randomized or truncated SVD costs O(m n r),
so this extrapolates to other shapes). Writes ``layer_costs.json`` / ``.md`` under ``--out``.

Exit status: 0 when every configuration compiled and all outputs are byte-identical, 1 otherwise,
2 on a usage error.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "scale"
OUT_NAME = "model.lr.onnx"
TIME_BIN = "/usr/bin/time"
SAMPLE_S = 0.2
FORMAT = 1


class UsageError(Exception):
    """A user error: printed as one line, exit 2."""


# ------------------------------------------------------------------------------ configurations


def parse_configs(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    for c in names:
        if not re.fullmatch(r"plain|workers[1-9]\d*|ray|ray[1-9]\d*", c):
            raise UsageError(f"--configs: unknown configuration {c!r}; use plain, workersN, ray or rayN")
    if len(set(names)) != len(names):
        raise UsageError(f"--configs: a configuration is listed twice ({text})")
    if not names:
        raise UsageError("--configs: give at least one configuration")
    return names


def config_args(name: str, ray_address: str | None) -> list[str]:
    """The CLI options of configuration ``name``."""
    if name == "plain":
        return []
    if name.startswith("workers"):
        return ["--workers", name[len("workers"):]]
    args = ["--ray", ray_address or "auto"]
    return args + (["--workers", name[3:]] if name[3:] else [])


def needed_options(names: list[str]) -> set[str]:
    need = {"--report"}
    for n in names:
        need |= {a for a in config_args(n, "x") if a.startswith("--")}
    return need


def check_cli(lrcompile: list[str], names: list[str]) -> str:
    """Stop with one line unless ``lrcompile compile --help`` lists every option the configurations
    use; returns the CLI's version line."""
    try:
        help_text = subprocess.run(lrcompile + ["compile", "--help"], capture_output=True, text=True,
                                   timeout=120).stdout
        version = subprocess.run(lrcompile + ["--version"], capture_output=True, text=True, timeout=120).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(f"cannot run {' '.join(lrcompile)} ({e}); pass --lrcompile") from None
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text))
    missing = sorted(needed_options(names) - flags)
    if missing:
        which = shutil.which(lrcompile[0]) or lrcompile[0]
        raise UsageError(f"the lrcompile at {which} ({version or 'unknown version'}) has no {', '.join(missing)} "
                         f"option (issue 21 adds --workers/--ray); run with --configs plain, or install a build "
                         f"that has it")
    return version


# ------------------------------------------------------------------------------ measuring


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mb(roots: list[int]) -> float:
    """Sum of the RSS of ``roots`` and all their descendants, in MB (shared pages counted per process)."""
    kids, seen, stack = _children(), set(), list(roots)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack += kids.get(pid, [])
    return sum(_rss_kb(p) for p in seen) / 1024


class TreeSampler(threading.Thread):
    """Samples :func:`tree_rss_mb` of some process trees until stopped; keeps the peak."""

    def __init__(self, roots: list[int]) -> None:
        super().__init__(daemon=True)
        self.roots, self.peak_mb, self._halt = roots, 0.0, threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak_mb = max(self.peak_mb, tree_rss_mb(self.roots))
            self._halt.wait(SAMPLE_S)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return round(self.peak_mb, 1)


def parse_time_v(text: str) -> dict:
    """The fields of GNU time's ``-v`` output that matter here."""
    out = {}
    for key, pat, conv in (("max_rss_mb", r"Maximum resident set size \(kbytes\): (\d+)", lambda v: int(v) / 1024),
                           ("user_s", r"User time \(seconds\): ([\d.]+)", float),
                           ("system_s", r"System time \(seconds\): ([\d.]+)", float),
                           ("cpu_percent", r"Percent of CPU this job got: (\d+)%", int)):
        m = re.search(pat, text)
        if m:
            out[key] = round(conv(m.group(1)), 1)
    return out


def phase_seconds(timings: dict | None) -> dict:
    """Per-phase seconds from the report's cumulative ``timings_s`` (phase -> time at its mark)."""
    prev, out = 0.0, {}
    for name, t in sorted((timings or {}).items(), key=lambda kv: kv[1]):
        out[name] = round(t - prev, 3)
        prev = t
    return out


# ------------------------------------------------------------------------------ layer costs


def layer_costs(layers: list[dict]) -> list[dict]:
    """Factorization seconds of the factorized layers, grouped by op, weight shape and rank."""
    groups: dict[tuple, list[float]] = {}
    for r in layers:
        if r.get("decision") != "factorized" or r.get("seconds") is None or r.get("shared_with"):
            continue
        key = (r.get("op"), tuple(r.get("shape") or ()), r.get("rank"), r.get("method"))
        groups.setdefault(key, []).append(float(r["seconds"]))
    rows = []
    for (op, shape, rank, method), secs in sorted(groups.items(), key=lambda kv: (-sum(kv[1]), str(kv[0]))):
        mnr = None
        if len(shape) == 2 and isinstance(rank, int):
            mnr = shape[0] * shape[1] * rank
        mean = statistics.fmean(secs)
        rows.append({"op": op, "shape": list(shape), "rank": rank, "method": method, "count": len(secs),
                     "total_s": round(sum(secs), 3), "mean_s": round(mean, 4),
                     "median_s": round(statistics.median(secs), 4), "max_s": round(max(secs), 4),
                     "ns_per_mnr": round(mean / mnr * 1e9, 3) if mnr else None})
    return rows


def layer_costs_md(rows: list[dict]) -> str:
    lines = ["| op | shape | rank | method | layers | total s | mean s | median s | max s | ns per m*n*r |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['rank']} | {r['method']} | {r['count']} "
                     f"| {r['total_s']:.2f} | {r['mean_s']:.4f} | {r['median_s']:.4f} | {r['max_s']:.4f} "
                     f"| {'' if r['ns_per_mnr'] is None else r['ns_per_mnr']} |")
    return "\n".join(lines) + "\n"


def run_layer_costs(reports: list[Path], out: Path) -> int:
    layers, sources = [], []
    for p in reports:
        try:
            rep = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{p}: not a readable JSON report ({e})") from None
        if not isinstance(rep, dict) or not isinstance(rep.get("layers"), list):
            raise UsageError(f"{p}: no 'layers' list (write one with lrcompile MODEL --report FILE.json)")
        layers += rep["layers"]
        sources.append({"report": str(p), "input": rep.get("input"), "pipeline": rep.get("pipeline"),
                        "factorize_s": phase_seconds(rep.get("timings_s")).get("factorize")})
    rows = layer_costs(layers)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_costs.json").write_text(json.dumps({"sources": sources, "groups": rows}, indent=1) + "\n")
    md = layer_costs_md(rows)
    (out / "layer_costs.md").write_text("Sources: " + ", ".join(s["report"] for s in sources) + "\n\n" + md)
    print(md, end="")
    print(f"wrote {out / 'layer_costs.json'} and {out / 'layer_costs.md'}")
    return 0


# ------------------------------------------------------------------------------ the Ray cluster

#: Every node of the local cluster, and the driver, on 127.0.0.1 (Ray's switch for one-machine
#: clusters; without it Ray binds the machine's outward address).
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

_RAY_HELPER = r"""
import signal, sys, time
from ray.cluster_utils import Cluster
nodes, cpus, temp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
args = dict(num_cpus=cpus, include_dashboard=False, temp_dir=temp)
cluster = Cluster(initialize_head=True, head_node_args=args)
for _ in range(nodes - 1):
    cluster.add_node(**args)
cluster.wait_for_nodes()
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("ADDRESS", cluster.address, flush=True)
try:
    while not stop and sys.stdin.readline():  # runs until the parent closes stdin or sends SIGTERM
        pass
finally:
    cluster.shutdown()
"""


class RayCluster:
    """A local multi-node Ray cluster in a helper process (``ray.cluster_utils.Cluster``), in its own
    session so that everything it starts can be stopped with it and nothing else."""

    def __init__(self, nodes: int = 2, cpus: int = 1) -> None:
        self.nodes, self.cpus = nodes, cpus
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.temp: str | None = None

    def start(self, timeout: float = 180) -> str:
        self.temp = tempfile.mkdtemp(prefix="scale_ray.", dir="/tmp")  # short: Ray's socket paths are limited
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **LOOPBACK}
        self.proc = subprocess.Popen([sys.executable, "-c", _RAY_HELPER, str(self.nodes), str(self.cpus), self.temp],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
        t0, lines = time.monotonic(), []
        while time.monotonic() - t0 < timeout:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if line.startswith("ADDRESS "):
                self.address = line.split()[1]
                threading.Thread(target=self._drain, daemon=True).start()
                return self.address
        self.stop()
        tail = " / ".join(lines[-3:]) or "no output"
        raise UsageError(f"the local Ray cluster did not start ({tail})")

    def _drain(self) -> None:
        for _ in self.proc.stdout:
            pass

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:  # whatever the helper left behind in its own session (raylets, GCS, workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.proc = None
        if self.temp:
            shutil.rmtree(self.temp, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


# ------------------------------------------------------------------------------ one compile


def run_one(lrcompile: list[str], model: Path, cfg: str, extra: list[str], folder: Path, ray: RayCluster | None,
            blas: int, keep: bool, reports: Path | None = None) -> dict:
    folder.mkdir(parents=True)
    out, report = folder / OUT_NAME, folder.parent / f"{folder.name}.report.json"
    cmd = lrcompile + [str(model), "-o", str(out), "--report", str(report), "-q",
                       *config_args(cfg, ray.address if ray else None), *extra]
    timev = folder.parent / f"{folder.name}.time.txt"
    use_time = os.access(TIME_BIN, os.X_OK)
    full = ([TIME_BIN, "-v", "-o", str(timev)] if use_time else []) + cmd
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(blas), "MKL_NUM_THREADS": str(blas),
           "OMP_NUM_THREADS": str(blas), "RAY_USAGE_STATS_ENABLED": "0", **LOOPBACK}
    t0 = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    uses_ray = cfg.startswith("ray") and ray is not None and ray.pid is not None
    sampler = TreeSampler([proc.pid] + ([ray.pid] if uses_ray else []))  # the cluster counts for ray only
    sampler.start()
    try:
        text, _ = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        tree_peak = sampler.stop()
    wall = time.perf_counter() - t0
    entry: dict = {"config": cfg, "argv": cmd, "returncode": proc.returncode, "wall_s": round(wall, 2),
                   "tree_rss_peak_mb": tree_peak}
    if use_time and timev.is_file():
        entry["time_v"] = parse_time_v(timev.read_text())
        timev.unlink()
    else:
        entry["time_v"] = None
    if proc.returncode != 0:
        entry["error"] = next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "no output")[:400]
    if report.is_file():
        rep = json.loads(report.read_text())
        if reports is not None:
            reports.mkdir(parents=True, exist_ok=True)
            entry["report"] = str(shutil.move(report, reports / report.name))
        else:
            report.unlink()
        entry["phases_s"] = phase_seconds(rep.get("timings_s"))
        entry["timings_s"] = rep.get("timings_s")
        entry["memory"] = rep.get("memory")
        entry["report_output_sha256"] = rep.get("output_sha256")
        entry["totals"] = {k: rep.get("totals", {}).get(k) for k in ("candidates", "factorized", "declined",
                                                                      "params_ratio", "output_bytes")}
        entry["layer_costs"] = layer_costs(rep.get("layers") or [])
        entry["verification"] = (rep.get("verification") or {}).get("verdict")
    from lrcompile.report import sha256

    entry["files"] = {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*"))
                      if p.is_file()}
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return entry


# ------------------------------------------------------------------------------ tables


def _mb(v) -> str:
    return "-" if v is None else f"{v / 1024:.2f} GiB" if v >= 1024 else f"{v:.0f} MiB"


def markdown(result: dict) -> str:
    runs = result["runs"]
    phases = []
    for r in runs:
        for p in r.get("phases_s") or {}:
            if p not in phases:
                phases.append(p)
    head = ["config", "round", "rc", "wall s", *[f"{p} s" for p in phases], "peak RSS (time -v)", "tree RSS peak",
            "output sha256", "same bytes"]
    lines = [f"# Scale: {result['name']}", "",
             f"Model `{result['model']}` ({result['model_bytes'] / 1e9:.2f} GB with its data), extra options "
             f"`{' '.join(result['extra']) or '(none)'}`; {result['environment']['date']}, "
             f"{result['environment']['cpu_count']} CPUs, {result['environment']['lrcompile']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 4) + "---|---|"]
    for r in runs:
        ph = r.get("phases_s") or {}
        sha = r["files"].get(OUT_NAME, "")[:12] or "-"
        lines.append("| " + " | ".join([r["config"], str(r["round"]), str(r["returncode"]), f"{r['wall_s']:.1f}",
                                        *[f"{ph[p]:.1f}" if p in ph else "-" for p in phases],
                                        _mb((r.get("time_v") or {}).get("max_rss_mb")), _mb(r["tree_rss_peak_mb"]),
                                        f"`{sha}`", "yes" if r.get("same_as_first") else "NO"]) + " |")
    mem = [(r["config"], r["round"], r["memory"]) for r in runs if r.get("memory")]
    if mem:
        lines += ["", "Peak RSS per phase (report `memory.phases`, MB: process / children):", ""]
        names = list(dict.fromkeys(p for _, _, m in mem for p in (m.get("phases") or {})))
        lines += ["| config | round | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
        for cfg, rnd, m in mem:
            cells = []
            for p in names:
                v = (m.get("phases") or {}).get(p) or {}
                ch = v.get("children_rss_peak_mb")
                cells.append(f"{v.get('rss_peak_mb', 0):.0f}" + (f" / {ch:.0f}" if ch is not None else ""))
            lines.append(f"| {cfg} | {rnd} | " + " | ".join(cells) + " |")
    errs = [r for r in runs if r.get("error")]
    if errs:
        lines += ["", "Errors:", ""] + [f"- {r['config']} (round {r['round']}): {r['error']}" for r in errs]
    walls = result["wall_ratio"]
    if walls:
        lines += ["", "Median wall time relative to " + result["baseline"] + ": "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in walls.items())]
    lines += ["", f"All outputs byte-identical: **{'yes' if result['identical'] else 'NO'}**."]
    return "\n".join(lines) + "\n"


def environment(lrcompile: list[str], version: str) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("numpy", "scipy", "onnx", "onnxruntime", "ray"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "lrcompile": version,
            "lrcompile_cmd": lrcompile, "script_repo_commit": commit.strip() or None, "versions": versions}


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("model", nargs="?", type=Path, help="the .onnx to compile")
    parser.add_argument("--configs", default="workers1,workers2,ray", help="comma-separated: plain, workersN, ray, "
                        "rayN (default: workers1,workers2,ray)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds (order rotated each round; default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: %(default)s)")
    parser.add_argument("--name", help="results file name (default: the model's folder name)")
    parser.add_argument("--keep", action="store_true", help="keep the compiled outputs (DIR/NAME.outputs/)")
    parser.add_argument("--reports", action="store_true", help="keep each compile's JSON report "
                        "(DIR/NAME.reports/CONFIG.rROUND.report.json; input of --layer-costs)")
    parser.add_argument("--ray-address", help="use this running Ray cluster instead of starting one")
    parser.add_argument("--ray-nodes", type=int, default=2, help="nodes of the local cluster (default 2)")
    parser.add_argument("--ray-cpus", type=int, default=1, help="CPUs per local node (default 1)")
    parser.add_argument("--blas-threads", type=int, default=1, help="BLAS/OpenMP threads per process (default 1)")
    parser.add_argument("--lrcompile", default="lrcompile", help="the CLI command (default: lrcompile on PATH; "
                        "e.g. 'python -m lrcompile')")
    parser.add_argument("--layer-costs", nargs="+", type=Path, metavar="REPORT.json",
                        help="summarize per-layer factorization seconds of these reports; compiles nothing")
    args = parser.parse_args(argv)
    try:
        if args.layer_costs:
            return run_layer_costs(args.layer_costs, args.out)
        if args.model is None:
            raise UsageError("give MODEL.onnx (or --layer-costs REPORT.json ...)")
        return run(args, extra)
    except UsageError as e:
        print(f"scale: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, extra: list[str]) -> int:
    model = args.model.resolve()
    if not model.is_file():
        raise UsageError(f"{model}: no such model file")
    if args.repeat < 1:
        raise UsageError("--repeat must be >= 1")
    names = parse_configs(args.configs)
    lrcompile = args.lrcompile.split()
    version = check_cli(lrcompile, names)
    name = args.name or (model.parent.name if model.name == "model.onnx" else model.stem)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / f"{name}.outputs" if args.keep else Path(tempfile.mkdtemp(prefix=f".scale_{name}.", dir=out))
    if args.keep and work.exists():
        raise UsageError(f"{work} exists; move it away or drop --keep")
    work.mkdir(parents=True, exist_ok=True)
    model_files = [model] + sorted(p for p in model.parent.iterdir()
                                   if p.is_file() and p.name.startswith(model.name + ".") and p.suffix == ".data")
    result = {"format": FORMAT, "name": name, "model": str(model),
              "model_bytes": sum(p.stat().st_size for p in model_files), "extra": extra, "configs": names,
              "repeat": args.repeat, "blas_threads": args.blas_threads, "runs": []}
    ray = None
    total = len(names) * args.repeat
    print(f"scale: {model} ({result['model_bytes'] / 1e9:.2f} GB), {len(names)} configurations x {args.repeat} "
          f"round(s), {version}" + (f", extra: {' '.join(extra)}" if extra else ""), flush=True)
    try:
        if any(n.startswith("ray") for n in names):
            if args.ray_address:
                result["ray"] = {"address": args.ray_address, "started_here": False}
                ray = RayCluster()
                ray.address = args.ray_address
            else:
                t0 = time.perf_counter()
                ray = RayCluster(args.ray_nodes, args.ray_cpus)
                address = ray.start()
                result["ray"] = {"address": address, "started_here": True, "nodes": args.ray_nodes,
                                 "cpus_per_node": args.ray_cpus, "start_s": round(time.perf_counter() - t0, 1)}
                print(f"ray: {args.ray_nodes}-node local cluster at {address} "
                      f"({result['ray']['start_s']:.0f} s to start)", flush=True)
        k = 0
        for rnd in range(1, args.repeat + 1):
            shift = (rnd - 1) % len(names)
            for cfg in names[shift:] + names[:shift]:
                k += 1
                entry = run_one(lrcompile, model, cfg, extra, work / f"{cfg}.r{rnd}", ray, args.blas_threads,
                                args.keep, out / f"{name}.reports" if args.reports else None)
                entry["round"] = rnd
                first = next((r for r in result["runs"] if r["returncode"] == 0), None)
                same = first is None or entry["files"] == first["files"]
                entry["same_as_first"] = entry["returncode"] == 0 and same
                result["runs"].append(entry)
                sha = entry["files"].get(OUT_NAME, "")[:12]
                rss = (entry.get("time_v") or {}).get("max_rss_mb")
                status = (f"sha256 {sha}, " + ("same bytes" if entry["same_as_first"] else "DIFFERENT bytes")
                          if entry["returncode"] == 0 else f"FAILED rc {entry['returncode']}: {entry.get('error')}")
                print(f"[{k}/{total}] {cfg} (round {rnd}): {entry['wall_s']:.1f} s, peak RSS {_mb(rss)} "
                      f"(tree {_mb(entry['tree_rss_peak_mb'])}), {status}", flush=True)
    except KeyboardInterrupt:
        print("scale: interrupted; writing what ran", file=sys.stderr)
        result["interrupted"] = True
    finally:
        if ray is not None and result.get("ray", {}).get("started_here"):
            ray.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ok = [r for r in result["runs"] if r["returncode"] == 0]
    result["identical"] = bool(ok) and len(ok) == len(result["runs"]) and all(r["same_as_first"] for r in ok)
    base = names[0]
    med = {}
    for n in names:
        walls = [r["wall_s"] for r in ok if r["config"] == n]
        if walls:
            med[n] = statistics.median(walls)
    result["baseline"] = base
    result["wall_ratio"] = {n: round(v / med[base], 3) for n, v in med.items()} if base in med else {}
    result["environment"] = environment(lrcompile, version)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    print(f"\n{'all outputs byte-identical' if result['identical'] else 'OUTPUTS DIFFER OR A COMPILE FAILED'}; "
          f"wrote {out / (name + '.json')} and {out / (name + '.md')}")
    return 0 if result["identical"] and not result.get("interrupted") else 1


if __name__ == "__main__":
    sys.exit(main())
