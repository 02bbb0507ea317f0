"""Which roundings of a trained w8a8 model make its errors: groups of quantizers given a finer grid over the same
range (no retraining), on 100 rMD17 test frames (every 10th; LEE over 20 of them, every 50th).
Usage: QSO3_RMD17_DIR=... python reports/quantization/finer_grids.py MODEL DATA SPEC [SPEC ...]
SPEC: terms joined by "+": `none`; `a16` (every activation quantizer but the MDDQ magnitudes at 16 bits, same clamp
range: step × 127/32767); `mag16` (MDDQ magnitudes likewise); `a16:KEY` (the activation quantizers whose name holds
KEY, e.g. update.0.act); `mddqB` / `attB` (MDDQ direction / attention q̂, k̂ codes at B bits)."""
import sys

import numpy as np
import torch

from qso3_tvm.graph.datasets import load_rmd17
from qso3_tvm.graph.metrics import lee_metric
from qso3_tvm.nn.checkpoint import load_model
from qso3_tvm.nn.metrics import eager_forces_fn, predict
from qso3_tvm.nn.quant import LSQ, MDDQ, FixedGrid, direction_levels

torch.set_num_threads(1)
model_name, data, specs = sys.argv[1], sys.argv[2], sys.argv[3:]
test = load_rmd17(data, "test")
mols, lee_mols = test.subset(np.arange(0, 1000, 10)), test.subset(np.arange(0, 1000, 50))


def widen(lsq: LSQ, bits: int = 16) -> None:
    """The same clamp range on a 2^bits grid."""
    new_qmax = 2 ** (bits - 1) - 1 if lsq.signed else 2 ** bits - 1
    with torch.no_grad():
        lsq.step.mul_(lsq.qmax / new_qmax)
    lsq.qmax, lsq.qmin = new_qmax, (-new_qmax if lsq.signed else 0)


def apply(model, term: str) -> None:
    for name, m in model.named_modules():
        act = isinstance(m, LSQ) and not name.endswith("w_quant")
        mag = name.endswith("magnitude")
        picked = (term == "a16" and not mag) or (term == "mag16" and mag) or (term[:4] == "a16:" and term[4:] in name and not mag)
        if act and picked:
            widen(m)
        elif term.startswith("mddq") and isinstance(m, MDDQ):
            m.levels = direction_levels(int(term[4:]))
        elif term.startswith("att") and isinstance(m, FixedGrid):
            m.levels = direction_levels(int(term[3:]))


for spec in specs:
    model = load_model(model_name).eval()
    for term in spec.split("+"):
        if term != "none":
            apply(model, term)
    e, f = predict(model, mols)
    lee = lee_metric(eager_forces_fn(model), lee_mols, len(lee_mols))
    print(f"| {spec} | {np.abs(e - mols.energies).mean() * 1e3:.3f} | {np.abs(f - mols.forces).mean() * 1e3:.3f} | {lee:.3f} |",
          flush=True)
