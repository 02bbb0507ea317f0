"""How much of a model's error is orientation noise: predictions on 100 rMD17 ethanol test frames (every 10th),
each under K random rotations; the error of one rotation against the error of the rotation average.
Usage: QSO3_RMD17_DIR=... python reports/quantization/rotation_noise.py MODEL [K]"""
import sys

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from qso3_tvm.graph.datasets import load_rmd17
from qso3_tvm.nn.checkpoint import load_model
from qso3_tvm.nn.metrics import predict

torch.set_num_threads(1)
name, K = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8
model = load_model(name).eval()
mols = load_rmd17("ethanol", "test").subset(np.arange(0, 1000, 10))
n = np.diff(mols.offsets)[0]
rng = np.random.default_rng(0)
E, F = [], []
for _ in range(K):
    R = Rotation.random(random_state=rng).as_matrix()
    m = mols.subset(np.arange(len(mols)))
    pos = m.positions.reshape(len(m), n, 3)
    m.positions = ((pos - pos.mean(1, keepdims=True)) @ R.T).reshape(-1, 3)
    e, f = predict(model, m)
    E.append(e)
    F.append(f @ R)  # back to the original frame
E, F = np.array(E), np.array(F)
print(f"{name}: E MAE one rotation {np.abs(E - mols.energies).mean() * 1e3:.3f} meV, rotation average "
      f"{np.abs(E.mean(0) - mols.energies).mean() * 1e3:.3f}, std over rotations {E.std(0).mean() * 1e3:.3f}")
print(f"F MAE one rotation {np.abs(F - mols.forces).mean() * 1e3:.3f} meV/Å, rotation average "
      f"{np.abs(F.mean(0) - mols.forces).mean() * 1e3:.3f}, mean |deviation from the average| {np.abs(F - F.mean(0)).mean() * 1e3:.3f}")
