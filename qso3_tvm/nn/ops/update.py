"""A layer's update around its MLP as torch custom operators, compiled to one TIR kernel each by
compiler.kernels.update (the numerics are model.residual_norms and model.gated_update):

    qso3::residual_norms     the MLP input [s | |vv|] of the residual sums s, v (qso3::messages' outputs), s and v
                             passed on, and the l=1 channel mix [uv | vv] = W v: one pass per atom instead of ~7 kernels
    qso3::gated_update       s + a_ss + a_sv <uv, vv>, v + a_vv uv: one pass instead of ~4
and their exact vector-Jacobian products `*_backward` (written once here in torch operators, once as
TIR kernels). W is the vec_uv Linear's weight (2F, F), dequantized for int8 models (a constant).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import gated_update, residual_norms
from . import weight_mix


@torch.library.custom_op("qso3::residual_norms", mutates_args=())
def residual_norms_op(s: torch.Tensor, v: torch.Tensor,
                      weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """s (N, F), v (N, 3, F), weight (2F, F) -> x (N, 2F), s, v (copies: the gradients of both uses meet in the
    backward kernel), uvvv (N, 3, 2F)."""
    x, s1, v1, uvvv = residual_norms(s, v, weight_mix(weight))
    return x, s1.clone(), v1.clone(), uvvv


@residual_norms_op.register_fake
def _(s, v, weight):
    n, F = s.shape
    return s.new_empty((n, 2 * F)), s.new_empty(s.shape), v.new_empty(v.shape), v.new_empty((n, 3, 2 * F))


@torch.library.custom_op("qso3::residual_norms_backward", mutates_args=())
def residual_norms_backward(g_x: torch.Tensor, g_s1: torch.Tensor, g_v1: torch.Tensor, g_uvvv: torch.Tensor, x: torch.Tensor,
                            uvvv: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of (s, v) from those of (x, s, v (the copies), uvvv)."""
    F = x.shape[1] // 2
    g_norm = g_x[:, F:] / x[:, F:]  # d|vv|/dvv = vv / |vv|
    g_uvvv = torch.cat([g_uvvv[..., :F], g_uvvv[..., F:] + g_norm[:, None, :] * uvvv[..., F:]], -1)
    return g_x[:, :F] + g_s1, g_v1 + g_uvvv @ weight


@residual_norms_backward.register_fake
def _(g_x, g_s1, g_v1, g_uvvv, x, uvvv, weight):
    return g_s1.new_empty(g_s1.shape), g_v1.new_empty(g_v1.shape)


def _residual_setup(ctx, inputs, output):
    ctx.save_for_backward(output[0], output[3], inputs[2])


def _residual_backward(ctx, g_x, g_s1, g_v1, g_uvvv):
    x, uvvv, weight = ctx.saved_tensors
    F = x.shape[1] // 2
    g_x, g_s1, g_v1, g_uvvv = (torch.zeros_like(t) if g is None else g for g, t in
                               ((g_x, x), (g_s1, x[:, :F]), (g_v1, uvvv[..., :F]), (g_uvvv, uvvv)))
    g_s, g_v = torch.ops.qso3.residual_norms_backward(g_x, g_s1, g_v1, g_uvvv, x, uvvv, weight)
    return g_s, g_v, None


residual_norms_op.register_autograd(_residual_backward, setup_context=_residual_setup)


@torch.library.custom_op("qso3::gated_update", mutates_args=())
def gated_update_op(a: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                    uvvv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a (N, 3F), s (N, F), v (N, 3, F), uvvv (N, 3, 2F) -> s' (N, F), v' (N, 3, F)."""
    s2, v2 = gated_update(a, s, v, uvvv)
    return s2, v2


@gated_update_op.register_fake
def _(a, s, v, uvvv):
    return s.new_empty(s.shape), v.new_empty(v.shape)


@torch.library.custom_op("qso3::gated_update_backward", mutates_args=())
def gated_update_backward(g_s: torch.Tensor, g_v: torch.Tensor, a: torch.Tensor,
                          uvvv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of (a, uvvv) from those of (s', v'); those of s and v are g_s and g_v themselves."""
    F = g_s.shape[1]
    uv, vv = uvvv.split(F, dim=-1)
    a_vv, a_sv = a[:, :F], a[:, F:2 * F]
    g_a = torch.cat([(g_v * uv).sum(1), g_s * (uv * vv).sum(1), g_s], -1)
    gsv = (g_s * a_sv)[:, None, :]
    g_uvvv = torch.cat([g_v * a_vv[:, None, :] + gsv * vv, gsv * uv], -1)
    return g_a, g_uvvv


@gated_update_backward.register_fake
def _(g_s, g_v, a, uvvv):
    return a.new_empty(a.shape), uvvv.new_empty(uvvv.shape)


def _gated_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[3], inputs[2])


def _gated_backward(ctx, g_s, g_v):
    a, uvvv, v = ctx.saved_tensors
    g_s = torch.zeros((v.shape[0], v.shape[2]), dtype=v.dtype, device=v.device) if g_s is None else g_s
    g_v = torch.zeros_like(v) if g_v is None else g_v
    g_a, g_uvvv = torch.ops.qso3.gated_update_backward(g_s, g_v, a, uvvv)
    return g_a, g_s, g_v, g_uvvv


gated_update_op.register_autograd(_gated_backward, setup_context=_gated_setup)


class UpdateKernels(nn.Module):
    """Deployment form of a layer's update (InteractionLayer.fused_update): the vec_uv Linear (float, or int8
    weights dequantized; no bias) enters as its weight matrix."""

    def residual_norms(self, s, v, vec_uv):
        from . import linear_weight

        return torch.ops.qso3.residual_norms(s, v, linear_weight(vec_uv))

    def gated_update(self, a, s, v, uvvv):
        return torch.ops.qso3.gated_update(a, s, v, uvvv)


def fuse_update(model: nn.Module) -> nn.Module:
    """`model` (changed in place) with every interaction layer updating through the operators above."""
    from ..model import InteractionLayer

    for layer in model.modules():
        if isinstance(layer, InteractionLayer):
            layer.fused_update = UpdateKernels()
    return model
