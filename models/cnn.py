"""A small CNN trained on scikit-learn's digits (8x8 scans upsampled to 16x16), exported to ONNX.

Input ``image [batch, 1, 16, 16]`` (pixel / 16, nearest-neighbour 2x upsampling), output
``logits [batch, 10]``. Layers: a plain 3x3 conv, a strided 3x3 conv, a grouped 3x3 conv
(4 groups), a depthwise 3x3 conv and a pointwise 1x1 conv (ReLU after each), 2x2 average pool,
then a Linear(1024, 128) + ReLU + Linear(128, 10) head (Gemms in ONNX). Torch default init, Adam.
Split: a seeded permutation of the 1797 images, the first 450 held out (the eval feed), the rest
for training; the calib feed is the first 256 training images.
"""
from __future__ import annotations

import io
import time
import warnings

import numpy as np
import onnx
import torch
from torch import nn

import metrics
from common import Built

N_TEST, N_CALIB = 450, 256
EPOCHS, FAST_EPOCHS = 20, 3


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),                # plain, 16x16
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),     # strided, 8x8
            nn.Conv2d(64, 64, 3, padding=1, groups=4), nn.ReLU(),     # grouped
            nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU(),    # depthwise
            nn.Conv2d(64, 64, 1), nn.ReLU(),                          # pointwise
            nn.AvgPool2d(2),                                          # 4x4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """Digits as ``[1797, 1, 16, 16]`` float32 in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32).repeat(2, axis=1).repeat(2, axis=2)[:, None]
    return x, d.target.astype(np.int64)


def cnn_digits(seed: int, fast: bool = False) -> Built:
    """Train for EPOCHS epochs (FAST_EPOCHS with ``fast``) and export."""
    torch.use_deterministic_algorithms(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible training whatever the core count
    try:
        x, y = load_images()
        perm = np.random.default_rng(seed).permutation(len(y))
        test_rows, train_rows = perm[:N_TEST], perm[N_TEST:]
        epochs = FAST_EPOCHS if fast else EPOCHS
        torch.manual_seed(seed)
        model = DigitsCNN()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        rng = np.random.default_rng([seed, 1])
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        t0, log = time.perf_counter(), []
        for epoch in range(epochs):
            model.train()
            order = torch.from_numpy(train_rows[rng.permutation(len(train_rows))])
            total = 0.0
            for idx in order.split(64):
                loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            log.append({"epoch": epoch + 1, "train_loss": round(total / len(order), 5)})
        train_s = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            torch_logits = model(xt[test_rows]).numpy()
            buf = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (xt[:2],), buf, input_names=["image"], output_names=["logits"],
                                  opset_version=17, dynamo=False,
                                  dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    onnx_model = onnx.load_from_string(buf.getvalue())
    onnx_model.doc_string = __doc__
    calib_rows = train_rows[:N_CALIB]
    return Built(
        model=onnx_model, calib={"image": x[calib_rows]}, eval={"image": x[test_rows]},
        calib_labels=y[calib_rows], eval_labels=y[test_rows],
        task="classification", output="logits", primary="top1", batch_size=None, torch_output=torch_logits,
        data={"source": "sklearn.datasets.load_digits (1797 images, bundled)",
              "preprocess": "pixel / 16, nearest-neighbour upsampling 8x8 -> 16x16",
              "split": f"perm = numpy.random.default_rng(seed).permutation(1797); test = perm[:{N_TEST}], "
                       f"train = perm[{N_TEST}:]",
              "eval": "test (all of it)", "calib": f"train[:{N_CALIB}]"},
        extra={"training": {"optimizer": "Adam lr 1e-3, batch 64, cross-entropy", "epochs": epochs,
                            "train_rows": len(train_rows), "seconds": round(train_s, 1), "log": log},
               "torch_test": {"top1": metrics.top1_accuracy(torch_logits, y[test_rows])}},
    )
