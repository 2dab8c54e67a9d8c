"""The ``lrcompile`` command line.

``lrcompile MODEL [options]`` compiles (the ``compile`` command is the default);
``lrcompile inspect MODEL`` shows candidates without writing anything.
User errors print one line and exit non-zero; every compile ends with PASSED or FAILED.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .errors import LrcError, VerificationFailed

log = logging.getLogger("lrcompile")


class DefaultGroup(click.Group):
    """A group whose first argument, when not a command name, goes to ``compile``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["compile", *args]
        return super().parse_args(ctx, args)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    for noisy in ("onnx_graphsurgeon", "polygraphy"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _run(fn):
    """Run ``fn`` mapping user errors to one line on stderr and their exit code."""
    try:
        return fn()
    except LrcError as e:
        click.echo(f"lrcompile: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("lrcompile: interrupted", err=True)
        sys.exit(130)


def _parse_dims(values: tuple[str, ...]) -> dict:
    dims = {}
    for v in values:
        name, sep, num = v.partition("=")
        if not sep or not num.isdigit():
            raise LrcError(f"--dim {v!r}: expected NAME=INT (e.g. --dim batch=4 --dim sequence=128)")
        dims[name] = int(num)
    return dims


def _parse_batches(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise LrcError(f"--latency-batches {text!r}: expected comma-separated integers (e.g. 1,16)") from None
    return out


def _plan_plot(res, path: Path, quiet: bool) -> None:
    """The plan as a PNG beside the report (skipped with a warning when matplotlib is missing)."""
    from .plots import plan_profile

    try:
        plan_profile(res.layers, res.report["plan"], path, title=f"{res.input.name}: {res.config.describe_ranks()}")
    except LrcError:
        log.warning("no plan plot (%s): matplotlib is not installed; pip install 'lrcompile[plot]'", path.name)
        return
    if not quiet:
        click.echo(f"wrote {path}")


def _parse_options(values: tuple[str, ...]) -> dict:
    opts = {}
    for v in values:
        key, sep, raw = v.partition("=")
        if not sep or not key:
            raise LrcError(f"--method-option {v!r}: expected KEY=VALUE (e.g. --method-option damping=0.01)")
        try:
            opts[key] = json.loads(raw)
        except ValueError:
            opts[key] = raw
    return opts


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lrcompile")
def main() -> None:
    """lrcompile: factorize the constant weights of an ONNX model, verify it, and build it.

    \b
    lrcompile model.onnx --target trt --ratio 0.5      compile (default command)
    lrcompile inspect model.onnx                      candidates and spectra, writes nothing
    """


@main.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output .onnx (default: MODEL.lr.onnx).")
@click.option("--target", type=click.Choice(["onnx", "ort", "trt"]), default="onnx", show_default=True,
              help="onnx: write the model; ort: also ORT latency + optimized model; trt: also a TensorRT engine.")
@click.option("--rank", type=int, help="Fixed rank for every layer.")
@click.option("--ratio", type=float, help="Keep about this fraction of each weight's parameters (default 0.5).")
@click.option("--energy", type=float, help="Smallest rank keeping this fraction of spectral energy.")
@click.option("--max-error", type=float, help="Smallest rank with relative error at most this.")
@click.option("--params", type=float, help="Global budget: keep this fraction of the candidate weights' "
              "parameters, ranks allocated across layers where they cost least.")
@click.option("--flops", type=float, help="Global budget on the candidates' FLOPs at the verification shapes.")
@click.option("--max-drop", type=float, help="Smallest model whose --metric stays within this of the original's "
              "(measured on --val, else the calibration data).")
@click.option("--metric", help="cosine, top1, max-rel, rel-l2, auc, logloss, or script (with --metric-script).")
@click.option("--metric-output", help="The output the metric reads (default: the first).")
@click.option("--metric-script", help="User metric FILE.py[:func](outputs, reference, labels) -> float, higher "
              "is better; runs only when named here.")
@click.option("--val", help="Validation data for --max-drop (same formats as --calib).")
@click.option("--val-samples", type=int, help="Use at most this many validation samples.")
@click.option("--val-labels", help="Labels .npy of the --val rows (default: __labels__ in the --val .npz).")
@click.option("--allocation", type=click.Choice(["auto", "sensitivity", "error", "threshold"]), default="auto",
              show_default=True, help="How a global budget is spread: measured sensitivity x error curves "
              "(auto with --calib), error curves alone, or the data-free spectrum threshold.")
@click.option("--sensitivity-samples", type=int, default=64, show_default=True,
              help="Calibration samples per sensitivity measurement.")
@click.option("--search-steps", type=int, default=8, show_default=True, help="Most models --max-drop measures.")
@click.option("--latency-aware/--size-only", "latency_aware", default=None,
              help="Time each layer dense vs factorized (ORT) and keep it dense where factorizing is not "
                   "faster [default: on for --target ort].")
@click.option("--latency-batches", default="1,16", show_default=True, help="Batch sizes latency-aware timing uses.")
@click.option("--timing-cache", help="Timing cache file (default: ~/.cache/lrcompile/timings.json; 'none': off).")
@click.option("--multiple", type=int, default=8, show_default=True, help="Round ranks to this multiple.")
@click.option("--method", help="Factorization method: svd, whiten, asvd, fwsvd, afm, kfac "
              "(default: whiten with --calib, svd without).")
@click.option("--calib", help="Calibration data: .npz (batched on axis 0), Polygraphy JSON, or loader.py[:func].")
@click.option("--calib-samples", type=int, help="Use at most this many calibration samples.")
@click.option("--calib-batch", type=int, default=16, show_default=True, help="Samples per ORT batch (.npz).")
@click.option("--mask-input", default="auto", show_default=True,
              help="Input whose zeros mark padding rows ('auto': attention_mask if present; 'none').")
@click.option("--method-option", "method_options", multiple=True, help="Factorizer option KEY=VALUE (repeatable).")
@click.option("--layer-method", "layer_methods", multiple=True, help="Per-layer method REGEX=METHOD (repeatable).")
@click.option("--sequential", is_flag=True, help="Calibrate each layer on the outputs of already-compressed ones "
              "and fit it to the original's outputs (slower, more accurate).")
@click.option("--prune-mlp", help="Keep this fraction of each MLP's hidden channels (Linear -> activation "
              "-> Linear: transformer FFNs, CTR towers), second layer refitted on --calib; the other layers "
              "follow the rank policy or budget. 'auto': the --params/--flops/--max-drop planner chooses each MLP's "
              "width with the other layers' ranks, under the one budget.")
@click.option("--fisher", help="fwsvd: Fisher .npz (weight name -> squared-gradient sums), or 'collect' (torch).")
@click.option("--labels", help="Labels .npy of the --calib rows, for --fisher collect and the auc/logloss metrics (default: __labels__ in the --calib .npz).")
@click.option("--loss", type=click.Choice(["auto", "bce", "ce", "mse"]), default="auto", show_default=True,
              help="Loss for --fisher collect.")
@click.option("--fisher-output", help="Model output the loss applies to (default: the first).")
@click.option("--probes", type=int, default=4, show_default=True,
              help="kfac: random output probes (backward passes) per calibration batch; the probed output is "
              "--metric-output, else the first.")
@click.option("--distill", help="Unlabeled data (same formats as --calib, ideally more of it) on which the "
              "factors are trained to reproduce the original after factorizing (torch: lrcompile[fisher]).")
@click.option("--distill-samples", type=int, help="Use at most this many --distill samples.")
@click.option("--distill-batch", type=int, default=32, show_default=True, help="Samples per training step.")
@click.option("--distill-epochs", type=int, default=2, show_default=True, help="Passes over the --distill data.")
@click.option("--distill-lr", type=float, default=1e-4, show_default=True, help="Adam learning rate (cosine-decayed).")
@click.option("--distill-match", type=click.Choice(["outputs", "layers"]), default="outputs", show_default=True,
              help="What --distill matches: the model outputs, or also every rewritten layer's output.")
@click.option("--solver", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True)
@click.option("--only", help="Comma-separated op types to consider (MatMul,Gemm,Conv,Gather).")
@click.option("--exclude", multiple=True, help="Regex on node names to leave intact (repeatable).")
@click.option("--include", multiple=True, help="Regex on node names to consider (repeatable).")
@click.option("--min-params", type=int, default=4096, show_default=True, help="Leave smaller weights intact.")
@click.option("--keep-unprofitable", is_flag=True, help="Factorize even when the rank saves nothing.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime comparison.")
@click.option("--tolerance", type=float, help="Fail if any output's relative L2 error exceeds this.")
@click.option("--min-cosine", type=float, help="Fail if any output's cosine falls below this.")
@click.option("--inputs", type=click.Path(path_type=Path), help="Verification inputs: .npz or Polygraphy JSON.")
@click.option("--dim", "dims", multiple=True, help="Dynamic dimension value NAME=INT (repeatable).")
@click.option("--external-data/--no-external-data", default=None, help="Force external data on/off.")
@click.option("--fp16", is_flag=True, help="trt: convert the ONNX to fp16 before building.")
@click.option("--sparse-weights", is_flag=True, help="trt: allow TensorRT sparse (2:4) weight kernels.")
@click.option("--shapes", help="trt: input shapes, e.g. 'ids:[1,16],[4,128],[8,128]' (min,opt,max).")
@click.option("--report", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="Replay the options of a JSON report.")
@click.option("-v", "--verbose", count=True)
@click.option("-q", "--quiet", is_flag=True)
def compile_cmd(model, output, report, config_file, verbose, quiet, no_verify, dims, only, exclude, include,
                method_options, layer_methods, latency_batches, **kw):
    """Compile MODEL: factorize, rewrite, verify, and write/build the target."""
    _setup_logging(verbose, quiet)

    def go():
        from .config import CompileConfig
        from .pipeline import compile_model
        from .report import layers_table, plan_summary, to_json, verification_table

        if config_file:
            try:
                data = json.loads(Path(config_file).read_text())
            except (OSError, ValueError) as e:
                raise LrcError(f"--config {config_file}: not a readable JSON report ({e})") from None
            cfg = CompileConfig.from_dict(data.get("config", data))
        else:
            cfg = CompileConfig(
                **kw, verify=not no_verify, dims=_parse_dims(dims),
                only=tuple(s.strip() for s in only.split(",")) if only else None,
                exclude=tuple(exclude), include=tuple(include), layer_methods=tuple(layer_methods),
                method_options=_parse_options(method_options), latency_batches=_parse_batches(latency_batches),
            )
            if cfg.calib and not cfg.inputs and cfg.verify:
                log.warning("verifying on random inputs: data-aware factorization is tuned to the calibration "
                            "data, so random inputs overstate its error; pass --inputs with held-out real data")
            if cfg.calib is None and cfg.method is None:
                log.warning("no --calib data: plain SVD of the weights; trained weights are rarely low-rank, "
                            "so pass --calib for data-aware factorization")
        if report is not None and Path(report).suffix != ".json":
            raise LrcError(f"--report {report}: use a .json path")
        try:
            res = compile_model(model, output, cfg, progress=not quiet)
        except VerificationFailed as e:
            if report is not None and e.result is not None:
                Path(report).write_text(to_json(e.result.report))
            click.echo("FAILED")
            raise
        if not quiet:
            click.echo(layers_table(res.layers))
            if res.report.get("plan"):
                click.echo("\n" + plan_summary(res.report["plan"], res.layers))
            dist = res.report.get("distillation")
            if dist:
                click.echo(f"\ndistilled on {dist['samples']:,} samples ({dist['tensors_trained']} tensors, "
                           f"{dist['params_trained']:,} params): held-out loss {dist['held_out_loss_before']:.4g} -> "
                           f"{dist['held_out_loss_after']:.4g} (epoch {dist['kept_epoch']} of {dist['epochs']} kept)")
            tot = res.report["totals"]
            kind = "compressed" if tot["pruned"] else "factorized"
            click.echo(f"\n{tot['factorized']} factorized, " + (f"{tot['pruned']} pruned, " if tot["pruned"] else "")
                       + f"{tot['declined']} declined; params in {kind} layers "
                       f"{tot['params_before']:,} -> {tot['params_after']:,}"
                       + (f" ({tot['params_ratio']:.1%})" if tot["params_ratio"] is not None else ""))
            if res.verification:
                src = res.feeds["source"]
                dist = res.feeds["distribution"]
                click.echo(f"\nverification on {src} inputs" + (f" ({dist})" if dist else "") + ":")
                click.echo(verification_table(res.verification))
            lat = res.target.get("latency")
            if lat:
                click.echo(f"\nORT latency ({', '.join(lat['providers'])}): original {lat['original']['median_ms']:.3f} ms, "
                           f"compressed {lat['compressed']['median_ms']:.3f} ms (median of {lat['repeats']}, "
                           f"interleaved); speedup x{lat['speedup']:.2f}")
                if lat["speedup"] < 1 and res.config.resolved_latency_aware:
                    log.warning("the compressed model ran slower than the original on the verification inputs "
                                "although every factorized layer timed faster alone: ORT fuses across layers "
                                "in the whole model; try --latency-batches with your deployment batch sizes")
            eng = res.target.get("engine")
            if eng:
                click.echo(f"\nTensorRT engine ({eng.get('backend')} {eng.get('version')}): {eng['path']} "
                           f"({eng.get('engine_bytes', 0):,} bytes)")
            for f in res.files:
                click.echo(f"wrote {f}")
        if report is not None:
            Path(report).write_text(to_json(res.report))
            if res.report.get("plan") and res.report["plan"].get("budget"):
                _plan_plot(res, Path(report).with_suffix(".plan.png"), quiet)
        click.echo(res.status)
        return res

    _run(go)


@main.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--ratio", type=float, default=0.5, show_default=True, help="Show the rank and error at this ratio.")
@click.option("--min-params", type=int, default=4096, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-v", "--verbose", count=True)
@click.option("-q", "--quiet", is_flag=True)
def inspect_cmd(model, ratio, min_params, as_json, verbose, quiet):
    """Show candidates, a singular-value summary per layer, and what would be declined and why."""
    _setup_logging(verbose, quiet)

    def go():
        from .inspect import inspect_model, inspect_table
        from .report import to_json

        rows = inspect_model(model, ratio=ratio, min_params=min_params, progress=not quiet and not as_json)
        click.echo(to_json(rows) if as_json else inspect_table(rows))

    _run(go)


@main.command("bench")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--config", "configs", multiple=True, metavar="'METHOD:KEY=V1,V2[;KEY=V]'",
              help="Configurations, e.g. 'svd:ratio=0.9,0.7,0.5' (repeatable; default: every method that "
                   "can run, at ratio 0.9, 0.7, 0.5).")
@click.option("--eval", "eval_feed", type=click.Path(path_type=Path),
              help="Evaluation feed .npz (default: the build folder's).")
@click.option("--reference", type=click.Path(path_type=Path),
              help="The original's outputs on the eval feed, .npz (default: the build folder's, else computed).")
@click.option("--labels", type=click.Path(path_type=Path), help="Labels .npy aligned with the eval rows.")
@click.option("--metric", type=click.Choice(["cosine", "top1", "auc"]),
              help="Task metric (default: meta.json's task, else cosine).")
@click.option("--output-name", help="The scored output (default: meta.json's, else the first output).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration data for data-aware methods.")
@click.option("--calib-labels", type=click.Path(path_type=Path), help="Labels of the calibration rows (.npy; fwsvd).")
@click.option("--eval-rows", type=int, help="Score only the first N eval rows.")
@click.option("--only", help="Comma-separated op types for every configuration (e.g. MatMul).")
@click.option("--min-params", type=int, help="--min-params for every configuration.")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="ORT CPU latency, original vs compressed.")
@click.option("--batch", type=int, default=1, show_default=True, help="Small latency batch.")
@click.option("--large-batch", type=int, default=64, show_default=True, help="Large latency batch.")
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--repeats", type=int, default=20, show_default=True, help="Timed runs per model at --batch (median).")
@click.option("--large-repeats", type=int, help="Timed runs per model at the large batch (default: --repeats).")
@click.option("--min-seconds", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Keep timing (interleaved) until both models ran this long at each batch: fast models get "
              "enough samples for a stable median.")
@click.option("--trt/--no-trt", default=True, show_default=True, help="Build TensorRT engines (size, success).")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write the PNGs (needs matplotlib).")
@click.option("--rank-config", help="Configuration label whose per-layer ranks are plotted "
              "(default: the last whiten one, else the last).")
@click.option("--keep-models", is_flag=True, help="Keep the compressed models in OUT/models.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("-v", "--verbose", count=True)
@click.option("-q", "--quiet", is_flag=True)
def bench_cmd(target, configs, eval_feed, reference, labels, metric, output_name, calib, calib_labels, eval_rows, only,
              min_params, latency, batch, large_batch, warmup, repeats, large_repeats, min_seconds, trt, plots,
              rank_config, keep_models, out, verbose, quiet):
    """Measure compression configurations of TARGET (a models/build.py folder, or a model with --eval):
    params, FLOPs, size, task metric, ORT latency, TensorRT build; writes results.json/csv and PNGs."""
    _setup_logging(verbose, quiet)

    def go():
        from .bench import load_dataset, method_availability, parse_config, results_table, run_bench

        ds = load_dataset(target, eval_feed=eval_feed, reference=reference, labels=labels, metric=metric,
                          calib=calib, calib_labels=calib_labels, output=output_name, rows=eval_rows)
        if configs:
            cfgs = [c for text in configs for c in parse_config(text)]
        else:
            methods, skipped = method_availability(ds.calib is not None, ds.calib_labels is not None)
            for m, why in skipped.items():
                log.warning("skipping method %s: %s", m, why)
            cfgs = [c for m in methods for c in parse_config(f"{m}:ratio=0.9,0.7,0.5")]
        common = {}
        if only:
            common["only"] = tuple(s.strip() for s in only.split(","))
        if min_params is not None:
            common["min_params"] = min_params
        res = run_bench(ds, cfgs, out, common=common, latency=latency, batch=batch, large_batch=large_batch,
                        warmup=warmup, repeats=repeats, large_repeats=large_repeats, min_seconds=min_seconds,
                        trt=trt, plots=plots,
                        rank_config=rank_config, keep_models=keep_models, progress=not quiet)
        click.echo(f"{res['model']} ({res['task']}, {res['settings']['eval_rows']} eval rows; "
                   f"primary metric {res['primary']})")
        click.echo(results_table(res))
        click.echo(f"\nwrote {', '.join(str(out / f) for f in res['files'])} in {res['seconds']:.0f} s")
        failed = [r["config"] for r in res["rows"] if r["status"] != "ok"]
        click.echo(f"FAILED: {len(failed)} configuration(s): {', '.join(failed)}" if failed else "PASSED")
        if failed:
            sys.exit(1)

    _run(go)


if __name__ == "__main__":  # pragma: no cover
    main()
