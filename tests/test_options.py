"""Options declared once: the CompileConfig fields make the CLI, the docs and the one coercion.

Every entry point (``lrcompile.compile()``, ``CompileConfig.from_dict`` as ``--config`` replays it,
the ``compile`` command, bench configurations) must turn the same user value into the same config.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from onnx import helper

import lrcompile
import lrcompile.pipeline
from helpers import make_model, save, trained_like, vi
from lrcompile import LrcError
from lrcompile.bench import parse_config
from lrcompile.cli import SectionedCommand, config_options, main
from lrcompile.config import (DEFAULT_RATIO, LOSSES, SECTIONS, SOLVERS, CompileConfig, coerce, default, opt,
                              specs)

CLI_ONLY = {"model", "output", "report", "config_file", "verbose", "quiet"}


class Captured(LrcError):
    pass


@pytest.fixture()
def captured(monkeypatch):
    """Stop ``compile_model`` at its start and keep the config it was given."""
    seen = []

    def fake(model, output, config, progress=False):
        seen.append(config)
        raise Captured("captured")

    monkeypatch.setattr(lrcompile.pipeline, "compile_model", fake)
    return seen


def via_cli(seen, *args) -> CompileConfig:
    r = CliRunner().invoke(main, ["compile", "m.onnx", *args], catch_exceptions=False)
    assert r.exit_code == 2 and "captured" in r.stderr, (r.exit_code, r.stderr)
    return seen.pop()


def via_api(seen, **options) -> CompileConfig:
    with pytest.raises(Captured):
        lrcompile.compile("m.onnx", **options)
    return seen.pop()


def via_bench(key: str, text: str) -> CompileConfig:
    (c,) = parse_config(f"svd:{key}={text}")
    return CompileConfig.from_dict(c.compile_options())


# ------------------------------------------------------------------------------ declarations


def test_every_field_has_a_generated_option():
    params = {p.name: p for p in main.commands["compile"].params}
    for s in specs():
        assert s.option.help.strip(), f"{s.name}: no help"
        if not s.option.cli:
            assert s.name not in params
            continue
        p = params[s.name]
        assert s.flag in p.opts, (s.name, p.opts)
        assert s.section in SECTIONS
    assert set(params) - {s.name for s in specs()} == CLI_ONLY


def test_cli_defaults_are_the_config_defaults(captured):
    assert via_cli(captured) == CompileConfig()


def test_inspect_defaults_come_from_the_config():
    params = {p.name: p for p in main.commands["inspect"].params}
    assert params["min_params"].default == default("min_params") == CompileConfig().min_params
    assert params["ratio"].default == DEFAULT_RATIO == CompileConfig().policy().ratio


def test_choice_lists_live_once():
    from lrcompile import fisher
    from lrcompile.factorize import svd

    assert SOLVERS == svd.SOLVERS and LOSSES == fisher.LOSSES
    params = {p.name: p for p in main.commands["compile"].params}
    assert tuple(params["solver"].type.choices) == SOLVERS and tuple(params["loss"].type.choices) == LOSSES


def test_help_groups_the_options_and_fills_registry_choices():
    out = CliRunner().invoke(main, ["compile", "--help"], terminal_width=200).stdout
    at = [out.index(f"\n{t}:\n") for t in SECTIONS]
    assert at == sorted(at), "sections out of order"
    from lrcompile.factorize import METHODS

    assert "Factorization method: " + ", ".join(m for m, v in METHODS.items() if not v.internal) in out
    assert "{choices}" not in out and "[default: 4096]" in out and "--latency-aware / --size-only" in out


@dataclass(frozen=True)
class Extended(CompileConfig):
    """CompileConfig with two fields more, declared as any option is: nothing else is edited."""

    new_knob: int = opt(7, "A knob only this test has.")
    new_sizes: tuple[int, ...] = opt((2, 3), "Sizes only this test has.")


def test_a_new_field_is_one_declaration():
    @click.command(cls=SectionedCommand)
    @config_options(cls=Extended)
    def cmd(**options):
        click.echo(json.dumps(Extended.from_dict(options).to_dict()))

    r = CliRunner().invoke(cmd, ["--new-knob", "9", "--new-sizes", "4,5", "--rank", "8"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert (d["new_knob"], d["new_sizes"], d["rank"]) == (9, [4, 5], 8)
    assert list(d)[-2:] == ["new_knob", "new_sizes"]  # the report's config gains the key
    helptext = CliRunner().invoke(cmd, ["--help"], terminal_width=200).stdout
    assert "--new-knob INTEGER" in helptext and "A knob only this test has.  [default: 7]" in helptext
    assert "[default: 2,3]" in helptext
    assert Extended.from_dict({"new_knob": "none"}).new_knob == 7
    assert coerce("new_sizes", "6+7", cls=Extended) == (6, 7)


def test_docs_cli_md_is_current():
    from lrcompile.clidoc import render

    path = Path(__file__).parents[1] / "docs" / "cli.md"
    assert path.read_text() == render(), "docs/cli.md is stale: python -m lrcompile.clidoc > docs/cli.md"


# -------------------------------------------------------------------------------- coercion

# (field, text as the CLI and bench write it, the Python value, the CLI arguments)
SAME = [
    ("only", "MatMul+Gemm", ["MatMul", "Gemm"], ["--only", "MatMul,Gemm"]),
    ("latency_batches", "1+4", [1, 4], ["--latency-batches", "1,4"]),
    ("ratio", "0.25", 0.25, ["--ratio", "0.25"]),
    ("rank", "16", 16, ["--rank", "16"]),
    ("multiple", "4", 4, ["--multiple", "4"]),
    ("keep_unprofitable", "yes", True, ["--keep-unprofitable"]),
    ("latency_aware", "0", False, ["--size-only"]),
    ("external_data", "true", True, ["--external-data"]),
    ("solver", "exact", "exact", ["--solver", "exact"]),
    ("dims", "batch=4", {"batch": 4}, ["--dim", "batch=4"]),
    ("method_options", "damping=0.01", {"damping": 0.01}, ["--method-option", "damping=0.01"]),
    ("exclude", "fc.+", ["fc.+"], ["--exclude", "fc.+"]),
    ("mask_input", "none", "none", ["--mask-input", "none"]),
    ("timing_cache", "none", "none", ["--timing-cache", "none"]),
    ("distill_lr", "1e-3", 1e-3, ["--distill-lr", "1e-3"]),
]


@pytest.mark.parametrize("name,text,value,args", SAME, ids=[c[0] for c in SAME])
def test_every_entry_point_coerces_alike(captured, name, text, value, args):
    configs = {
        "api": via_api(captured, method="svd", **{name: value}),
        "api-text": via_api(captured, method="svd", **{name: text}),
        "replay": CompileConfig.from_dict(json.loads(json.dumps({"method": "svd", name: value}))),
        "cli": via_cli(captured, "--method", "svd", *args),
        "bench": via_bench(name, text),
    }
    expected = CompileConfig(method="svd", **{name: value})
    for where, cfg in configs.items():
        assert cfg == expected, where
        assert cfg.to_dict()[name] == value, where
    assert CompileConfig.from_dict(expected.to_dict()) == expected  # the report replays


def test_none_means_default(captured):
    d = CompileConfig()
    nones = {s.name: None for s in specs()}
    assert CompileConfig(**nones) == d and CompileConfig.from_dict(nones) == d
    assert via_api(captured, **nones) == d
    for s in specs():  # "none" is the default for everything but text, where it is a value ("off")
        if s.kind != "str":
            assert coerce(s.name, "none") == s.default, s.name
    assert CompileConfig(mask_input=None).mask_input == "auto"
    (c,) = parse_config("svd:multiple=none;only=none")
    assert CompileConfig.from_dict(c.compile_options()) == CompileConfig(method="svd")


def test_values_are_typed_once():
    c = CompileConfig.from_dict({"inputs": Path("in.npz"), "prune_mlp": "auto", "params": "0.5",
                                 "calib": "c.npz", "exclude": "a,b", "only": ["MatMul"], "verify": "off"})
    assert c.inputs == "in.npz" and c.params == 0.5 and c.prune_mlp == "auto"
    assert c.exclude == ("a,b",) and c.only == ("MatMul",) and c.verify is False
    assert CompileConfig(ratio=1).ratio == 1.0 and isinstance(CompileConfig(ratio=1).ratio, float)
    assert CompileConfig(latency_batches=[1.0, "8"]).latency_batches == (1, 8)


@pytest.mark.parametrize("options,match", [
    ({"rank": "x"}, "--rank 'x': not a valid integer"),
    ({"ratio": True}, "--ratio True: not a valid number"),
    ({"sequential": "maybe"}, "--sequential 'maybe': not a valid boolean"),
    ({"target": "tflite"}, "--target 'tflite': choose onnx, ort or trt"),
    ({"dims": ["batch"]}, r"--dim 'batch': expected NAME=INT \(e.g. --dim batch=4"),
    ({"dims": {"batch": -1}}, "--dim"),
    ({"latency_batches": "1,x"}, r"--latency-batches '1,x': expected comma-separated integers \(e.g. 1,16\)"),
    ({"verify": "sometimes"}, "verify 'sometimes'"),
    ({"raito": 0.5}, r"unknown option\(s\) in config: \['raito'\]; did you mean \['ratio'\]"),
])
def test_bad_values_name_the_option(options, match):
    with pytest.raises(LrcError, match=match):
        CompileConfig.from_dict(options)


def test_unknown_api_option_is_a_user_error():
    with pytest.raises(LrcError, match="did you mean"):
        lrcompile.compile("m.onnx", min_param=0)


# ---------------------------------------------------------------------------------- inspect


def test_inspect_twice(tmp_path):
    """``import lrcompile.inspection`` (any submodule import) must not replace the function."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")]
    m = save(make_model(nodes, [vi("x", ["batch", 128])], [vi("y", ["batch", 96])], [("W", trained_like(128, 96))]),
             tmp_path / "m.onnx")
    first = lrcompile.inspect(m)
    importlib.import_module("lrcompile.inspection")
    assert callable(lrcompile.inspect)
    assert lrcompile.inspect(m) == first and first[0]["node"] == "fc"
    assert lrcompile.inspect(m, ratio=DEFAULT_RATIO, min_params=default("min_params")) == first
    assert [r["decision"] for r in lrcompile.inspect(m, min_params=10**6)] == ["declined"]


def test_config_fields_and_specs_agree():
    assert [f.name for f in fields(CompileConfig)] == [s.name for s in specs()]
