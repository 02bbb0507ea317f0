"""The Relax module of a model: the one chain (export -> import -> our kernels) that compile, tune,
the reports and the tests build on.

    model -> deployable (int8 form)  -> export energy+forces (torch.export; symbolic sizes, or a bucket's)
          -> import to Relax (custom operators -> TIR) -> our int8 GEMM kernels for the target
"""

from __future__ import annotations

from ..graph.convention import Bucket
from ..nn.int8 import to_int8
from .export import export_energy_forces
from .kernels.pipeline import apply_kernels
from .relax_import import import_to_relax
from .targets import TargetSpec


def deployable(model, spec: TargetSpec | None = None):
    """The module that gets exported: quantized models in their int8 form (int8 weights, int8 GEMMs;
    MDDQ and attention as our TIR operators on CPU targets, generic operators elsewhere)."""
    if getattr(model, "quant_cfg", None) is None:
        return model
    return to_int8(model, custom_ops=spec is None or spec.device == "cpu")


def relax_module(model, spec: TargetSpec | None = None, bucket: Bucket | None = None, target=None):
    """The model's energy+forces graph as a Relax module, at symbolic sizes or a static bucket, with our
    kernels for the target (`spec`'s TVM target, or `target` when given, e.g. tuning's with num-cores)."""
    mod = import_to_relax(export_energy_forces(deployable(model, spec), bucket=bucket))
    target = target if target is not None else (spec.tvm_target() if spec is not None else None)
    if target is not None:
        mod, _ = apply_kernels(mod, target)
    return mod
