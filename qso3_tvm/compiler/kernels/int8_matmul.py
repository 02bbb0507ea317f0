"""The scalar-branch int8 Linears as TIR kernels, per target: the forward (`linear_func`: activation codes,
int8 x int8 -> int32 product, scale and bias in one pass over the rows) and the backward product
(`grad_product_func`). compiler.relax_import emits them for the custom operators of nn.ops.int8_linear, with
the weights packed at compile time (N padded with zero columns to the instruction's block):

  x86 + AVX-512 VNNI  vpdpbusd, u8 x s8: weights packed [N/16, K/4, 16, 4]; the activation codes
                      are shifted into u8 (a + 128) and 128·Σ_k w[k, n] is subtracted (exact)
  x86 + AVX2          vpsignb + vpmaddubsw + vpmaddwd, s8 x s8 (|a| · sign(a) w: pairs stay below
                      2^15, exact): weights packed [N/8, K/4, 8, 4]; the backward products take the
                      gradient's two code vectors as one int16 code (hi·254 + lo) on vpmaddwd, weights
                      widened to int16 and packed [N/8, K/2, 8, 2] (half the multiplies of two int8 products)
  arm64 + dotprod     sdot, s8 x s8: weights packed [N/4, K/4, 4, 4]
  arm64 (NEON only)   smull + sadalp, s8 x s8: same packing as sdot
  other CPUs          16-column int32 multiply-adds on the same packing
GPU targets keep torch._int_mm's generic matmul (nn.int8 without custom operators). M (rows: atoms or edges)
stays symbolic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .schedule import row_kernel


@dataclass(frozen=True)
class DotKernel:
    name: str  # what the manifest and reports call it
    intrin: str  # registered tensor intrinsic
    block_n: int  # output channels per instruction
    a_dtype: str  # activation dtype the instruction takes
    k_step: int = 4  # reduction elements per instruction and output channel
    w_dtype: str = "int8"  # weight dtype the instruction takes
    column_blocks: int = 1  # output blocks that share one activation load (the reduction loop inside them)


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
    if target_has_features("avx2", target):
        return DotKernel("x86-avx2-vpmaddubsw", register_avx2_intrin(), 8, "int8")
    return None


AVX2_INTRIN = "qso3_dot_8x4_i8i8i32_avx2"
AVX2_I16_INTRIN = "qso3_dot_8x2_i16i16i32_avx2"


def grad_kernel(kern: DotKernel | None) -> DotKernel | None:
    """The instruction of the backward products (grad_product_func, qkv_grad_func). On AVX2 one int16 code per gradient
    element (hi·254 + lo, |code| ≤ 32,385) on vpmaddwd: 2 multiplies per 32 MACs where the two int8 code vectors
    take 4, the same integers (int32 sums stay below 2^31 for up to 520 outputs). Elsewhere `kern`: VNNI, sdot and
    NEON multiply int8 at least twice as fast as int16."""
    if kern is not None and kern.intrin == AVX2_INTRIN:
        return DotKernel("x86-avx2-vpmaddwd", register_avx2_i16_intrin(), 8, "int16", k_step=2, w_dtype="int16",
                         column_blocks=8)
    return kern


def intrin_registered(name: str) -> bool:
    """Whether a tensor intrinsic of this name is registered (ours register once per process)."""
    from tvm.s_tir import TensorIntrin

    try:
        TensorIntrin.get(name)
        return True
    except ValueError:
        return False


def dot_desc(lanes: int, k: int, dtype: str):
    """The semantics of a signed dot intrinsic: C[i] += Σ_j A[j] B[i, j] in int32 (A (k,), B (lanes, k) of dtype)."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((k,), dtype, offset_factor=1), B: T.Buffer((lanes, k), dtype, offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:k], B[0:lanes, 0:k])
            T.writes(C[0:lanes])
            for i, j in T.grid(lanes, k):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    C[vi] = C[vi] + T.cast(A[vj], "int32") * T.cast(B[vi, vj], "int32")

    return desc


