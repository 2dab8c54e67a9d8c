"""CTR models (DeepFM, DCN-V2) trained on MovieLens-100K with torch and exported to ONNX.

Task: predict ``rating >= 4`` from user and item fields. One int64 input ``features
[batch, 13]``, one column per field (0 = unknown / padding)::

    0 user_id  1 item_id  2 age bucket  3 gender  4 occupation  5 zip prefix (2 chars)
    6 release-year bucket  7..12 genre slots (up to 6 genres, 0-padded)

Each field has its own embedding table (dim 16), exported as an ONNX Gather over a constant
``[vocab, 16]`` initializer; the six genre slots share one table whose padding row is zero and
are summed into one field vector. The MLP layers (400-400-400) and DCN-V2's full-rank cross
matrices are Gemms over constant weights. Output ``probability [batch, 1]`` (sigmoid in the graph).

Embeddings start at N(0, 0.05) and Linear layers at torch's default init (not a tiny init, which
would leave the trained layers nearly low-rank). Adam, batch 512, early stopping on validation AUC.
Split: a seeded random 80/10/10 split of the ratings (train/valid/test); eval feed = test split,
calib feed = the first 4096 training rows, distill feed (inputs only) the next 32,768. A full build
also trains the same model on a by-time split (oldest 80% / next 10% / newest 10%) and records its
test metrics.
"""
from __future__ import annotations

import copy
import csv
import io
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

import metrics
from common import Built, data_file, file_digest

FIELDS = ["user_id", "item_id", "age", "gender", "occupation", "zip2", "year"]
GENRE_SLOTS = 6
AGE_EDGES = [18, 25, 35, 45, 50, 56]
YEAR_EDGES = [1940, 1950, 1960, 1970, 1980, 1990, 1995, 1996, 1997, 1998]
DIM, HIDDEN, CROSS_LAYERS = 16, (400, 400, 400), 3
FILES = ("movielens-100k/ml-100k.inter", "movielens-100k/ml-100k.user", "movielens-100k/ml-100k.item")


def _read(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]


def _index(values) -> dict[str, int]:
    """Sorted vocabulary -> ids starting at 1 (0 is unknown / padding)."""
    return {v: i + 1 for i, v in enumerate(sorted(set(values)))}


def load_movielens(data: Path) -> dict:
    """Encode MovieLens-100K: ``x [n, 13]`` int64, ``y [n]`` (rating >= 4), ``t [n]`` timestamps, vocab sizes."""
    inter, users, items = (_read(data_file(data, f)) for f in FILES)
    zip2 = lambda z: z[:2] if z[:2].isdigit() else "other"  # noqa: E731
    user_ids, item_ids = _index(r[0] for r in users), _index(r[0] for r in items)
    occupations, zips = _index(r[3] for r in users), _index(zip2(r[4]) for r in users)
    genres = _index(g for r in items for g in r[3].split())
    user_feat = {r[0]: [user_ids[r[0]], int(np.digitize(int(r[1]), AGE_EDGES)) + 1, 1 + (r[2] == "F"),
                        occupations[r[3]], zips[zip2(r[4])]] for r in users}
    item_feat = {}
    for r in items:
        year = int(np.digitize(int(r[2]), YEAR_EDGES)) + 1 if r[2].isdigit() else 0
        slots = [genres[g] for g in r[3].split()][:GENRE_SLOTS]
        item_feat[r[0]] = [item_ids[r[0]], year, slots + [0] * (GENRE_SLOTS - len(slots))]
    x = np.array([[uf[0], itf[0], *uf[1:], itf[1], *itf[2]]
                  for r in inter for uf, itf in [(user_feat[r[0]], item_feat[r[1]])]], np.int64)
    vocab = [len(user_ids) + 1, len(item_ids) + 1, len(AGE_EDGES) + 2, 3, len(occupations) + 1,
             len(zips) + 1, len(YEAR_EDGES) + 2, len(genres) + 1]
    return {"x": x, "y": np.array([float(r[2]) >= 4 for r in inter], np.int64),
            "t": np.array([float(r[3]) for r in inter]), "vocab": vocab}


