"""Edge pairs as the torch custom operator `qso3::edge_pairs` (compiled to one TIR kernel by compiler.kernels.pairs).

The radial filter φ(|r_ij|) of edge j -> i equals that of i -> j (|r_ij| is computed bit for bit the same both
ways), so the deployment form computes it once per pair of edges: on the basis of each pair's canonical edge
(src < dst), half the filter work of the forward and of the forces. The messages read φ of their pair
(nn.ops.messages), and the gradient of φ is summed over the pair's two edges (the backward kernel runs pair by
pair, so that it writes each row of that gradient once).

The neighbor lists (graph.neighbors) hold both edges of every pair; the calling convention keeps them so
(graph.convention). For edges src, dst (E,):
    pair (E,)        each edge's pair
    canon (E // 2,)  the canonical edges (src < dst) in edge order: pair p is canon[p] ...
    partner (E // 2,)  ... and its reverse partner[p]
Repeated edges (bucket padding repeats a pair) are matched in edge order: the k-th copy of i -> j with the k-th
of j -> i, so that every pair has exactly its two edges.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.library.custom_op("qso3::edge_pairs", mutates_args=())
def edge_pairs(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    canonical = src < dst
    canon, other = torch.nonzero(canonical).squeeze(1), torch.nonzero(~canonical).squeeze(1)
    n = int(torch.maximum(src.max(), dst.max())) + 1
    key_c, key_o = src[canon] * n + dst[canon], dst[other] * n + src[other]  # both as (i, j), i < j
    order_c, order_o = torch.argsort(key_c, stable=True), torch.argsort(key_o, stable=True)
    if canon.shape[0] != other.shape[0] or not torch.equal(key_c[order_c], key_o[order_o]):
        raise ValueError("edges must come in pairs i -> j, j -> i (an edge has no reverse, or is a self-loop)")
    partner = torch.empty_like(canon)
    partner[order_c] = other[order_o]
    pair = torch.empty_like(src)
    pair[canon] = torch.arange(canon.shape[0], device=src.device)
    pair[partner] = torch.arange(canon.shape[0], device=src.device)
    return pair, canon, partner


@edge_pairs.register_fake
def _(src, dst):
    half = (src.shape[0] // 2,)
    return src.new_empty(src.shape), src.new_empty(half), src.new_empty(half)


class PairsKernel(nn.Module):
    """Deployment form of the edge pairs (So3krates.fused_pairs)."""

    def forward(self, src, dst):
        return torch.ops.qso3.edge_pairs(src, dst)
