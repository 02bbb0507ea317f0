"""Kernel calls (R.call_tir after fusion) of the energy+forces graph: generic int8 graph vs ours.
Usage: python reports/compile/kernel_calls.py ethanol-int8 | ethanol-fp32"""
import sys, re, tvm
from tvm import relax
from qso3_tvm.checkpoint import load_model
from qso3_tvm.compile import deployable
from qso3_tvm.export import export_energy_forces
from qso3_tvm.relax_frontend import import_to_relax
from qso3_tvm.kernels.pipeline import apply_kernels
from qso3_tvm.int8 import to_int8
from qso3_tvm.targets import resolve_target
t = resolve_target("x86-avx512").tvm_target()
m = load_model(sys.argv[1])
def calls(mod):
    with t:
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    return len(re.findall(r"R\.call_tir\(", mod["main"].script()))
if getattr(m, "quant_cfg", None) is not None:
    print("generic int8 (no custom ops, no kernels):", calls(import_to_relax(export_energy_forces(to_int8(m, custom_ops=False)))))
print("ours:", calls(apply_kernels(import_to_relax(export_energy_forces(deployable(m))), t)[0]))
