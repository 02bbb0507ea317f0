"""The Relax module of a model: the one chain (export -> import -> our kernels) that compile, tune,
the reports and the tests build on.

    model -> deployable (int8 form)  -> export energy+forces (torch.export; symbolic sizes, or a bucket's)
          -> import to Relax (custom operators -> TIR kernels, the int8 ones for the target's dot instruction)
          -> an energy-only entry point

The module has two functions with the same inputs (graph.convention): `main` returns (energy, forces),
`energy` the energy alone: a copy of `main` without the backward pass (dead code removed), sharing its
kernels and weights.
"""

from __future__ import annotations

import copy

import tvm

from ..graph.convention import ENTRY_POINTS, Bucket, bucket_function
from ..nn.int8 import to_int8
from ..nn.ops import fuse_operators
from .export import export_energy_forces
from .kernels.int8_matmul import dot_kernel
from .kernels.schedule import parallel_rows
from .relax_import import import_to_relax
from .targets import TargetSpec


def deployable(model, spec: TargetSpec | None = None):
    """The module that gets exported: quantized models in their int8 form (int8 weights, int8 GEMMs;
    MDDQ and attention as our TIR operators on CPU targets, generic operators elsewhere); on CPU
    targets every model's messages and neighbor sums, its update around the MLP and its edge geometry as our
    fused TIR operators (nn.ops.messages, nn.ops.update, nn.ops.geometry)."""
    cpu = spec is None or spec.device == "cpu"
    if getattr(model, "quant_cfg", None) is not None:
        return to_int8(model, custom_ops=cpu, backward=int8_backward(spec))
    return fuse_operators(copy.deepcopy(model)) if cpu else model


def int8_backward(spec: TargetSpec | None) -> str:
    """How a quantized model's scalar-branch Linears compute input gradients on this target (nn.int8):
    int8 products on CPUs with an int8 dot-product instruction (kernels.int8_matmul), else float."""
    if spec is None:
        return "int8"
    return "int8" if spec.device == "cpu" and dot_kernel(spec.tvm_target()) is not None else "float"


def relax_module(model, spec: TargetSpec | None = None, bucket: Bucket | None = None, target=None, specialize=()):
    """The model's energy+forces graph as a Relax module, at symbolic sizes or a static bucket, with our
    kernels for the target (`spec`'s TVM target, or `target` when given, e.g. tuning's with num-cores);
    `specialize`: buckets that get static copies of the entry points (graph.convention.bucket_function)."""
    cpu = spec is None or spec.device == "cpu"
    target = target if target is not None else (spec.tvm_target() if spec is not None else None)
    ep = export_energy_forces(deployable(model, spec), bucket=bucket)
    mod = add_energy_entry(import_to_relax(ep, cpu_kernels=cpu, target=target))
    return parallel_rows(add_bucket_entries(mod, [Bucket.parse(b) for b in specialize]))


def add_bucket_entries(mod, buckets):
    """`mod` with copies of its entry points at each bucket's static sizes: the symbolic atom, edge and
    molecule counts (the leading sizes of species, src and mol_slots) bound to constants, so that TVM
    plans their memory at compile time and their kernels have static loops."""
    from tvm.relax.utils import copy_with_new_vars

    for bucket in buckets:
        for entry in ENTRY_POINTS:
            f = copy_with_new_vars(mod[entry])
            dims = [f.params[i].ty.shape[0] for i in (0, 3, 5)]
            if not all(isinstance(d, tvm.tirx.Var) for d in dims):
                raise ValueError(f"{entry} has static sizes already: cannot specialize it to bucket {bucket.text}")
            name = bucket_function(entry, bucket)
            f = f.bind_symbolic_vars(dict(zip(dims, bucket.as_list())))
            mod[name] = f.with_attr("global_symbol", name)
    return mod


def add_energy_entry(mod):
    """`mod` with an `energy` function: `main` (which ends in the tuple (energy, forces)) returning only
    the energy, so that the backward pass is dead code and is removed."""
    from tvm import relax
    from tvm.relax.utils import copy_with_new_vars

    f = copy_with_new_vars(mod["main"])
    *blocks, last_block = f.body.blocks
    *bindings, last = last_block.bindings
    if not (isinstance(last.value, relax.Tuple) and last.var.same_as(f.body.body)):
        raise ValueError("main must end in the tuple (energy, forces)")
    energy = last.value.fields[0]
    out = relax.Var("energy", energy.ty)
    body = relax.SeqExpr(blocks + [relax.DataflowBlock(bindings + [relax.VarBinding(out, energy)])], out)
    mod["energy"] = relax.Function(f.params, body, out.ty, f.is_pure, f.attrs).with_attr("global_symbol", "energy")
    return relax.transform.DeadCodeElimination(["main", "energy"])(mod)
