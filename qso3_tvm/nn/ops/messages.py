"""A layer's messages and their neighbor sums as torch custom operators `qso3::messages` and
`qso3::messages_backward` (compiled to one TIR kernel each by compiler.kernels.messages), so that the
edge-sized messages, gathers and their gradients never reach memory. Per edge e = j -> i, channel c of
head h (model.aggregate_messages is the definition):

    ds_i    = Σ_e α_eh φs_ec vs_jc
    dv_i,k  = Σ_e α_eh (φr_ec vr_jc u_ek + φv_ec W v_j,k,c)

Inputs: α (E, H) attention, φ (E, 3F) radial filter [φs | φr | φv], val (N, 2F) [vs | vr] per atom,
vv (N, 3, F) = W v per atom, u (E, 3) unit edge vectors, src, dst (E,). The backward is the exact
vector-Jacobian product (the operator is linear in each input), written once in torch operators in
`messages_backward` and once as a TIR kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import aggregate_messages, segment_sum


@torch.library.custom_op("qso3::messages", mutates_args=())
def messages(alpha: torch.Tensor, phi: torch.Tensor, val: torch.Tensor, vv: torch.Tensor, u: torch.Tensor,
             src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return aggregate_messages(alpha, phi, val, vv, u, src, dst)


@messages.register_fake
def _(alpha, phi, val, vv, u, src, dst):
    return val.new_empty((val.shape[0], vv.shape[2])), vv.new_empty(vv.shape)


@torch.library.custom_op("qso3::messages_backward", mutates_args=())
def messages_backward(g_s: torch.Tensor, g_v: torch.Tensor, alpha: torch.Tensor, phi: torch.Tensor,
                      val: torch.Tensor, vv: torch.Tensor, u: torch.Tensor, src: torch.Tensor,
                      dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (α, φ, val, vv, u) from those of (ds, dv)."""
    n, (E, H), F = val.shape[0], alpha.shape, vv.shape[2]
    a = alpha.repeat_interleave(F // H, dim=1)
    phi_s, phi_r, phi_v = phi.split(F, dim=-1)
    val_s, val_r = val[src].split(F, dim=-1)
    gs, gv, vvj = g_s[dst], g_v[dst], vv[src]  # (E, F), (E, 3, F), (E, 3, F)
    t = (gv * u[:, :, None]).sum(1)  # (E, F): the gradient of φr vr α along u
    w = (gv * vvj).sum(1)
    g_a = gs * phi_s * val_s + t * phi_r * val_r + w * phi_v
    g_alpha = g_a.view(E, H, F // H).sum(-1)
    g_phi = torch.cat([gs * a * val_s, t * a * val_r, w * a], dim=-1)
    g_val = segment_sum(torch.cat([gs * a * phi_s, t * a * phi_r], dim=-1), src, n)
    g_vv = segment_sum((a * phi_v)[:, None, :] * gv, src, n)
    g_u = (gv * (a * phi_r * val_r)[:, None, :]).sum(-1)
    return g_alpha, g_phi, g_val, g_vv, g_u


@messages_backward.register_fake
def _(g_s, g_v, alpha, phi, val, vv, u, src, dst):
    return alpha.new_empty(alpha.shape), phi.new_empty(phi.shape), val.new_empty(val.shape), vv.new_empty(vv.shape), \
        u.new_empty(u.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, g_s, g_v):
    alpha, phi, val, vv, u, src, dst = ctx.saved_tensors
    grads = torch.ops.qso3.messages_backward(g_s, g_v, alpha, phi, val, vv, u, src, dst)
    return (*grads, None, None)


messages.register_autograd(_backward, setup_context=_setup)


class MessagesKernel(nn.Module):
    """Deployment form of a layer's messages and neighbor sums (InteractionLayer.fused_messages)."""

    def forward(self, alpha, phi, val, vv, u, src, dst):
        return torch.ops.qso3.messages(alpha, phi, val, vv, u, src, dst)


def fuse_messages(model: nn.Module) -> nn.Module:
    """`model` (changed in place) with every interaction layer aggregating through qso3::messages."""
    from ..model import InteractionLayer

    for layer in model.modules():
        if isinstance(layer, InteractionLayer):
            layer.fused_messages = MessagesKernel()
    return model
