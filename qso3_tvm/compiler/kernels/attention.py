"""Robust (L2-normalized) attention as one TIR kernel forward and one backward (N, E symbolic; H, d
static): per-atom int8 codes of q̂ and k̂ (int16 for more than 127 levels), dot products with int32 accumulation, temperature, and
the cutoff-weighted segment softmax with its sink; the backward recomputes the softmax and gives the
straight-through gradients of q, k and the cutoff weights. They implement the torch operators of
nn.ops.attention (the numerics are defined there) and replace them at import
(compiler.relax_import.CONVERTERS)."""

from __future__ import annotations

from ...nn.ops.attention import NORM_EPS
from ...nn.quant import DIRECTION_LEVELS
from .schedule import PARALLEL_MIN_EDGES

# ---- TIR kernels (N, E symbolic; H, d static) ---------------------------------------------------
LINE = 16  # 4-byte words per 64-byte cache line: a head's scalars get a line of their own


def code_dtype(levels: int) -> str:
    """int8 codes for the paper's 127 levels, int16 up to 32767 (|q_int · k_int| <= (levels + 2)² fits int32)."""
    return "int8" if levels <= 127 else "int16"


def _macros(heads: int, dim: int, levels: int):
    """TIR pieces shared by the forward and backward kernels."""
    from tvm.script import tirx as T

    L, cd = float(levels), code_dtype(levels)

    @T.macro
    def codes(n, q, k, cq, ck, rq, rk):  # per-atom int8 codes of q̂ and k̂, and 1/|q|, 1/|k|
        for a, h in T.grid(n, heads):
            rq[a, h] = T.float32(0)
            rk[a, h] = T.float32(0)
            for j in range(dim):
                rq[a, h] = rq[a, h] + q[a, h, j] * q[a, h, j]
                rk[a, h] = rk[a, h] + k[a, h, j] * k[a, h, j]
            rq[a, h] = T.rsqrt(rq[a, h] + T.float32(NORM_EPS))
            rk[a, h] = T.rsqrt(rk[a, h] + T.float32(NORM_EPS))
            for j in range(dim):
                cq[a, h, j] = T.Cast(cd, T.floor(T.max(T.min(q[a, h, j] * rq[a, h], T.float32(1)), T.float32(-1)) * T.float32(L) + T.float32(0.5)))
                ck[a, h, j] = T.Cast(cd, T.floor(T.max(T.min(k[a, h, j] * rk[a, h], T.float32(1)), T.float32(-1)) * T.float32(L) + T.float32(0.5)))

    @T.macro
    def head_softmax(h, n, e, cq, ck, src, dst, fc, tau, logit, den, mx, acc):
        # logit[h, i] = exp(t - m) (without fc), den[h, a] = Σ fc exp(t - m) + exp(-m); a head's scratch lies in
        # its own rows (logit, den) and cache lines (mx, acc) so that heads on different threads never share one
        mx[h * LINE] = T.float32(0)
        for i in range(e):  # logits, max per head
            acc[h * LINE] = 0
            for j in range(dim):
                acc[h * LINE] = acc[h * LINE] + T.Cast("int32", cq[dst[i], h, j]) * T.Cast("int32", ck[src[i], h, j])
            logit[h, i] = tau[h] * T.Cast("float32", acc[h * LINE]) / T.float32(L * L)
            mx[h * LINE] = T.max(mx[h * LINE], logit[h, i])
        for a in range(n):
            den[h, a] = T.exp(-mx[h * LINE])
        for i in range(e):  # exponentials, cutoff-weighted neighbor sums
            logit[h, i] = T.exp(logit[h, i] - mx[h * LINE])
            den[h, dst[i]] = den[h, dst[i]] + fc[i] * logit[h, i]

    return codes, head_softmax


def forward_func(heads: int, dim: int, levels: int = DIRECTION_LEVELS):
    from tvm.script import tirx as T

    codes, head_softmax = _macros(heads, dim, levels)
    cd = code_dtype(levels)

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
        cq = T.alloc_buffer((n, heads, dim), cd)
        ck = T.alloc_buffer((n, heads, dim), cd)
        rq = T.alloc_buffer((n, heads), "float32")
        rk = T.alloc_buffer((n, heads), "float32")
        logit = T.alloc_buffer((heads, e), "float32")
        den = T.alloc_buffer((heads, n), "float32")
        mx = T.alloc_buffer((heads * LINE,), "float32")
        acc = T.alloc_buffer((heads * LINE,), "int32")  # one int32 accumulator per head
        with T.sblock("codes"):
            codes(n, q, k, cq, ck, rq, rk)
        with T.sblock("softmax"):  # heads on the thread pool from PARALLEL_MIN_EDGES edges
            if e >= PARALLEL_MIN_EDGES:
                for h in T.parallel(heads):
                    head_softmax(h, n, e, cq, ck, src, dst, fc, tau, logit, den, mx, acc)
            else:
                for h in range(heads):
                    head_softmax(h, n, e, cq, ck, src, dst, fc, tau, logit, den, mx, acc)
            for i, h in T.grid(e, heads):  # normalized, in the output's (edge, head) layout
                alpha[i, h] = fc[i] * logit[h, i] / den[h, dst[i]]

    return l2_attention_fwd.with_attrs({"global_symbol": "qso3_l2_attention", "tirx.is_scheduled": True,
                                        "op_pattern": 8})


