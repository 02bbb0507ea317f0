"""Kernel calls (R.call_tir after fusion) of the energy+forces graph: generic int8 graph vs ours. These are call sites
in the symbolic main function after fusion (x86-avx512), not the kernels one call runs (ethanol-int8, 2026-12-03: 367
here against 137 run per E+F call): for those use profile_kernels.py (the VM's instrument hook on an artifact).
Usage: python reports/compile/kernel_calls.py ethanol-int8 | ethanol-fp32"""
import re
import sys

from qso3_tvm.compiler.export import export_energy_forces
from qso3_tvm.compiler.kernels.pipeline import fused
from qso3_tvm.compiler.module import relax_module
from qso3_tvm.compiler.relax_import import import_to_relax
from qso3_tvm.compiler.targets import resolve_target
from qso3_tvm.nn.checkpoint import load_model
from qso3_tvm.nn.int8 import to_int8

spec = resolve_target("x86-avx512")
t = spec.tvm_target()
m = load_model(sys.argv[1])


def calls(mod):
    return len(re.findall(r"R\.call_tir\(", fused(mod, t)["main"].script()))


if getattr(m, "quant_cfg", None) is not None:
    print("generic int8 (no custom ops, no kernels):", calls(import_to_relax(export_energy_forces(to_int8(m, custom_ops=False)))))
print("ours:", calls(relax_module(m, spec)))
