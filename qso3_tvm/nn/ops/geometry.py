"""The edge geometry as torch custom operators, compiled to one TIR kernel each by compiler.kernels.geometry:

    qso3::edge_geometry            per edge: unit vector u, cutoff envelope fc, radial basis · fc
                                   (model.edge_geometry defines it; ~12 generic kernels before)
    qso3::edge_geometry_backward   the forces' last step: the gradients of u, fc and the basis back to
                                   atom positions (one pass over the edges, sums over senders and receivers)

The backward is the exact vector-Jacobian product, written once here in torch operators and once as a
TIR kernel (both checked against autograd of model.edge_geometry in tests/test_kernels.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import edge_geometry, polynomial_cutoff, segment_sum


def cutoff_derivative(r: torch.Tensor, cutoff: float, p: int = 6) -> torch.Tensor:
    """d polynomial_cutoff / dr (0 beyond the cutoff, where the envelope is clamped)."""
    x = r / cutoff
    xc = x.clamp(max=1.0)
    d = -(p + 1) * (p + 2) / 2 * p * xc ** (p - 1) + p * (p + 2) * (p + 1) * xc**p - p * (p + 1) / 2 * (p + 2) * xc ** (p + 1)
    return torch.where(x <= 1.0, d / cutoff, torch.zeros_like(d))


def _basis(centers: torch.Tensor, gamma: float):
    return lambda r: torch.exp(-gamma * (r[:, None] - centers) ** 2)  # model.GaussianRBF.forward


@torch.library.custom_op("qso3::edge_geometry", mutates_args=())
def edge_geometry_op(pos: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, centers: torch.Tensor, gamma: float,
                     cutoff: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pos (N, 3), src, dst (E,), basis centers (R,) -> u (E, 3), fc (E,), basis · fc (E, R)."""
    u, fc, rbf = edge_geometry(pos, src, dst, _basis(centers, gamma), cutoff)
    return u, fc, rbf


@edge_geometry_op.register_fake
def _(pos, src, dst, centers, gamma, cutoff):
    e = src.shape[0]
    return pos.new_empty((e, 3)), pos.new_empty((e,)), pos.new_empty((e, centers.shape[0]))


@torch.library.custom_op("qso3::edge_geometry_backward", mutates_args=())
def edge_geometry_backward(g_u: torch.Tensor, g_fc: torch.Tensor, g_rbf: torch.Tensor, pos: torch.Tensor,
                           src: torch.Tensor, dst: torch.Tensor, centers: torch.Tensor, gamma: float,
                           cutoff: float) -> torch.Tensor:
    """The gradient of the positions (N, 3) from those of (u, fc, basis · fc): per edge dL/dr along u plus
    the part of dL/du across u, added at the sender and taken off at the receiver."""
    vec = pos[src] - pos[dst]
    r = torch.sqrt((vec * vec).sum(-1))
    u = vec / r[:, None]
    fc = polynomial_cutoff(r, cutoff)
    d_fc = cutoff_derivative(r, cutoff)
    ex = _basis(centers, gamma)(r)  # (E, R)
    g_r = g_fc * d_fc + (g_rbf * ex * (-2 * gamma * (r[:, None] - centers) * fc[:, None] + d_fc[:, None])).sum(-1)
    g_vec = (g_u - (g_u * u).sum(-1, keepdim=True) * u) / r[:, None] + g_r[:, None] * u
    return segment_sum(g_vec, src, pos.shape[0]) - segment_sum(g_vec, dst, pos.shape[0])


@edge_geometry_backward.register_fake
def _(g_u, g_fc, g_rbf, pos, src, dst, centers, gamma, cutoff):
    return pos.new_empty(pos.shape)


def _setup(ctx, inputs, output):
    pos, src, dst, centers, gamma, cutoff = inputs
    ctx.save_for_backward(pos, src, dst, centers)
    ctx.consts = (gamma, cutoff)


def _backward(ctx, g_u, g_fc, g_rbf):
    pos, src, dst, centers = ctx.saved_tensors
    e, n_rbf = src.shape[0], centers.shape[0]
    g_u = pos.new_zeros((e, 3)) if g_u is None else g_u
    g_fc = pos.new_zeros((e,)) if g_fc is None else g_fc
    g_rbf = pos.new_zeros((e, n_rbf)) if g_rbf is None else g_rbf
    g_pos = torch.ops.qso3.edge_geometry_backward(g_u, g_fc, g_rbf, pos, src, dst, centers, *ctx.consts)
    return g_pos, None, None, None, None, None


edge_geometry_op.register_autograd(_backward, setup_context=_setup)


class GeometryKernel(nn.Module):
    """Deployment form of the edge geometry (So3krates.fused_geometry)."""

    def forward(self, pos, src, dst, rbf, cutoff: float):
        return torch.ops.qso3.edge_geometry(pos, src, dst, rbf.centers, float(rbf.gamma), float(cutoff))


def fuse_geometry(model: nn.Module) -> nn.Module:
    """`model` (changed in place) computing its edge geometry through qso3::edge_geometry."""
    model.fused_geometry = GeometryKernel()
    return model
