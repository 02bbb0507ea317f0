"""Compiled int8 vs PyTorch int8 on 32 H/C/O QM9 molecules of 16-20 atoms (needs `pip install qm9pack`).
Usage: python reports/compile/qm9_parity.py ARTIFACT_DIR [ARTIFACT_DIR ...] (artifacts of ethanol-int8)."""
import sys

import numpy as np

from qso3_tvm.nn.checkpoint import load_model
from qso3_tvm.graph.datasets import load_qm9
from qso3_tvm.graph.molecules import MoleculeSet
from qso3_tvm.nn.metrics import predict
from qso3_tvm.runtime.compiled import CompiledModel

mols = load_qm9()
order = np.random.default_rng(0).permutation(len(mols))[:3000]
idx = [i for i in order if set(mols.frame(int(i))[0].tolist()) <= {1, 6, 8} and 16 <= len(mols.frame(int(i))[0]) <= 20][:32]
sub = MoleculeSet.from_molecules([mols.frame(int(i)) for i in idx])
e0, f0 = predict(load_model("ethanol-int8"), sub)
for artifact in sys.argv[1:]:
    e1, f1 = CompiledModel(artifact).predict(sub)
    de = np.abs(e1 - e0) * 1e3
    print(f"{artifact}: max |dE| {de.max():.1f} meV, max |dF| {np.abs(f1 - f0).max() * 1e3:.1f} meV/Å, "
          f"molecules with |dE| > 1 meV: {int((de > 1).sum())} of {len(idx)}")
