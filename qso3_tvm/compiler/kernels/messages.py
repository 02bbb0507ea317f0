"""A layer's messages and neighbor sums as one TIR kernel, and their backward as another (N, E symbolic;
channels F and heads H static). They implement the torch operators of nn.ops.messages (the numerics
are defined there) and replace them at import (compiler.relax_import.CONVERTERS).

Each runs one pass over the edges: per edge it gathers the sender's values, forms the messages in
registers (channels of a head are one vector: α is a scalar there) and adds them to the receiver's
sums, so no edge-sized message, gather or gradient tensor is written except the gradient of φ, which
the radial filter's backward needs. Edges are visited in order, so sums are in the same order as
the torch operator's index_add.
"""

from __future__ import annotations

from .schedule import PARALLEL_MIN_EDGES


def _sizes(channels: int, heads: int) -> tuple[int, int]:
    if channels % heads:
        raise ValueError(f"channels {channels} not divisible by heads {heads}")
    return channels, channels // heads


def _lane_sum(T, x, d: int, *row):
    """x[row, 0] += x[row, 1] + ... + x[row, d - 1] (a local buffer of d lanes; called while the kernel is
    parsed), by halving when d is a power of two: a few vector adds instead of a chain of d scalar adds."""
    if d & (d - 1):
        with T.serial(1, d) as j:
            T.buffer_store(x, x[(*row, 0)] + x[(*row, j)], [*row, 0])
        return
    half = d // 2
    while half >= 1:
        with T.vectorized(half) as j:
            T.buffer_store(x, x[(*row, j)] + x[(*row, j + half)], [*row, j])
        half //= 2


