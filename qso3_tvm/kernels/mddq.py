"""MDDQ as a custom operator: one TIR kernel for the forward (quantize + dequantize) and one for the
straight-through backward of l=1 features (N, 3, F), instead of ~20 generic operators each.

Deployment path: qso3_tvm.int8.to_int8 swaps each MDDQ module for MDDQKernel, which calls the torch
custom operators below (eager implementations in torch: the reference). The exported graph then
holds `qso3.mddq` / `qso3.mddq_backward` nodes, which relax_frontend.CONVERTERS maps to the TIR
kernels. Numerics (per atom n, channel f; quant.MDDQ is the definition):
  r = sqrt(|v|² + ε²), u = v / r, w = u / max(max_c |u_c|, ε) (cube grid) or u (sphere grid),
  d = floor(127 w + 0.5), r_q = clamp(floor(r / s + 0.5), 0, qmax) · s, out = r_q · d · (|d|² + ε²)^-½
Backward: the vector-Jacobian product of that function with round() replaced by the identity
(what autograd gives the QAT model: straight-through), so compiled forces equal QAT forces.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant import DIRECTION_LEVELS, MDDQ_EPS

EPS2 = MDDQ_EPS**2


def _forward_parts(v, step, qmax: int, cube: bool):
    r = torch.sqrt((v * v).sum(1) + EPS2)  # (N, F)
    u = v / r[:, None, :]
    m = u.abs().amax(1).clamp(min=MDDQ_EPS) if cube else torch.ones_like(r)
    d = torch.floor(u / m[:, None, :] * DIRECTION_LEVELS + 0.5)
    nd = torch.rsqrt((d * d).sum(1) + EPS2)
    rq = torch.clamp(torch.floor(r / step + 0.5), 0, qmax) * step
    return r, u, m, d, nd, rq


@torch.library.custom_op("qso3::mddq", mutates_args=())
def mddq(v: torch.Tensor, step: torch.Tensor, qmax: int, cube: bool) -> torch.Tensor:
    _, _, _, d, nd, rq = _forward_parts(v, step, qmax, cube)
    return (rq * nd)[:, None, :] * d


@torch.library.custom_op("qso3::mddq_backward", mutates_args=())
def mddq_backward(grad: torch.Tensor, v: torch.Tensor, step: torch.Tensor, qmax: int, cube: bool) -> torch.Tensor:
    r, u, m, d, nd, rq = _forward_parts(v, step, qmax, cube)
    unit = d * nd[:, None, :]
    g_rq = (grad * unit).sum(1)
    g_unit = rq[:, None, :] * grad
    g_d = nd[:, None, :] * g_unit - d * (nd**3 * (d * g_unit).sum(1))[:, None, :]
    g_w = DIRECTION_LEVELS * g_d
    if cube:  # w = u / m, m = clamp(max_c |u_c|, ε): amax's gradient is shared by tied maxima
        g_u = g_w / m[:, None, :]
        g_m = -(g_w * u).sum(1) / (m * m) * (u.abs().amax(1) >= MDDQ_EPS)
        is_max = (u.abs() == u.abs().amax(1, keepdim=True)).to(v.dtype)
        g_u = g_u + torch.sign(u) * is_max * (g_m / is_max.sum(1))[:, None, :]
    else:
        g_u = g_w
    x = r / step
    g_r = g_rq * ((x >= 0) & (x <= qmax)).to(v.dtype) - (g_u * v).sum(1) / (r * r)
    return g_u / r[:, None, :] + g_r[:, None, :] * v / r[:, None, :]


@mddq.register_fake
def _(v, step, qmax, cube):
    return torch.empty_like(v)


@mddq_backward.register_fake
def _(grad, v, step, qmax, cube):
    return torch.empty_like(v)


def _setup(ctx, inputs, output):
    v, step, qmax, cube = inputs
    ctx.save_for_backward(v, step)
    ctx.qmax, ctx.cube = qmax, cube


def _backward(ctx, grad):
    v, step = ctx.saved_tensors
    return torch.ops.qso3.mddq_backward(grad, v, step, ctx.qmax, ctx.cube), None, None, None


mddq.register_autograd(_backward, setup_context=_setup)


class MDDQKernel(nn.Module):
    """Deployment form of quant.MDDQ: the fixed magnitude steps and one custom operator."""

    def __init__(self, q):
        super().__init__()
        self.register_buffer("step", q.magnitude.scale().detach().clone().reshape(-1))
        self.qmax, self.cube = q.magnitude.qmax, q.grid == "cube"

    def forward(self, v):
        return torch.ops.qso3.mddq(v, self.step.to(v.dtype), self.qmax, self.cube)


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


def _grad_expr(tir, G, V, step, i, c, f, qmax: int, cube: bool):
    f32 = lambda x: tir.const(x, "float32")  # noqa: E731
    p = _te_parts(tir, V, step, i, f, qmax, cube)
    d, nd, rq, r, v = p["d"], p["nd"], p["rq"], p["r"], p["v"]
    g = [G[i, k, f] for k in range(3)]
    g_rq = (g[0] * d[0] + g[1] * d[1] + g[2] * d[2]) * nd
    dg = (g[0] * d[0] + g[1] * d[1] + g[2] * d[2]) * rq
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


def forward_func(channels: int, qmax: int, cube: bool):
    """out (N, 3, F) = MDDQ(v (N, 3, F); magnitude steps (F,))."""
    def build(te, tir, n):
        V = te.placeholder((n, 3, channels), "float32", name="v")
        S = te.placeholder((channels,), "float32", name="step")

        def out(i, c, f):
            p = _te_parts(tir, V, S, i, f, qmax, cube)
            return p["rq"] * p["nd"] * _pick(tir, p["d"], c)
        return [V, S, te.compute((n, 3, channels), out, name="mddq")]
    return _prim_func("qso3_mddq", channels, build)


def backward_func(channels: int, qmax: int, cube: bool):
    """dL/dv (N, 3, F) from dL/dout, v and the magnitude steps (straight-through, see module doc)."""
    def build(te, tir, n):
        G = te.placeholder((n, 3, channels), "float32", name="grad")
        V = te.placeholder((n, 3, channels), "float32", name="v")
        S = te.placeholder((channels,), "float32", name="step")
        out = te.compute((n, 3, channels), lambda i, c, f: _grad_expr(tir, G, V, S, i, c, f, qmax, cube), name="mddq_bwd")
        return [G, V, S, out]
    return _prim_func("qso3_mddq_backward", channels, build)
