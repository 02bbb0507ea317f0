"""Where an artifact's time goes: seconds per kernel (by name, numbered copies summed) of one entry point
on a bench input, from the VM's instrument hook (1 thread unless TVM_NUM_THREADS says otherwise).
Usage: python reports/compile/profile_kernels.py ARTIFACT INPUTS.npz [main|energy] [RUNS]
(INPUTS.npz: a bench work dir's inputs/WORKLOAD_*.npz, written by `qso3-tvm bench`)."""
import collections
import re
import sys
import time

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from qso3_tvm.graph.convention import pad_to_specialized
from qso3_tvm.runtime.compiled import CompiledModel

artifact, inputs = sys.argv[1], np.load(sys.argv[2])
entry = sys.argv[3] if len(sys.argv) > 3 else "main"
runs = int(sys.argv[4]) if len(sys.argv) > 4 else 5
model = CompiledModel(artifact)
arrays = [inputs[f"g_{k}"] for k in ("species", "pos", "mol", "src", "dst")] + [np.zeros(int(inputs["g_n_mol"]), np.float32)]
args = [tvm.runtime.tensor(a, model.device) for a in pad_to_specialized(arrays, model.manifest, model.cutoff)]
name = model.function(entry, args)
vm = VirtualMachine(model.library, model.device)
for _ in range(3):
    vm[name](*args)
times = []
for _ in range(runs):
    t0 = time.perf_counter()
    vm[name](*args)
    times.append(time.perf_counter() - t0)
print(f"{name}: median {1e3 * np.median(times):.2f} ms per call (uninstrumented, {runs} calls)")

spent, calls, start = collections.Counter(), collections.Counter(), {}


def instrument(func, symbol, before, ret, *rest):
    symbol = re.sub(r"\d+$", "", str(symbol))
    if before:
        start[symbol] = time.perf_counter()
    else:
        spent[symbol] += time.perf_counter() - start[symbol]
        calls[symbol] += 1
    return 0


vm.set_instrument(instrument)
for _ in range(runs):
    vm[name](*args)
kernels = sum(c for s, c in calls.items() if not s.startswith("vm.builtin")) // runs
print(f"instrumented: {1e3 * sum(spent.values()) / runs:.2f} ms, {kernels} kernel calls per call")
for symbol, seconds in spent.most_common(30):
    print(f"{1e3 * seconds / runs:9.3f} ms {calls[symbol] // runs:5d}  {symbol[:150]}")