def forward_func(channels: int, heads: int):
    """PrimFunc (α (e, H), φ (e, 3F), val (n, 2F), vv (n, 3, F), u (e, 3), src, dst) -> ds (n, F), dv (n, 3, F).
    One pass over the edges per head; heads run on the thread pool when there are PARALLEL_MIN_EDGES edges."""
    from tvm.script import tirx as T

    F, d = _sizes(channels, heads)

    @T.macro
    def head_pass(h, n, e, alpha, phi, val, vv, u, src, dst, ds, dv):
        for a, l in T.grid(n, d):
            ds[a, h * d + l] = T.float32(0)
            for k in range(3):
                dv[a, k, h * d + l] = T.float32(0)
        for i in range(e):
            for l in T.vectorized(d):
                ds[dst[i], h * d + l] = ds[dst[i], h * d + l] + alpha[i, h] * phi[i, h * d + l] * val[src[i], h * d + l]
            for k in range(3):
                for l in T.vectorized(d):
                    dv[dst[i], k, h * d + l] = dv[dst[i], k, h * d + l] + (
                        alpha[i, h] * phi[i, F + h * d + l] * val[src[i], F + h * d + l] * u[i, k]
                        + alpha[i, h] * phi[i, 2 * F + h * d + l] * vv[src[i], k, h * d + l])

    @T.prim_func(s_tir=True)
    def messages_fwd(alpha_h: T.handle, phi_h: T.handle, val_h: T.handle, vv_h: T.handle, u_h: T.handle,
                     src_h: T.handle, dst_h: T.handle, ds_h: T.handle, dv_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n, e = T.int64(), T.int64()
        alpha = T.match_buffer(alpha_h, (e, heads), "float32")
        phi = T.match_buffer(phi_h, (e, 3 * F), "float32")
        val = T.match_buffer(val_h, (n, 2 * F), "float32")
        vv = T.match_buffer(vv_h, (n, 3, F), "float32")
        u = T.match_buffer(u_h, (e, 3), "float32")
        src = T.match_buffer(src_h, (e,), "int64")
        dst = T.match_buffer(dst_h, (e,), "int64")
        ds = T.match_buffer(ds_h, (n, F), "float32")
        dv = T.match_buffer(dv_h, (n, 3, F), "float32")
        with T.sblock("root"):
            if e >= PARALLEL_MIN_EDGES:
                for h in T.parallel(heads):
                    head_pass(h, n, e, alpha, phi, val, vv, u, src, dst, ds, dv)
            else:
                for h in range(heads):
                    head_pass(h, n, e, alpha, phi, val, vv, u, src, dst, ds, dv)

    return messages_fwd.with_attrs({"global_symbol": f"qso3_messages_{F}x{heads}", "tirx.is_scheduled": True,
                                    "op_pattern": 8})


def backward_func(channels: int, heads: int):
    """PrimFunc (g_s (n, F), g_v (n, 3, F), α, φ, val, vv, u, src, dst) -> gradients of (α, φ, val, vv, u).
    One pass over the edges per head (on the thread pool as in the forward); the gradient of u, which
    sums over all heads, is summed from per-head parts at the end."""
    from tvm.script import tirx as T

    F, d = _sizes(channels, heads)

    @T.macro
    def head_pass(h, n, e, g_s, g_v, alpha, phi, val, vv, u, src, dst, g_alpha_t, g_phi, g_val, g_vv, part):
        with T.sblock("head"):  # its own lane buffers per thread
            T.reads()
            T.writes()
            t = T.alloc_buffer((d,), "float32")  # Σ_k g_v u_k per channel of the head
            w = T.alloc_buffer((d,), "float32")  # Σ_k g_v vv_k
            red = T.alloc_buffer((d,), "float32")  # ∂/∂α per channel, summed over the head's lanes
            ured = T.alloc_buffer((3, d), "float32")  # ∂/∂u_k per channel
            for a, l in T.grid(n, d):
                g_val[a, h * d + l] = T.float32(0)
                g_val[a, F + h * d + l] = T.float32(0)
                for k in range(3):
                    g_vv[a, k, h * d + l] = T.float32(0)
            for i in range(e):
                for l in T.vectorized(d):
                    t[l] = (g_v[dst[i], 0, h * d + l] * u[i, 0] + g_v[dst[i], 1, h * d + l] * u[i, 1]
                            + g_v[dst[i], 2, h * d + l] * u[i, 2])
                    w[l] = (g_v[dst[i], 0, h * d + l] * vv[src[i], 0, h * d + l]
                            + g_v[dst[i], 1, h * d + l] * vv[src[i], 1, h * d + l]
                            + g_v[dst[i], 2, h * d + l] * vv[src[i], 2, h * d + l])
                    red[l] = (g_s[dst[i], h * d + l] * phi[i, h * d + l] * val[src[i], h * d + l]
                              + t[l] * phi[i, F + h * d + l] * val[src[i], F + h * d + l] + w[l] * phi[i, 2 * F + h * d + l])
                    g_phi[i, h * d + l] = g_s[dst[i], h * d + l] * alpha[i, h] * val[src[i], h * d + l]
                    g_phi[i, F + h * d + l] = t[l] * alpha[i, h] * val[src[i], F + h * d + l]
                    g_phi[i, 2 * F + h * d + l] = w[l] * alpha[i, h]
                    g_val[src[i], h * d + l] = g_val[src[i], h * d + l] + g_s[dst[i], h * d + l] * alpha[i, h] * phi[i, h * d + l]
                    g_val[src[i], F + h * d + l] = g_val[src[i], F + h * d + l] + t[l] * alpha[i, h] * phi[i, F + h * d + l]
                for k in range(3):
                    for l in T.vectorized(d):
                        g_vv[src[i], k, h * d + l] = g_vv[src[i], k, h * d + l] + alpha[i, h] * phi[i, 2 * F + h * d + l] * g_v[dst[i], k, h * d + l]
                        ured[k, l] = g_v[dst[i], k, h * d + l] * alpha[i, h] * phi[i, F + h * d + l] * val[src[i], F + h * d + l]
                _lane_sum(T, red, d)
                g_alpha_t[h, i] = red[0]
                for k in range(3):
                    _lane_sum(T, ured, d, k)
                    part[h, i, k] = ured[k, 0]

    @T.prim_func(s_tir=True)
    def messages_bwd(gs_h: T.handle, gv_h: T.handle, alpha_h: T.handle, phi_h: T.handle, val_h: T.handle,
                     vv_h: T.handle, u_h: T.handle, src_h: T.handle, dst_h: T.handle, g_alpha_h: T.handle,
                     g_phi_h: T.handle, g_val_h: T.handle, g_vv_h: T.handle, g_u_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n, e = T.int64(), T.int64()
        g_s = T.match_buffer(gs_h, (n, F), "float32")
        g_v = T.match_buffer(gv_h, (n, 3, F), "float32")
        alpha = T.match_buffer(alpha_h, (e, heads), "float32")
        phi = T.match_buffer(phi_h, (e, 3 * F), "float32")
        val = T.match_buffer(val_h, (n, 2 * F), "float32")
        vv = T.match_buffer(vv_h, (n, 3, F), "float32")
        u = T.match_buffer(u_h, (e, 3), "float32")
        src = T.match_buffer(src_h, (e,), "int64")
        dst = T.match_buffer(dst_h, (e,), "int64")
        g_alpha = T.match_buffer(g_alpha_h, (e, heads), "float32")
        g_phi = T.match_buffer(g_phi_h, (e, 3 * F), "float32")
        g_val = T.match_buffer(g_val_h, (n, 2 * F), "float32")
        g_vv = T.match_buffer(g_vv_h, (n, 3, F), "float32")
        g_u = T.match_buffer(g_u_h, (e, 3), "float32")
        with T.sblock("root"):
            # per-head rows (heads on different threads never write to one cache line): the parts of the
            # gradient of u, which sums over heads, and the gradient of α, moved to its (edge, head) layout at the end
            part = T.alloc_buffer((heads, e, 3), "float32")
            g_alpha_t = T.alloc_buffer((heads, e), "float32")
            if e >= PARALLEL_MIN_EDGES:
                for h in T.parallel(heads):
                    head_pass(h, n, e, g_s, g_v, alpha, phi, val, vv, u, src, dst, g_alpha_t, g_phi, g_val, g_vv, part)
            else:
                for h in range(heads):
                    head_pass(h, n, e, g_s, g_v, alpha, phi, val, vv, u, src, dst, g_alpha_t, g_phi, g_val, g_vv, part)
            for i, k in T.grid(e, 3):
                g_u[i, k] = part[0, i, k]
                for h in range(1, heads):
                    g_u[i, k] = g_u[i, k] + part[h, i, k]
            for i, h in T.grid(e, heads):
                g_alpha[i, h] = g_alpha_t[h, i]

    return messages_bwd.with_attrs({"global_symbol": f"qso3_messages_backward_{F}x{heads}", "tirx.is_scheduled": True,
                                    "op_pattern": 8})
