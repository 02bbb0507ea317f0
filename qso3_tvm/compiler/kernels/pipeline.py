"""Where the hand-written kernels and schedules enter the build.

    imported Relax module (our custom operators already TIR kernels: compiler.relax_import)
      -> [MetaSchedule database]   compiler.tuning, tuned builds only
      -> legalize, fuse            TVM's CPU pipeline (exp, sigmoid: kernels.fast_math)
      -> default CPU schedules     every fused kernel nobody scheduled (kernels.schedule)
         or GPU schedules          dlight's rules, tolerant of rules that raise (kernels.gpu)
      -> lower, build              CUDA device code compiled to a fatbin at export (kernels.gpu)
"""

from __future__ import annotations


def kernel_summary(target) -> dict:
    """How the quantized operators run on this target (recorded in manifest.json)."""
    from .int8_matmul import dot_kernel, grad_kernel

    kern = dot_kernel(target)
    backward = grad_kernel(kern)
    cpu = target.kind.name == "llvm"
    return {
        "scalar_linears": ("int8 x int8 -> int32, one TIR kernel per Linear (qso3_int8_linear: activation codes, product, "
                           f"scale and bias in one pass; {kern.name if kern else 'int32 multiply-adds, no int8 dot instruction on this target'}), "
                           "weights packed at compile time; an MLP's SiLU folded into the Linear after it; a layer's q, k and "
                           "value Linears as one kernel (qso3_int8_qkv)") if cpu
                          else "int8 x int8 -> int32, generic relax matmul",
        "vector_linears": "int8 weights dequantized to float (inputs are MDDQ-decoded vectors)",
        "mddq": "custom TIR operators qso3_mddq / qso3_mddq_backward" if cpu else "generic operators",
        "attention": "custom TIR operators qso3_l2_attention / qso3_l2_attention_backward (int8 q̂·k̂ codes, int32 dot, "
                     "temperature, segment softmax with sink)" if cpu else "generic operators",
        "messages": "custom TIR operators qso3_messages / qso3_messages_backward (gather, messages and neighbor "
                    "sums in one pass over the edges, heads on the thread pool from 2048 edges)"
                    if cpu else "generic operators",
        "update": "custom TIR operators qso3_residual_norms / qso3_gated_update and their backwards (residual sums, l=1 "
                  "channel mix, norms, gated mixing: one pass per atom each)" if cpu else "generic operators",
        "radial_filter": "once per pair of edges i -> j, j -> i (qso3_edge_pairs ranks the pairs; the messages read φ of "
                         "their pair, its gradient summed per pair): half the filter work" if cpu else "once per edge",
        "geometry": "custom TIR operators qso3_edge_geometry / qso3_edge_geometry_backward (unit vectors, cutoff, radial "
                    "basis per edge; forces back to atoms in one pass)" if cpu else "generic operators",
        "forces": "straight-through backward; the scalar-branch Linears' input gradients as int8 products (gradient "
                  f"rows as two int8 code vectors, nn.int8.int8_grad_product: qso3_int8_grad_product, {backward.name}"
                  + (" with the two codes as one int16 code, the same sums" if backward != kern else "") + ", "
                  "the input's straight-through mask in the same kernel), the rest in float" if kern and cpu else
                  "float backward with straight-through semantics (equals the QAT model's autograd forces)",
        "schedules": "default CPU rule (kernels.schedule) for unscheduled fused kernels"
                     if cpu else "dlight GPU rules (kernels.gpu)",
        **({"device_code": f"fatbin for {target.arch} + PTX, compiled at export with nvcc (no compiler on the board)"}
           if target.kind.name == "cuda" else {}),
    }


def fuse_passes(target) -> list:
    """Legalize and fuse, as TVM's pipeline for the target does before scheduling (GPU targets legalize
    scatter_elements to a thread-bound kernel, CPU targets exp and sigmoid to vectorizable fast_exp):
    the fused kernels are what schedules and tuning see."""
    from tvm import relax

    legalize_map = None
    if target.kind.name == "cuda":
        from .gpu import GPU_LEGALIZE as legalize_map
    elif target.kind.name == "llvm":
        from .fast_math import CPU_LEGALIZE as legalize_map
    return [relax.transform.LegalizeOps(legalize_map), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]


def fused(mod, target):
    """The module legalized and fused for the target (`fuse_passes`), nothing scheduled."""
    import tvm

    with target:
        return tvm.transform.Sequential(fuse_passes(target))(mod)


def backend_pipeline(target, backend, legalize):
    """TVM's pipeline of a backend module (tvm.relax.backend.<cpu_generic|cuda>.pipeline) with
    `legalize(target)` (legalize, fuse, schedule passes) in place of its own legalize step."""
    import tvm

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            seq = (backend.library_dispatch_passes(target) + legalize(target) + backend.dataflow_lower_passes(target)
                   + backend.finalize_passes(target))
            return tvm.transform.Sequential(seq)(mod)

    return _pipeline


def relax_pipeline(target):
    """TVM's default pipeline for the target, with our default CPU or GPU schedules after fusion."""
    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as cuda

        from .gpu import default_gpu_schedule

        return backend_pipeline(target, cuda, lambda t: fuse_passes(t) + [default_gpu_schedule(t)])
    if target.kind.name != "llvm":
        return "default"
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from .schedule import default_cpu_schedule

    return backend_pipeline(target, cpu, lambda t: fuse_passes(t) + [default_cpu_schedule(t)])
