"""benchmarks/scale.py: configurations, measurements, byte identity, and its one-line refusals."""
from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale  # noqa: E402

#: A stand-in CLI: lists the given options in its help; a compile writes OUTPUT (fixed bytes, or a
#: counter that changes every call when SCALE_FAKE_VARY is set) and a report.
FAKE = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    args = sys.argv[1:]
    if args == ["--version"]:
        print("fake, version 0"); sys.exit(0)
    if args[:2] == ["compile", "--help"]:
        print("Options:\\n  -o, --output PATH\\n  --report PATH\\n" + os.environ.get("SCALE_FAKE_HELP", ""))
        sys.exit(0)
    out, report = Path(args[args.index("-o") + 1]), Path(args[args.index("--report") + 1])
    counter = Path(os.environ["SCALE_FAKE_COUNTER"])
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    out.write_bytes(b"same" if not os.environ.get("SCALE_FAKE_VARY") else str(n).encode())
    (out.parent / (out.name + ".data")).write_bytes(b"weights")
    report.write_text(json.dumps({"timings_s": {"analyze": 1.0, "factorize": 3.5}, "output_sha256": "x",
                                  "memory": {"phases": {"factorize": {"rss_peak_mb": 10.0,
                                                                      "children_rss_peak_mb": None}}},
                                  "layers": [{"op": "MatMul", "shape": [4, 8], "rank": 2, "method": "svd",
                                              "decision": "factorized", "seconds": 0.5}],
                                  "totals": {}}))
    print("args:", " ".join(args))