class FieldEmbeddings(nn.Module):
    """One table per field; the genre slots share a table with a zero padding row and are summed."""

    def __init__(self, vocab: list[int], dim: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(v, dim, padding_idx=0 if i == len(vocab) - 1 else None)
                                    for i, v in enumerate(vocab))
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.05)
            if t.padding_idx is not None:
                t.weight.data[t.padding_idx].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, 13]`` ids -> ``[batch, 8, dim]`` field vectors."""
        cols = torch.split(x, [1] * len(FIELDS) + [GENRE_SLOTS], dim=1)
        vecs = [t(c) for t, c in zip(self.tables, cols[:-1])]
        vecs.append(self.tables[-1](cols[-1]).sum(dim=1, keepdim=True))
        return torch.cat(vecs, dim=1)


def mlp(n_in: int, hidden=HIDDEN, dropout: float = 0.2) -> nn.Sequential:
    layers = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU(), nn.Dropout(dropout)]
        n_in = h
    return nn.Sequential(*layers)


class CTRModel(nn.Module):
    """Base: ``forward`` returns the probability; subclasses implement ``logit``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(x))


class DeepFM(CTRModel):
    """logit = bias + sum of first-order field weights + FM pairwise term + MLP(concat of fields)."""

    def __init__(self, vocab: list[int]) -> None:
        super().__init__()
        self.emb = FieldEmbeddings(vocab, DIM)
        self.first = FieldEmbeddings(vocab, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        self.deep = mlp(DIM * len(vocab))
        self.head = nn.Linear(HIDDEN[-1], 1)

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        fm = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1, keepdim=True)
        return self.bias + self.first(x).sum(1) + fm + self.head(self.deep(e.flatten(1)))


class DCNv2(CTRModel):
    """Parallel DCN-V2: full-rank cross layers ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l`` beside an MLP."""

    def __init__(self, vocab: list[int]) -> None:
        super().__init__()
        d = DIM * len(vocab)
        self.emb = FieldEmbeddings(vocab, DIM)
        self.cross = nn.ModuleList(nn.Linear(d, d) for _ in range(CROSS_LAYERS))
        self.deep = mlp(d)
        self.head = nn.Linear(d + HIDDEN[-1], 1)

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.emb(x).flatten(1)
        xl = x0
        for layer in self.cross:
            xl = x0 * layer(xl) + xl
        return self.head(torch.cat([xl, self.deep(x0)], dim=1))


def predict(model: nn.Module, x: np.ndarray, batch: int = 8192) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + batch])).numpy()[:, 0] for i in range(0, len(x), batch)])


def train(cls, vocab, x, y, train_rows, valid_rows, *, seed: int, max_epochs: int, patience: int = 2,
          lr: float = 1e-3, batch: int = 512) -> tuple[nn.Module, list[dict]]:
    """Adam on BCE; keeps the weights of the epoch with the best validation AUC."""
    torch.manual_seed(seed)
    model = cls(vocab)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng([seed, 1])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    log, best, best_auc, best_epoch = [], None, -1.0, 0
    for epoch in range(max_epochs):
        t0, total = time.perf_counter(), 0.0
        model.train()
        order = train_rows[rng.permutation(len(train_rows))]
        for i in range(0, len(order), batch):
            idx = torch.from_numpy(order[i:i + batch])
            loss = nn.functional.binary_cross_entropy_with_logits(model.logit(xt[idx])[:, 0], yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        p = predict(model, x[valid_rows])
        auc = metrics.roc_auc(y[valid_rows], p)
        log.append({"epoch": epoch + 1, "train_loss": round(total / len(order), 5), "valid_auc": round(auc, 5),
                    "valid_logloss": round(metrics.logloss(y[valid_rows], p), 5),
                    "seconds": round(time.perf_counter() - t0, 1)})
        if auc > best_auc:
            best, best_auc, best_epoch = copy.deepcopy(model.state_dict()), auc, epoch
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best)
    return model.eval(), log


def export(model: nn.Module, n_cols: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.ones(2, n_cols, dtype=torch.int64),), buf, input_names=["features"],
                          output_names=["probability"], opset_version=17, dynamo=False,
                          dynamic_axes={"features": {0: "batch"}, "probability": {0: "batch"}})
    out = onnx.load_from_string(buf.getvalue())
    out.doc_string = __doc__
    return out


