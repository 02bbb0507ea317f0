"""Accuracy of the int8 backward products (nn.int8.int8_grad_product) against the float backward, eager
PyTorch, bundled ethanol-int8 on the rMD17 ethanol test split.
Usage: QSO3_RMD17_DIR=... python reports/compile/int8_backward_accuracy.py [FRAMES]"""
import json
import sys

import numpy as np
import torch

from qso3_tvm.graph.datasets import load_dataset
from qso3_tvm.nn.checkpoint import load_model
from qso3_tvm.nn.int8 import to_int8
from qso3_tvm.nn.metrics import evaluate_model, predict

torch.set_num_threads(1)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
mols = load_dataset("ethanol", split="test")
mols = mols.subset(range(min(n, len(mols))))
model = load_model("ethanol-int8")
for backward in ("float", "int8"):
    print(backward, json.dumps(evaluate_model(to_int8(model, backward=backward), mols, lee_frames=100)), flush=True)
few = mols.subset(range(min(100, len(mols))))
_, f_float = predict(to_int8(model, backward="float"), few)
_, f_int8 = predict(to_int8(model, backward="int8"), few)
print("max / mean |dF| meV/A", 1e3 * np.abs(f_float - f_int8).max(), 1e3 * np.abs(f_float - f_int8).mean())