''')


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
    script = tmp_path / "fake_lrcompile.py"
    script.write_text(FAKE)
    monkeypatch.setenv("SCALE_FAKE_COUNTER", str(tmp_path / "counter"))
    monkeypatch.setenv("SCALE_FAKE_HELP", "  --workers INTEGER\n  --ray TEXT")
    model = tmp_path / "m" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(b"onnx")
    return f"{sys.executable} {script}", model


def test_configs_and_their_options():
    assert scale.parse_configs("workers1, workers2,ray,ray2,plain") == ["workers1", "workers2", "ray", "ray2", "plain"]
    for bad in ("workers0", "threads2", "ray,ray", ""):
        with pytest.raises(scale.UsageError):
            scale.parse_configs(bad)
    assert scale.config_args("workers2", None) == ["--workers", "2"]
    assert scale.config_args("ray", "127.0.0.1:6380") == ["--ray", "127.0.0.1:6380"]
    assert scale.config_args("ray4", "a:1") == ["--ray", "a:1", "--workers", "4"]
    assert scale.config_args("plain", None) == []
    assert scale.needed_options(["plain", "ray"]) == {"--report", "--ray"}


def test_phase_seconds_are_deltas_of_the_cumulative_marks():
    assert scale.phase_seconds({"rewrite": 5.0, "analyze": 1.0, "factorize": 4.5}) == \
        {"analyze": 1.0, "factorize": 3.5, "rewrite": 0.5}
    assert scale.phase_seconds(None) == {}


def test_layer_costs_group_by_shape_and_rank():
    layers = [{"op": "MatMul", "shape": [100, 200], "rank": 10, "method": "svd", "decision": "factorized",
               "seconds": s} for s in (0.1, 0.3)]
    layers += [{"op": "MatMul", "shape": [100, 200], "rank": 10, "decision": "declined", "seconds": 9.0},
               {"op": "MatMul", "shape": [100, 200], "rank": 10, "method": "svd", "decision": "factorized",
                "seconds": 0.0, "shared_with": "x"},
               {"op": "Gather", "shape": [1000, 8], "rank": 4, "method": "svd", "decision": "factorized",
                "seconds": 1.0}]
    rows = scale.layer_costs(layers)
    assert [(r["op"], r["count"], r["total_s"]) for r in rows] == [("Gather", 1, 1.0), ("MatMul", 2, 0.4)]
    assert rows[1]["mean_s"] == pytest.approx(0.2) and rows[1]["ns_per_mnr"] == pytest.approx(0.2 / 2e5 * 1e9)


def test_parse_time_v():
    text = ("\tUser time (seconds): 12.50\n\tSystem time (seconds): 1.25\n\tPercent of CPU this job got: 180%\n"
            "\tMaximum resident set size (kbytes): 2097152\n")
    assert scale.parse_time_v(text) == {"max_rss_mb": 2048.0, "user_s": 12.5, "system_s": 1.2, "cpu_percent": 180}


def test_missing_option_is_one_line(fake_cli, tmp_path, monkeypatch, capsys):
    cli, model = fake_cli
    monkeypatch.setenv("SCALE_FAKE_HELP", "")
    assert scale.main([str(model), "--lrcompile", cli, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no --ray, --workers option" in err
    assert not (tmp_path / "counter").exists()  # nothing compiled


def test_identical_outputs_recorded_and_deleted(fake_cli, tmp_path):
    cli, model = fake_cli
    out = tmp_path / "r"
    rc = scale.main([str(model), "--lrcompile", cli, "--configs", "workers1,workers2", "--repeat", "2", "--reports",
                     "--out", str(out), "--", "--rank", "8"])
    assert rc == 0
    res = json.loads((out / "m.json").read_text())
    assert res["identical"] and [(r["config"], r["round"]) for r in res["runs"]] == \
        [("workers1", 1), ("workers2", 1), ("workers2", 2), ("workers1", 2)]  # rotated each round
    run = res["runs"][1]
    assert run["argv"][-4:] == ["--workers", "2", "--rank", "8"]
    assert set(run["files"]) == {"model.lr.onnx", "model.lr.onnx.data"}
    assert run["phases_s"] == {"analyze": 1.0, "factorize": 2.5}
    assert run["memory"]["phases"]["factorize"]["rss_peak_mb"] == 10.0
    assert run["layer_costs"][0]["count"] == 1 and run["tree_rss_peak_mb"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["m.json", "m.md", "m.reports"]  # outputs deleted after hashing
    assert sorted(p.name for p in (out / "m.reports").iterdir()) == [f"workers{w}.r{r}.report.json"
                                                                    for w in (1, 2) for r in (1, 2)]
    assert "byte-identical: **yes**" in (out / "m.md").read_text()


def test_different_outputs_fail(fake_cli, tmp_path, monkeypatch):
    cli, model = fake_cli
    monkeypatch.setenv("SCALE_FAKE_VARY", "1")
    out = tmp_path / "r"
    assert scale.main([str(model), "--lrcompile", cli, "--configs", "workers1,workers2", "--out", str(out),
                       "--keep"]) == 1
    res = json.loads((out / "m.json").read_text())
    assert not res["identical"] and [r["same_as_first"] for r in res["runs"]] == [True, False]
    assert (out / "m.outputs" / "workers2.r1" / "model.lr.onnx").read_bytes() == b"1"  # kept


def test_layer_costs_mode(tmp_path):
    rep = tmp_path / "a.report.json"
    rep.write_text(json.dumps({"timings_s": {"factorize": 2.0}, "layers": [
        {"op": "Gemm", "shape": [10, 20], "rank": 5, "method": "svd", "decision": "factorized", "seconds": 0.25}]}))
    assert scale.main(["--layer-costs", str(rep), "--out", str(tmp_path / "o")]) == 0
    got = json.loads((tmp_path / "o" / "layer_costs.json").read_text())
    assert got["groups"][0]["total_s"] == 0.25 and got["sources"][0]["factorize_s"] == 2.0
    (tmp_path / "bad.json").write_text("{}")
    assert scale.main(["--layer-costs", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")]) == 2


@pytest.mark.slow
def test_local_ray_cluster_starts_two_nodes_and_stops_cleanly():
    pytest.importorskip("ray")
    import subprocess

    cluster = scale.RayCluster(nodes=2, cpus=1)
    address = cluster.start()
    pid = cluster.pid
    try:
        host, _, port = address.rpartition(":")
        assert host and port.isdigit()
        code = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); print(len(ray.nodes()))"
        got = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120,
                             env={**os.environ, **scale.LOOPBACK})  # the driver joins on loopback too
        assert got.stdout.strip() == "2"
        assert scale.tree_rss_mb([pid]) > 50  # GCS + two raylets
    finally:
        cluster.stop()
    left = subprocess.run(["pgrep", "-s", str(pid)], capture_output=True, text=True).stdout.split()
    assert left == []


@pytest.mark.slow
def test_ray_configuration_gets_the_local_cluster_address(fake_cli, tmp_path):
    pytest.importorskip("ray")
    cli, model = fake_cli
    out = tmp_path / "r"
    assert scale.main([str(model), "--lrcompile", cli, "--configs", "plain,ray", "--out", str(out)]) == 0
    res = json.loads((out / "m.json").read_text())
    assert res["ray"]["started_here"] and res["ray"]["nodes"] == 2
    ray_run = res["runs"][1]
    assert ray_run["argv"][-2:] == ["--ray", res["ray"]["address"]]
    assert ray_run["tree_rss_peak_mb"] > res["runs"][0]["tree_rss_peak_mb"] + 50  # the cluster's processes count
