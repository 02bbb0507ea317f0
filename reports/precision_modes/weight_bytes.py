"""Weight bytes of the four precisions (reports/precision_modes.md): stored weights at their bit width
(nn.quant.weight_bytes), the tensors of the deployed form (nn.int8.int8_weight_bytes: what compile
records as stored_weight_bytes) and the checkpoint file size.

    python reports/precision_modes/weight_bytes.py ethanol-fp32 ethanol-int8 /work/runs/ethanol_int8_float_head.pt ethanol-w8
"""

import sys

from qso3_tvm.compiler.module import deployable
from qso3_tvm.nn.checkpoint import load_model, precision, resolve_model_path
from qso3_tvm.nn.int8 import int8_weight_bytes
from qso3_tvm.nn.quant import weight_bytes

print("| model | precision | weight bytes | deployed tensor bytes | checkpoint file bytes |")
print("|---|---|---|---|---|")
for spec in sys.argv[1:]:
    model = load_model(spec)
    print(f"| {spec} | {precision(model)} | {weight_bytes(model):,} | {int8_weight_bytes(deployable(model)):,} | "
          f"{resolve_model_path(spec).stat().st_size:,} |")
