"""int8 x int8 -> int32 matrix products with constant (weight) right-hand sides, per target.

The exported graph carries `R.matmul(a_int8 (M, K), w_int8 (K, N), out_dtype="int32")` (from
torch._int_mm in nn.int8). `rewrite_int8_matmuls` replaces each one whose weights are a
constant by a call to a tensorized TIR kernel, packing the weights at compile time:

  x86 + AVX-512 VNNI  vpdpbusd, u8 x s8: weights packed [N/16, K/4, 16, 4]; the activation codes
                      are shifted into u8 (a + 128) and 128·Σ_k w[k, n] is subtracted (exact)
  arm64 + dotprod     sdot, s8 x s8: weights packed [N/4, K/4, 4, 4]
  arm64 (NEON only)   smull + sadalp, s8 x s8: same packing as sdot
Other targets keep the generic matmul. M (rows: atoms or edges) stays symbolic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DotKernel:
    name: str  # what the manifest and reports call it
    intrin: str  # registered tensor intrinsic
    block_n: int  # output channels per instruction
    a_dtype: str  # activation dtype the instruction takes


def dot_kernel(target) -> DotKernel | None:
    """The int8 dot-product instruction this target has, if we have a kernel for it."""
    from tvm.target.codegen import target_has_features

    if target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "")) or "x86_64"
    if triple.startswith("aarch64"):
        from tvm.s_tir.tensor_intrin.arm_cpu import ARM_DOT_4x4_i8_NEON_INTRIN, ARM_DOT_4x4_i8_SDOT_INTRIN

        if target_has_features("dotprod", target):
            return DotKernel("arm-sdot", ARM_DOT_4x4_i8_SDOT_INTRIN, 4, "int8")
        return DotKernel("arm-neon-smull", ARM_DOT_4x4_i8_NEON_INTRIN, 4, "int8")
    if target_has_features("avx512vnni", target):
        from ..tvm_fixes import register_vnni_intrin

        return DotKernel("x86-vnni-vpdpbusd", register_vnni_intrin(), 16, "uint8")
    return None


def pack_weights(w: np.ndarray, block_n: int) -> np.ndarray:
    """w (K, N) -> [N/block_n, K/4, block_n, 4]: one instruction's operand is contiguous."""
    k, n = w.shape
    return np.ascontiguousarray(w.T.reshape(n // block_n, block_n, k // 4, 4).transpose(0, 2, 1, 3))


def matmul_func(k: int, n: int, kern: DotKernel):
    """Scheduled, tensorized PrimFunc C (M, N) int32 = A (M, K) · W_packed, M symbolic."""
    from tvm import s_tir
    from tvm.script import tirx as T

    bn = kern.block_n

    @T.prim_func(s_tir=True)
    def mm(a: T.handle, w: T.Buffer((n // bn, k // 4, bn, 4), "int8"), c: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        A = T.match_buffer(a, (m, k), kern.a_dtype)
        C = T.match_buffer(c, (m, n), "int32")
        for i, j, r in T.grid(m, n, k):
            with T.sblock("C"):
                vi, vj, vr = T.axis.remap("SSR", [i, j, r])
                with T.init():
                    C[vi, vj] = 0
                C[vi, vj] = C[vi, vj] + T.cast(A[vi, vr], "int32") * T.cast(w[vj // bn, vr // 4, vj % bn, vr % 4], "int32")

    sch = s_tir.Schedule(mm)
    block = sch.get_sblock("C")
    i, j, r = sch.get_loops(block)
    jo, ji = sch.split(j, [None, bn])
    ro, ri = sch.split(r, [None, 4])
    sch.reorder(i, jo, ro, ji, ri)
    init = sch.decompose_reduction(block, ro)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ji, kern.intrin)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def supported(k: int, n: int, kern: DotKernel) -> bool:
    return k % 4 == 0 and n % kern.block_n == 0


def rewrite_int8_matmuls(mod, target):
    """Replace int8 matmuls with constant weights by the target's tensorized kernel.
    Returns (module, number rewritten, kernel name or None)."""
    from tvm import relax

    kern = dot_kernel(target)
    if kern is None:
        return mod, 0, None

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.count, self.funcs = 0, {}

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not _is_int8_weight_matmul(call):
                return call
            w = call.args[1].value.numpy()
            k, n = w.shape
            if not supported(k, n, kern):
                return call
            self.count += 1
            return self.emit_kernel(call.args[0], w, k, n)

        def emit_kernel(self, a, w, k, n):
            bb = self.builder_
            if (k, n) not in self.funcs:
                name = f"qso3_int8_matmul_{k}x{n}"
                self.funcs[(k, n)] = bb.add_func(matmul_func(k, n, kern).with_attr("global_symbol", name), name)
            if kern.a_dtype == "uint8":  # u8 x s8: a + 128 in u8, then subtract 128·Σw
                a = bb.emit(relax.op.astype(relax.op.add(relax.op.astype(a, "int16"), relax.const(128, "int16")), "uint8"))
            packed = relax.const(pack_weights(w, kern.block_n))
            out = bb.emit(relax.call_tir(self.funcs[(k, n)], [a, packed], relax.TensorType([a.ty.shape[0], n], "int32")))
            if kern.a_dtype == "uint8":
                colsum = (128 * w.astype(np.int32).sum(0)).astype(np.int32)
                out = relax.op.subtract(out, relax.const(colsum))
            return out

    rw = Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    return rw.builder_.get(), rw.count, kern.name


def _is_int8_weight_matmul(call) -> bool:
    import tvm

    return (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"
            and isinstance(call.args[1], tvm.ir.Constant) and str(call.args[1].value.dtype) == "int8"
            and len(call.args[1].value.shape) == 2 and str(call.attrs.out_dtype) == "int32")
