"""Molecules as flat numpy arrays (MoleculeSet), units and element tables, input validation.

Everything inside qso3-tvm is in eV and Å; loaders (graph.datasets) convert on the way in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from ..errors import QSO3Error

KCAL_MOL_TO_EV = 0.0433641  # rMD17 README
HARTREE_TO_EV = 27.211386245988
RMD17_KEYS = ("nuclear_charges", "coords", "energies", "forces")
RMD17_MOLECULES = ("aspirin", "azobenzene", "benzene", "ethanol", "malonaldehyde",
                   "naphthalene", "paracetamol", "salicylic", "toluene", "uracil")
RMD17_SOURCE = "figshare article 12672038 ('Revised MD17 dataset (rMD17)')"
# QM9 U0 atom references (Hartree)
QM9_ATOM_REF_HA = {1: -0.500273, 6: -37.846772, 7: -54.583861, 8: -75.064579, 9: -99.718730}
ELEMENT_Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
MIN_DISTANCE_A = 0.1  # closer atoms are a broken input, not chemistry


@dataclass
class MoleculeSet:
    """Frames of molecules: flat atoms with per-frame offsets. Energies in eV, forces in eV/Å."""

    numbers: np.ndarray  # (n_atoms_total,) int64
    positions: np.ndarray  # (n_atoms_total, 3) float64
    offsets: np.ndarray  # (n_frames + 1,) int64
    energies: np.ndarray | None = None  # (n_frames,)
    forces: np.ndarray | None = None  # (n_atoms_total, 3)
    name: str = ""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def frame(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.numbers[a:b], self.positions[a:b]

    def subset(self, idx) -> "MoleculeSet":
        idx = np.asarray(idx, dtype=np.int64)
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        atom_idx = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)]) if len(idx) else np.zeros(0, np.int64)
        sizes = ends - starts
        return MoleculeSet(
            numbers=self.numbers[atom_idx], positions=self.positions[atom_idx],
            offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            energies=None if self.energies is None else self.energies[idx],
            forces=None if self.forces is None else self.forces[atom_idx], name=self.name)

    @classmethod
    def from_molecules(cls, molecules) -> "MoleculeSet":
        """Frames from a list of (numbers (n,), positions (n, 3)) of any sizes."""
        molecules = list(molecules)
        return cls(numbers=np.concatenate([np.asarray(z, np.int64) for z, _ in molecules]),
                   positions=np.concatenate([np.asarray(p, np.float64) for _, p in molecules]),
                   offsets=np.concatenate([[0], np.cumsum([len(z) for z, _ in molecules])]).astype(np.int64))

    @classmethod
    def from_frames(cls, numbers: np.ndarray, coords: np.ndarray, energies=None, forces=None, name="") -> "MoleculeSet":
        """Same molecule in every frame: numbers (n_atoms,), coords (n_frames, n_atoms, 3)."""
        n_frames, n_atoms = coords.shape[:2]
        return cls(numbers=np.tile(np.asarray(numbers, np.int64), n_frames),
                   positions=coords.reshape(-1, 3).astype(np.float64),
                   offsets=np.arange(n_frames + 1, dtype=np.int64) * n_atoms,
                   energies=None if energies is None else np.asarray(energies, np.float64),
                   forces=None if forces is None else forces.reshape(-1, 3).astype(np.float64), name=name)


def validate(mols: MoleculeSet, species: tuple[int, ...] | None = None, source: str = "input") -> None:
    """Raise QSO3Error naming the first broken thing: no frames, an empty frame, non-finite values,
    overlapping atoms, unknown elements."""
    if len(mols) == 0:
        raise QSO3Error(f"{source}: no frames")
    sizes = np.diff(mols.offsets)
    if (sizes <= 0).any():
        raise QSO3Error(f"{source}: frame {int(np.argmax(sizes <= 0))} has no atoms")
    if not np.all(np.isfinite(mols.positions)):
        bad = np.nonzero(~np.isfinite(mols.positions).all(1))[0][0]
        frame = int(np.searchsorted(mols.offsets, bad, side="right") - 1)
        raise QSO3Error(f"{source}: coordinates of frame {frame} contain NaN or inf (atom {bad - mols.offsets[frame]})")
    for name in ("energies", "forces"):
        arr = getattr(mols, name)
        if arr is not None and not np.all(np.isfinite(arr)):
            raise QSO3Error(f"{source}: {name} contain NaN or inf")
    if species is not None:
        unknown = sorted(set(np.unique(mols.numbers).tolist()) - set(species))
        if unknown:
            raise QSO3Error(f"{source}: element(s) Z={unknown} not known to the model (species {list(species)})")
    for f in range(len(mols)):
        _, pos = mols.frame(f)
        pairs = cKDTree(pos).query_pairs(MIN_DISTANCE_A, output_type="ndarray")
        if len(pairs):
            i, j = pairs[0]
            d = float(np.linalg.norm(pos[i] - pos[j]))
            raise QSO3Error(f"{source}: atoms {i} and {j} of frame {f} are {d:.3f} Å apart (< {MIN_DISTANCE_A} Å)")


def random_molecule(n_atoms: int, species=(1, 6, 8), seed: int = 0, min_dist: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """A random compact cloud of atoms with no pair closer than min_dist Å."""
    rng = np.random.default_rng(seed)
    pos = []
    while len(pos) < n_atoms:
        p = rng.normal(scale=0.9 * n_atoms ** (1 / 3), size=3)
        if all(np.linalg.norm(p - q) >= min_dist for q in pos):
            pos.append(p)
    return rng.choice(species, size=n_atoms), np.array(pos)
