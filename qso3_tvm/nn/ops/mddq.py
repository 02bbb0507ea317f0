"""MDDQ as torch custom operators `qso3::mddq` and `qso3::mddq_backward` (the eager reference).

Deployment path: nn.int8.to_int8 swaps each MDDQ module for MDDQKernel, which calls these operators.
The exported graph then holds `qso3.mddq` / `qso3.mddq_backward` nodes, which
compiler.relax_import.CONVERTERS maps to the TIR kernels of compiler.kernels.mddq. Numerics (per atom n, channel f; quant.MDDQ is the definition):
  r = sqrt(|v|² + ε²), u = v / r, w = u / max(max_c |u_c|, ε) (cube grid) or u (sphere grid),
  d = floor(L w + 0.5) (L = levels: 127 for the paper's int8 codes), r_q = clamp(floor(r / s + 0.5), 0, qmax) · s, out = r_q · d · (|d|² + ε²)^-½
Backward: what autograd gives the QAT model (quant.MDDQ.ste), so compiled forces equal QAT forces:
  grid STE: the vector-Jacobian product of that function with round() replaced by the identity;
  geometric STE: of out = r_q · u (the decoded direction's gradient taken at u = v / r).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant import DIRECTION_LEVELS, MDDQ_EPS

EPS2 = MDDQ_EPS**2


def _forward_parts(v, step, qmax: int, cube: bool, levels: int):
    r = torch.sqrt((v * v).sum(1) + EPS2)  # (N, F)
    u = v / r[:, None, :]
    m = u.abs().amax(1).clamp(min=MDDQ_EPS) if cube else torch.ones_like(r)
    d = torch.floor(u / m[:, None, :] * levels + 0.5)
    nd = torch.rsqrt((d * d).sum(1) + EPS2)
    rq = torch.clamp(torch.floor(r / step + 0.5), 0, qmax) * step
    return r, u, m, d, nd, rq


@torch.library.custom_op("qso3::mddq", mutates_args=())
def mddq(v: torch.Tensor, step: torch.Tensor, qmax: int, cube: bool, geometric: bool,
         levels: int = DIRECTION_LEVELS) -> torch.Tensor:
    """(`geometric` changes only the backward)"""
    _, _, _, d, nd, rq = _forward_parts(v, step, qmax, cube, levels)
    return (rq * nd)[:, None, :] * d


@torch.library.custom_op("qso3::mddq_backward", mutates_args=())
def mddq_backward(grad: torch.Tensor, v: torch.Tensor, step: torch.Tensor, qmax: int, cube: bool,
                  geometric: bool, levels: int = DIRECTION_LEVELS) -> torch.Tensor:
    r, u, m, d, nd, rq = _forward_parts(v, step, qmax, cube, levels)
    unit = d * nd[:, None, :]
    g_rq = (grad * unit).sum(1)
    g_unit = rq[:, None, :] * grad
    if geometric:
        return _through_r_and_u(g_unit, g_rq, v, r, step, qmax)
    g_d = nd[:, None, :] * g_unit - d * (nd**3 * (d * g_unit).sum(1))[:, None, :]
    g_w = levels * g_d
    if cube:  # w = u / m, m = clamp(max_c |u_c|, ε): amax's gradient is shared by tied maxima
        g_u = g_w / m[:, None, :]
        g_m = -(g_w * u).sum(1) / (m * m) * (u.abs().amax(1) >= MDDQ_EPS)
        is_max = (u.abs() == u.abs().amax(1, keepdim=True)).to(v.dtype)
        g_u = g_u + torch.sign(u) * is_max * (g_m / is_max.sum(1))[:, None, :]
    else:
        g_u = g_w
    return _through_r_and_u(g_u, g_rq, v, r, step, qmax)


def _through_r_and_u(g_u, g_rq, v, r, step, qmax: int):
    """dL/dv from dL/du (u = v / r) and dL/dr_q (straight through the magnitude's rounding, clipped)."""
    x = r / step
    g_r = g_rq * ((x >= 0) & (x <= qmax)).to(v.dtype) - (g_u * v).sum(1) / (r * r)
    return g_u / r[:, None, :] + g_r[:, None, :] * v / r[:, None, :]


@mddq.register_fake
def _(v, step, qmax, cube, geometric, levels=DIRECTION_LEVELS):
    return torch.empty_like(v)


@mddq_backward.register_fake
def _(grad, v, step, qmax, cube, geometric, levels=DIRECTION_LEVELS):
    return torch.empty_like(v)


def _setup(ctx, inputs, output):
    v, step, qmax, cube, geometric, levels = inputs
    ctx.save_for_backward(v, step)
    ctx.qmax, ctx.cube, ctx.geometric, ctx.levels = qmax, cube, geometric, levels


def _backward(ctx, grad):
    v, step = ctx.saved_tensors
    g = torch.ops.qso3.mddq_backward(grad, v, step, ctx.qmax, ctx.cube, ctx.geometric, ctx.levels)
    return g, None, None, None, None, None


mddq.register_autograd(_backward, setup_context=_setup)


class MDDQKernel(nn.Module):
    """Deployment form of quant.MDDQ: the fixed magnitude steps and one custom operator."""

    def __init__(self, q):
        super().__init__()
        self.register_buffer("step", q.magnitude.scale().detach().clone().reshape(-1))
        self.qmax, self.cube, self.geometric, self.levels = q.magnitude.qmax, q.grid == "cube", q.ste == "geometric", q.levels

    def forward(self, v):
        return torch.ops.qso3.mddq(v, self.step.to(v.dtype), self.qmax, self.cube, self.geometric, self.levels)
