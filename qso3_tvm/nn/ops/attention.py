"""Robust (L2-normalized) attention as one torch custom operator `qso3::l2_attention` (compiled to one
TIR kernel by compiler.kernels.attention): per-atom normalization and int8 codes of
q and k, int8 q̂·k̂ products with int32 accumulation, temperature, the cutoff-weighted segment
softmax over each atom's neighbors (with its attention sink) — one TIR kernel instead of ~25
generic operators and three edge-sized intermediates.

    q̂_n = codes(q_n / |q_n|), codes(x) = floor(127 clamp(x, -1, 1) + 0.5)   (int8, per atom and head)
    t_e = τ_h (q̂_dst · k̂_src) / 127²        (int8 × int8 -> int32, exact)
    m_h = max(0, max_e t_e)                  (stability shift, no gradient: as in the model)
    w_e = fc_e exp(t_e - m_h),  α_e = w_e / (Σ_{e' -> dst_e} w_e' + exp(-m_h))

This equals model.InteractionLayer.attention_weights with FixedGrid q̂/k̂ (normalizing per atom then
gathering gives the same values as gathering then normalizing). `levels` other than 127 (QuantConfig.direction_bits):
the same with codes in ±levels (int16 in the kernel). The backward (forces) is the
straight-through vector-Jacobian product, a second operator `qso3::l2_attention_backward` (torch
operators here, one TIR kernel when compiled): it recomputes the softmax rather than keeping
edge-sized intermediates.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import segment_sum
from ..quant import DIRECTION_LEVELS

NORM_EPS = 1e-12


def _codes(x, levels: int):
    u = x * torch.rsqrt((x * x).sum(-1, keepdim=True) + NORM_EPS)
    return torch.floor(u.clamp(-1.0, 1.0) * levels + 0.5), u


def _softmax_parts(q, k, src, dst, fc, tau, levels: int):
    """int8 codes (levels 127) and unit vectors of q, k; exp(t - m) per edge; the neighbor sums with the sink."""
    (cq, uq), (ck, uk) = _codes(q, levels), _codes(k, levels)
    t = tau * (cq[dst] * ck[src]).sum(-1) / levels**2  # (E, H)
    m = t.amax(0).clamp(min=0.0)
    e_t = torch.exp(t - m)
    denom = segment_sum(fc[:, None] * e_t, dst, q.shape[0]) + torch.exp(-m)
    return cq, uq, ck, uk, e_t, denom


@torch.library.custom_op("qso3::l2_attention", mutates_args=())
def l2_attention(q: torch.Tensor, k: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, fc: torch.Tensor,
                 tau: torch.Tensor, levels: int = DIRECTION_LEVELS) -> torch.Tensor:
    """α (E, H) from per-atom q, k (N, H, d), edges src -> dst, cutoff weights fc (E,), τ (H,); q̂, k̂ codes in ±levels."""
    *_, e_t, denom = _softmax_parts(q, k, src, dst, fc, tau, levels)
    return fc[:, None] * e_t / denom[dst]


@l2_attention.register_fake
def _(q, k, src, dst, fc, tau, levels=DIRECTION_LEVELS):
    return q.new_empty((src.shape[0], q.shape[1]))


@torch.library.custom_op("qso3::l2_attention_backward", mutates_args=())
def l2_attention_backward(g_alpha: torch.Tensor, q: torch.Tensor, k: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                          fc: torch.Tensor, tau: torch.Tensor, alpha: torch.Tensor,
                          levels: int = DIRECTION_LEVELS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Straight-through gradients of q, k (N, H, d) and fc (E,) from that of α (E, H)."""
    n = q.shape[0]
    cq, uq, ck, uk, e_t, denom = _softmax_parts(q, k, src, dst, fc, tau, levels)
    g_w = (g_alpha - segment_sum(g_alpha * alpha, dst, n)[dst]) / denom[dst]  # softmax-with-sink VJP
    g_t = g_w * fc[:, None] * e_t
    g_fc = (g_w * e_t).sum(-1)
    g_qhat = segment_sum((g_t * tau)[..., None] * ck[src] / levels, dst, n)  # STE: codes/127 ~ q̂
    g_khat = segment_sum((g_t * tau)[..., None] * cq[dst] / levels, src, n)
    return _norm_vjp(g_qhat, q, uq), _norm_vjp(g_khat, k, uk), g_fc


@l2_attention_backward.register_fake
def _(g_alpha, q, k, src, dst, fc, tau, alpha, levels=DIRECTION_LEVELS):
    return q.new_empty(q.shape), k.new_empty(k.shape), fc.new_empty(fc.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6], output)
    ctx.levels = inputs[6]


def _backward(ctx, g_alpha):
    q, k, src, dst, fc, tau, alpha = ctx.saved_tensors
    g_q, g_k, g_fc = torch.ops.qso3.l2_attention_backward(g_alpha, q, k, src, dst, fc, tau, alpha, ctx.levels)
    return g_q, g_k, None, None, g_fc, None, None


def _norm_vjp(g, x, u):
    """VJP of u = x / sqrt(|x|² + ε) (clamp to [-1, 1] passes the gradient: |u| <= 1)."""
    return (g - u * (g * u).sum(-1, keepdim=True)) * torch.rsqrt((x * x).sum(-1, keepdim=True) + NORM_EPS)


l2_attention.register_autograd(_backward, setup_context=_setup)


class L2AttentionKernel(nn.Module):
    """Deployment form of a layer's l2norm attention with fixed-grid q̂, k̂ (see quant.FixedGrid)."""

    def __init__(self, levels: int = DIRECTION_LEVELS):
        super().__init__()
        self.levels = levels

    def forward(self, q, k, src, dst, fc, log_tau):
        return torch.ops.qso3.l2_attention(q, k, src, dst, fc, torch.exp(log_tau), self.levels)
