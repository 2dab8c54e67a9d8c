"""The ``lrcompile`` command line.

``lrcompile MODEL [options]`` compiles (the ``compile`` command is the default);
``lrcompile inspect MODEL`` shows candidates without writing anything.
User errors print one line and exit non-zero; every compile ends with PASSED, FAILED or UNVERIFIED
(``lrcompile.verdict``); anything unexpected prints one line naming where it happened and exits 4,
its traceback saved to a log file (``_run``).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import click

from .config import DEFAULT_RATIO, SECTIONS, Spec, coerce, specs
from .errors import INTERNAL_ERROR_EXIT, LrcError, VerificationFailed, internal_error_line, is_write_error, write_error

log = logging.getLogger("lrcompile")


class DefaultGroup(click.Group):
    """A group whose first argument, when not a command name, goes to ``compile``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["compile", *args]
        return super().parse_args(ctx, args)


class FieldOption(click.Option):
    """A click option generated from a ``CompileConfig`` field (:func:`config_options`).

    It keeps the field's help section, and fills ``{choices}`` in its help when the help is shown
    (a registry such as the metrics loads only then)."""

    def __init__(self, *args, spec: Spec, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec, self.section = spec, spec.section

    def get_help_record(self, ctx):
        if self.help and "{choices}" in self.help:
            self.help = self.help.replace("{choices}", ", ".join(self.spec.choices))
        return super().get_help_record(ctx)


def _field_option(s: Spec):
    """The click option of one field: its flag, help, choices and default come from the field.

    Values reach ``CompileConfig.from_dict`` as click gives them (lists and ``NAME=INT`` pairs as
    text) and are converted there, by ``lrcompile.config.coerce``, like any other caller's."""
    kw = {"cls": FieldOption, "spec": s, "help": s.option.help}
    if s.kind == "bool":
        if s.inverted:  # --no-verify: the flag sets the field False
            kw.update(is_flag=True, flag_value=False, default=True)
        elif "/" in s.decl:  # --external-data/--no-external-data: None when neither is given
            kw.update(default=s.default)
        else:
            kw.update(is_flag=True)
        return click.option(s.decl, s.name, **kw)
    choices = s.option.choices
    if isinstance(choices, tuple) and choices:
        kw["type"] = click.Choice(choices)
    elif s.kind in ("int", "float"):
        kw["type"] = click.INT if s.kind == "int" else click.FLOAT
    kw.update(multiple=s.option.multiple, metavar=s.option.metavar)
    if s.option.flag_value is not None:  # --ray alone, or --ray ADDRESS
        kw.update(is_flag=False, flag_value=s.option.flag_value)
    d = s.default
    if d not in (None, (), {}):
        kw.update(default=",".join(map(str, d)) if isinstance(d, tuple) else d, show_default=True)
    return click.option(s.decl, s.name, **kw)


def config_options(*names: str, cls: type | None = None):
    """Decorate a command with the click options of the ``CompileConfig`` fields (all, or ``names``;
    ``cls``: a subclass that adds fields)."""
    chosen = [s for s in specs(cls) if s.option.cli and (not names or s.name in names)]

    def decorate(fn):
        for s in reversed(chosen):
            fn = _field_option(s)(fn)
        return fn

    return decorate


class SectionedCommand(click.Command):
    """A command whose ``--help`` shows the generated options under the config's SECTIONS."""

    def format_options(self, ctx, formatter) -> None:
        groups: dict[str, list] = {}
        for p in self.get_params(ctx):
            rec = p.get_help_record(ctx) if isinstance(p, click.Option) else None
            if rec:
                groups.setdefault(getattr(p, "section", "Options"), []).append(rec)
        for title in ("Options", *SECTIONS):
            if groups.get(title):
                with formatter.section(title):
                    formatter.write_dl(groups[title])


def log_options(fn):
    """``-v`` / ``-q``, the same on every command."""
    fn = click.option("-q", "--quiet", is_flag=True, help="Only errors and the result.")(fn)
    return click.option("-v", "--verbose", count=True, help="More log output (-vv: debug).")(fn)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    for noisy in ("onnx_graphsurgeon", "polygraphy"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _run(fn, command: str):
    """Run ``fn`` (the body of ``command``) so that no traceback reaches the user.

    User errors print one line on stderr and exit with their code (2; 3 for a failed verification).
    A place that cannot be written (permission, read-only, full disk) is a user error too. Anything
    else is our bug: one line naming the stage and node where it happened, the traceback saved to
    a log file (``lrcompile.errors.save_details``; ``-vv`` also logs it), exit code 4. The compile
    writes its files only after every step succeeded, so an error leaves no output behind.
    """
    try:
        return fn()
    except LrcError as e:
        click.echo(f"lrcompile: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("lrcompile: interrupted", err=True)
        sys.exit(130)
    except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
        raise
    except Exception as e:  # noqa: BLE001 - the guard: every other exception is reported, never shown raw
        if is_write_error(e):
            click.echo(f"lrcompile: error: {write_error(e, e.filename or 'a file', 'path', action='access')}", err=True)
            sys.exit(LrcError.exit_code)
        log.debug("internal error", exc_info=e)
        click.echo(f"lrcompile: {internal_error_line(e, command)}", err=True)
        sys.exit(INTERNAL_ERROR_EXIT)


def _check_writable(path: Path, option: str) -> None:
    """Fail now, before any work, when ``path``'s folder cannot be written: the nearest folder of
    it that exists must be a folder and take a new file (a real write: permissions alone do not
    tell, e.g. for root or on a read-only mount)."""
    folder = Path(path).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(folder))
        fd, probe = tempfile.mkstemp(prefix=".lrcompile-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:  # whatever the reason, this folder cannot take the file
        raise write_error(e, Path(path).parent, option) from None


def _write_text(path: Path, text: str, option: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, then a rename): a failed
    write leaves no partial file; an unwritable place is one user-error line naming ``option``."""
    from .io import atomic_output, commit

    try:
        with atomic_output(path) as tmp:
            (tmp / path.name).write_text(text)
            commit([tmp / path.name], path.parent)
    except OSError as e:
        if is_write_error(e) or isinstance(e, (IsADirectoryError, FileExistsError)):
            raise write_error(e, path, option) from None
        raise


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


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lrcompile")
def main() -> None:
    """lrcompile: factorize the constant weights of an ONNX model, verify it, and build it.

    \b
    lrcompile model.onnx --target trt --ratio 0.5      compile (default command)
    lrcompile inspect model.onnx                      candidates and spectra, writes nothing
    lrcompile compare model.onnx model.lr.onnx        both models through Polygraphy: accuracy, latency
    """


@main.command("compile", cls=SectionedCommand)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output .onnx (default: MODEL.lr.onnx).")
@config_options()
@click.option("--report", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="Replay the options of a JSON report.")
@log_options
def compile_cmd(model, output, report, config_file, verbose, quiet, **options):
    """Compile MODEL: factorize, rewrite, verify, and write/build the target."""
    _setup_logging(verbose, quiet)

    def go():
        from .config import CompileConfig
        from .pipeline import compile_model, default_output
        from .report import layers_table, memory_line, plan_summary, to_json, verification_table

        if config_file:
            try:
                data = json.loads(Path(config_file).read_text())
            except (OSError, ValueError) as e:
                raise LrcError(f"--config {config_file}: not a readable JSON report ({e})") from None
            cfg = CompileConfig.from_dict(data.get("config", data))
        else:
            cfg = CompileConfig.from_dict(options)
            if cfg.calib and not cfg.inputs and cfg.verify:
                log.warning("verifying on random inputs: data-aware factorization is tuned to the calibration "
                            "data, so random inputs overstate its error; pass --inputs with held-out real data")
            if cfg.calib is None and cfg.method is None:
                log.warning("no --calib data: plain SVD of the weights; trained weights are rarely low-rank, "
                            "so pass --calib for data-aware factorization")
        if report is not None and Path(report).suffix != ".json":
            raise LrcError(f"--report {report}: use a .json path")
        _check_writable(Path(output) if output is not None else default_output(Path(model)), "-o")
        if report is not None:
            _check_writable(Path(report), "--report")
        try:
            res = compile_model(model, output, cfg, progress=not quiet)
        except VerificationFailed as e:
            if report is not None and e.result is not None:
                _write_text(Path(report), to_json(e.result.report), "--report")
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
                       + (f" ({tot['params_ratio']:.1%})" if tot["params_ratio"] is not None else "")
                       + (" in the file" if "storage_params_after" in tot else ""))
            if "storage_params_after" in tot and tot["params_before"]:
                b = tot["params_before"]
                click.echo(f"sparse forms: storage with indices {tot['storage_params_after']:,} "
                           f"({tot['storage_params_after'] / b:.1%}; what a runtime with sparse kernels holds); "
                           f"ONNX Runtime holds {tot['ort_params_after']:,} ({tot['ort_params_after'] / b:.1%}: "
                           "it runs every sparse part dense) (docs/forms.md)")
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
            mem, par = memory_line(res.report), res.report.get("parallel") or {}
            if mem:
                runner = ("" if par.get("runner") in (None, "in-process") else
                          f"; units on {par['nodes']} Ray nodes" if par["runner"] == "ray" else
                          f"; units in {par['workers']} processes")
                click.echo(f"\n{mem}{runner}")
            for f in res.files:
                click.echo(f"wrote {f}")
        verdict = (res.report.get("verification") or {}).get("verdict")
        if verdict and not quiet:
            click.echo(f"\nverdict: {verdict['description']}")
        for o in (verdict or {}).get("outputs", []):
            if o["status"] in ("unverified", "unjudged") and (not quiet or res.status == "UNVERIFIED"):
                for why in o["reasons"]:
                    click.echo(f"{'UNVERIFIED' if o['status'] == 'unverified' else 'not judged'}: {why}")
        for why in (verdict or {}).get("notes", []):
            click.echo(f"UNVERIFIED: {why}")
        if report is not None:
            _write_text(Path(report), to_json(res.report), "--report")
            if res.report.get("plan") and res.report["plan"].get("budget"):
                _plan_plot(res, Path(report).with_suffix(".plan.png"), quiet)
        click.echo(res.status)
        return res

    _run(go, "compile")


@main.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--ratio", type=float, default=DEFAULT_RATIO, show_default=True,
              help="Show the rank and error at this ratio.")
@config_options("min_params")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@log_options
def inspect_cmd(model, ratio, min_params, as_json, verbose, quiet):
    """Show candidates, a singular-value summary per layer, and what would be declined and why."""
    _setup_logging(verbose, quiet)

    def go():
        from .inspection import inspect_model, inspect_table
        from .report import to_json

        rows = inspect_model(model, ratio=ratio, min_params=min_params, progress=not quiet and not as_json)
        click.echo(to_json(rows) if as_json else inspect_table(rows))

    _run(go, "inspect")


@main.command("compare")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("compressed", type=click.Path(path_type=Path))
@config_options("inputs", "dims", "seed", "tolerance", "min_cosine")
@click.option("--atol", type=float, help="Polygraphy's absolute tolerance; with --rtol / --check-error-stat its "
              "check decides too (default: reported at Polygraphy's 1e-5, not judged).")
@click.option("--rtol", type=float, help="Polygraphy's relative tolerance (relative to the original's output).")
@click.option("--check-error-stat", type=click.Choice(["elemwise", "max", "mean", "median", "quantile"]),
              help="Polygraphy's error statistic checked against the tolerances (its default: elemwise).")
@click.option("--trt/--no-trt", default=None, help="Also compare and time with Polygraphy's TensorRT runner "
              "(default: where tensorrt imports and a GPU is present).")
@click.option("--warmup", type=int, help="Untimed runs per model and runner (default 5).")
@click.option("--repeats", type=int, help="Timed runs per model and runner, interleaved (default 50; 0: no timing).")
@click.option("--save-inputs", type=click.Path(path_type=Path), help="Write the inputs used as a Polygraphy JSON "
              "input file (the printed polygraphy lines load it).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the comparison as JSON here.")
@log_options
def compare_cmd(original, compressed, inputs, dims, seed, tolerance, min_cosine, atol, rtol, check_error_stat, trt,
                warmup, repeats, save_inputs, json_path, verbose, quiet):
    """Compare COMPRESSED with ORIGINAL on the same inputs through Polygraphy's runners and comparator:
    per output accuracy (Polygraphy's statistics and tolerances, and the compile's verdict rule), the
    latency of both per runner, and the equivalent `polygraphy run` lines. Exit code 3 on FAILED."""
    _setup_logging(verbose, quiet)

    def go():
        from .comparison import CompareOptions, compare_models, comparison_table
        from .report import to_json

        if json_path is not None:
            if Path(json_path).suffix != ".json":
                raise LrcError(f"--json {json_path}: use a .json path")
            _check_writable(Path(json_path), "--json")
        if save_inputs is not None:
            _check_writable(Path(save_inputs), "--save-inputs")
        opts = CompareOptions(inputs=coerce("inputs", inputs), dims=coerce("dims", dims), seed=seed,
                              tolerance=tolerance, min_cosine=min_cosine, atol=atol, rtol=rtol,
                              check_error_stat=check_error_stat, trt=trt, warmup=warmup, repeats=repeats,
                              save_inputs=str(save_inputs) if save_inputs is not None else None)
        res = compare_models(original, compressed, opts)
        if not quiet:
            src = res.inputs["source"]
            click.echo(f"inputs: {src} ({res.inputs['batches']} batch(es): "
                       + ", ".join(f"{k} {'x'.join(map(str, v['shape']))} {v['dtype']}"
                                   for k, v in res.inputs["inputs"].items()) + ")")
            click.echo(comparison_table(res))
            for kind, why in res.skipped.items():
                click.echo(f"\n{kind} runner skipped: {why}")
            click.echo(f"\nrule: {res.rule}")
            click.echo("\nthe same comparison with Polygraphy" + ("" if save_inputs or (inputs and not str(inputs)
                       .endswith(".npz")) else " (pass --save-inputs INPUTS.json to write the inputs these lines load)")
                       + ":")
            for line in res.commands:
                click.echo("  " + line)
        for r in res.runners:
            for o in r.verdict["outputs"]:
                if o["status"] != "passed":
                    for why in o["reasons"]:
                        click.echo(f"{r.runner}: {o['status']}: {why}")
        if json_path is not None:
            _write_text(Path(json_path), to_json(res.to_dict()), "--json")
        click.echo(res.status)
        if res.status == "FAILED":
            sys.exit(VerificationFailed.exit_code)
        return res

    _run(go, "compare")


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
@log_options
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
            common["only"] = coerce("only", only)
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

    _run(go, "bench")


if __name__ == "__main__":  # pragma: no cover
    main()
