"""A layer's messages and neighbor sums as one TIR kernel, and their backward as another (N, E symbolic;
channels F and heads H static). They implement the torch operators of nn.ops.messages (the numerics
are defined there) and replace them at import (compiler.relax_import.CONVERTERS).

The forward runs per receiving atom when the edges are grouped by receiver (graph.neighbors builds them so,
graph.convention pads them so; the kernel checks): atoms on the thread pool, each head's sums in registers
over the atom's edge segment. Otherwise, and in the backward (whose sums go to the senders), one pass over
the pairs of edges per head. Per edge it gathers the sender's values, forms the messages in registers (channels
of a head are one vector: α is a scalar there) and adds them to the receiver's sums, so no edge-sized message,
gather or gradient tensor is written. φ is per pair of edges (edge i reads row pair[i], nn.ops.pairs); its
gradient, which the radial filter's backward needs, is the sum over the pair's two edges, which the backward
visits one after the other (canon[q], partner[q]) so that each row is written once, in order.
The forward visits edges in order, so its sums are in the same order as the torch operator's index_add; the
backward's sums to the senders come in pair order (float sums differ in rounding only). The layer's
l=1 channel mix W v (vec_value) is computed per atom inside the kernels (forward and backward), and the
residual sums s + ds, v + dv are the forward's outputs.
"""

from __future__ import annotations

from .schedule import PARALLEL_MIN_EDGES


def _sizes(channels: int, heads: int) -> tuple[int, int]:
    if channels % heads:
        raise ValueError(f"channels {channels} not divisible by heads {heads}")
    return channels, channels // heads


def _lane_total(T, x, d: int, *row):
    """x[row, 0] + ... + x[row, d - 1] as one expression (built while the kernel is parsed): for d a power of two
    the row as one vector halved with vectorlow/vectorhigh (register shuffles, log2 d adds; it was a halving through
    the local buffer, whose reloads of just-stored lanes cost a quarter of the backward), else a chain of d loads."""
    if d & (d - 1):
        total = x[(*row, 0)]
        for j in range(1, d):
            total = total + x[(*row, j)]
        return total
    vec = x.vload([*row, 0], f"float32x{d}") if d > 1 else x[(*row, 0)]
    while d > 1:
        d //= 2
        dtype = f"float32x{d}" if d > 1 else "float32"
        vec = T.vectorlow(dtype, vec) + T.vectorhigh(dtype, vec)
    return vec


