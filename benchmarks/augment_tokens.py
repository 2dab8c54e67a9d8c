"""Token-level augmentations of tokenized calibration rows, as `--distill` data that stays within
the calibration set (no text beyond it).

    python benchmarks/augment_tokens.py artifacts/minilm-l6/calib.npz 4096 out/aug/aug4096.npz

Each new row is a random crop (30-100% of a row's tokens) of one calibration row (40%) or two
crops of two rows joined (60%); half of the rows then drop each token with probability 0.15. The
first and last real tokens ([CLS], [SEP] for BERT vocabularies) are kept around the new body, and
rows are padded to the input's width. Seeded: the same arguments write the same file.
"""
from __future__ import annotations

import argparse

import numpy as np


def augment(ids: np.ndarray, mask: np.ndarray, n: int, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """``n`` augmented rows of (ids, mask), both [rows, width] with 1s in ``mask`` for real tokens."""
    width = ids.shape[1]
    lengths = mask.astype(bool).sum(1)
    if (lengths < 3).any():
        raise SystemExit("every row needs at least one token between its first and last")
    first, last = ids[0, 0], ids[0, lengths[0] - 1]
    bodies = [ids[i, 1:lengths[i] - 1] for i in range(len(ids))]
    rng = np.random.default_rng(seed)

    def crop(b: np.ndarray) -> np.ndarray:
        k = max(1, int(round(len(b) * rng.uniform(0.3, 1.0))))
        s = rng.integers(0, len(b) - k + 1)
        return b[s:s + k]

    out_ids = np.zeros((n, width), ids.dtype)
    out_mask = np.zeros((n, width), mask.dtype)
    for j in range(n):
        a = bodies[rng.integers(len(bodies))]
        if rng.random() < 0.4:
            body = crop(a)
        else:
            b = bodies[rng.integers(len(bodies))]
            body = np.concatenate([crop(a), crop(b)])
        if rng.random() < 0.5:
            keep = rng.random(len(body)) >= 0.15
            body = body[keep] if keep.any() else body
        row = np.concatenate([[first], body[:width - 2], [last]])
        out_ids[j, :len(row)] = row
        out_mask[j, :len(row)] = 1
    return out_ids, out_mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("calib", help=".npz with input_ids and attention_mask")
    p.add_argument("n", type=int, help="rows to write")
    p.add_argument("out", help="output .npz")
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    with np.load(a.calib, allow_pickle=False) as d:
        ids, mask = d["input_ids"], d["attention_mask"]
    new_ids, new_mask = augment(ids, mask, a.n, a.seed)
    np.savez(a.out, input_ids=new_ids, attention_mask=new_mask)
    print(f"{a.n} rows, mean length {new_mask.sum(1).mean():.1f} -> {a.out}")


if __name__ == "__main__":
    main()
