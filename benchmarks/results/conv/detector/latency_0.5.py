import json, sys
sys.path.insert(0, "benchmarks")
from conv_detector import pictures
from lrcompile.latency import measure
from lrcompile.sessions import session
x = pictures(48, seed=2)[:1]
runs = {n: (session(p), {"images": x}) for n, p in [("original", "/tmp/dd/whl/ddddocr/common_det.onnx")] +
        [(f, f"/tmp/cv/detector/models/{f}_0.5.onnx") for f in ("lowrank", "tucker2", "spatial")]}
ms = measure(runs, repeats=15, budget_s=2.0)
print(json.dumps({k: v / ms["original"] for k, v in ms.items()} | {"original_ms": ms["original"]}))
