"""So3krates-style SO(3)-equivariant graph transformer: invariant (l=0) and vector (l=1) features.

Per layer, for each directed edge j -> i within the cutoff:
  attention  a_ij = fc(r_ij) exp(t_ij - m) / (sum_k fc(r_ik) exp(t_ik - m) + exp(-m))
             t_ij = tau_h <q_i/|q_i|, k_j/|k_j|>   (robust: L2-normalized q, k, learned temperature)
                  or <q_i, k_j>/sqrt(d_h)          (plain scaled dot product, for the ablation)
             (the exp(-m) term is an attention sink with logit 0: isolated atoms and atoms whose
             neighbors leave the cutoff stay smooth; m is a detached per-head max for stability)
  messages   s_i += sum_j a_ij phi_s(r_ij) * Vs s_j
             v_i += sum_j a_ij [phi_r(r_ij) * Vr s_j] u_ij + a_ij phi_v(r_ij) * (W v_j)
  update     PaiNN-style gated mixing of s and v (norms and inner products of vectors are invariant).
Energy: per-atom MLP on s, scaled, plus per-element shifts, summed per molecule. Forces = -dE/dx.
Vectors are stored as (N, 3, F) so that channel mixing (Linear over F) commutes with rotations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from ..errors import QSO3Error
from .batch import Batch


@dataclass
class ModelConfig:
    species: tuple[int, ...] = (1, 6, 7, 8, 9)
    channels: int = 64  # scalar channels = vector channels
    layers: int = 6
    heads: int = 4
    n_rbf: int = 20
    cutoff: float = 5.0
    attention: str = "l2norm"  # "l2norm" (robust) or "dot" (plain scaled dot product)
    tau_init: float = 4.0
    energy_scale: float = 1.0  # eV, set from data (force RMS)
    energy_shift: list[float] = field(default_factory=list)  # eV per species, set from data

    def __post_init__(self):
        """Refuse configurations that would build a broken model (QSO3Error names the field)."""
        bad = []
        if not self.species or any(not isinstance(z, int) or not 1 <= z <= 118 for z in self.species):
            bad.append(f"species {self.species!r} (atomic numbers 1..118)")
        for name in ("channels", "layers", "heads", "n_rbf"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad.append(f"{name} {getattr(self, name)!r} (an integer ≥ 1)")
        if isinstance(self.channels, int) and isinstance(self.heads, int) and self.heads >= 1 and self.channels % self.heads:
            bad.append(f"channels {self.channels} not divisible by heads {self.heads}")
        if not (isinstance(self.cutoff, (int, float)) and math.isfinite(self.cutoff) and self.cutoff > 0):
            bad.append(f"cutoff {self.cutoff!r} (a positive length in Å)")
        if self.attention not in ("l2norm", "dot"):
            bad.append(f"attention {self.attention!r} (l2norm or dot)")
        if self.energy_shift and len(self.energy_shift) != len(self.species):
            bad.append(f"energy_shift has {len(self.energy_shift)} entries for {len(self.species)} species")
        if bad:
            raise QSO3Error("invalid model config: " + "; ".join(bad))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise QSO3Error(f"invalid model config: unknown fields {unknown}")
        d["species"] = tuple(d.get("species", cls.species))
        return cls(**d)


def polynomial_cutoff(r: torch.Tensor, cutoff: float, p: int = 6) -> torch.Tensor:
    """Smooth envelope (NequIP, p=6): 1 at r=0, value and first two derivatives 0 at r=cutoff."""
    x = (r / cutoff).clamp(max=1.0)
    return (1.0 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2))


class GaussianRBF(nn.Module):
    def __init__(self, n: int, cutoff: float):
        super().__init__()
        self.register_buffer("centers", torch.linspace(0.0, cutoff, n))
        self.gamma = 0.5 / (cutoff / (n - 1)) ** 2

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.gamma * (r[:, None] - self.centers) ** 2)


def edge_geometry(pos, src, dst, rbf: GaussianRBF, cutoff: float):
    """Per edge j -> i (i = dst receives from j = src): the unit vector u_ij of r_ij = x_j - x_i (E, 3), the
    cutoff envelope fc(|r_ij|) (E,) and the radial basis times the envelope (E, n_rbf)."""
    vec = pos[src] - pos[dst]
    r = torch.sqrt((vec * vec).sum(-1))
    fc = polynomial_cutoff(r, cutoff)
    return vec / r[:, None], fc, rbf(r) * fc[:, None]


def mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_out))


def segment_sum(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """out[index[e]] += values[e] (the aggregation over neighbors / atoms)."""
    return torch.zeros((n,) + values.shape[1:], dtype=values.dtype, device=values.device).index_add(0, index, values)


def aggregate_messages(alpha, phi, val, vv, u, src, dst):
    """Neighbor sums of a layer's messages: ds (N, F) and dv (N, 3, F) from attention α (E, H), radial
    filter φ (E, 3F) = [φs | φr | φv], values val (N, 2F) = [Vs s | Vr s] and vv (N, 3, F) = W v per
    atom, unit vectors u (E, 3). Per edge j -> i: ds_i += α φs vs_j, dv_i += α (φr vr_j u + φv vv_j)."""
    N, F, H = val.shape[0], vv.shape[2], alpha.shape[1]
    alpha = alpha.repeat_interleave(F // H, dim=1)  # (E, F)
    phi_s, phi_r, phi_v = phi.split(F, dim=-1)
    val_s, val_r = val[src].split(F, dim=-1)
    msg_s = alpha * phi_s * val_s
    msg_v = (alpha * phi_r * val_r)[:, None, :] * u[:, :, None] + (alpha * phi_v)[:, None, :] * vv[src]
    return segment_sum(msg_s, dst, N), segment_sum(msg_v, dst, N)


class Hooks(nn.Module):
    """Points where quantizers attach (identity in fp32). The quant module swaps these in place."""

    def __init__(self):
        super().__init__()
        self.scalar = nn.Identity()  # invariant node features passed to the next layer (N, F)
        self.vector = nn.Identity()  # l=1 node features passed to the next layer (N, 3, F)
        self.query = nn.Identity()  # normalized q (E, H, d)
        self.key = nn.Identity()  # normalized k (E, H, d)


class InteractionLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        F, H = cfg.channels, cfg.heads
        assert F % H == 0, "channels must be divisible by heads"
        self.F, self.H, self.attention = F, H, cfg.attention
        self.q = nn.Linear(F, F, bias=False)
        self.k = nn.Linear(F, F, bias=False)
        self.log_tau = nn.Parameter(torch.full((H,), math.log(cfg.tau_init)))
        self.filter = mlp(cfg.n_rbf, F, 3 * F)  # phi_s, phi_r, phi_v
        self.value = nn.Linear(F, 2 * F)  # Vs s, Vr s
        self.vec_value = nn.Linear(F, F, bias=False)  # W v (no bias: equivariance)
        self.vec_uv = nn.Linear(F, 2 * F, bias=False)
        self.update = mlp(2 * F, F, 3 * F)
        self.hooks = Hooks()

    def attention_weights(self, q, k, src, dst, fc, n_atoms):
        """α (E, H) from the per-atom queries q = W_q s and keys k = W_k s (N, F)."""
        E, H, d = src.shape[0], self.H, self.F // self.H
        if getattr(self, "fused_attention", None) is not None:  # deployment: one custom operator
            return self.fused_attention(q.view(-1, H, d), k.view(-1, H, d), src, dst, fc, self.log_tau)
        q, k = q[dst].view(E, H, d), k[src].view(E, H, d)
        if self.attention == "l2norm":
            q = self.hooks.query(q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-12))
            k = self.hooks.key(k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-12))
            logits = torch.exp(self.log_tau) * (q * k).sum(-1)
        else:
            logits = (q * k).sum(-1) / math.sqrt(d)
        m = logits.detach().amax(0).clamp(min=0.0) if E else logits.new_zeros(H)  # (H,)
        w = fc[:, None] * torch.exp(logits - m)
        denom = segment_sum(w, dst, n_atoms) + torch.exp(-m)  # sink: logit 0, value 0
        return w / denom[dst]  # (E, H)

    def forward(self, s, v, src, dst, u, rbf, fc, pairs=None):
        """`rbf` per edge, or with `pairs` = (pair, canon, partner) (deployment, nn.ops.pairs) per pair of edges: edge e's
        basis is rbf[pair[e]]."""
        qkv = getattr(self, "fused_qkv", None)  # deployment: the three Linears of s as one custom operator (s passes through)
        q, k, val, s = qkv(self.q, self.k, self.value, s) if qkv is not None else (self.q(s), self.k(s), self.value(s), s)
        alpha = self.attention_weights(q, k, src, dst, fc, s.shape[0])  # (E, H)
        messages = getattr(self, "fused_messages", None) or residual_messages  # deployment: one custom operator
        s, v = messages(alpha, self.filter(rbf), val, s, v, self.vec_value, u, src, dst, pairs)
        fused = getattr(self, "fused_update", None)  # deployment: custom operators around the update MLP
        norms, gate = (fused.residual_norms, fused.gated_update) if fused is not None else (residual_norms, gated_update)
        x, s, v, uvvv = norms(s, v, self.vec_uv)
        s, v = gate(self.update(x), s, v, uvvv)
        return self.hooks.scalar(s), self.hooks.vector(v)


def residual_messages(alpha, phi, val, s, v, vec_value, u, src, dst, pairs=None):
    """A layer's residual sums s + ds, v + dv with the neighbor sums of aggregate_messages (vv = vec_value(v));
    with `pairs` = (pair, canon, partner), φ is per pair of edges (nn.ops.pairs) and edge e's is phi[pair[e]]."""
    if pairs is not None:
        phi = phi[pairs[0]]
    ds, dv = aggregate_messages(alpha, phi, val, vec_value(v), u, src, dst)
    return s + ds, v + dv


