"""Per-round speed ratios of TVM int8 from one bench run: against our fp32 build and against the fastest other
route (eager, torch.compile, ONNX Runtime fp32/int8), median over rounds (min-max), as a markdown table.
Usage: python reports/compile/bench_ratios.py reports/bench/bench.json"""
import json
import sys

import numpy as np

d = json.load(open(sys.argv[1]))
R = {}
for r in d["results"]:
    if "round_medians_ms" in r:  # routes that ran
        R[(r["threads"], r["workload"], r["mode"], r["route"])] = np.array(r["round_medians_ms"])
others = ["eager-fp32", "compile-fp32", "ort-fp32", "ort-int8"]
print("| threads | workload | mode | int8 ms | fp32/int8 (per-round median, min–max) | best other | best other/int8 |")
print("|---|---|---|---|---|---|---|")
for t in (1, 2):
    for w in ("ethanol-b1", "aspirin-b1", "qm9-b32", "qm9-b256"):
        for m in ("E", "E+F"):
            i8 = R.get((t, w, m, "tvm-int8"))
            if i8 is None:
                continue
            f = R[(t, w, m, "tvm-fp32")] / i8
            best = min(others, key=lambda o: np.median(R[(t, w, m, o)]) if (t, w, m, o) in R else 1e99)
            b = R[(t, w, m, best)] / i8
            spread = lambda x: f"{np.median(x):.2f} ({x.min():.2f}–{x.max():.2f})"  # noqa: E731
            print(f"| {t} | {w} | {m} | {np.median(i8):.3g} | {spread(f)} | {best} | {spread(b)} |")
