"""Interleaved ONNX Runtime CPU latency of several models on one feed file, batch 1 and 16:
``python benchmarks/attention_latency.py EVAL.npz OUT.json NAME=MODEL.onnx ...`` (the first model is
the reference of the ratios). Each round runs every model once, in an order rotated every round;
the median of the rounds is reported. Used for results/attention (MiniLM: original, head-reduced
and low-rank attention weights)."""
import json
import sys
import time

import numpy as np

from lrcompile.sessions import session

models = dict(a.split("=", 1) for a in sys.argv[3:])
first = next(iter(models))
ev = np.load(sys.argv[1])
sess = {k: session(v, ["CPUExecutionProvider"]) for k, v in models.items()}
out = {}
for b, rounds in ((1, 30), (16, 8)):
    feed = {k: ev[k][:b] for k in ev.files if not k.startswith("__")}
    names = {k: [i.name for i in s.get_inputs()] for k, s in sess.items()}
    for k, s in sess.items():
        s.run(None, {n: feed[n] for n in names[k]})
    times = {k: [] for k in sess}
    order = list(sess)
    for r in range(rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            sess[k].run(None, {n: feed[n] for n in names[k]})
            times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    out[f"b{b}"] = {k: {"ms": round(m, 2), "ratio": round(m / med[first], 3)} for k, m in med.items()}
print(json.dumps(out, indent=1))
with open(sys.argv[2], "w") as f:
    json.dump(out, f, indent=1)
