"""MDDQ as TIR kernels: one for the forward (quantize + dequantize) and one for the straight-through
backward of l=1 features (N, 3, F), instead of ~20 generic operators each. They implement the torch
operators of nn.ops.mddq (the numerics are defined there) and replace them at import
(compiler.relax_import.CONVERTERS)."""

from __future__ import annotations

from ...nn.ops.mddq import EPS2
from ...nn.quant import DIRECTION_LEVELS, MDDQ_EPS

# ---- TIR kernels (TE expressions, N symbolic, F static) -----------------------------------------

def _pick(tir, xs, c):
    return tir.Select(c == 0, xs[0], tir.Select(c == 1, xs[1], xs[2]))


def _te_parts(tir, V, step, i, f, qmax: int, cube: bool):
    f32 = lambda x: tir.const(x, "float32")  # noqa: E731
    v = [V[i, c, f] for c in range(3)]
    r = tir.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + f32(EPS2))
    u = [c / r for c in v]
    a = [tir.abs(c) for c in u]
    amax = tir.max(tir.max(a[0], a[1]), a[2])
    m = tir.max(amax, f32(MDDQ_EPS)) if cube else f32(1.0)
    d = [tir.floor(c / m * f32(DIRECTION_LEVELS) + f32(0.5)) for c in u]
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


def _grad_expr(tir, G, V, step, i, c, f, qmax: int, cube: bool, geometric: bool):
    f32 = lambda x: tir.const(x, "float32")  # noqa: E731
    p = _te_parts(tir, V, step, i, f, qmax, cube)
    d, nd, rq, r, v = p["d"], p["nd"], p["rq"], p["r"], p["v"]
    g = [G[i, k, f] for k in range(3)]
    g_rq = (g[0] * d[0] + g[1] * d[1] + g[2] * d[2]) * nd
    dg = (g[0] * d[0] + g[1] * d[1] + g[2] * d[2]) * rq
    if geometric:  # the direction's gradient taken at u
        g_u = [rq * g[k] for k in range(3)]
    else:
        g_w = [f32(DIRECTION_LEVELS) * (nd * rq * g[k] - d[k] * nd * nd * nd * dg) for k in range(3)]
        g_u = _cube_grad(tir, p, g_w) if cube else g_w
    x = r / step[f]
    inside = tir.Select(tir.all(x >= f32(0.0), x <= f32(qmax)), f32(1.0), f32(0.0))
    g_r = g_rq * inside - (g_u[0] * v[0] + g_u[1] * v[1] + g_u[2] * v[2]) / (r * r)
    return _pick(tir, g_u, c) / r + g_r * _pick(tir, v, c) / r


def _prim_func(name: str, channels: int, build):
    from tvm import te, tirx

    n = tirx.Var("n", "int64")
    ins = build(te, tirx, n)
    # opaque to FuseOps: fusing producers into these kernels trips a FuseTIR buffer-mapping check
    return te.create_prim_func(ins).with_attrs({"global_symbol": name, "tirx.noalias": True, "op_pattern": 8})


def forward_func(channels: int, qmax: int, cube: bool, geometric: bool = False):
    """out (N, 3, F) = MDDQ(v (N, 3, F); magnitude steps (F,)); `geometric` (the STE) changes only the backward."""
    def build(te, tir, n):
        V = te.placeholder((n, 3, channels), "float32", name="v")
        S = te.placeholder((channels,), "float32", name="step")

        def out(i, c, f):
            p = _te_parts(tir, V, S, i, f, qmax, cube)
            return p["rq"] * p["nd"] * _pick(tir, p["d"], c)
        return [V, S, te.compute((n, 3, channels), out, name="mddq")]
    return _prim_func("qso3_mddq", channels, build)


def backward_func(channels: int, qmax: int, cube: bool, geometric: bool):
    """dL/dv (N, 3, F) from dL/dout, v and the magnitude steps (straight-through, see module doc)."""
    def build(te, tir, n):
        G = te.placeholder((n, 3, channels), "float32", name="grad")
        V = te.placeholder((n, 3, channels), "float32", name="v")
        S = te.placeholder((channels,), "float32", name="step")
        out = te.compute((n, 3, channels), lambda i, c, f: _grad_expr(tir, G, V, S, i, c, f, qmax, cube, geometric),
                         name="mddq_bwd")
        return [G, V, S, out]
    return _prim_func("qso3_mddq_backward", channels, build)
