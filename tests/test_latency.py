"""Per-layer latency: machine fingerprint, the timing cache and its invalidation, micro models
(numerically the layer, dense and factorized), time_layers, fast_rank."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from helpers import make_model, trained_like, vi
from onnx import TensorProto, helper

from lrcompile import latency as L
from lrcompile.config import CompileConfig
from lrcompile.errors import LrcError
from lrcompile.factorize import Factorization
from lrcompile.engine import analyze
from lrcompile.sessions import session

CPU = ["CPUExecutionProvider"]
FAST = dict(repeats=3, warmup=1, budget_s=0.01)  # timing quality is not under test: keep it quick


def tiny_model():
    """ids -> Gather(E [300, 64]) -> MatMul(W1 [64, 512]) -> Relu -> MatMul(W2 [512, 512]) -> y,
    img -> Conv(Wc [32, 16, 3, 3]) -> z, g -> Gemm(Wg^T, bias) -> w, and a left-side MatMul
    (W3 @ v: no activation input)."""
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "W1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "W2"], ["y"], name="fc2"),
        helper.make_node("Conv", ["img", "Wc"], ["z"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["W3", "v"], ["u"], name="left"),
        helper.make_node("Gemm", ["g", "Wg", "bg"], ["w"], name="gemm", transB=1),
    ]
    inits = [("E", trained_like(300, 64, 1)), ("W1", trained_like(64, 512, 2)), ("W2", trained_like(512, 512, 3)),
             ("Wc", trained_like(32, 144, 4).reshape(32, 16, 3, 3)), ("W3", trained_like(96, 64, 5)),
             ("Wg", trained_like(128, 64, 6)), ("bg", np.linspace(-1, 1, 128).astype(np.float32))]
    inputs = [vi("ids", ["b", 8], TensorProto.INT64), vi("img", ["b", 16, 8, 8]), vi("v", [64, "c"]),
              vi("g", ["b", 64])]
    outputs = [vi("y", ["b", 8, 512]), vi("z", ["b", 32, 8, 8]), vi("u", [96, "c"]), vi("w", ["b", 128])]
    return make_model(nodes, inputs, outputs, inits)


def feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"ids": rng.integers(0, 300, (batch, 8)).astype(np.int64),
            "img": rng.standard_normal((batch, 16, 8, 8)).astype(np.float32),
            "v": rng.standard_normal((64, 4)).astype(np.float32),
            "g": rng.standard_normal((batch, 64)).astype(np.float32)}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def cands(model):
    return analyze(model, CompileConfig(min_params=0)).candidates


def key(sha="a" * 64, fp=None, rank=None, node="fc1"):
    return L.timing_key(sha, fp or L.machine_fingerprint(CPU), node, 1, [1, 8, 64], "float32", rank)


# ---------------------------------------------------------------- fingerprint and cache


def test_fingerprint_is_stable_and_names_the_providers():
    a, b = L.machine_fingerprint(CPU), L.machine_fingerprint(CPU)
    assert a == b and tuple(a) == L.MACHINE_KEYS
    assert a["cores"] >= 1 and a["cpu"] and a["providers"] == CPU
    assert L.fingerprint_digest(a) == L.fingerprint_digest(b)
    assert L.fingerprint_digest(L.machine_fingerprint(["CUDAExecutionProvider", *CPU])) != L.fingerprint_digest(a)


def test_cache_returns_an_entry_only_for_the_same_model_and_machine(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    c = L.TimingCache(path)
    c.put(key(), 1.5)
    c.save()
    again = L.TimingCache(path)
    assert again.get(key()) == 1.5
    assert again.get(key(sha="b" * 64)) is None  # another model
    other = {**L.machine_fingerprint(CPU), "cpu": "Some Other CPU"}
    assert again.get(key(fp=other)) is None  # another machine
    monkeypatch.setattr(L, "machine_fingerprint", lambda providers: other)
    assert again.get(key()) is None
    with pytest.raises(ValueError, match="model"):
        again.get({"node": "fc1", "rank": None})  # a key that could match any model


def test_timing_cache_invalidates_when_the_model_or_machine_changes(model, cands, tmp_path, monkeypatch):
    """End to end: cached timings are reused, a changed model or machine measures again."""
    calls = []
    real = L.measure
    monkeypatch.setattr(L, "measure", lambda runs, **kw: calls.append(len(runs)) or real(runs, **kw))
    cache = L.TimingCache(tmp_path / "t.json")
    fc1 = [c for c in cands if c.label == "fc1"]
    args = (model, fc1, {1: feeds(1)}, {"fc1": [16]})
    first = L.time_layers(*args, providers=CPU, cache=cache, **FAST)
    assert calls == [2]
    assert L.time_layers(*args, providers=CPU, cache=L.TimingCache(tmp_path / "t.json"), **FAST) == first
    assert calls == [2]  # nothing measured again
    L.time_layers(*args, providers=CPU, cache=L.TimingCache(tmp_path / "t.json"), model_sha="c" * 64, **FAST)
    assert calls == [2, 2]  # another model: measured again
    fp = {**L.machine_fingerprint(CPU), "cpu": "Some Other CPU"}
    monkeypatch.setattr(L, "machine_fingerprint", lambda providers: fp)
    L.time_layers(*args, providers=CPU, cache=L.TimingCache(tmp_path / "t.json"), **FAST)
    assert calls == [2, 2, 2]  # another machine: measured again


@pytest.mark.parametrize("content", ["{not json", '{"format": 99, "entries": {}}', '{"format": 1, "entries": []}', ""])
def test_corrupt_cache_is_ignored_with_a_warning(tmp_path, caplog, content):
    path = tmp_path / "t.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="lrcompile.latency"):
        c = L.TimingCache(path)
    assert len(c) == 0 and "ignoring it" in caplog.text
    c.put(key(), 2.0)
    c.save()  # replaces the corrupt file
    assert L.TimingCache(path).get(key()) == 2.0


def test_unreadable_or_unwritable_cache_does_not_crash(tmp_path, caplog):
    folder = tmp_path / "dir.json"
    folder.mkdir()  # a folder where the file should be: neither readable nor replaceable
    with caplog.at_level(logging.WARNING, logger="lrcompile.latency"):
        c = L.TimingCache(folder)
        c.put(key(), 1.0)
        c.save()
    assert c.get(key()) == 1.0 and "cannot write" in caplog.text


def test_save_is_atomic_and_merges_with_the_file(tmp_path):
    path = tmp_path / "sub" / "t.json"
    a, b = L.TimingCache(path), L.TimingCache(path)
    a.put(key(rank=8), 1.0)
    b.put(key(rank=16), 2.0)
    a.save()
    b.save()  # a second process saving later keeps the first one's entries
    assert [p.name for p in path.parent.iterdir()] == ["t.json"]  # no temporary file left
    data = json.loads(path.read_text())
    assert data["format"] == L.CACHE_FORMAT and len(data["entries"]) == 2
    c = L.TimingCache(path)
    assert c.get(key(rank=8)) == 1.0 and c.get(key(rank=16)) == 2.0


def test_disabled_cache_reads_and_writes_nothing(tmp_path):
    path = tmp_path / "t.json"
    L.TimingCache(path).put(key(), 1.0)
    c = L.TimingCache(path, enabled=False)
    c.put(key(), 1.0)
    c.save()
    assert c.get(key()) is None and not path.exists()


def test_cache_counts_hits_and_misses(tmp_path):
    c = L.TimingCache(tmp_path / "t.json")
    c.put(key(), 1.0)
    assert c.get(key()) == 1.0 and c.get(key(rank=8)) is None
    assert (c.hits, c.misses) == (1, 1)


def test_describe_target_names_runtime_provider_and_cpu():
    text = L.describe_target(CPU)
    fp = L.machine_fingerprint(CPU)
    assert text.startswith(f"ONNX Runtime {fp['onnxruntime']} CPU on ") and fp["cpu"] in text
    assert "ONNX Runtime" in L.describe_target()


def test_default_cache_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LRCOMPILE_CACHE_DIR", str(tmp_path))
    assert L.TimingCache().path == tmp_path / "timings.json"
    monkeypatch.delenv("LRCOMPILE_CACHE_DIR")
    assert L.default_cache_path().parts[-3:] == (".cache", "lrcompile", "timings.json")


# ---------------------------------------------------------------- fast_rank


def timing(dense, ranks, times):
    return L.LayerTiming(node="n", batch=1, rows_shape=[1, 64], dense_ms=dense, ranks=ranks, factorized_ms=times)


def test_fast_rank_is_the_largest_rank_under_the_margin():
    t = timing(3.0, [64, 128, 192, 256], [1.0, 2.0, 3.0, 4.0])  # linear: t(r) = r / 64
    assert t.fast_rank(margin=0.0) == 192  # exactly at the crossing
    assert t.fast_rank(margin=0.05) == 182  # t(r) <= 2.85 -> r <= 182.4
    assert t.fast_rank(margin=0.05, multiple=8) == 176  # rounded down, still under the crossing
    assert t.fast_rank(margin=0.05, multiple=200) == 0
    assert timing(10.0, [64, 128], [1.0, 2.0]).fast_rank() == 128  # not extrapolated past the last rank
    assert timing(1.0, [256, 64, 128], [4.0, 1.0, 2.0]).fast_rank(margin=0.5) == 0  # never fast enough
    assert timing(1.0, [64, 128], [1.2, 1.5]).fast_rank() == 0
    assert timing(1.0, [], []).fast_rank() == 0


def test_fast_rank_takes_ranks_in_any_order_and_skips_a_slow_bump():
    assert timing(3.0, [256, 64, 192, 128], [4.0, 1.0, 3.0, 2.0]).fast_rank(margin=0.0) == 192
    # a slow bump at 128 does not hide that 192 is fast again
    assert timing(3.0, [64, 128, 192, 256], [1.0, 3.5, 2.0, 4.0]).fast_rank(margin=0.0) == 224


# ---------------------------------------------------------------- micro models


def _run(model, feed):
    return session(model.SerializeToString(), CPU).run(None, feed)[0]


def _svd_full(m: np.ndarray) -> Factorization:
    u, s, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    r = len(s)
    return Factorization(a=(u * s).astype(m.dtype), c=vt.astype(m.dtype), rank=r, method="svd", rel_error=0.0,
                         objective_error=0.0)


@pytest.mark.parametrize("label,name,example", [
    ("fc2", "r1", np.random.default_rng(1).standard_normal((2, 8, 512)).astype(np.float32)),
    ("embed", "ids", np.random.default_rng(2).integers(0, 300, (3, 8)).astype(np.int64)),
    ("conv", "img", np.random.default_rng(3).standard_normal((2, 16, 8, 8)).astype(np.float32)),
    ("gemm", "g", np.random.default_rng(4).standard_normal((5, 64)).astype(np.float32)),
])
def test_factorized_micro_model_is_the_layer_at_full_rank(model, cands, label, name, example):
    cand = next(c for c in cands if c.label == label)
    micro = L.micro_model(model, cand, {name: example})
    assert [n.op_type for n in micro.graph.node] == [cand.node.op] and [i.name for i in micro.graph.input] == [name]
    facts = [_svd_full(m) for m in cand.matrices]
    fact = L.factorized_micro(micro, facts[0].rank, facts=facts)
    assert len(fact.graph.node) == 2  # the chain the compiler emits
    dense, low = _run(micro, {name: example}), _run(fact, {name: example})
    assert np.linalg.norm(low - dense) / np.linalg.norm(dense) < 1e-5
    if label in ("fc2", "embed"):  # the dense micro model is the layer of the original model
        ref = example @ cand.matrices[0] if label == "fc2" else cand.matrices[0][example]
        np.testing.assert_allclose(dense, ref, rtol=1e-4, atol=1e-4)
    # random factors at a small rank: the same structure, the requested rank
    rnd = L.factorized_micro(micro, 8)
    assert _run(rnd, {name: example}).shape == dense.shape


# ---------------------------------------------------------------- time_layers


def test_time_layers_times_every_candidate_at_every_batch_and_rank(model, cands, tmp_path):
    labels = {c.label for c in cands}
    assert labels == {"embed", "fc1", "fc2", "conv", "gemm", "left"}
    ranks = {"embed": [8, 32], "fc1": [16, 48], "fc2": [64, 128], "conv": [8, 16], "gemm": [8, 32]}
    fb = {1: feeds(1), 4: feeds(4)}
    cache = L.TimingCache(tmp_path / "t.json")
    res = L.time_layers(model, cands, fb, ranks, providers=CPU, cache=cache, **FAST)
    assert set(res) == {"embed", "fc1", "fc2", "conv", "gemm"}  # "left" has no activation input: skipped
    for label, ts in res.items():
        assert [t.batch for t in ts] == [1, 4]
        for t in ts:
            assert t.node == label and t.ranks == ranks[label] and len(t.factorized_ms) == 2
            assert t.dense_ms > 0 and all(x > 0 for x in t.factorized_ms)
    assert res["fc2"][1].rows_shape == [4, 8, 512] and res["embed"][0].rows_shape == [1, 8]
    assert res["conv"][1].rows_shape == [4, 16, 8, 8]
    assert len(cache) == 5 * 2 * 3
    assert len(L.TimingCache(tmp_path / "t.json")) == 5 * 2 * 3  # saved


def test_time_layers_reuses_the_cache_and_measures_only_what_is_missing(model, cands, tmp_path, monkeypatch):
    fb = {2: feeds(2)}
    path = tmp_path / "t.json"
    first = L.time_layers(model, cands, fb, {"fc2": [64]}, providers=CPU, cache=L.TimingCache(path), **FAST)
    seen = []
    real = L.measure
    monkeypatch.setattr(L, "measure", lambda runs, **kw: seen.append(sorted(runs, key=str)) or real(runs, **kw))
    again = L.time_layers(model, cands, fb, {"fc2": [64, 128]}, providers=CPU, cache=L.TimingCache(path), **FAST)
    assert seen == [[128]]  # every dense time and rank 64 came from the cache: only the new rank ran
    assert again["fc2"][0].dense_ms == first["fc2"][0].dense_ms
    assert again["fc2"][0].factorized_ms[0] == first["fc2"][0].factorized_ms[0]
    seen.clear()
    L.time_layers(model, cands, fb, {"fc2": [64]}, providers=CPU, cache=L.TimingCache(path), intra_op_threads=1,
                  **FAST)
    assert len(seen) == 5  # another thread count is another measurement


def test_time_layers_without_a_cache_and_without_candidates(model, cands):
    assert L.time_layers(model, [], {1: feeds(1)}, {}, providers=CPU) == {}
    left = [c for c in cands if c.label == "left"]
    assert L.time_layers(model, left, {1: feeds(1)}, {"left": [8]}, providers=CPU) == {}
    res = L.time_layers(model, [c for c in cands if c.label == "fc1"], {1: feeds(1)}, {}, providers=CPU, **FAST)
    assert res["fc1"][0].ranks == [] and res["fc1"][0].dense_ms > 0


def test_measure_adapts_rounds_to_the_budget():
    class Fake:
        def __init__(self):
            self.n = 0

        def run(self, _, feed):
            self.n += 1

    a, b = Fake(), Fake()
    out = L.measure({"a": (a, {}), "b": (b, {})}, repeats=7, warmup=2)
    assert set(out) == {"a", "b"} and all(v > 0 for v in out.values())
    # runs far under MIN_SAMPLE_MS are grouped into samples; at most `repeats` samples each
    assert a.n > 7 and b.n > 7


def test_a_layer_whose_micro_model_fails_is_left_out_with_a_warning(model, cands, monkeypatch, caplog):
    def boom(micro, rank, **kw):
        raise ValueError("no")

    monkeypatch.setattr(L, "factorized_micro", boom)
    fc = [c for c in cands if c.label in ("fc1", "fc2")]
    with caplog.at_level(logging.WARNING, logger="lrcompile.latency"):
        res = L.time_layers(model, fc, {1: feeds(1)}, {"fc1": [16]}, providers=CPU, **FAST)
    assert set(res) == {"fc2"} and "fc1: cannot build or load its micro model" in caplog.text


# ----------------------------------------------------------------------------------- timing backends


class _CountingOrt(L.OrtTiming):
    """The ORT backend under another fingerprint, counting what it loads: the interface a
    TensorRT backend fills (``fingerprint``, ``describe``, ``load``), exercised with ONNX Runtime."""

    name = "counting"

    def __init__(self):
        super().__init__(CPU)
        self.loaded = []

    def fingerprint(self):
        return {**super().fingerprint(), "backend": self.name}

    def load(self, model, tmp, feeds):
        self.loaded.append(sorted(f[next(iter(f))].shape[0] for f in feeds))  # every batch's feed is offered
        return super().load(model, tmp, feeds)


def test_time_layers_runs_any_backend_through_one_interface(model, cands, tmp_path):
    fb = {1: feeds(1), 4: feeds(4)}
    path = tmp_path / "t.json"
    fc2 = [c for c in cands if c.label == "fc2"]
    plain = L.time_layers(model, fc2, fb, {"fc2": [64]}, providers=CPU, cache=L.TimingCache(path), **FAST)
    backend = _CountingOrt()
    other = L.time_layers(model, fc2, fb, {"fc2": [64]}, cache=L.TimingCache(path), backend=backend, **FAST)
    assert backend.loaded == [[1, 4], [1, 4]]  # dense and rank 64: measured, not taken from ORT's entries
    assert [t.batch for t in other["fc2"]] == [t.batch for t in plain["fc2"]] == [1, 4]
    assert all(t.dense_ms > 0 and t.factorized_ms[0] > 0 for t in other["fc2"])
    assert len(L.TimingCache(path)) == 2 * 2 * 2  # two backends' entries side by side
    # the default backend is ONNX Runtime with the given providers: its entries are hit again
    again = L.OrtTiming(CPU)
    assert L.time_layers(model, fc2, fb, {"fc2": [64]}, cache=L.TimingCache(path), backend=again, **FAST) == plain


def test_timing_backend_choice(monkeypatch):
    assert isinstance(L.timing_backend(None), L.OrtTiming) and isinstance(L.timing_backend("ort", "trt"), L.OrtTiming)
    why = L.TrtTiming.unavailable()
    if why is None:
        pytest.skip("TensorRT runs here: the refusal is not testable")
    assert isinstance(L.timing_backend("auto", "trt"), L.OrtTiming)  # falls back where TensorRT cannot run
    with pytest.raises(LrcError, match="TensorRT cannot time layers"):
        L.timing_backend("trt")
    assert L.OrtTiming(CPU).describe() == L.describe_target(CPU)


@pytest.mark.gpu
def test_tensorrt_backend_times_layers(model, cands, tmp_path):
    if L.TrtTiming.unavailable() is not None:
        pytest.skip(L.TrtTiming.unavailable())
    fc2 = [c for c in cands if c.label == "fc2"]
    res = L.time_layers(model, fc2, {1: feeds(1), 4: feeds(4)}, {"fc2": [64]}, backend=L.TrtTiming(), **FAST)
    assert all(t.dense_ms > 0 and t.factorized_ms[0] > 0 for t in res["fc2"])
