"""Robust (L2-normalized) attention as one TIR kernel (N, E symbolic; H, d static): per-atom int8 codes
of q̂ and k̂, int8 dot products with int32 accumulation, temperature, and the cutoff-weighted segment
softmax with its sink. It implements the torch operator of nn.ops.attention (the numerics are
defined there) and replaces it at import (compiler.relax_import.CONVERTERS)."""

from __future__ import annotations

from ...nn.ops.attention import NORM_EPS
from ...nn.quant import DIRECTION_LEVELS
from .schedule import PARALLEL_MIN_EDGES

# ---- TIR kernel (N, E symbolic; H, d static) ----------------------------------------------------

def forward_func(heads: int, dim: int):
    from tvm.script import tirx as T

    L = float(DIRECTION_LEVELS)
    LINE = 16  # 4-byte words per 64-byte cache line

    @T.macro
    def head_softmax(h, n, e, cq, ck, src, dst, fc, tau, logit, den, mx, acc):
        # a head's scratch lies in its own rows (logit, den) and cache lines (mx, acc: stride LINE) so that
        # heads on different threads never write to one cache line
        mx[h * LINE] = T.float32(0)
        for i in range(e):  # logits, max per head
            acc[h * LINE] = 0
            for j in range(dim):
                acc[h * LINE] = acc[h * LINE] + T.Cast("int32", cq[dst[i], h, j]) * T.Cast("int32", ck[src[i], h, j])
            logit[h, i] = tau[h] * T.Cast("float32", acc[h * LINE]) / T.float32(L * L)
            mx[h * LINE] = T.max(mx[h * LINE], logit[h, i])
        for a in range(n):
            den[h, a] = T.exp(-mx[h * LINE])
        for i in range(e):  # cutoff-weighted exponentials, neighbor sums
            logit[h, i] = fc[i] * T.exp(logit[h, i] - mx[h * LINE])
            den[h, dst[i]] = den[h, dst[i]] + logit[h, i]

    @T.prim_func(s_tir=True)
    def l2_attention_fwd(q_h: T.handle, k_h: T.handle, src_h: T.handle, dst_h: T.handle, fc_h: T.handle,
                         tau: T.Buffer((heads,), "float32"), out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n, e = T.int64(), T.int64()
        q = T.match_buffer(q_h, (n, heads, dim), "float32")
        k = T.match_buffer(k_h, (n, heads, dim), "float32")
        src = T.match_buffer(src_h, (e,), "int64")
        dst = T.match_buffer(dst_h, (e,), "int64")
        fc = T.match_buffer(fc_h, (e,), "float32")
        alpha = T.match_buffer(out_h, (e, heads), "float32")
        cq = T.alloc_buffer((n, heads, dim), "int8")
        ck = T.alloc_buffer((n, heads, dim), "int8")
        logit = T.alloc_buffer((heads, e), "float32")
        den = T.alloc_buffer((heads, n), "float32")
        mx = T.alloc_buffer((heads * LINE,), "float32")
        acc = T.alloc_buffer((heads * LINE,), "int32")  # one int32 accumulator per head
        norm = T.alloc_buffer((2,), "float32")
        with T.sblock("codes"):  # per-atom int8 codes of q̂ and k̂
            for a, h in T.grid(n, heads):
                norm[0] = T.float32(0)
                norm[1] = T.float32(0)
                for j in range(dim):
                    norm[0] = norm[0] + q[a, h, j] * q[a, h, j]
                    norm[1] = norm[1] + k[a, h, j] * k[a, h, j]
                for j in range(dim):
                    cq[a, h, j] = T.Cast("int8", T.floor(T.max(T.min(q[a, h, j] * T.rsqrt(norm[0] + T.float32(NORM_EPS)), T.float32(1)), T.float32(-1)) * T.float32(L) + T.float32(0.5)))
                    ck[a, h, j] = T.Cast("int8", T.floor(T.max(T.min(k[a, h, j] * T.rsqrt(norm[1] + T.float32(NORM_EPS)), T.float32(1)), T.float32(-1)) * T.float32(L) + T.float32(0.5)))
        with T.sblock("softmax"):  # heads on the thread pool from PARALLEL_MIN_EDGES edges
            if e >= PARALLEL_MIN_EDGES:
                for h in T.parallel(heads):
                    head_softmax(h, n, e, cq, ck, src, dst, fc, tau, logit, den, mx, acc)
            else:
                for h in range(heads):
                    head_softmax(h, n, e, cq, ck, src, dst, fc, tau, logit, den, mx, acc)
            for i, h in T.grid(e, heads):  # normalized, in the output's (edge, head) layout
                alpha[i, h] = logit[h, i] / den[h, dst[i]]

    return l2_attention_fwd.with_attrs({"global_symbol": "qso3_l2_attention", "tirx.is_scheduled": True,
                                        "op_pattern": 8})
