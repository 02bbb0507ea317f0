"""Per-call time of compiled artifacts on one molecule, side by side in one process (calls interleaved
round by round, so machine load hits them alike), energy and forces, including the neighbor list and
padding as MD pays them (CompiledModel.energy_forces).
Usage: TVM_NUM_THREADS=1 python reports/precision_modes/speed.py DATA ARTIFACT [ARTIFACT ...]
(DATA: an rMD17 name; frame 0 of its test split)."""
import sys
import time

import numpy as np

from qso3_tvm.graph.datasets import load_dataset
from qso3_tvm.runtime.compiled import CompiledModel

data, paths = sys.argv[1], sys.argv[2:]
mols = load_dataset(data, split="test")
z, x = mols.frame(0)
models = [CompiledModel(p) for p in paths]
for m in models:
    for _ in range(20):
        m.energy_forces(z, x)
times = [[] for _ in models]
for _ in range(30):  # rounds
    for m, t in zip(models, times):
        t0 = time.perf_counter()
        for _ in range(20):
            m.energy_forces(z, x)
        t.append((time.perf_counter() - t0) / 20)
print("| artifact | precision | median ms per call | p10 | p90 |")
print("|---|---|---|---|---|")
for p, m, t in zip(paths, models, times):
    ms = 1e3 * np.array(t)
    print(f"| {p} | {m.manifest['model']['precision']} | {np.median(ms):.3f} | {np.percentile(ms, 10):.3f} | "
          f"{np.percentile(ms, 90):.3f} |")
