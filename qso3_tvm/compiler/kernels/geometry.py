"""The edge geometry as TIR kernels (E, N symbolic; basis size, its width and the cutoff static): the forward
(unit vectors, cutoff envelope, radial basis · envelope: one "row" block per edge, on the thread pool at
large static sizes through kernels.schedule.parallel_rows) and the backward to atom positions (per-edge
gradients, then one serial pass adding them at senders and taking them off at receivers, in edge order).
They implement the torch operators of nn.ops.geometry and replace them at import (compiler.relax_import)."""

from __future__ import annotations

from .fast_math import fast_exp_expr
from .schedule import row_kernel

P = 6  # model.polynomial_cutoff's exponent


def _edge(tir, pos, src, dst, i, cutoff: float):
    """PrimExprs of edge i: component k -> r_ij[k], |r_ij|, the envelope and its derivative (model.edge_geometry)."""
    f = lambda c: tir.const(c, "float32")  # noqa: E731
    vec = lambda k: pos[src[i], k] - pos[dst[i], k]  # noqa: E731
    r = tir.sqrt(vec(0) * vec(0) + vec(1) * vec(1) + vec(2) * vec(2))
    x = r / f(cutoff)
    xc = tir.min(x, f(1.0))
    a, b, c = (P + 1) * (P + 2) / 2, P * (P + 2), P * (P + 1) / 2
    pw = [f(1.0)]
    for _ in range(P + 2):  # integer powers as products (no powf call)
        pw.append(pw[-1] * xc)
    fc = f(1.0) - f(a) * pw[P] + f(b) * pw[P + 1] - f(c) * pw[P + 2]
    d = (-f(a * P) * pw[P - 1] + f(b * (P + 1)) * pw[P] - f(c * (P + 2)) * pw[P + 1]) / f(cutoff)
    return vec, r, fc, tir.Select(x <= f(1.0), d, f(0.0))


def _dot_u(tir, g_u, pos, src, dst, i, cutoff: float):
    """g_u · u at edge i (as torch: the product with u = vec / r, summed)."""
    vec, r, *_ = _edge(tir, pos, src, dst, i, cutoff)
    return g_u[i, 0] * (vec(0) / r) + g_u[i, 1] * (vec(1) / r) + g_u[i, 2] * (vec(2) / r)


def forward_func(n_rbf: int, gamma: float, cutoff: float):
    """(pos (n, 3), src, dst (e,), centers (R,)) -> u (e, 3), fc (e,), basis · fc (e, R)."""
    from tvm import tirx
    from tvm.script import tirx as T

    R = n_rbf

    @T.prim_func(s_tir=True)
    def geometry(pos_h: T.handle, src_h: T.handle, dst_h: T.handle, centers: T.Buffer((R,), "float32"),
                 u_h: T.handle, fc_h: T.handle, rbf_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n, e = T.int64(), T.int64()
        pos = T.match_buffer(pos_h, (n, 3), "float32")
        src = T.match_buffer(src_h, (e,), "int64")
        dst = T.match_buffer(dst_h, (e,), "int64")
        u = T.match_buffer(u_h, (e, 3), "float32")
        fc = T.match_buffer(fc_h, (e,), "float32")
        rbf = T.match_buffer(rbf_h, (e, R), "float32")
        for i in range(e):
            with T.sblock("row"):
                r = T.axis.spatial(e, i)
                g = T.sblock_alloc_buffer((2,), "float32")  # |r_ij|, fc
                g[0] = _edge(tirx, pos, src, dst, r, cutoff)[1]
                g[1] = _edge(tirx, pos, src, dst, r, cutoff)[2]
                for k in range(3):
                    u[r, k] = _edge(tirx, pos, src, dst, r, cutoff)[0](k) / g[0]
                fc[r] = g[1]
                for j in T.vectorized(R):
                    rbf[r, j] = fast_exp_expr(tirx, T.float32(-gamma) * (g[0] - centers[j]) * (g[0] - centers[j])) * g[1]

    return row_kernel(geometry, f"qso3_edge_geometry_{R}")


def backward_func(n_rbf: int, gamma: float, cutoff: float):
    """(g_u (e, 3), g_fc (e,), g_rbf (e, R), pos (n, 3), src, dst, centers) -> g_pos (n, 3)."""
    from tvm import tirx
    from tvm.script import tirx as T

    R = n_rbf

    @T.prim_func(s_tir=True)
    def geometry_bwd(gu_h: T.handle, gfc_h: T.handle, grbf_h: T.handle, pos_h: T.handle, src_h: T.handle,
                     dst_h: T.handle, centers: T.Buffer((R,), "float32"), gpos_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n, e = T.int64(), T.int64()
        g_u = T.match_buffer(gu_h, (e, 3), "float32")
        g_fc = T.match_buffer(gfc_h, (e,), "float32")
        g_rbf = T.match_buffer(grbf_h, (e, R), "float32")
        pos = T.match_buffer(pos_h, (n, 3), "float32")
        src = T.match_buffer(src_h, (e,), "int64")
        dst = T.match_buffer(dst_h, (e,), "int64")
        g_pos = T.match_buffer(gpos_h, (n, 3), "float32")
        with T.sblock("root"):
            g_vec = T.alloc_buffer((e, 3), "float32")
            s = T.alloc_buffer((4,), "float32")  # |r_ij|, fc, dfc/dr, then dL/dr
            t = T.alloc_buffer((R,), "float32")
            for i in range(e):
                s[0] = _edge(tirx, pos, src, dst, i, cutoff)[1]
                s[1] = _edge(tirx, pos, src, dst, i, cutoff)[2]
                s[2] = _edge(tirx, pos, src, dst, i, cutoff)[3]
                for j in T.vectorized(R):
                    t[j] = g_rbf[i, j] * fast_exp_expr(tirx, T.float32(-gamma) * (s[0] - centers[j]) * (s[0] - centers[j])) * (
                        T.float32(-2.0 * gamma) * (s[0] - centers[j]) * s[1] + s[2])
                s[3] = g_fc[i] * s[2]
                for j in range(R):
                    s[3] = s[3] + t[j]
                for k in range(3):  # (g_u - (g_u · u) u) / r + dL/dr u, with u = vec / r
                    g_vec[i, k] = (g_u[i, k] - _dot_u(tirx, g_u, pos, src, dst, i, cutoff) * (
                        _edge(tirx, pos, src, dst, i, cutoff)[0](k) / s[0])) / s[0] \
                        + s[3] * (_edge(tirx, pos, src, dst, i, cutoff)[0](k) / s[0])
            for a, k in T.grid(n, 3):
                g_pos[a, k] = T.float32(0)
            for i in range(e):
                for k in range(3):
                    g_pos[src[i], k] = g_pos[src[i], k] + g_vec[i, k]
                    g_pos[dst[i], k] = g_pos[dst[i], k] - g_vec[i, k]

    return geometry_bwd.with_attrs({"global_symbol": f"qso3_edge_geometry_backward_{R}", "tirx.is_scheduled": True,
                                    "op_pattern": 8})
