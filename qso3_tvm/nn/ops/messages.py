"""A layer's messages, their neighbor sums and the residual sums as torch custom operators `qso3::messages` and
`qso3::messages_backward` (compiled to one TIR kernel each by compiler.kernels.messages), so that the
edge-sized messages, gathers and their gradients never reach memory. Per edge e = j -> i, channel c of
head h (model.residual_messages is the definition):

    s1_i    = s_i + Σ_e α_eh φs_ec vs_jc
    v1_i,k  = v_i,k + Σ_e α_eh (φr_ec vr_jc u_ek + φv_ec (W v_j)_k,c)

Inputs: α (E, H) attention, φ (P, 3F) radial filter [φs | φr | φv] per pair of edges (edge e's is φ[pair[e]]),
val (N, 2F) [vs | vr] per atom, the layer's inputs s (N, F) and v (N, 3, F), W (F, F) the vec_value Linear's
weight (a constant), u (E, 3) unit edge vectors, src, dst, pair (E,) and each pair's two edges canon, partner
(P = E // 2,) (nn.ops.pairs). The layer's inputs enter here (and not in a separate add) so that the gradient of
v is complete when the backward returns it (g_v1 + W^T-mixed neighbor part: no add kernel), and that of s is
g_s1 itself. The backward is the exact vector-Jacobian product (the operator is linear in each input), written
once in torch operators in `messages_backward` and once as a TIR kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import residual_messages, segment_sum
from . import weight_mix


@torch.library.custom_op("qso3::messages", mutates_args=())
def messages(alpha: torch.Tensor, phi: torch.Tensor, val: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
             weight: torch.Tensor, u: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, pair: torch.Tensor,
             canon: torch.Tensor, partner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s1, v1 = residual_messages(alpha, phi, val, s, v, weight_mix(weight), u, src, dst, (pair, canon, partner))
    return s1, v1


@messages.register_fake
def _(alpha, phi, val, s, v, weight, u, src, dst, pair, canon, partner):
    return s.new_empty(s.shape), v.new_empty(v.shape)


@torch.library.custom_op("qso3::messages_backward", mutates_args=())
def messages_backward(g_s: torch.Tensor, g_v: torch.Tensor, alpha: torch.Tensor, phi: torch.Tensor,
                      val: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, src: torch.Tensor,
                      dst: torch.Tensor, pair: torch.Tensor, canon: torch.Tensor,
                      partner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (α, φ, val, v, u) from those of (s1, v1) (that of s is g_s itself; that of φ summed per pair)."""
    n, (E, H), F = val.shape[0], alpha.shape, v.shape[2]
    a = alpha.repeat_interleave(F // H, dim=1)
    phi_s, phi_r, phi_v = phi[pair].split(F, dim=-1)
    val_s, val_r = val[src].split(F, dim=-1)
    gs, gv, vvj = g_s[dst], g_v[dst], (v @ weight.T)[src]  # (E, F), (E, 3, F), (E, 3, F)
    t = (gv * u[:, :, None]).sum(1)  # (E, F): the gradient of φr vr α along u
    w = (gv * vvj).sum(1)
    g_a = gs * phi_s * val_s + t * phi_r * val_r + w * phi_v
    g_alpha = g_a.view(E, H, F // H).sum(-1)
    g_phi = segment_sum(torch.cat([gs * a * val_s, t * a * val_r, w * a], dim=-1), pair, phi.shape[0])
    g_val = segment_sum(torch.cat([gs * a * phi_s, t * a * phi_r], dim=-1), src, n)
    g_vv = segment_sum((a * phi_v)[:, None, :] * gv, src, n)
    g_u = (gv * (a * phi_r * val_r)[:, None, :]).sum(-1)
    return g_alpha, g_phi, g_val, g_v + g_vv @ weight, g_u


@messages_backward.register_fake
def _(g_s, g_v, alpha, phi, val, v, weight, u, src, dst, pair, canon, partner):
    return alpha.new_empty(alpha.shape), phi.new_empty(phi.shape), val.new_empty(val.shape), v.new_empty(v.shape), \
        u.new_empty(u.shape)


def _setup(ctx, inputs, output):
    alpha, phi, val, s, v, weight, u, src, dst, *pairs = inputs
    ctx.save_for_backward(alpha, phi, val, v, weight, u, src, dst, *pairs)


def _backward(ctx, g_s, g_v):
    alpha, phi, val, v, weight, u, src, dst, *pairs = ctx.saved_tensors
    g_s = torch.zeros((v.shape[0], v.shape[2]), dtype=v.dtype, device=v.device) if g_s is None else g_s
    g_v = torch.zeros_like(v) if g_v is None else g_v
    g_alpha, g_phi, g_val, g_v0, g_u = torch.ops.qso3.messages_backward(g_s, g_v, alpha, phi, val, v, weight, u, src, dst,
                                                                                 *pairs)
    return g_alpha, g_phi, g_val, g_s, g_v0, None, g_u, None, None, None, None, None


messages.register_autograd(_backward, setup_context=_setup)


class MessagesKernel(nn.Module):
    """Deployment form of a layer's messages and residual sums (InteractionLayer.fused_messages): the vec_value Linear
    (float, or int8 weights dequantized; no bias) enters as its weight matrix; φ per pair of edges (`pairs` = pair,
    canon, partner: nn.ops.pairs)."""

    def forward(self, alpha, phi, val, s, v, vec_value, u, src, dst, pairs):
        from . import linear_weight

        return torch.ops.qso3.messages(alpha, phi, val, s, v, linear_weight(vec_value), u, src, dst, *pairs)


def fuse_messages(model: nn.Module) -> nn.Module:
    """`model` (changed in place) with every interaction layer aggregating through qso3::messages, on radial filters
    computed once per pair of edges (qso3::edge_pairs)."""
    from ..model import InteractionLayer
    from .pairs import PairsKernel

    model.fused_pairs = PairsKernel()
    for layer in model.modules():
        if isinstance(layer, InteractionLayer):
            layer.fused_messages = MessagesKernel()
    return model