def _build(cls, seed: int, data: Path, fast: bool) -> Built:
    torch.use_deterministic_algorithms(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible training whatever the core count
    try:
        ml = load_movielens(data)
        x, y, n = ml["x"], ml["y"], len(ml["y"])
        perm = np.random.default_rng(seed).permutation(n)
        train_rows, valid_rows, test_rows = perm[:int(0.8 * n)], perm[int(0.8 * n):int(0.9 * n)], perm[int(0.9 * n):]
        n_train, n_test, n_calib, epochs = (20000, 2000, 512, 2) if fast else (len(train_rows), len(test_rows),
                                                                                4096, 10)
        n_distill = 1024 if fast else 32768
        t0 = time.perf_counter()
        model, log = train(cls, ml["vocab"], x, y, train_rows[:n_train], valid_rows, seed=seed, max_epochs=epochs)
        train_s = time.perf_counter() - t0
        eval_rows, calib_rows = test_rows[:n_test], train_rows[:n_calib]
        distill_rows = train_rows[n_calib:n_calib + n_distill]
        p_test = predict(model, x[eval_rows])
        extra = {"training": {"optimizer": "Adam lr 1e-3, batch 512, BCE", "max_epochs": epochs, "patience": 2,
                              "train_rows": n_train, "seconds": round(train_s, 1), "log": log,
                              "best_epoch": max(log, key=lambda r: r["valid_auc"])["epoch"]},
                 "torch_test": {"auc": metrics.roc_auc(y[eval_rows], p_test),
                                "logloss": metrics.logloss(y[eval_rows], p_test)}}
        if not fast:
            order = np.argsort(ml["t"], kind="stable")
            a, b = int(0.8 * n), int(0.9 * n)
            tmodel, tlog = train(cls, ml["vocab"], x, y, order[:a], order[a:b], seed=seed, max_epochs=epochs)
            p = predict(tmodel, x[order[b:]])
            extra["time_split"] = {"rule": "sort by timestamp (stable); train oldest 80%, valid next 10%, "
                                           "test newest 10%; same model and training, not exported",
                                   "test_auc": metrics.roc_auc(y[order[b:]], p),
                                   "test_logloss": metrics.logloss(y[order[b:]], p),
                                   "best_epoch": max(tlog, key=lambda r: r["valid_auc"])["epoch"]}
        onnx_model = export(model, x.shape[1])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    return Built(
        model=onnx_model, calib={"features": x[calib_rows]}, eval={"features": x[eval_rows]},
        calib_labels=y[calib_rows], eval_labels=y[eval_rows], distill={"features": x[distill_rows]},
        task="binary_classification", output="probability", primary="auc", batch_size=4096,
        torch_output=p_test[:, None],
        data={"files": {f: file_digest(data_file(data, f)) for f in FILES}, "n_ratings": n,
              "label": "rating >= 4", "positive_rate": float(y.mean()),
              "columns": FIELDS + [f"genre{i + 1}" for i in range(GENRE_SLOTS)],
              "vocab": dict(zip(FIELDS + ["genre"], ml["vocab"])),
              "buckets": {"age": f"numpy.digitize(age, {AGE_EDGES}) + 1",
                          "year": f"numpy.digitize(year, {YEAR_EDGES}) + 1 (0 when missing)",
                          "zip2": "first two characters of the zip code if digits, else 'other'"},
              "split": f"perm = numpy.random.default_rng(seed).permutation({n}); train = perm[:80%], "
                       "valid = perm[80%:90%], test = perm[90%:]",
              "train": f"train[:{n_train}]", "eval": f"test[:{n_test}] (the test split)",
              "calib": f"train[:{n_calib}]", "distill": f"train[{n_calib}:{n_calib + n_distill}] (inputs only)"},
        extra=extra,
    )


def deepfm(seed: int, data: Path, fast: bool = False) -> Built:
    """DeepFM on MovieLens-100K."""
    return _build(DeepFM, seed, data, fast)


def dcnv2(seed: int, data: Path, fast: bool = False) -> Built:
    """DCN-V2 (parallel, full-rank cross) on MovieLens-100K."""
    return _build(DCNv2, seed, data, fast)