def backward_func(heads: int, dim: int, levels: int = DIRECTION_LEVELS):
    """The straight-through vector-Jacobian product of nn.ops.attention.l2_attention_backward: gradients
    of q, k (N, H, d) and fc (E,) from that of α, recomputing the softmax; per head, the neighbor sums
    S_a = Σ_{e -> a} g_α α, then per edge g_t = fc exp(t - m) (g_α - S_dst) / den_dst, the codes' STE
    sums into q̂ (over edges into the atom) and k̂ (out of it), and the normalization's VJP per atom."""
    from tvm.script import tirx as T

    L, cd = float(levels), code_dtype(levels)
    codes, head_softmax = _macros(heads, dim, levels)

    @T.macro
    def head_backward(h, n, e, g_alpha, q, k, cq, ck, rq, rk, src, dst, fc, tau, alpha, logit, den, mx, acc, ssum, g_fc_t,
                      g_q, g_k, dot):
        head_softmax(h, n, e, cq, ck, src, dst, fc, tau, logit, den, mx, acc)
        for a in range(n):
            ssum[h, a] = T.float32(0)
            for j in range(dim):
                g_q[a, h, j] = T.float32(0)
                g_k[a, h, j] = T.float32(0)
        for i in range(e):
            ssum[h, dst[i]] = ssum[h, dst[i]] + g_alpha[i, h] * alpha[i, h]
        for i in range(e):  # g_q, g_k hold the gradients of q̂, k̂ first
            g_fc_t[h, i] = (g_alpha[i, h] - ssum[h, dst[i]]) / den[h, dst[i]] * logit[h, i]
            for j in T.vectorized(dim):
                g_q[dst[i], h, j] = g_q[dst[i], h, j] + g_fc_t[h, i] * fc[i] * tau[h] / T.float32(L) * T.Cast("float32", ck[src[i], h, j])
                g_k[src[i], h, j] = g_k[src[i], h, j] + g_fc_t[h, i] * fc[i] * tau[h] / T.float32(L) * T.Cast("float32", cq[dst[i], h, j])
        for a in range(n):  # VJP of x / |x|: (g - u (g·u)) / |x|
            dot[h * LINE] = T.float32(0)
            dot[h * LINE + 1] = T.float32(0)
            for j in range(dim):
                dot[h * LINE] = dot[h * LINE] + g_q[a, h, j] * q[a, h, j] * rq[a, h]
                dot[h * LINE + 1] = dot[h * LINE + 1] + g_k[a, h, j] * k[a, h, j] * rk[a, h]
            for j in T.vectorized(dim):
                g_q[a, h, j] = (g_q[a, h, j] - q[a, h, j] * rq[a, h] * dot[h * LINE]) * rq[a, h]
                g_k[a, h, j] = (g_k[a, h, j] - k[a, h, j] * rk[a, h] * dot[h * LINE + 1]) * rk[a, h]

    @T.prim_func(s_tir=True)
    def l2_attention_bwd(ga_h: T.handle, q_h: T.handle, k_h: T.handle, src_h: T.handle, dst_h: T.handle, fc_h: T.handle,
                         tau: T.Buffer((heads,), "float32"), alpha_h: T.handle, gq_h: T.handle, gk_h: T.handle,
                         gfc_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n, e = T.int64(), T.int64()
        g_alpha = T.match_buffer(ga_h, (e, heads), "float32")
        q = T.match_buffer(q_h, (n, heads, dim), "float32")
        k = T.match_buffer(k_h, (n, heads, dim), "float32")
        src = T.match_buffer(src_h, (e,), "int64")
        dst = T.match_buffer(dst_h, (e,), "int64")
        fc = T.match_buffer(fc_h, (e,), "float32")
        alpha = T.match_buffer(alpha_h, (e, heads), "float32")
        g_q = T.match_buffer(gq_h, (n, heads, dim), "float32")
        g_k = T.match_buffer(gk_h, (n, heads, dim), "float32")
        g_fc = T.match_buffer(gfc_h, (e,), "float32")
        cq = T.alloc_buffer((n, heads, dim), cd)
        ck = T.alloc_buffer((n, heads, dim), cd)
        rq = T.alloc_buffer((n, heads), "float32")
        rk = T.alloc_buffer((n, heads), "float32")
        logit = T.alloc_buffer((heads, e), "float32")
        den = T.alloc_buffer((heads, n), "float32")
        ssum = T.alloc_buffer((heads, n), "float32")
        g_fc_t = T.alloc_buffer((heads, e), "float32")
        mx = T.alloc_buffer((heads * LINE,), "float32")
        acc = T.alloc_buffer((heads * LINE,), "int32")
        dot = T.alloc_buffer((heads * LINE,), "float32")
        with T.sblock("codes"):
            codes(n, q, k, cq, ck, rq, rk)
        with T.sblock("heads"):
            if e >= PARALLEL_MIN_EDGES:
                for h in T.parallel(heads):
                    head_backward(h, n, e, g_alpha, q, k, cq, ck, rq, rk, src, dst, fc, tau, alpha, logit, den, mx, acc,
                                  ssum, g_fc_t, g_q, g_k, dot)
            else:
                for h in range(heads):
                    head_backward(h, n, e, g_alpha, q, k, cq, ck, rq, rk, src, dst, fc, tau, alpha, logit, den, mx, acc,
                                  ssum, g_fc_t, g_q, g_k, dot)
            for i in range(e):  # the cutoff weight's gradient sums over heads
                g_fc[i] = g_fc_t[0, i]
                for h in range(1, heads):
                    g_fc[i] = g_fc[i] + g_fc_t[h, i]

    return l2_attention_bwd.with_attrs({"global_symbol": "qso3_l2_attention_backward", "tirx.is_scheduled": True,
                                        "op_pattern": 8})
