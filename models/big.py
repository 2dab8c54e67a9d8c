"""Models past protobuf's 2 GB limit, for the scale evidence (issue 21): numpy + onnx only.

Both write their weights straight into the external-data file as they are generated, one
initializer at a time (:class:`StreamingGraph`), so building needs about one weight matrix of
memory (plus ONNX Runtime's copy of the model when ``write_build`` runs the eval reference), not
the whole model. The builders take ``scratch``, the output folder, from ``build.py``; the weights
are written there under a temporary name and moved into place by ``common.write_build``.

- ``synthetic-transformer``: ``blocks`` post-LN encoder blocks (BERT layout, as
  ``synthetic.tiny_transformer``): Q/K/V/O ``d x d``, FFN ``d x 4d`` / ``4d x d`` with erf-GELU,
  LayerNormalization after each residual. Weights are ``synthetic.trained_like`` (power-law
  spectra plus noise), so low rank is meaningful but not exact. Full size: d = 1024, 16 heads,
  80 blocks = 480 MatMul weights, 4.03 GB of float32. Input ``x [batch, seq, d]``.
- ``ctr-embedding``: one shared embedding table of 12M rows x 64 (3.07 GB of float32) over eight
  fields (per-field ids, offset into the table inside the graph: ``Add`` then ``Gather``), then an
  MLP head 512 -> 256 -> 128 -> 1 (Gemm, transB=1) and a sigmoid. The table's rows are Gaussian
  with covariance eigenvalues decaying like ``i^-1`` (a trained table's spectrum) plus 10% noise;
  the feeds' ids are power-law distributed per field (low ids popular). The head's last layer is
  scaled so that the logits have std 1.5 on the feeds, and the labels are drawn from the model's
  own probabilities (seeded), so AUC is meaningful (the original scores about 0.8 by construction).

``fast=True`` builds the same structure a few MB in size, for tests.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from common import Built
from synthetic import NOISE, GraphBuilder, anisotropic, orthonormal, trained_like

DATA_FILE = "model.onnx.data"
PARTIAL = ".model.onnx.data.partial"
#: Initializers of at least this many bytes go to the data file (onnx's own default threshold).
EXTERNAL_MIN_BYTES = 1024
#: Offsets of external tensors are multiples of this (page-aligned, so a runtime may map them).
ALIGN = 4096


def external_tensor(name: str, dtype: np.dtype, shape, location: str, offset: int, length: int) -> TensorProto:
    """An initializer whose bytes are ``length`` bytes at ``offset`` of ``location`` (beside the model)."""
    t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims=list(shape))
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)
    return t


class StreamingGraph(GraphBuilder):
    """A GraphBuilder whose large initializers are written to ``path`` as they are made.

    Each initializer of at least EXTERNAL_MIN_BYTES is appended to the open data file at a
    page-aligned offset and kept in the graph as an external-data reference to ``location``
    (the name it will have beside model.onnx); smaller ones stay inline.
    """

    def __init__(self, rng: np.random.Generator, path: Path, location: str = DATA_FILE) -> None:
        super().__init__(rng)
        self.location = location
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.bytes = 0

    def const(self, name: str, value) -> str:
        arr = np.asarray(value)  # not ascontiguousarray: it turns a scalar into shape [1]
        if arr.nbytes < EXTERNAL_MIN_BYTES:
            return super().const(name, arr)
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        offset = -(-self.file.tell() // ALIGN) * ALIGN
        self.file.seek(offset)
        self.file.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        self.inits.append(external_tensor(name, arr.dtype, arr.shape, self.location, offset, arr.nbytes))
        self.bytes += arr.nbytes
        return name

    def close(self, ok: bool = True) -> None:
        """Close the data file; on failure (``ok`` False) delete it too."""
        self.file.close()
        if not ok:
            Path(self.file.name).unlink(missing_ok=True)


def _partial(scratch: Path | None) -> Path:
    if scratch is None:
        raise ValueError("this builder writes its weights into the output folder: build it with models/build.py")
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch / PARTIAL


# ------------------------------------------------------------------------- synthetic-transformer


def _gelu(g: GraphBuilder, x: str, name: str) -> str:
    """erf-GELU ``0.5 x (1 + erf(x / sqrt 2))``, the node pattern torch exports."""
    erf = g.op("Erf", [g.op("Mul", [x, "gelu.rsqrt2"], f"{name}/Div")], f"{name}/Erf")
    return g.op("Mul", [g.op("Mul", [x, g.op("Add", [erf, "gelu.one"], f"{name}/Add")], f"{name}/Mul"),
                        "gelu.half"], f"{name}/Mul_half")


def encoder_block(g: GraphBuilder, x: str, d: int, ff: int, heads: int, prefix: str) -> str:
    """One post-LN block reading ``x [batch, seq, d]``; needs the shared constants of
    :func:`synthetic_transformer` (head shapes, scale, GELU numbers). Returns its output name."""

    def project(name: str, perm: list[int]) -> str:
        y = g.linear(x, d, d, f"{prefix}.attn.{name}")
        return g.op("Transpose", [g.op("Reshape", [y, "shape.heads"], f"{prefix}.attn.{name}/Reshape")],
                    f"{prefix}.attn.{name}/Transpose", perm=perm)

    q, k, v = project("q", [0, 2, 1, 3]), project("k", [0, 2, 3, 1]), project("v", [0, 2, 1, 3])
    s = g.op("Mul", [g.op("MatMul", [q, k], f"{prefix}.attn/scores"), "attn.scale"], f"{prefix}.attn/scale")
    p = g.op("Softmax", [s], f"{prefix}.attn/Softmax", axis=-1)
    ctx = g.op("Transpose", [g.op("MatMul", [p, v], f"{prefix}.attn/context")], f"{prefix}.attn/context/Transpose",
               perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", [ctx, "shape.merge"], f"{prefix}.attn/context/Reshape")
    h = g.layer_norm(g.op("Add", [g.linear(ctx, d, d, f"{prefix}.attn.out"), x], f"{prefix}.attn/residual"), d,
                     f"{prefix}.ln1")
    f = _gelu(g, g.linear(h, d, ff, f"{prefix}.ffn.in"), f"{prefix}.gelu")
    return g.layer_norm(g.op("Add", [g.linear(f, ff, d, f"{prefix}.ffn.out"), h], f"{prefix}.ffn/residual"), d,
                        f"{prefix}.ln2")


#: (d, ffn, heads, blocks) of the full-size and the fast builds.
TRANSFORMER = (1024, 4096, 16, 80)
TRANSFORMER_FAST = (64, 256, 4, 2)


def transformer_weight_bytes(d: int, ff: int, heads: int, blocks: int) -> int:
    """float32 bytes of the weights (matrices, biases, LayerNorm) of :func:`synthetic_transformer`."""
    return 4 * blocks * (4 * (d * d + d) + 2 * d * ff + ff + d + 4 * d)


def synthetic_transformer(seed: int, fast: bool = False, scratch: Path | None = None, **_) -> Built:
    """``blocks`` encoder blocks, ``x [batch, seq, d]`` -> ``y [batch, seq, d]`` (module docstring)."""
    d, ff, heads, blocks = TRANSFORMER_FAST if fast else TRANSFORMER
    seq, n_calib, n_eval = (16, 32, 32) if fast else (16, 16, 16)
    g = StreamingGraph(np.random.default_rng([seed, 0]), _partial(scratch))
    try:
        g.const("shape.heads", np.array([0, 0, heads, d // heads], np.int64))
        g.const("shape.merge", np.array([0, 0, d], np.int64))
        g.const("attn.scale", np.array(1 / math.sqrt(d // heads), np.float32))
        g.const("gelu.rsqrt2", np.array(1 / math.sqrt(2), np.float32))
        g.const("gelu.one", np.array(1, np.float32))
        g.const("gelu.half", np.array(0.5, np.float32))
        h = "x"
        for b in range(blocks):
            h = encoder_block(g, h, d, ff, heads, f"block{b}")
    except BaseException:
        g.close(ok=False)
        raise
    g.close()
    g.nodes[-1].output[0] = "y"
    model = g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d])],
                    "synthetic_transformer", synthetic_transformer.__doc__)
    feeds = anisotropic(np.random.default_rng([seed, 1]), n_calib + n_eval, (seq, d))
    weights = {t.name for t in g.inits}
    n_weights = sum(n.op_type == "MatMul" and n.input[1] in weights for n in g.nodes)
    return Built(model=model, calib={"x": feeds[:n_calib]}, eval={"x": feeds[n_calib:]}, task="fidelity",
                 output="y", primary="cosine_mean", batch_size=4, external_data=DATA_FILE, weights_file=g.file.name,
                 data={"kind": "synthetic", "calib_rows": n_calib, "eval_rows": n_eval,
                       "rule": "one seeded draw; calib = first rows, eval = the rest",
                       "distribution": f"[n, {seq}, {d}] tokens, each x = (z * d) @ Q^T, d_i ~ i^-1"},
                 extra={"shape": {"d": d, "ffn": ff, "heads": heads, "blocks": blocks, "matmul_weights": n_weights,
                                  "weight_bytes": g.bytes}})


# ------------------------------------------------------------------------------- ctr-embedding

#: Rows of each field's slice of the shared table (full size: 12,000,000 rows).
VOCAB = (5_000_000, 3_000_000, 2_000_000, 1_000_000, 600_000, 300_000, 80_000, 20_000)
VOCAB_FAST = (2000, 1000, 500, 300, 100, 60, 30, 10)
EMB_DIM, HEAD = 64, (256, 128)
ZIPF = 1.1
TABLE_RMS = 0.1
CHUNK_ROWS = 1 << 20


def power_law_ids(rng: np.random.Generator, vocab: int, n: int, a: float = ZIPF) -> np.ndarray:
    """``n`` ids in ``[0, vocab)``, ``P(id) ~ (id + 1)^-a`` (continuous inverse-CDF approximation)."""
    u = rng.random(n)
    top = (vocab + 1.0) ** (1.0 - a)
    ids = np.floor((1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - a))) - 1.0
    return np.clip(ids, 0, vocab - 1).astype(np.int64)


def _table_chunks(rng: np.random.Generator, rows: int, dim: int):
    """Yield the table in row chunks: rows ``z @ (diag(s) V^T)`` plus noise, entry RMS TABLE_RMS."""
    s = np.arange(1, dim + 1, dtype=np.float64) ** -0.5  # eigenvalues of the row covariance ~ i^-1
    mix = (s[:, None] * orthonormal(rng, dim, dim).T).astype(np.float32)
    scale = TABLE_RMS / math.sqrt(np.mean(s ** 2) * (1 + NOISE ** 2))
    noise = NOISE * math.sqrt(np.mean(s ** 2))
    for start in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - start)
        chunk = rng.standard_normal((n, dim), dtype=np.float32) @ mix
        chunk += np.float32(noise) * rng.standard_normal((n, dim), dtype=np.float32)
        chunk *= np.float32(scale)
        yield start, chunk


def ctr_embedding(seed: int, fast: bool = False, scratch: Path | None = None, **_) -> Built:
    """``features [batch, 8]`` per-field ids -> shared table Gather -> MLP -> ``probability [batch, 1]``."""
    vocab = VOCAB_FAST if fast else VOCAB
    rows, fields = sum(vocab), len(vocab)
    n_calib, n_eval = (256, 512) if fast else (4096, 8192)
    offsets = np.concatenate([[0], np.cumsum(vocab)[:-1]]).astype(np.int64)
    frng = np.random.default_rng([seed, 1])
    feats = np.stack([power_law_ids(frng, v, n_calib + n_eval) for v in vocab], axis=1)
    global_ids = feats + offsets

    g = StreamingGraph(np.random.default_rng([seed, 2]), _partial(scratch))
    try:
        # the table: streamed chunk by chunk; the rows the feeds read are kept for the labels
        table_name = "embedding.weight"
        offset = -(-g.file.tell() // ALIGN) * ALIGN
        g.file.seek(offset)
        picked = np.empty((*global_ids.shape, EMB_DIM), np.float32)
        for start, chunk in _table_chunks(np.random.default_rng([seed, 0]), rows, EMB_DIM):
            g.file.write(memoryview(np.ascontiguousarray(chunk, "<f4")).cast("B"))
            hit = (global_ids >= start) & (global_ids < start + len(chunk))
            picked[hit] = chunk[global_ids[hit] - start]
        g.inits.append(external_tensor(table_name, np.float32, (rows, EMB_DIM), g.location, offset,
                                       rows * EMB_DIM * 4))
        g.bytes += rows * EMB_DIM * 4

        ids = g.op("Add", ["features", g.const("field.offsets", offsets)], "embedding/offsets")
        emb = g.op("Gather", [table_name, ids], "embedding/Gather", axis=0)
        h = g.op("Flatten", [emb], "embedding/Flatten", axis=1)
        x = picked.reshape(len(feats), fields * EMB_DIM)
        dims = [fields * EMB_DIM, *HEAD]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            w = trained_like(g.rng, a, b)
            bias = (0.01 * g.rng.standard_normal(b)).astype(np.float32)
            h = g.op("Relu", [g.op("Gemm", [h, g.const(f"mlp{i}.weight", w.T.copy()), g.const(f"mlp{i}.bias", bias)],
                                   f"mlp{i}/Gemm", transB=1)], f"mlp{i}/Relu")
            x = np.maximum(x @ w + bias, 0)
        # the head: scaled so the logits spread (std 1.5) around a 30% positive rate on the feeds
        w = trained_like(g.rng, HEAD[-1], 1)
        z = (x @ w)[:, 0].astype(np.float64)
        w = (w * (1.5 / z.std())).astype(np.float32)
        b = np.array([math.log(0.3 / 0.7) - 1.5 * z.mean() / z.std()], np.float32)
        logit = g.op("Gemm", [h, g.const("head.weight", w.T.copy()), g.const("head.bias", b)], "head/Gemm", transB=1)
        g.op("Sigmoid", [logit], "head/Sigmoid")
    except BaseException:
        g.close(ok=False)
        raise
    g.close()
    g.nodes[-1].output[0] = "probability"
    p = 1.0 / (1.0 + np.exp(-(x @ w + b)[:, 0].astype(np.float64)))
    labels = (np.random.default_rng([seed, 3]).random(len(p)) < p).astype(np.int64)
    model = g.model([helper.make_tensor_value_info("features", TensorProto.INT64, ["batch", fields])],
                    [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
                    "ctr_embedding", ctr_embedding.__doc__)
    return Built(model=model, calib={"features": feats[:n_calib]}, eval={"features": feats[n_calib:]},
                 calib_labels=labels[:n_calib], eval_labels=labels[n_calib:], task="binary_classification",
                 output="probability", primary="auc", batch_size=4096, external_data=DATA_FILE,
                 weights_file=g.file.name,
                 data={"kind": "synthetic", "calib_rows": n_calib, "eval_rows": n_eval,
                       "rule": "one seeded draw; calib = first rows, eval = the rest",
                       "ids": f"per field P(id) ~ (id + 1)^-{ZIPF}, id < vocab; the graph adds the field offsets",
                       "labels": "Bernoulli(p) with p the model's own probability (numpy, seeded)",
                       "vocab": list(vocab)},
                 extra={"shape": {"table_rows": rows, "dim": EMB_DIM, "fields": fields, "head": list(HEAD),
                                  "weight_bytes": g.bytes}})
