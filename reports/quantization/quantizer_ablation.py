"""Which quantizers a w8a8 model's accuracy rests on: each group of quantizers switched off at evaluation
(no retraining), on 100 rMD17 ethanol test frames (every 10th), against the labels and against ethanol-fp32.
Usage: QSO3_RMD17_DIR=... python reports/quantization/quantizer_ablation.py MODEL"""
import sys

import numpy as np
import torch

from qso3_tvm.graph.datasets import load_rmd17
from qso3_tvm.nn.checkpoint import load_model
from qso3_tvm.nn.metrics import predict
from qso3_tvm.nn.quant import quantizers

torch.set_num_threads(1)
mols = load_rmd17("ethanol", "test").subset(np.arange(0, 1000, 10))
e_fp, f_fp = predict(load_model("ethanol-fp32").eval(), mols)


def run(tag, off):
    m = load_model(sys.argv[1]).eval()
    for name, q, _ in quantizers(m):
        q.enabled = not off(name)
    e, f = predict(m, mols)
    print(f"{tag:28s} E {np.abs(e - mols.energies).mean() * 1e3:.3f} F {np.abs(f - mols.forces).mean() * 1e3:.3f} | "
          f"vs fp32 E {np.abs(e - e_fp).mean() * 1e3:.3f} F {np.abs(f - f_fp).mean() * 1e3:.3f}", flush=True)


act = lambda n: not n.endswith("w_quant")  # noqa: E731
run("all on", lambda n: False)
run("weights off", lambda n: n.endswith("w_quant"))
run("all activations off", act)
run("mddq off", lambda n: "hooks.vector" in n)
run("attention grid off", lambda n: "hooks.query" in n or "hooks.key" in n)
for key in ("q.act", "k.act", "value.act", "filter.0.act", "filter.2.act", "update.0.act", "update.2.act"):
    run(key + " off", lambda n, key=key: key in n and act(n))
for layer in range(6):
    run(f"layer {layer} activations off", lambda n, layer=layer: n.startswith(f"layers.{layer}.") and act(n))
