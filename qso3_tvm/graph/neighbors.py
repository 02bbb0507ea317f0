"""Neighbor lists (radius graphs) and the numpy form of a batch: several molecules as one graph."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from ..errors import QSO3Error
from .molecules import MoleculeSet


def radius_graph(pos: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Directed pairs (src, dst) with |pos[src]-pos[dst]| < cutoff, src != dst, any molecule size (k-d tree)."""
    pairs = cKDTree(pos).query_pairs(cutoff, output_type="ndarray")
    if len(pairs):
        d = np.linalg.norm(pos[pairs[:, 0]] - pos[pairs[:, 1]], axis=1)
        pairs = pairs[d < cutoff]  # query_pairs is inclusive (<=); the cutoff function is zero at r = cutoff
    src = np.concatenate([pairs[:, 0], pairs[:, 1]]).astype(np.int64)
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]]).astype(np.int64)
    order = np.lexsort((src, dst))  # grouped by receiving atom
    return src[order], dst[order]


def species_index(numbers: np.ndarray, species: tuple[int, ...]) -> np.ndarray:
    table = np.full(max(max(species), int(numbers.max(initial=0))) + 1, -1, np.int64)
    table[list(species)] = np.arange(len(species))
    idx = table[numbers]
    if (idx < 0).any():
        raise QSO3Error(f"element(s) Z={sorted(set(numbers[idx < 0].tolist()))} not known to the model "
                        f"(species {list(species)})")
    return idx


@dataclass
class GraphArrays:
    """Several molecules as one graph (numpy). `species` are indices into the model's species list;
    edges src -> dst never cross molecules and are grouped by receiving atom."""

    species: np.ndarray  # (N,) int64
    pos: np.ndarray  # (N, 3) float64
    mol: np.ndarray  # (N,) int64 molecule of each atom
    src: np.ndarray  # (E,) int64
    dst: np.ndarray  # (E,) int64
    n_mol: int
    energy: np.ndarray | None = None  # (n_mol,)
    forces: np.ndarray | None = None  # (N, 3)


def graph_arrays(mols: MoleculeSet, frames, species: tuple[int, ...], cutoff: float) -> GraphArrays:
    """Collate frames into one graph with radius-graph edges."""
    srcs, dsts, mol_ids, numbers, positions = [], [], [], [], []
    energies, forces, base = [], [], 0
    for m, f in enumerate(frames):
        z, pos = mols.frame(int(f))
        s, d = radius_graph(pos, cutoff)
        srcs.append(s + base), dsts.append(d + base)
        numbers.append(z), positions.append(pos), mol_ids.append(np.full(len(z), m, np.int64))
        if mols.energies is not None:
            energies.append(mols.energies[f])
        if mols.forces is not None:
            a = mols.offsets[f]
            forces.append(mols.forces[a:a + len(z)])
        base += len(z)
    return GraphArrays(species=species_index(np.concatenate(numbers), species), pos=np.concatenate(positions),
                       mol=np.concatenate(mol_ids), src=np.concatenate(srcs), dst=np.concatenate(dsts),
                       n_mol=len(frames), energy=np.asarray(energies, np.float64) if energies else None,
                       forces=np.concatenate(forces) if forces else None)