def residual_norms(s, v, vec_uv):
    """The update MLP's input x = [s | |vv|] (N, 2F) of the residual sums s, v (neighbor sums included, in
    accumulator precision), s and v themselves, and the channel mixes uvvv = vec_uv(v) (N, 3, 2F) = [uv | vv]."""
    F = s.shape[1]
    uvvv = vec_uv(v)
    vv = uvvv[..., F:]
    return torch.cat([s, torch.sqrt((vv * vv).sum(1) + 1e-8)], -1), s, v, uvvv


def gated_update(a, s, v, uvvv):
    """PaiNN-style gated mixing from the update MLP's output a (N, 3F) = [a_vv | a_sv | a_ss]:
    s' = s + a_ss + a_sv <uv, vv>, v' = v + a_vv uv (s, v, uvvv: residual_norms' outputs)."""
    F = v.shape[2]
    uv, vv = uvvv.split(F, dim=-1)
    a_vv, a_sv, a_ss = a.split(F, dim=-1)
    return s + a_ss + a_sv * (uv * vv).sum(1), v + a_vv[:, None, :] * uv


class So3krates(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n_species = len(cfg.species)
        self.embed = nn.Embedding(n_species, cfg.channels)
        self.rbf = GaussianRBF(cfg.n_rbf, cfg.cutoff)
        self.layers = nn.ModuleList(InteractionLayer(cfg) for _ in range(cfg.layers))
        self.head = mlp(cfg.channels, cfg.channels, 1)
        self.register_buffer("energy_scale", torch.tensor(float(cfg.energy_scale)))

    def atomic_energies(self, species, pos, src, dst):
        fused = getattr(self, "fused_geometry", None)  # deployment: one custom operator
        u, fc, rbf = (fused or edge_geometry)(pos, src, dst, self.rbf, self.cfg.cutoff)
        pairs = getattr(self, "fused_pairs", None)  # deployment: the radial filter once per pair of edges
        if pairs is not None:
            pairs = pairs(src, dst)  # pair, canon, partner
            rbf = rbf[pairs[1]]
        s = self.embed(species)
        v = s.new_zeros(s.shape[0], 3, s.shape[1])
        for layer in self.layers:
            s, v = layer(s, v, src, dst, u, rbf, fc, pairs)
        return self.head(s).squeeze(-1) * self.energy_scale

    def forward(self, species, pos, mol, src, dst, n_mol: int):
        """Interaction energy per molecule (eV), without the per-element shifts (see reference_energy)."""
        return segment_sum(self.atomic_energies(species, pos, src, dst), mol, n_mol)

    def atom_shifts(self, species: torch.Tensor) -> torch.Tensor:
        """The per-element energy shift of each atom (eV, float64)."""
        shift = self.cfg.energy_shift or [0.0] * len(self.cfg.species)
        return torch.tensor(shift, dtype=torch.float64, device=species.device)[species]

    def reference_energy(self, batch: Batch) -> torch.Tensor:
        """Sum of per-element shifts per molecule, in float64 (totals of ~1e4 eV lose meV in float32)."""
        return segment_sum(self.atom_shifts(batch.species), batch.mol, batch.n_mol)


def energy_and_forces(model: So3krates, batch: Batch, create_graph: bool = False):
    """Interaction energy per molecule (eV, add model.reference_energy for the total) and forces -dE/dx (eV/Å)."""
    return energies_and_forces(model, batch, create_graph)[:2]


def energies_and_forces(model: So3krates, batch: Batch, create_graph: bool = False):
    """energy_and_forces and the per-atom interaction energies (eV) they sum."""
    pos = batch.pos.detach().requires_grad_(True)
    atoms = model.atomic_energies(batch.species, pos, batch.src, batch.dst)
    energy = segment_sum(atoms, batch.mol, batch.n_mol)
    (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
    return energy, -grad, atoms


def fit_energy_shift(numbers_per_frame: list, energies, species: tuple[int, ...]) -> list[float]:
    """Per-element shifts by minimum-norm least squares of E on element counts."""
    import numpy as np

    counts = np.array([[np.sum(z == s) for s in species] for z in numbers_per_frame], dtype=np.float64)
    shift, *_ = np.linalg.lstsq(counts, np.asarray(energies, np.float64), rcond=None)
    return shift.tolist()
