#!/usr/bin/env python
"""The conv forms on a real detector: ddddocr's ``common_det.onnx`` (YOLOX-style, 31 3 x 3 and 52
1 x 1 convs, 5.0M parameters, input [1, 3, 416, 416]) at several global budgets, one compile per
(form, budget), scored by box agreement with the original and timed in ONNX Runtime, every variant
of one budget interleaved with the original in one run (``latency.measure``).

    pip download ddddocr==1.6.1 --no-deps -d /tmp/dd && unzip -o -q /tmp/dd/ddddocr-1.6.1-py3-none-any.whl -d /tmp/dd/whl
    python benchmarks/conv_detector.py /tmp/dd/whl/ddddocr/common_det.onnx --out benchmarks/results/conv/detector

Inputs: seeded click-captcha-like pictures drawn with Pillow (4-7 glyphs of DejaVu fonts, random
sizes, rotations and colours on a noisy gradient with clutter lines), letterboxed to 416 x 416 as
ddddocr's ``preproc`` does (grey 114 padding, BGR, 0..255 floats). 16 calibrate, 48 others score.
Box agreement: the original's decoded boxes (ddddocr's decoding: strides 8/16/32, score = obj x
cls > 0.1, class-agnostic NMS at IoU 0.45) are the reference; per image, compressed boxes are
matched greedily at IoU >= 0.5; ``box_f1`` is the F1 over all images, ``mean_iou`` the mean IoU of
the matched pairs. Writes ``results.json`` and ``README.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx

import lrcompile
from lrcompile.latency import measure
from lrcompile.sessions import session

FONTS = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("DejaVu*.ttf"))
GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnqrt23456789"


def pictures(n: int, seed: int) -> np.ndarray:
    """``n`` letterboxed pictures ``[n, 3, 416, 416]`` float32 (BGR, 0..255)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = np.full((n, 3, 416, 416), 114.0, np.float32)
    for k in range(n):
        w, h = int(rng.integers(300, 420)), int(rng.integers(160, 300))
        grad = np.linspace(0, 1, w)[None, :, None] * rng.uniform(-80, 80, 3) + rng.uniform(90, 230, 3)
        bg = np.clip(grad + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(bg, "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 8))):
            draw.line([tuple(rng.integers(0, [w, h])) for _ in range(2)], fill=tuple(rng.integers(0, 255, 3).tolist()),
                      width=int(rng.integers(1, 4)))
        for _ in range(int(rng.integers(4, 8))):
            size = int(rng.integers(26, 54))
            font = ImageFont.truetype(str(FONTS[int(rng.integers(len(FONTS)))]), size)
            glyph = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
            ImageDraw.Draw(glyph).text((size // 3, size // 4), GLYPHS[int(rng.integers(len(GLYPHS)))], font=font,
                                        fill=tuple(rng.integers(0, 120, 3).tolist()) + (255,))
            glyph = glyph.rotate(float(rng.uniform(-40, 40)), resample=Image.BILINEAR)
            img.paste(glyph, (int(rng.integers(0, max(w - size * 2, 1))), int(rng.integers(0, max(h - size * 2, 1)))),
                      glyph)
        r = min(416 / h, 416 / w)
        small = np.asarray(img.resize((int(w * r), int(h * r)), Image.BILINEAR), np.float32)[..., ::-1]  # BGR
        out[k, :, :small.shape[0], :small.shape[1]] = small.transpose(2, 0, 1)
    return out


def decode(pred: np.ndarray) -> list[np.ndarray]:
    """ddddocr's decoding of ``[n, 3549, 6]``: boxes ``[m, 4]`` (x1, y1, x2, y2) per image."""
    grids, strides = [], []
    for s in (8, 16, 32):
        g = 416 // s
        yv, xv = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((g * g, 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    out = []
    for p in pred.astype(np.float64):
        xy = (p[:, :2] + grid) * stride
        wh = np.exp(np.clip(p[:, 2:4], -20, 20)) * stride
        score = p[:, 4] * p[:, 5]
        keep = score > 0.1
        b = np.concatenate([xy - wh / 2, xy + wh / 2], 1)[keep]
        out.append(b[_nms(b, score[keep], 0.45)])
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), 2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], 1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def _nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        i = order[0]
        keep.append(i)
        if len(order) == 1:
            break
        ov = _iou(boxes[i:i + 1], boxes[order[1:]])[0]
        order = order[1:][ov <= thr]
    return np.asarray(keep, np.int64)


def agreement(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    tp = fp = fn = 0
    ious = []
    for a, b in zip(ref, got):
        used = set()
        if len(a) and len(b):
            m = _iou(a, b)
            for i in np.argsort(-m.max(1), kind="stable"):
                j = next((j for j in np.argsort(-m[i], kind="stable") if j not in used and m[i, j] >= 0.5), None)
                if j is not None:
                    used.add(j)
                    ious.append(m[i, j])
        tp += len(used)
        fn += len(a) - len(used)
        fp += len(b) - len(used)
    return {"box_f1": 2 * tp / max(2 * tp + fp + fn, 1), "mean_iou": float(np.mean(ious)) if ious else 0.0,
            "boxes_ref": int(sum(len(a) for a in ref)), "boxes": int(sum(len(b) for b in got))}


def run_model(path, x: np.ndarray) -> np.ndarray:
    s = session(str(path))
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def n_params(path) -> int:
    m = onnx.load(str(path))
    total = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    total += int(np.prod(a.t.dims))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--out", default="benchmarks/results/conv/detector")
    ap.add_argument("--params", default="0.9,0.7,0.5", help="budgets: fractions of the candidates' parameters")
    ap.add_argument("--forms", default="lowrank,tucker2,cp,spatial")
    ap.add_argument("--extra", action="append", default=[], help="extra compile options KEY=V for every variant")
    ap.add_argument("--large-batch", type=int, default=0, help="a second latency batch (0: none; "
                    "common_det.onnx has a fixed batch of 1)")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    calib, evalx = pictures(16, seed=1), pictures(48, seed=2)
    np.savez(out / "models" / "calib.npz", images=calib)
    ref = decode(run_model(args.model, evalx))
    base = n_params(args.model)
    extra = {k: json.loads(v) if v[:1] in "0123456789[{tf" else v for k, v in (e.split("=", 1) for e in args.extra)}
    rows = []
    for p in [float(v) for v in args.params.split(",")]:
        variants = {}
        for form in args.forms.split(","):
            dst = out / "models" / f"{form}_{p}.onnx"
            t0 = time.perf_counter()
            res = lrcompile.compile(args.model, dst, form=form, params=p, calib=str(out / "models" / "calib.npz"),
                                    allocation="error", verify=False, calib_batch=1, **extra)
            secs = time.perf_counter() - t0
            got = decode(run_model(dst, evalx))
            won = {}
            for r in res.layers:
                if r.decision == "factorized":
                    f = (r.info or {}).get("form", "lowrank")
                    won[f] = won.get(f, 0) + 1
            rows.append({"params": p, "form": form, "all_params_ratio": n_params(dst) / base, "compile_s": round(secs, 1),
                         "forms_won": won, **agreement(ref, got)})
            variants[form] = dst
            print(json.dumps(rows[-1]), flush=True)
        for batch in sorted({1, args.large_batch} - {0}):  # the detector's batch is fixed at 1
            x = evalx[:batch]
            runs = {name: (session(str(path)), {"images": x}) for name, path in
                    [("original", args.model)] + list(variants.items())}
            ms = measure(runs, repeats=15, budget_s=2.0)
            for r in rows:
                if r["params"] == p:
                    r[f"lat_b{batch}_ratio"] = ms[r["form"]] / ms["original"]
                    r[f"lat_b{batch}_orig_ms"] = ms["original"]
        print(json.dumps([r for r in rows if r["params"] == p]), flush=True)
        # written after each budget: a long run keeps what it measured
        (out / "results.json").write_text(json.dumps({"model": str(args.model), "params_before": base,
                                                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
