"""MDDQ as TIR kernels: one for the forward (quantize + dequantize) and one for the straight-through
backward of l=1 features (N, 3, F), instead of ~20 generic operators each. They implement the torch
operators of nn.ops.mddq (the numerics are defined there) and replace them at import
(compiler.relax_import.CONVERTERS)."""

from __future__ import annotations

from ...nn.ops.mddq import EPS2
from ...nn.quant import DIRECTION_LEVELS, MDDQ_EPS

# ---- TIR kernels (N symbolic, F static) -------------------------------------------------------------

def _te_parts(tir, V, step, i, f, qmax: int, cube: bool, levels: int):
    f32 = lambda x: tir.const(x, "float32")  # noqa: E731
    v = [V[i, c, f] for c in range(3)]
    r = tir.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + f32(EPS2))
    u = [c / r for c in v]
    a = [tir.abs(c) for c in u]
    amax = tir.max(tir.max(a[0], a[1]), a[2])
    m = tir.max(amax, f32(MDDQ_EPS)) if cube else f32(1.0)
    d = [tir.floor(c / m * f32(levels) + f32(0.5)) for c in u]
    nd = tir.rsqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2] + f32(EPS2))
    rq = tir.min(tir.max(tir.floor(r / step[f] + f32(0.5)), f32(0.0)), f32(qmax)) * step[f]
    return dict(v=v, r=r, u=u, a=a, amax=amax, m=m, d=d, nd=nd, rq=rq)


def _cube_grad(tir, p, g_w):
    f32 = lambda x: tir.const(x, "float32")  # noqa: E731
    u, a, amax, m = p["u"], p["a"], p["amax"], p["m"]
    g_m = tir.Select(amax >= f32(MDDQ_EPS), -(g_w[0] * u[0] + g_w[1] * u[1] + g_w[2] * u[2]) / (m * m), f32(0.0))
    is_max = [tir.Select(a[c] == amax, f32(1.0), f32(0.0)) for c in range(3)]
    share = g_m / (is_max[0] + is_max[1] + is_max[2])
    sign = [tir.Select(u[c] > f32(0.0), f32(1.0), tir.Select(u[c] < f32(0.0), f32(-1.0), f32(0.0))) for c in range(3)]
    return [g_w[c] / m + sign[c] * is_max[c] * share for c in range(3)]


def _grad_out(tir, G, V, step, i, f, qmax: int, cube: bool, geometric: bool, levels: int) -> list:
    """The three components of dL/dv at atom i, channel f."""
    f32 = lambda x: tir.const(x, "float32")  # noqa: E731
    p = _te_parts(tir, V, step, i, f, qmax, cube, levels)
    d, nd, rq, r, v = p["d"], p["nd"], p["rq"], p["r"], p["v"]
    g = [G[i, k, f] for k in range(3)]
    g_rq = (g[0] * d[0] + g[1] * d[1] + g[2] * d[2]) * nd
    dg = (g[0] * d[0] + g[1] * d[1] + g[2] * d[2]) * rq
    if geometric:  # the direction's gradient taken at u
        g_u = [rq * g[k] for k in range(3)]
    else:
        g_w = [f32(levels) * (nd * rq * g[k] - d[k] * nd * nd * nd * dg) for k in range(3)]
        g_u = _cube_grad(tir, p, g_w) if cube else g_w
    x = r / step[f]
    inside = tir.Select(tir.all(x >= f32(0.0), x <= f32(qmax)), f32(1.0), f32(0.0))
    g_r = g_rq * inside - (g_u[0] * v[0] + g_u[1] * v[1] + g_u[2] * v[2]) / (r * r)
    return [g_u[c] / r + g_r * v[c] / r for c in range(3)]


def _forward_out(tir, V, step, i, f, qmax: int, cube: bool, levels: int) -> list:
    p = _te_parts(tir, V, step, i, f, qmax, cube, levels)
    return [p["rq"] * p["nd"] * p["d"][c] for c in range(3)]


def _row_kernel(func, name: str):
    """Channels vectorized; one "row" block per atom (kernels.schedule.parallel_rows puts the atoms of large
    static calls on the thread pool). Opaque to FuseOps: fusing producers into these kernels trips a FuseTIR
    buffer-mapping check."""
    from tvm import s_tir

    from .schedule import _vectorize_innermost, row_kernel

    sch = s_tir.Schedule(func)
    _vectorize_innermost(sch, sch.get_loops(sch.get_sblock("mddq"))[-1])
    return row_kernel(sch.mod["main"].with_attr("tirx.noalias", True), name)


def _atom_rows(F: int):
    """A macro writing O (n, 3, F) from components(r, f) -> three PrimExprs, per atom and channel in one pass."""
    from tvm.script import tirx as T

    @T.macro
    def rows(n, O, components):
        for i in range(n):
            with T.sblock("row"):
                r = T.axis.spatial(n, i)
                for f in range(F):
                    with T.sblock("mddq"):
                        vf = T.axis.spatial(F, f)
                        O[r, 0, vf] = components(r, vf)[0]
                        O[r, 1, vf] = components(r, vf)[1]
                        O[r, 2, vf] = components(r, vf)[2]

    return rows


def forward_func(channels: int, qmax: int, cube: bool, geometric: bool = False, levels: int = DIRECTION_LEVELS):
    """out (N, 3, F) = MDDQ(v (N, 3, F); magnitude steps (F,)); `geometric` (the STE) changes only the backward.
    `levels`: the largest direction code. Per atom and channel the three components are written in one pass."""
    from tvm import tirx
    from tvm.script import tirx as T

    F, rows = channels, _atom_rows(channels)

    @T.prim_func(s_tir=True)
    def mddq(v_h: T.handle, step: T.Buffer((F,), "float32"), o_h: T.handle):
        n = T.int64()
        V = T.match_buffer(v_h, (n, 3, F), "float32")
        O = T.match_buffer(o_h, (n, 3, F), "float32")
        rows(n, O, lambda r, f: _forward_out(tirx, V, step, r, f, qmax, cube, levels))

    return _row_kernel(mddq, "qso3_mddq")


def backward_func(channels: int, qmax: int, cube: bool, geometric: bool, levels: int = DIRECTION_LEVELS):
    """dL/dv (N, 3, F) from dL/dout, v and the magnitude steps (straight-through, see module doc)."""
    from tvm import tirx
    from tvm.script import tirx as T

    F, rows = channels, _atom_rows(channels)

    @T.prim_func(s_tir=True)
    def mddq_bwd(g_h: T.handle, v_h: T.handle, step: T.Buffer((F,), "float32"), o_h: T.handle):
        n = T.int64()
        G = T.match_buffer(g_h, (n, 3, F), "float32")
        V = T.match_buffer(v_h, (n, 3, F), "float32")
        O = T.match_buffer(o_h, (n, 3, F), "float32")
        rows(n, O, lambda r, f: _grad_out(tirx, G, V, step, r, f, qmax, cube, geometric, levels))

    return _row_kernel(mddq_bwd, "qso3_mddq_backward")