def register_avx2_intrin() -> str:
    """Register (once) an 8x4 s8·s8 -> i32 dot intrinsic for AVX2: C[i] += Σ_k A[k] B[i, k] as
    vpmaddubsw(|a|, sign(a)·b) (u8 × s8 pairs; |a| ≤ 128 and |b| ≤ 127 keep each pair sum below 2^15, so
    no saturation) then vpmaddwd with ones; returns its name."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    if intrin_registered(AVX2_INTRIN):
        return AVX2_INTRIN

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((8, 4), "int8", offset_factor=1),
             C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int8x32")
            b = B.vload([0, 0], dtype="int8x32")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b"), a, a, dtype="int8x32"),
                T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b"), b, a, dtype="int8x32"),
                dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.broadcast(T.int16(1), 16), dtype="int32x8")

    TensorIntrin.register(AVX2_INTRIN, dot_desc(8, 4, "int8"), impl)
    return AVX2_INTRIN


def register_avx2_i16_intrin() -> str:
    """Register (once) an 8x2 s16·s16 -> i32 dot intrinsic for AVX2: C[i] += A[0] B[i, 0] + A[1] B[i, 1] as one
    vpmaddwd (exact: each pair sum is below 2^31); returns its name."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    if intrin_registered(AVX2_I16_INTRIN):
        return AVX2_I16_INTRIN

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), "int16", offset_factor=1), B: T.Buffer((8, 2), "int16", offset_factor=1),
             C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:2], B[0:8, 0:2])
            T.writes(C[0:8])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), 8), dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a, B.vload([0, 0], dtype="int16x16"), dtype="int32x8")

    TensorIntrin.register(AVX2_I16_INTRIN, dot_desc(8, 2, "int16"), impl)
    return AVX2_I16_INTRIN


