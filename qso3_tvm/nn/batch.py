"""A batch as torch tensors: graph.neighbors.GraphArrays for the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graph.molecules import MoleculeSet
from ..graph.neighbors import GraphArrays, graph_arrays


@dataclass
class Batch(GraphArrays):
    """graph.neighbors.GraphArrays with torch tensors (same fields, same meaning)."""

    @property
    def n_atoms(self) -> torch.Tensor:
        return torch.bincount(self.mol, minlength=self.n_mol)

    def to(self, device: torch.device | str) -> "Batch":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return Batch(**moved)


def make_batch(mols: MoleculeSet, frames, species: tuple[int, ...], cutoff: float,
               dtype: torch.dtype = torch.float32) -> Batch:
    """Collate frames into one graph; edges never cross molecules."""
    g = graph_arrays(mols, frames, species, cutoff)
    t = lambda a, dt=torch.int64: None if a is None else torch.as_tensor(a, dtype=dt)  # noqa: E731
    return Batch(species=t(g.species), pos=t(g.pos, dtype), mol=t(g.mol), src=t(g.src), dst=t(g.dst),
                 n_mol=g.n_mol, energy=t(g.energy, dtype), forces=t(g.forces, dtype))
