"""A layer's update around its MLP as TIR kernels: residual_norms and gated_update and their backwards, one
kernel each (N symbolic, F static). They implement the torch operators of nn.ops.update (the numerics are
model.residual_norms and model.gated_update) and replace them at import (compiler.relax_import.CONVERTERS).

Each is one "row" block per atom (kernels.schedule.parallel_rows puts the atoms of large static calls on the
thread pool) with its channels as vectors; the l=1 channel mix W v (3 x F -> 3 x 2F per atom) accumulates in
the row's own buffer.
"""

from __future__ import annotations

from .schedule import row_kernel


def residual_norms_func(channels: int):
    """(s (n, F), v (n, 3, F), W^T (F, 2F)) -> x (n, 2F) = [s | |vv|], s, v (copies), uvvv (n, 3, 2F)."""
    from tvm.script import tirx as T

    F = channels

    @T.prim_func(s_tir=True)
    def residual_norms(s_h: T.handle, v_h: T.handle, wt: T.Buffer((F, 2 * F), "float32"),
                       x_h: T.handle, s1_h: T.handle, v1_h: T.handle, uvvv_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        s = T.match_buffer(s_h, (n, F), "float32")
        v = T.match_buffer(v_h, (n, 3, F), "float32")
        x = T.match_buffer(x_h, (n, 2 * F), "float32")
        s1 = T.match_buffer(s1_h, (n, F), "float32")
        v1 = T.match_buffer(v1_h, (n, 3, F), "float32")
        uvvv = T.match_buffer(uvvv_h, (n, 3, 2 * F), "float32")
        for i in range(n):
            with T.sblock("row"):
                r = T.axis.spatial(n, i)
                acc = T.sblock_alloc_buffer((3, 2 * F), "float32")
                for c in T.vectorized(F):
                    x[r, c] = s[r, c]
                    s1[r, c] = s[r, c]
                for k in range(3):
                    for c in T.vectorized(F):
                        v1[r, k, c] = v[r, k, c]
                    for h in range(2):  # F outputs at a time: their sums fit in registers
                        for o in T.vectorized(F):
                            acc[k, h * F + o] = T.float32(0)
                        for c in range(F):
                            for o in T.vectorized(F):
                                acc[k, h * F + o] = acc[k, h * F + o] + v[r, k, c] * wt[c, h * F + o]
                    for o in T.vectorized(2 * F):
                        uvvv[r, k, o] = acc[k, o]
                for c in T.vectorized(F):
                    x[r, F + c] = T.sqrt(acc[0, F + c] * acc[0, F + c] + acc[1, F + c] * acc[1, F + c]
                                         + acc[2, F + c] * acc[2, F + c] + T.float32(1e-8))

    return row_kernel(residual_norms, f"qso3_residual_norms_{F}")


def residual_norms_backward_func(channels: int):
    """(g_x (n, 2F), g_s1 (n, F), g_v1 (n, 3, F), g_uvvv (n, 3, 2F), x, uvvv, W (2F, F)) -> g_s (n, F), g_v (n, 3, F)."""
    from tvm.script import tirx as T

    F = channels

    @T.prim_func(s_tir=True)
    def residual_norms_bwd(gx_h: T.handle, gs1_h: T.handle, gv1_h: T.handle, gu_h: T.handle, x_h: T.handle,
                           uvvv_h: T.handle, w: T.Buffer((2 * F, F), "float32"), gs_h: T.handle, gv_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        g_x = T.match_buffer(gx_h, (n, 2 * F), "float32")
        g_s1 = T.match_buffer(gs1_h, (n, F), "float32")
        g_v1 = T.match_buffer(gv1_h, (n, 3, F), "float32")
        g_uvvv = T.match_buffer(gu_h, (n, 3, 2 * F), "float32")
        x = T.match_buffer(x_h, (n, 2 * F), "float32")
        uvvv = T.match_buffer(uvvv_h, (n, 3, 2 * F), "float32")
        g_s = T.match_buffer(gs_h, (n, F), "float32")
        g_v = T.match_buffer(gv_h, (n, 3, F), "float32")
        for i in range(n):
            with T.sblock("row"):
                r = T.axis.spatial(n, i)
                t = T.sblock_alloc_buffer((3, 2 * F), "float32")  # the gradient of uvvv, the norm's share added
                acc = T.sblock_alloc_buffer((3, F), "float32")
                for c in T.vectorized(F):
                    g_s[r, c] = g_x[r, c] + g_s1[r, c]
                for k in range(3):
                    for c in T.vectorized(F):
                        t[k, c] = g_uvvv[r, k, c]
                        t[k, F + c] = g_uvvv[r, k, F + c] + g_x[r, F + c] / x[r, F + c] * uvvv[r, k, F + c]
                    for c in T.vectorized(F):
                        acc[k, c] = g_v1[r, k, c]
                    for o in range(2 * F):
                        for c in T.vectorized(F):
                            acc[k, c] = acc[k, c] + t[k, o] * w[o, c]
                    for c in T.vectorized(F):
                        g_v[r, k, c] = acc[k, c]

    return row_kernel(residual_norms_bwd, f"qso3_residual_norms_backward_{F}")


def gated_update_func(channels: int):
    """(a (n, 3F), s (n, F), v (n, 3, F), uvvv (n, 3, 2F)) -> s' (n, F), v' (n, 3, F)."""
    from tvm.script import tirx as T

    F = channels

    @T.prim_func(s_tir=True)
    def gated_update(a_h: T.handle, s_h: T.handle, v_h: T.handle, uvvv_h: T.handle, s2_h: T.handle, v2_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        a = T.match_buffer(a_h, (n, 3 * F), "float32")
        s = T.match_buffer(s_h, (n, F), "float32")
        v = T.match_buffer(v_h, (n, 3, F), "float32")
        uvvv = T.match_buffer(uvvv_h, (n, 3, 2 * F), "float32")
        s2 = T.match_buffer(s2_h, (n, F), "float32")
        v2 = T.match_buffer(v2_h, (n, 3, F), "float32")
        for i in range(n):
            with T.sblock("row"):
                r = T.axis.spatial(n, i)
                for c in T.vectorized(F):
                    s2[r, c] = s[r, c] + a[r, 2 * F + c] + a[r, F + c] * (
                        uvvv[r, 0, c] * uvvv[r, 0, F + c] + uvvv[r, 1, c] * uvvv[r, 1, F + c] + uvvv[r, 2, c] * uvvv[r, 2, F + c])
                for k in range(3):
                    for c in T.vectorized(F):
                        v2[r, k, c] = v[r, k, c] + a[r, c] * uvvv[r, k, c]

    return row_kernel(gated_update, f"qso3_gated_update_{F}")


def gated_update_backward_func(channels: int):
    """(g_s (n, F), g_v (n, 3, F), a (n, 3F), uvvv (n, 3, 2F)) -> g_a (n, 3F), g_uvvv (n, 3, 2F)."""
    from tvm.script import tirx as T

    F = channels

    @T.prim_func(s_tir=True)
    def gated_update_bwd(gs_h: T.handle, gv_h: T.handle, a_h: T.handle, uvvv_h: T.handle, ga_h: T.handle,
                         gu_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        g_s = T.match_buffer(gs_h, (n, F), "float32")
        g_v = T.match_buffer(gv_h, (n, 3, F), "float32")
        a = T.match_buffer(a_h, (n, 3 * F), "float32")
        uvvv = T.match_buffer(uvvv_h, (n, 3, 2 * F), "float32")
        g_a = T.match_buffer(ga_h, (n, 3 * F), "float32")
        g_uvvv = T.match_buffer(gu_h, (n, 3, 2 * F), "float32")
        for i in range(n):
            with T.sblock("row"):
                r = T.axis.spatial(n, i)
                for c in T.vectorized(F):
                    g_a[r, c] = g_v[r, 0, c] * uvvv[r, 0, c] + g_v[r, 1, c] * uvvv[r, 1, c] + g_v[r, 2, c] * uvvv[r, 2, c]
                    g_a[r, F + c] = g_s[r, c] * (uvvv[r, 0, c] * uvvv[r, 0, F + c] + uvvv[r, 1, c] * uvvv[r, 1, F + c]
                                                 + uvvv[r, 2, c] * uvvv[r, 2, F + c])
                    g_a[r, 2 * F + c] = g_s[r, c]
                for k in range(3):
                    for c in T.vectorized(F):
                        g_uvvv[r, k, c] = g_v[r, k, c] * a[r, c] + g_s[r, c] * a[r, F + c] * uvvv[r, k, F + c]
                        g_uvvv[r, k, F + c] = g_s[r, c] * a[r, F + c] * uvvv[r, k, c]

    return row_kernel(gated_update_bwd, f"qso3_gated_update_backward_{F}")