def _atom_mixes(channels: int):
    """Macros: per atom a, the l=1 channel mix vv[a] = W v[a] (wt = W^T) and the gradient of v through it and the
    residual, g_v0[a] = g_v[a] + W^T g_vv[a] (wm = W): all F output channels as one vector per component, the sums
    in the atom's own buffer."""
    from tvm.script import tirx as T

    F = channels
    B = 32 if F % 32 == 0 else F  # output channels per pass: 3 x B accumulators fit the 16 AVX2 registers

    @T.macro
    def atom_values(a, v, wt, vv):
        with T.sblock("atom_values"):
            T.reads()
            T.writes()
            acc = T.alloc_buffer((3, B), "float32")
            for ob in range(F // B):
                for k in range(3):
                    for o in T.vectorized(B):
                        acc[k, o] = T.float32(0)
                for c in range(F):
                    for k in range(3):
                        for o in T.vectorized(B):
                            acc[k, o] = acc[k, o] + v[a, k, c] * wt[c, ob * B + o]
                for k in range(3):
                    for o in T.vectorized(B):
                        vv[a, k, ob * B + o] = acc[k, o]

    @T.macro
    def v_gradient(a, g_v, g_vv, wm, g_v0):
        with T.sblock("v_gradient"):
            T.reads()
            T.writes()
            acc = T.alloc_buffer((3, B), "float32")
            for cb in range(F // B):
                for k in range(3):
                    for c in T.vectorized(B):
                        acc[k, c] = g_v[a, k, cb * B + c]
                for o in range(F):
                    for k in range(3):
                        for c in T.vectorized(B):
                            acc[k, c] = acc[k, c] + g_vv[a, k, o] * wm[o, cb * B + c]
                for k in range(3):
                    for c in T.vectorized(B):
                        g_v0[a, k, cb * B + c] = acc[k, c]

    return atom_values, v_gradient


def _receiver_segments():
    """Macro: start (n + 1,) with receiver a's edges at start[a]:start[a + 1] (counts, then their running sum) and
    is_sorted[0] = 1 when dst never decreases (the neighbor lists' order: graph.neighbors), else 0."""
    from tvm.script import tirx as T

    @T.macro
    def receiver_segments(n, e, dst, start, is_sorted):
        for a in range(n + 1):
            start[a] = T.int64(0)
        is_sorted[0] = 1
        for i in range(e):
            start[dst[i] + 1] = start[dst[i] + 1] + T.int64(1)
            if i > 0:
                if dst[i] < dst[i - 1]:
                    is_sorted[0] = 0
        for a in range(n):
            start[a + 1] = start[a + 1] + start[a]

    return receiver_segments


def forward_func(channels: int, heads: int):
    """PrimFunc (α (e, H), φ (p, 3F), val (n, 2F), s (n, F), v (n, 3, F), W^T (F, F), u (e, 3), src, dst, pair) -> s1 (n, F),
    v1 (n, 3, F). W v for every atom, then the messages added to the receivers' sums (started at s, v): per receiver
    over its edge segment when dst is sorted, else per head over all edges; atoms (or heads) run on the thread pool
    when there are PARALLEL_MIN_EDGES edges."""
    from tvm.script import tirx as T

    F, d = _sizes(channels, heads)
    atom_values, _ = _atom_mixes(channels)
    receiver_segments = _receiver_segments()

    def scalar_message(alpha, phi, val, src, pair, i, h, l):  # edge i's message to channel h·d + l of s (a PrimExpr)
        return alpha[i, h] * phi[pair[i], h * d + l] * val[src[i], h * d + l]

    def vector_message(alpha, phi, val, u, src, pair, vv, i, h, k, l):  # ... and to component k of v
        return (alpha[i, h] * phi[pair[i], F + h * d + l] * val[src[i], F + h * d + l] * u[i, k]
                + alpha[i, h] * phi[pair[i], 2 * F + h * d + l] * vv[src[i], k, h * d + l])

    @T.macro
    def head_pass(h, n, e, alpha, phi, val, s, v, u, src, dst, pair, ds, dv, vv):
        for a, l in T.grid(n, d):
            ds[a, h * d + l] = s[a, h * d + l]
            for k in range(3):
                dv[a, k, h * d + l] = v[a, k, h * d + l]
        for i in range(e):
            for l in T.vectorized(d):
                ds[dst[i], h * d + l] = ds[dst[i], h * d + l] + scalar_message(alpha, phi, val, src, pair, i, h, l)
            for k in range(3):
                for l in T.vectorized(d):
                    dv[dst[i], k, h * d + l] = dv[dst[i], k, h * d + l] + vector_message(alpha, phi, val, u, src, pair, vv, i, h, k, l)

    @T.macro
    def atom_pass(a, alpha, phi, val, s, v, u, src, pair, start, ds, dv, vv):
        with T.sblock("atom"):  # the receiver's sums of one head in registers over its edges
            T.reads()
            T.writes()
            acc = T.alloc_buffer((4, d), "float32")  # s, v_x, v_y, v_z
            for h in range(heads):
                for l in T.vectorized(d):
                    acc[0, l] = s[a, h * d + l]
                for k in T.unroll(3):
                    for l in T.vectorized(d):
                        acc[1 + k, l] = v[a, k, h * d + l]
                for i in range(start[a], start[a + 1]):
                    for l in T.vectorized(d):
                        acc[0, l] = acc[0, l] + scalar_message(alpha, phi, val, src, pair, i, h, l)
                    for k in T.unroll(3):
                        for l in T.vectorized(d):
                            acc[1 + k, l] = acc[1 + k, l] + vector_message(alpha, phi, val, u, src, pair, vv, i, h, k, l)
                for l in T.vectorized(d):
                    ds[a, h * d + l] = acc[0, l]
                for k in T.unroll(3):
                    for l in T.vectorized(d):
                        dv[a, k, h * d + l] = acc[1 + k, l]

    @T.prim_func(s_tir=True)
    def messages_fwd(alpha_h: T.handle, phi_h: T.handle, val_h: T.handle, s_h: T.handle, v_h: T.handle,
                     wt: T.Buffer((F, F), "float32"), u_h: T.handle, src_h: T.handle, dst_h: T.handle, pair_h: T.handle,
                     ds_h: T.handle, dv_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n, e, p = T.int64(), T.int64(), T.int64()
        alpha = T.match_buffer(alpha_h, (e, heads), "float32")
        phi = T.match_buffer(phi_h, (p, 3 * F), "float32")
        val = T.match_buffer(val_h, (n, 2 * F), "float32")
        s = T.match_buffer(s_h, (n, F), "float32")
        v = T.match_buffer(v_h, (n, 3, F), "float32")
        u = T.match_buffer(u_h, (e, 3), "float32")
        src = T.match_buffer(src_h, (e,), "int64")
        dst = T.match_buffer(dst_h, (e,), "int64")
        pair = T.match_buffer(pair_h, (e,), "int64")
        ds = T.match_buffer(ds_h, (n, F), "float32")
        dv = T.match_buffer(dv_h, (n, 3, F), "float32")
        with T.sblock("root"):
            vv = T.alloc_buffer((n, 3, F), "float32")  # W v per atom
            start = T.alloc_buffer((n + 1,), "int64")  # receiver a's edges are start[a]:start[a + 1] when sorted
            is_sorted = T.alloc_buffer((1,), "int32")
            receiver_segments(n, e, dst, start, is_sorted)
            if e >= PARALLEL_MIN_EDGES:
                for a in T.parallel(n):
                    atom_values(a, v, wt, vv)
                if is_sorted[0] == 1:
                    for a in T.parallel(n):
                        atom_pass(a, alpha, phi, val, s, v, u, src, pair, start, ds, dv, vv)
                else:
                    for h in T.parallel(heads):
                        head_pass(h, n, e, alpha, phi, val, s, v, u, src, dst, pair, ds, dv, vv)
            else:
                for a in range(n):
                    atom_values(a, v, wt, vv)
                if is_sorted[0] == 1:
                    for a in range(n):
                        atom_pass(a, alpha, phi, val, s, v, u, src, pair, start, ds, dv, vv)
                else:
                    for h in range(heads):
                        head_pass(h, n, e, alpha, phi, val, s, v, u, src, dst, pair, ds, dv, vv)

    return messages_fwd.with_attrs({"global_symbol": f"qso3_messages_{F}x{heads}", "tirx.is_scheduled": True,
                                    "op_pattern": 8})


def backward_func(channels: int, heads: int):
    """PrimFunc (g_s1 (n, F), g_v1 (n, 3, F), α, φ, val, v, W (F, F), W^T, u, src, dst, canon, partner) -> gradients of
    (α, φ, val, v, u). W v recomputed per atom; per head (on the thread pool as in the forward) one pass over the pairs of
    edges, each pair's two edges in turn (canon[q], then partner[q]: nn.ops.pairs), so that the gradient of φ is written
    once per pair, row after row; then per atom the gradient of v, g_v1 + W^T-mix of the neighbor parts. The gradient of
    u, which sums over all heads, is summed from per-head parts at the end."""
    from tvm.script import tirx as T

    F, d = _sizes(channels, heads)
    atom_values, v_gradient = _atom_mixes(channels)

    def phi_grad(g_phi, first: bool, q, col, value):  # the pair's first edge writes the row, the second adds to it
        return value if first else g_phi[q, col] + value

    @T.macro
    def edge_pass(h, i, q, first, g_s, g_v, alpha, phi, val, u, src, dst, g_alpha_t, g_phi, g_val, g_vv, part, vv,
                  t, w, red, ured):
        for l in T.vectorized(d):
            t[l] = (g_v[dst[i], 0, h * d + l] * u[i, 0] + g_v[dst[i], 1, h * d + l] * u[i, 1]
                    + g_v[dst[i], 2, h * d + l] * u[i, 2])
            w[l] = (g_v[dst[i], 0, h * d + l] * vv[src[i], 0, h * d + l]
                    + g_v[dst[i], 1, h * d + l] * vv[src[i], 1, h * d + l]
                    + g_v[dst[i], 2, h * d + l] * vv[src[i], 2, h * d + l])
            red[l] = (g_s[dst[i], h * d + l] * phi[q, h * d + l] * val[src[i], h * d + l]
                      + t[l] * phi[q, F + h * d + l] * val[src[i], F + h * d + l] + w[l] * phi[q, 2 * F + h * d + l])
            g_phi[q, h * d + l] = phi_grad(g_phi, first, q, h * d + l, g_s[dst[i], h * d + l] * alpha[i, h] * val[src[i], h * d + l])
            g_phi[q, F + h * d + l] = phi_grad(g_phi, first, q, F + h * d + l, t[l] * alpha[i, h] * val[src[i], F + h * d + l])
            g_phi[q, 2 * F + h * d + l] = phi_grad(g_phi, first, q, 2 * F + h * d + l, w[l] * alpha[i, h])
            g_val[src[i], h * d + l] = g_val[src[i], h * d + l] + g_s[dst[i], h * d + l] * alpha[i, h] * phi[q, h * d + l]
            g_val[src[i], F + h * d + l] = g_val[src[i], F + h * d + l] + t[l] * alpha[i, h] * phi[q, F + h * d + l]
        for k in range(3):
            for l in T.vectorized(d):
                g_vv[src[i], k, h * d + l] = g_vv[src[i], k, h * d + l] + alpha[i, h] * phi[q, 2 * F + h * d + l] * g_v[dst[i], k, h * d + l]
                ured[k, l] = g_v[dst[i], k, h * d + l] * alpha[i, h] * phi[q, F + h * d + l] * val[src[i], F + h * d + l]
        g_alpha_t[h, i] = _lane_total(T, red, d)
        for k in range(3):
            part[h, i, k] = _lane_total(T, ured, d, k)

    @T.macro
    def head_pass(h, n, p, g_s, g_v, alpha, phi, val, u, src, dst, canon, partner, g_alpha_t, g_phi, g_val, g_vv, part, vv):
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
            for q in range(p):
                edge_pass(h, canon[q], q, True, g_s, g_v, alpha, phi, val, u, src, dst, g_alpha_t, g_phi, g_val, g_vv,
                          part, vv, t, w, red, ured)
                edge_pass(h, partner[q], q, False, g_s, g_v, alpha, phi, val, u, src, dst, g_alpha_t, g_phi, g_val, g_vv,
                          part, vv, t, w, red, ured)

    @T.prim_func(s_tir=True)
    def messages_bwd(gs_h: T.handle, gv_h: T.handle, alpha_h: T.handle, phi_h: T.handle, val_h: T.handle,
                     v_h: T.handle, wm: T.Buffer((F, F), "float32"), wt: T.Buffer((F, F), "float32"), u_h: T.handle,
                     src_h: T.handle, dst_h: T.handle, canon_h: T.handle, partner_h: T.handle, g_alpha_h: T.handle,
                     g_phi_h: T.handle, g_val_h: T.handle, g_v0_h: T.handle, g_u_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n, e, p = T.int64(), T.int64(), T.int64()
        g_s = T.match_buffer(gs_h, (n, F), "float32")
        g_v = T.match_buffer(gv_h, (n, 3, F), "float32")
        alpha = T.match_buffer(alpha_h, (e, heads), "float32")
        phi = T.match_buffer(phi_h, (p, 3 * F), "float32")
        val = T.match_buffer(val_h, (n, 2 * F), "float32")
        v = T.match_buffer(v_h, (n, 3, F), "float32")
        u = T.match_buffer(u_h, (e, 3), "float32")
        src = T.match_buffer(src_h, (e,), "int64")
        dst = T.match_buffer(dst_h, (e,), "int64")
        canon = T.match_buffer(canon_h, (p,), "int64")
        partner = T.match_buffer(partner_h, (p,), "int64")
        g_alpha = T.match_buffer(g_alpha_h, (e, heads), "float32")
        g_phi = T.match_buffer(g_phi_h, (p, 3 * F), "float32")
        g_val = T.match_buffer(g_val_h, (n, 2 * F), "float32")
        g_v0 = T.match_buffer(g_v0_h, (n, 3, F), "float32")
        g_u = T.match_buffer(g_u_h, (e, 3), "float32")
        with T.sblock("root"):
            # per-head rows (heads on different threads never write to one cache line): the parts of the
            # gradient of u, which sums over heads, and the gradient of α, moved to its (edge, head) layout at the end
            part = T.alloc_buffer((heads, e, 3), "float32")
            g_alpha_t = T.alloc_buffer((heads, e), "float32")
            vv = T.alloc_buffer((n, 3, F), "float32")  # W v per atom
            g_vv = T.alloc_buffer((n, 3, F), "float32")  # the gradient of W v per atom
            if e >= PARALLEL_MIN_EDGES:
                for a in T.parallel(n):
                    atom_values(a, v, wt, vv)
                for h in T.parallel(heads):
                    head_pass(h, n, p, g_s, g_v, alpha, phi, val, u, src, dst, canon, partner, g_alpha_t, g_phi, g_val,
                              g_vv, part, vv)
                for a in T.parallel(n):
                    v_gradient(a, g_v, g_vv, wm, g_v0)
            else:
                for a in range(n):
                    atom_values(a, v, wt, vv)
                for h in range(heads):
                    head_pass(h, n, p, g_s, g_v, alpha, phi, val, u, src, dst, canon, partner, g_alpha_t, g_phi, g_val,
                              g_vv, part, vv)
                for a in range(n):
                    v_gradient(a, g_v, g_vv, wm, g_v0)
            for i, k in T.grid(e, 3):
                g_u[i, k] = part[0, i, k]
                for h in range(1, heads):
                    g_u[i, k] = g_u[i, k] + part[h, i, k]
            for i, h in T.grid(e, heads):
                g_alpha[i, h] = g_alpha_t[h, i]

    return messages_bwd.with_attrs({"global_symbol": f"qso3_messages_backward_{F}x{heads}", "tirx.is_scheduled": True,
                                    "op_pattern": 8})