def pack_weights(w: np.ndarray, block_n: int, k_step: int = 4) -> np.ndarray:
    """w (K, N) -> [N/block_n, K/k_step, block_n, k_step]: one instruction's operand is contiguous."""
    k, n = w.shape
    return np.ascontiguousarray(w.T.reshape(n // block_n, block_n, k // k_step, k_step).transpose(0, 2, 1, 3))


def padded_columns(w: np.ndarray, block_n: int) -> np.ndarray:
    """w (K, N) with zero columns up to a multiple of the instruction's block (e.g. N = 20 radial
    basis functions in the radial filter's backward); the extra outputs are sliced off."""
    k, n = w.shape
    return np.concatenate([w, np.zeros((k, -n % block_n), w.dtype)], axis=1)


def linear_func(k: int, n: int, kern: DotKernel | None, qmin: int, qmax: int, zp: int, silu: bool = False):
    """One kernel for nn.int8.int8_linear: O (M, n') float32 from X (M, k) float32, M symbolic. Per row: the
    activation codes clamp(floor(X / s_x + 0.5), qmin, qmax) (of SiLU(X) with `silu`: the MLP's activation
    folded into the Linear after it) (stored as code - zp + 128 in u8 for VNNI, code - zp
    in s8 otherwise; `corr` = (that shift) · Σ_k W[k, :] is taken off the int32 sums, exactly), the product
    with the packed weight codes [n'/bn, k/4, bn, 4] (n' = n padded to the block) on the target's dot
    instruction, and O = (C - corr) · (s_x s_w) + b: quantize, int8 GEMM and dequantize in one pass, the
    codes and sums in the row's own buffers. Without a dot instruction (kern None): 16-column int32
    multiply-adds on the same packing."""
    from tvm import s_tir, tirx
    from tvm.script import tirx as T

    from .fast_math import fast_sigmoid_expr
    from .schedule import _vectorize_innermost

    bn, a_dtype = _operands(kern)
    shift = _u8_shift(kern) - zp
    npad = n + (-n % bn)
    act = (lambda x: x * fast_sigmoid_expr(tirx, x)) if silu else (lambda x: x)  # noqa: E731

    @T.prim_func(s_tir=True)
    def lin(x_h: T.handle, s_x: T.Buffer((1,), "float32"), w: T.Buffer((npad // bn, k // 4, bn, 4), "int8"),
            corr: T.Buffer((npad,), "int32"), scale: T.Buffer((npad,), "float32"), bias: T.Buffer((npad,), "float32"),
            o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        X = T.match_buffer(x_h, (m, k), "float32")
        O = T.match_buffer(o_h, (m, npad), "float32")
        for i in range(m):
            with T.sblock("row"):  # one row's codes and sums live in the row's own buffers
                r = T.axis.spatial(m, i)
                A = T.sblock_alloc_buffer((k,), a_dtype)
                C = T.sblock_alloc_buffer((npad,), "int32")
                for j in range(k):
                    with T.sblock("codes"):
                        vj = T.axis.spatial(k, j)
                        A[vj] = _activation_code(T, act(X[r, vj]), s_x[0], qmin, qmax, shift, a_dtype)
                for kk, j in T.grid(npad, k):
                    with T.sblock("C"):
                        vk, vj = T.axis.remap("SR", [kk, j])
                        with T.init():
                            C[vk] = 0
                        C[vk] = C[vk] + T.cast(A[vj], "int32") * T.cast(w[vk // bn, vj // 4, vk % bn, vj % 4], "int32")
                for kk in range(npad):
                    with T.sblock("out"):
                        vk = T.axis.spatial(npad, kk)
                        O[r, vk] = T.cast(C[vk] - corr[vk], "float32") * scale[vk] + bias[vk]

    sch = s_tir.Schedule(lin)
    _vectorize_innermost(sch, sch.get_loops(sch.get_sblock("codes"))[-1])
    _vectorize_innermost(sch, sch.get_loops(sch.get_sblock("out"))[-1])
    _schedule_product(sch, kern, bn)
    return row_kernel(sch.mod["main"], f"qso3_int8_linear_{k}x{n}" + ("_silu" if silu else "") + (f"_{kern.name}" if kern else ""))


def _activation_code(T, x, s_x, qmin: int, qmax: int, shift: int, a_dtype: str):
    """clamp(floor(x / s_x + 0.5), qmin, qmax) + shift as the instruction's operand type (PrimExprs; nn.int8.int8_linear)."""
    code = T.max(T.min(T.floor(x / s_x + T.float32(0.5)), T.float32(qmax)), T.float32(qmin))
    return T.cast(T.cast(code, "int32") + shift, a_dtype)


def linear_weights(w_codes_t: np.ndarray, s_x: float, s_w: np.ndarray, bias: np.ndarray, zp: int,
                   kern: DotKernel | None) -> list[np.ndarray]:
    """linear_func's constant inputs from the layer's weight codes (k, n) int8, steps and bias: s_x (1,),
    the packed weights, corr, s_x·s_w and the bias, padded to the instruction's block (float32 products
    rounded as torch rounds them in nn.int8.int8_linear)."""
    import torch

    bn, _ = _operands(kern)
    shift = _u8_shift(kern) - zp
    w = padded_columns(w_codes_t, bn)
    pad = w.shape[1] - w_codes_t.shape[1]
    scale = (torch.tensor(s_x, dtype=torch.float32) * torch.from_numpy(s_w.astype(np.float32))).numpy()
    return [np.array([s_x], np.float32), pack_weights(w, bn), (shift * w.astype(np.int32).sum(0)).astype(np.int32),
            np.pad(scale, (0, pad)), np.pad(bias.astype(np.float32), (0, pad))]


def emit_linear(bb, x, w_codes_t: np.ndarray, s_x: float, s_w: np.ndarray, bias: np.ndarray, bounds: tuple[int, int, int],
                kern: DotKernel | None, silu: bool = False):
    """Emit the call of linear_func for rows x (M, k): (M, n) float32. bounds: (qmin, qmax, zp); `silu`: of SiLU(x)."""
    from tvm import relax

    k, n = w_codes_t.shape
    qmin, qmax, zp = bounds
    func = linear_func(k, n, kern, qmin, qmax, zp, silu)
    consts = linear_weights(w_codes_t, s_x, s_w, bias, zp, kern)
    name = func.attrs["global_symbol"] + (f"_u{zp}" if zp else "")
    gv = bb.add_func(func, name)
    npad = consts[-1].shape[0]
    out = bb.emit(relax.call_tir(gv, [x, *map(relax.const, consts)], relax.TensorType([x.ty.shape[0], npad], "float32")))
    if npad != n:
        out = bb.emit(relax.op.strided_slice(out, axes=[1], begin=[0], end=[n]))
    return out


def qkv_linear_func(k: int, F: int, kern: DotKernel | None, qmin: int, qmax: int, zp: int):
    """One kernel for the three int8 Linears that read a layer's scalars s (q, k: F outputs, value: 2F): per row the
    codes of s at each Linear's own step, the products on the dot instruction (value as two segments of F outputs
    sharing its step) and the three outputs, scaled and biased, and s copied (nn.ops.int8_linear.int8_qkv_op).
    Weights packed per segment [4, F/bn, k/4, bn, 4]."""
    from tvm import s_tir
    from tvm.script import tirx as T

    from .schedule import _vectorize_innermost

    bn, a_dtype = _operands(kern)
    shift = _u8_shift(kern) - zp
    if F % bn or k % 4:
        raise ValueError(f"qkv_linear_func needs F = {F} a multiple of {bn} and k = {k} of 4")

    @T.prim_func(s_tir=True)
    def qkv(x_h: T.handle, s_x: T.Buffer((4,), "float32"), w: T.Buffer((4, F // bn, k // 4, bn, 4), "int8"),
            corr: T.Buffer((4, F), "int32"), scale: T.Buffer((4, F), "float32"), bias: T.Buffer((4, F), "float32"),
            q_h: T.handle, k_h: T.handle, v_h: T.handle, s_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        X = T.match_buffer(x_h, (m, k), "float32")
        Q = T.match_buffer(q_h, (m, F), "float32")
        K = T.match_buffer(k_h, (m, F), "float32")
        V = T.match_buffer(v_h, (m, 2 * F), "float32")
        S = T.match_buffer(s_h, (m, k), "float32")
        for i in range(m):
            with T.sblock("row"):
                r = T.axis.spatial(m, i)
                A = T.sblock_alloc_buffer((4, k), a_dtype)
                C = T.sblock_alloc_buffer((4, F), "int32")
                for j in range(k):
                    with T.sblock("copy"):
                        vj = T.axis.spatial(k, j)
                        S[r, vj] = X[r, vj]
                for g, j in T.grid(4, k):
                    with T.sblock("codes"):
                        vg, vj = T.axis.remap("SS", [g, j])
                        A[vg, vj] = _activation_code(T, X[r, vj], s_x[vg], qmin, qmax, shift, a_dtype)
                for g, kk, j in T.grid(4, F, k):
                    with T.sblock("C"):
                        vg, vk, vj = T.axis.remap("SSR", [g, kk, j])
                        with T.init():
                            C[vg, vk] = 0
                        C[vg, vk] = C[vg, vk] + T.cast(A[vg, vj], "int32") * T.cast(w[vg, vk // bn, vj // 4, vk % bn, vj % 4], "int32")
                for kk in range(F):
                    with T.sblock("out_q"):
                        vk = T.axis.spatial(F, kk)
                        Q[r, vk] = T.cast(C[0, vk] - corr[0, vk], "float32") * scale[0, vk] + bias[0, vk]
                for kk in range(F):
                    with T.sblock("out_k"):
                        vk = T.axis.spatial(F, kk)
                        K[r, vk] = T.cast(C[1, vk] - corr[1, vk], "float32") * scale[1, vk] + bias[1, vk]
                for kk in range(2 * F):
                    with T.sblock("out_v"):
                        vk = T.axis.spatial(2 * F, kk)
                        V[r, vk] = (T.cast(C[2 + vk // F, vk % F] - corr[2 + vk // F, vk % F], "float32") * scale[2 + vk // F, vk % F]
                                    + bias[2 + vk // F, vk % F])

    sch = s_tir.Schedule(qkv)
    _vectorize_innermost(sch, sch.get_loops(sch.get_sblock("codes"))[-1])
    for name in ("copy", "out_q", "out_k", "out_v"):
        _vectorize_innermost(sch, sch.get_loops(sch.get_sblock(name))[-1])
    _schedule_product(sch, kern, bn, code_vectors=True)
    return row_kernel(sch.mod["main"], f"qso3_int8_qkv_{k}x{F}" + (f"_{kern.name}" if kern else ""))


def qkv_weights(linears, zp: int, kern: DotKernel | None) -> list[np.ndarray]:
    """[(w_codes_t (k, n), s_x, s_w, bias)] of q, k, value -> qkv_linear_func's constants, each linear_weights'
    stacked over the segments q, k, value[:F], value[F:] (the step s_x as (4,))."""
    F = linears[0][0].shape[1]
    w_v, s_xv, s_wv, b_v = linears[2]
    halves = [(w_v[:, h * F:(h + 1) * F], s_xv, s_wv[h * F:(h + 1) * F], b_v[h * F:(h + 1) * F]) for h in (0, 1)]
    parts = [linear_weights(np.ascontiguousarray(w), s_x, s_w, b, zp, kern) for w, s_x, s_w, b in [*linears[:2], *halves]]
    return [np.concatenate([p[0] for p in parts])] + [np.stack([p[i] for p in parts]) for i in range(1, 5)]


def emit_qkv(bb, x, linears, bounds: tuple[int, int, int], kern: DotKernel | None):
    """Emit the call of qkv_linear_func for rows x (M, k): (q (M, F), k (M, F), value (M, 2F), x). linears: qkv_weights'."""
    from tvm import relax

    k, F = linears[0][0].shape
    func = qkv_linear_func(k, F, kern, *bounds)
    gv = bb.add_func(func, func.attrs["global_symbol"])
    m = x.ty.shape[0]
    outs = [relax.TensorType([m, n], "float32") for n in (F, F, 2 * F, k)]
    return bb.emit(relax.call_tir(gv, [x, *map(relax.const, qkv_weights(linears, bounds[2], kern))], outs))


def qkv_grad_func(k: int, F: int, kern: DotKernel | None, qmin: int, qmax: int):
    """One kernel for nn.ops.int8_linear.int8_qkv_grad_op: O (M, k') = G_x + Σ over q, k, value of grad_product_func's
    product (each Linear's own row step over its outputs, value's 2F as two segments of F, its own straight-through
    mask of X). Weights: each segment's W^T (F, k) packed [4, k'/bn, F/4, bn, 4], corrections (4, k'), steps s_w (4, F)
    and s_x (3,)."""
    from tvm import s_tir, tirx
    from tvm.script import tirx as T

    from .schedule import _vectorize_innermost

    kern = grad_kernel(kern)
    bn, a_dtype = _operands(kern)
    ks, w_dtype, parts = _grad_operands(kern)
    zp = _u8_shift(kern)
    kp = k + (-k % bn)
    if F % 16:
        raise ValueError(f"qkv_grad_func needs F = {F} a multiple of 16")
    mask = lambda x, s: _input_mask(tirx, x, s, qmin, qmax, False, None)  # noqa: E731
    tiny, levels = T.float32(1e-30), T.float32(127)

    @T.prim_func(s_tir=True)
    def qkv_grad(gq_h: T.handle, gk_h: T.handle, gv_h: T.handle, gx_h: T.handle, x_h: T.handle,
                 s_w: T.Buffer((4, F), "float32"), w: T.Buffer((4, kp // bn, F // ks, bn, ks), w_dtype),
                 corr: T.Buffer((4, kp), "int32"), s_x: T.Buffer((3,), "float32"), o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        Gq = T.match_buffer(gq_h, (m, F), "float32")
        Gk = T.match_buffer(gk_h, (m, F), "float32")
        Gv = T.match_buffer(gv_h, (m, 2 * F), "float32")
        Gx = T.match_buffer(gx_h, (m, k), "float32")
        X = T.match_buffer(x_h, (m, k), "float32")
        O = T.match_buffer(o_h, (m, kp), "float32")
        for i in range(m):
            with T.sblock("row"):
                r = T.axis.spatial(m, i)
                aq = T.sblock_alloc_buffer((1,), "float32")  # each Linear's row maximum (one writer per buffer)
                ak = T.sblock_alloc_buffer((1,), "float32")
                av = T.sblock_alloc_buffer((1,), "float32")
                A = T.sblock_alloc_buffer((4, parts, F), a_dtype)
                C = T.sblock_alloc_buffer((4, parts, kp), "int32")
                for j in range(F):
                    with T.sblock("amax_q"):
                        vj = T.axis.reduce(F, j)
                        with T.init():
                            aq[0] = T.min_value("float32")
                        aq[0] = T.max(aq[0], T.fabs(Gq[r, vj] * s_w[0, vj]))
                for j in range(F):
                    with T.sblock("amax_k"):
                        vj = T.axis.reduce(F, j)
                        with T.init():
                            ak[0] = T.min_value("float32")
                        ak[0] = T.max(ak[0], T.fabs(Gk[r, vj] * s_w[1, vj]))
                for j in range(2 * F):
                    with T.sblock("amax_v"):
                        vj = T.axis.reduce(2 * F, j)
                        with T.init():
                            av[0] = T.min_value("float32")
                        av[0] = T.max(av[0], T.fabs(Gv[r, vj] * s_w[2 + vj // F, vj % F]))
                for g, c, j in T.grid(4, parts, F):
                    with T.sblock("codes"):
                        vg, vc, vj = T.axis.remap("SSS", [g, c, j])
                        A[vg, vc, vj] = T.cast(T.cast(_code(T, T.if_then_else(
                            vg == 0, Gq[r, vj], T.if_then_else(vg == 1, Gk[r, vj], Gv[r, T.max(vg - 2, 0) * F + vj]))
                            * s_w[vg, vj] * (T.float32(1) / T.max(T.if_then_else(vg == 0, aq[0], T.if_then_else(vg == 1, ak[0], av[0])), tiny) * levels), vc, parts), "int32") + zp, a_dtype)
                for g, c, kk, j in T.grid(4, parts, kp, F):
                    with T.sblock("C"):
                        vg, vc, vk, vj = T.axis.remap("SSSR", [g, c, kk, j])
                        with T.init():
                            C[vg, vc, vk] = 0
                        C[vg, vc, vk] = C[vg, vc, vk] + T.cast(A[vg, vc, vj], "int32") * T.cast(
                            w[vg, vk // bn, vj // ks, vk % bn, vj % ks], "int32")
                for kk in range(kp):
                    with T.sblock("out"):
                        vk = T.axis.spatial(kp, kk)
                        O[r, vk] = (Gx[r, T.min(vk, k - 1)]
                                    + (_decoded(T, lambda c: C[0, c, vk] - corr[0, vk], parts)
                                       * (T.max(aq[0], tiny) / levels)) * mask(X[r, T.min(vk, k - 1)], s_x[0])
                                    + (_decoded(T, lambda c: C[1, c, vk] - corr[1, vk], parts)
                                       * (T.max(ak[0], tiny) / levels)) * mask(X[r, T.min(vk, k - 1)], s_x[1])
                                    + (_decoded(T, lambda c: C[2, c, vk] - corr[2, vk] + C[3, c, vk] - corr[3, vk], parts)
                                       * (T.max(av[0], tiny) / levels)) * mask(X[r, T.min(vk, k - 1)], s_x[2]))

    sch = s_tir.Schedule(qkv_grad)
    for name, width in (("amax_q", F), ("amax_k", F), ("amax_v", 2 * F)):  # row maxima in 16 lanes, then across them
        jo, ji = sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, 16])
        sch.vectorize(sch.get_loops(sch.rfactor(ji, 0))[-1])
    codes = sch.get_sblock("codes")
    for loop in sch.get_loops(codes)[-3:-1]:
        sch.unroll(loop)
    _vectorize_innermost(sch, sch.get_loops(codes)[-1])
    _vectorize_innermost(sch, sch.get_loops(sch.get_sblock("out"))[-1])
    _schedule_product(sch, kern, bn, code_vectors=True)
    return row_kernel(sch.mod["main"], f"qso3_int8_qkv_grad_{k}x{F}" + (f"_{kern.name}" if kern else ""))


def qkv_grad_weights(w_codes: list[np.ndarray], s_w: list[np.ndarray], kern: DotKernel | None) -> list[np.ndarray]:
    """qkv_grad_func's s_w (4, F), packed weights and corrections from the weight codes (k, n) and steps (n,) of q, k,
    value (value split into its two halves of F outputs)."""
    F = w_codes[0].shape[1]
    segs = [w_codes[0], w_codes[1], w_codes[2][:, :F], w_codes[2][:, F:]]
    packed = [grad_product_weights(np.ascontiguousarray(w), kern) for w in segs]
    steps = np.stack([s_w[0], s_w[1], s_w[2][:F], s_w[2][F:]]).astype(np.float32)
    return [steps, np.stack([p[0] for p in packed]), np.stack([p[1] for p in packed])]


def emit_qkv_grad(bb, grads, x, w_codes: list[np.ndarray], s_x: list[float], s_w: list[np.ndarray],
                  bounds: tuple[int, int], kern: DotKernel | None):
    """Emit the call of qkv_grad_func for the gradients (g_q, g_k, g_value, g_x) and the rows x (M, k): (M, k) float32."""
    from tvm import relax

    k, F = w_codes[0].shape
    func = qkv_grad_func(k, F, kern, *bounds)
    gv = bb.add_func(func, func.attrs["global_symbol"])
    steps, packed, corr = qkv_grad_weights(w_codes, s_w, kern)
    consts = [steps, packed, corr, np.array(s_x, np.float32)]
    out = bb.emit(relax.call_tir(gv, [*grads, x, *map(relax.const, consts)],
                                 relax.TensorType([x.ty.shape[0], corr.shape[1]], "float32")))
    if corr.shape[1] != k:
        out = bb.emit(relax.op.strided_slice(out, axes=[1], begin=[0], end=[k]))
    return out


def grad_product_func(n: int, k: int, kern: DotKernel | None, qmin: int, qmax: int, silu: bool):
    """One kernel for nn.ops.int8_linear.int8_grad_product_op: O (M, k') float32 from G (M, n) float32 (the gradient
    of a Linear's n outputs), its per-output steps s_w (n,), its weight codes and its input X (M, k) with step s_x,
    M symbolic. Per row: the step max |G ⊙ s_w| / 127, two int8 code vectors (hi, lo), both products with the weight
    codes in int32 and O = (acc_hi + acc_lo / 254) · step · mask (on AVX2 one int16 code hi·254 + lo, one product,
    O = acc / 254 · step · mask: grad_kernel), the straight-through mask of X (nn.int8.input_grad_mask:
    X / s_x within [qmin, qmax], of SiLU(X) times SiLU'(X) with `silu`). The codes and accumulators are one row long (the row block's own
    buffers). With a dot-product kernel the products are tensorized as in linear_func: the weights come as
    W^T (n, k) packed [k'/bn, n/4, bn, 4] (k' = k padded to the block), and u8 codes (+128) are corrected
    by `corr` = 128·Σ_j W^T[j, :]. Without one (kern None): the same packing with 16 columns, signed codes,
    corr = 0, int32 vector multiply-adds."""
    from tvm import s_tir, tirx
    from tvm.script import tirx as T

    from .fast_math import fast_sigmoid_expr
    from .schedule import _vectorize_innermost

    kern = grad_kernel(kern)
    bn, a_dtype = _operands(kern)
    ks, w_dtype, parts = _grad_operands(kern)
    zp = _u8_shift(kern)
    kp = k + (-k % bn)
    mask = lambda x, s: _input_mask(tirx, x, s, qmin, qmax, silu, fast_sigmoid_expr)  # noqa: E731

    @T.prim_func(s_tir=True)
    def gp(g_h: T.handle, s_w: T.Buffer((n,), "float32"), w: T.Buffer((kp // bn, n // ks, bn, ks), w_dtype),
           corr: T.Buffer((kp,), "int32"), x_h: T.handle, s_x: T.Buffer((1,), "float32"), o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        G = T.match_buffer(g_h, (m, n), "float32")
        X = T.match_buffer(x_h, (m, k), "float32")
        O = T.match_buffer(o_h, (m, kp), "float32")
        for i in range(m):
            with T.sblock("row"):  # one row's step, codes and accumulators live in the row's own buffers
                r = T.axis.spatial(m, i)
                amax = T.sblock_alloc_buffer((1,), "float32")
                inv = T.sblock_alloc_buffer((1,), "float32")
                A = T.sblock_alloc_buffer((parts, n), a_dtype)
                C = T.sblock_alloc_buffer((parts, kp), "int32")
                for j in range(n):
                    with T.sblock("amax"):
                        vj = T.axis.reduce(n, j)
                        with T.init():
                            amax[0] = T.min_value("float32")
                        amax[0] = T.max(amax[0], T.fabs(G[r, vj] * s_w[vj]))
                for z in range(1):
                    with T.sblock("inverse"):
                        vz = T.axis.spatial(1, z)
                        inv[vz] = T.float32(1) / T.max(amax[vz], T.float32(1e-30)) * T.float32(127)
                for c, j in T.grid(parts, n):
                    with T.sblock("codes"):
                        vc, vj = T.axis.remap("SS", [c, j])
                        A[vc, vj] = T.cast(T.cast(_code(T, G[r, vj] * s_w[vj] * inv[0], vc, parts),
                                                  "int32") + zp, a_dtype)
                for c, kk, j in T.grid(parts, kp, n):
                    with T.sblock("C"):
                        vc, vk, vj = T.axis.remap("SSR", [c, kk, j])
                        with T.init():
                            C[vc, vk] = 0
                        C[vc, vk] = C[vc, vk] + T.cast(A[vc, vj], "int32") * T.cast(w[vk // bn, vj // ks, vk % bn, vj % ks], "int32")
                for kk in range(kp):
                    with T.sblock("out"):
                        vk = T.axis.spatial(kp, kk)
                        O[r, vk] = (_decoded(T, lambda c: C[c, vk] - corr[vk], parts)
                                    * (T.max(amax[0], T.float32(1e-30)) / T.float32(127))) * mask(X[r, T.min(vk, k - 1)], s_x[0])

    sch = s_tir.Schedule(gp)
    if n % 16 == 0:  # the row maximum in 16 lanes, then across them
        jo, ji = sch.split(sch.get_loops(sch.get_sblock("amax"))[-1], [None, 16])
        sch.vectorize(sch.get_loops(sch.rfactor(ji, 0))[-1])
    codes = sch.get_sblock("codes")
    sch.unroll(sch.get_loops(codes)[-2])
    _vectorize_innermost(sch, sch.get_loops(codes)[-1])
    _vectorize_innermost(sch, sch.get_loops(sch.get_sblock("out"))[-1])
    _schedule_product(sch, kern, bn, code_vectors=True)
    name = f"qso3_int8_grad_product_{n}x{k}" + ("_silu" if silu else "") + (f"_{kern.name}" if kern else "")
    return row_kernel(sch.mod["main"], name)


def _input_mask(tir, x, s_x, qmin: int, qmax: int, silu: bool, sigmoid):
    """nn.int8.input_grad_mask of one input element (PrimExprs; `sigmoid`: fast_math.fast_sigmoid_expr)."""
    f = lambda c: tir.const(c, "float32")  # noqa: E731
    sig = sigmoid(tir, x) if silu else None
    u = (x * sig if silu else x) / s_x
    inside = tir.Select(tir.all(u >= f(qmin), u <= f(qmax)), f(1.0), f(0.0))
    return inside * (sig * (f(1.0) + x * (f(1.0) - sig))) if silu else inside


def _schedule_product(sch, kern: DotKernel | None, bn: int, code_vectors: bool = False) -> None:
    """Block "C" (per row: [code vector,] output column, reduction): output columns in blocks of bn, the reduction
    in the instruction's k_step (4 without one), tensorized with the dot instruction, with kern.column_blocks output
    blocks per reduction step (their sums stay in registers); without one (kern None), int32 multiply-adds over 16
    output columns per vector (vectorized before the reduction is split). `code_vectors`: a loop over code vectors
    before the columns, moved inside the weight block so that each weight block serves every code vector."""
    block = sch.get_sblock("C")
    *_, kk, j = sch.get_loops(block)
    vectors = [sch.get_loops(block)[-3]] if code_vectors else []
    ko, ki = sch.split(kk, [None, bn])
    jo, ji = sch.split(j, [None, kern.k_step if kern else 4])
    blocks = _column_blocks(sch.get(ko).extent.value, kern.column_blocks) if kern else 1
    if blocks > 1:  # `blocks` output blocks per step of the reduction: one activation load serves them all
        koo, koi = sch.split(ko, [None, blocks])
        sch.reorder(koo, jo, koi, *vectors, ki, ji)
    elif kern:
        sch.reorder(ko, jo, *vectors, ki, ji)
    else:
        sch.reorder(ko, jo, *vectors, ji, ki)
        sch.vectorize(ki)
    init = sch.decompose_reduction(block, jo)
    sch.vectorize(sch.get_loops(init)[-1])
    if kern:
        sch.tensorize(ki, kern.intrin)


def _column_blocks(n_blocks: int, most: int) -> int:
    """The largest divisor of n_blocks up to `most`."""
    return max(d for d in range(1, most + 1) if n_blocks % d == 0)


def _code(T, u, part, parts: int = 2):
    """Code `part` (0: hi, 1: lo) of u = g / step (PrimExprs, built while the kernel is parsed), or with parts = 1 the
    one int16 code hi·254 + lo. No clip: |u| ≤ 127 gives hi = floor(u + 0.5) in [-127, 127] and u - hi in
    [-0.5, 0.5), so lo in [-127, 127]."""
    hi = T.floor(u + T.float32(0.5))
    lo = T.floor((u - hi) * T.float32(254) + T.float32(0.5))
    return hi * T.float32(254) + lo if parts == 1 else T.if_then_else(part == 0, hi, lo)


def _decoded(T, acc, parts: int):
    """acc_hi + acc_lo / 254 in float from the int32 sums acc(c) of code vector c (PrimExprs), or acc(0) / 254 with one
    int16 code vector."""
    if parts == 1:
        return T.cast(acc(0), "float32") / T.float32(254)
    return T.cast(acc(0), "float32") + T.cast(acc(1), "float32") / T.float32(254)


def emit_grad_product(bb, g, s_w, w_codes_t: np.ndarray, kern: DotKernel | None, x, s_x: float, masking: tuple[int, int, bool]):
    """Emit the call of grad_product_func for gradient rows g (M, n), steps s_w (n,), weight codes w_codes_t (k, n)
    and the Linear's input rows x (M, k) with step s_x: (M, k) float32. masking: (qmin, qmax, silu)."""
    from tvm import relax

    k, n = w_codes_t.shape
    func = grad_product_func(n, k, kern, *masking)
    packed, corr = grad_product_weights(w_codes_t, kern)
    gv = bb.add_func(func, func.attrs["global_symbol"])
    args = [g, s_w, relax.const(packed), relax.const(corr), x, relax.const(np.array([s_x], np.float32))]
    out = bb.emit(relax.call_tir(gv, args,
                                 relax.TensorType([g.ty.shape[0], corr.shape[0]], "float32")))
    if corr.shape[0] != k:
        out = bb.emit(relax.op.strided_slice(out, axes=[1], begin=[0], end=[k]))
    return out


GENERIC_BLOCK = 16  # output columns per vector in linear_func and grad_product_func without a dot-product instruction


def grad_product_weights(w_codes_t: np.ndarray, kern: DotKernel | None) -> tuple[np.ndarray, np.ndarray]:
    """The packed W^T and the u8 correction of grad_product_func from w_codes_t (k, n) int8."""
    kern = grad_kernel(kern)
    bn, _ = _operands(kern)
    ks, w_dtype, _ = _grad_operands(kern)
    wt = padded_columns(np.ascontiguousarray(w_codes_t.T), bn)  # (n, k')
    return pack_weights(wt, bn, ks).astype(w_dtype), (_u8_shift(kern) * wt.astype(np.int32).sum(0)).astype(np.int32)


def _operands(kern: DotKernel | None) -> tuple[int, str]:
    """(output columns per instruction, activation code dtype) of the kernels with `kern`, or without one."""
    return (kern.block_n, kern.a_dtype) if kern else (GENERIC_BLOCK, "int8")


def _grad_operands(kern: DotKernel | None) -> tuple[int, str, int]:
    """(reduction step, weight dtype, code vectors per gradient row) of the backward products with `kern`
    (already grad_kernel's): two int8 code vectors, or one int16 code where the instruction takes int16."""
    if kern is None:
        return 4, "int8", 2
    return kern.k_step, kern.w_dtype, 1 if kern.a_dtype == "int16" else 2


def _u8_shift(kern: DotKernel | None) -> int:
    """What is added to signed codes so that an u8 x s8 instruction (VNNI) takes them: 128, else 0."""
    return 128 if kern and kern.a_dtype == "uint8" else 0

