"""Datasets (rMD17, QM9, extxyz), input validation, radius-graph neighbor lists and batching.

Everything inside qso3-tvm is in eV and Å; loaders convert on the way in.
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from .errors import QSO3Error

KCAL_MOL_TO_EV = 0.0433641  # rMD17 README
HARTREE_TO_EV = 27.211386245988
RMD17_KEYS = ("nuclear_charges", "coords", "energies", "forces")
RMD17_MOLECULES = ("aspirin", "azobenzene", "benzene", "ethanol", "malonaldehyde",
                   "naphthalene", "paracetamol", "salicylic", "toluene", "uracil")
RMD17_SOURCE = "figshare article 12672038 ('Revised MD17 dataset (rMD17)')"
# QM9 U0 atom references (Hartree), DESIGN.md §4
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
    """Raise QSO3Error naming the first broken thing: non-finite values, overlapping atoms, unknown elements."""
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


# ---------------------------------------------------------------- rMD17
def rmd17_dir() -> Path | None:
    """Where rMD17 lives: $QSO3_RMD17_DIR, else shared/data/rmd17 here or one level up."""
    candidates = [os.environ.get("QSO3_RMD17_DIR")] + [str(p / "shared/data/rmd17") for p in (Path.cwd(), Path.cwd().parent)]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def resolve_rmd17(spec: str, split: str = "train") -> Path:
    """A path to an npz, or a molecule name ('ethanol') resolved in rmd17_dir()."""
    p = Path(spec)
    if p.suffix == ".npz" or p.exists():
        if not p.is_file():
            raise QSO3Error(f"dataset file not found: {p} (rMD17 comes from {RMD17_SOURCE}; "
                            "set QSO3_RMD17_DIR or pass the .npz path)")
        return p
    if spec not in RMD17_MOLECULES:
        raise QSO3Error(f"unknown dataset {spec!r}: give an .npz path or an rMD17 molecule ({', '.join(RMD17_MOLECULES)})")
    d = rmd17_dir()
    if d is None:
        raise QSO3Error(f"rMD17 directory not found: set QSO3_RMD17_DIR to the folder with rmd17_{spec}_{split}_01.npz "
                        f"(download: {RMD17_SOURCE})")
    path = d / f"rmd17_{spec}_{split}_01.npz"
    if not path.is_file():
        raise QSO3Error(f"dataset file not found: {path} (download: {RMD17_SOURCE})")
    return path


def load_rmd17(spec: str | Path, split: str = "train") -> MoleculeSet:
    """Load an rMD17 npz (kcal/mol, Å) into eV and eV/Å."""
    path = resolve_rmd17(str(spec), split)
    try:
        with np.load(path) as npz:
            missing = [k for k in RMD17_KEYS if k not in npz.files]
            if missing:
                raise QSO3Error(f"{path}: missing keys {missing}; an rMD17 file has {list(RMD17_KEYS)} (found {npz.files})")
            data = {k: npz[k] for k in RMD17_KEYS}
    except (OSError, ValueError) as e:  # not a zip / not an npz
        raise QSO3Error(f"{path}: not a readable .npz file ({e})") from None
    z, coords = data["nuclear_charges"].astype(np.int64), data["coords"]
    if coords.ndim != 3 or coords.shape[1:] != (len(z), 3) or data["forces"].shape != coords.shape:
        raise QSO3Error(f"{path}: coords {coords.shape} / forces {data['forces'].shape} do not match {len(z)} atoms")
    mols = MoleculeSet.from_frames(z, coords, data["energies"] * KCAL_MOL_TO_EV,
                                   data["forces"] * KCAL_MOL_TO_EV, name=path.stem)
    validate(mols, source=str(path))
    return mols


# ---------------------------------------------------------------- QM9
def _qm9_csv_dir() -> Path:
    spec = importlib.util.find_spec("qm9pack")  # `import qm9pack` needs pkg_resources; locate files only
    if spec is None or spec.origin is None:
        raise QSO3Error("QM9 needs the qm9pack package: pip install 'qso3-tvm[qm9]' (or pip install qm9pack)")
    return Path(spec.origin).parent / "data"


def qm9_cache_path() -> Path:
    return Path(os.environ.get("QSO3_CACHE", Path.home() / ".cache" / "qso3_tvm")) / "qm9_u0.npz"


def _parse_qm9_csv(csv_dir: Path) -> dict[str, np.ndarray]:
    numbers, positions, sizes, u0 = [], [], [], []
    csv.field_size_limit(1 << 24)
    for part in ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv"):
        with open(csv_dir / part, newline="") as fh:
            for row in csv.DictReader(fh):
                elements = ast.literal_eval(row["Elements"])
                numbers.extend(ELEMENT_Z[e] for e in elements)
                positions.extend(ast.literal_eval(row["XYZ_Ang"]))
                sizes.append(len(elements))
                u0.append(float(row["InternalEnergy_0K_au"]))
    return {"numbers": np.asarray(numbers, np.int8), "positions": np.asarray(positions, np.float32),
            "offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), "u0_ha": np.asarray(u0)}


def load_qm9(atomization: bool = True) -> MoleculeSet:
    """All QM9 molecules with U0 (eV); atomization energy if asked. Parsed once into an npz cache."""
    cache = qm9_cache_path()
    if not cache.exists():
        arrays = _parse_qm9_csv(_qm9_csv_dir())
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cache)  # never leave a half-written cache
    with np.load(cache) as npz:
        numbers, offsets = npz["numbers"].astype(np.int64), npz["offsets"]
        energy_ha = npz["u0_ha"].copy()
        positions = npz["positions"].astype(np.float64)
    if atomization:
        ref = np.zeros(10)
        for z, e in QM9_ATOM_REF_HA.items():
            ref[z] = e
        energy_ha -= np.add.reduceat(ref[numbers], offsets[:-1])
    return MoleculeSet(numbers, positions, offsets, energies=energy_ha * HARTREE_TO_EV, name="qm9")


def qm9_split(n_total: int, seed: int = 0, n_train: int = 110_000, n_val: int = 10_000) -> dict[str, np.ndarray]:
    """The standard 110k/10k/rest split with a fixed seed."""
    perm = np.random.default_rng(seed).permutation(n_total)
    return {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}


# ---------------------------------------------------------------- extxyz
def load_extxyz(path: str | Path) -> MoleculeSet:
    """Frames of an extxyz file via ASE; energies/forces taken when present."""
    path = Path(path)
    if not path.is_file():
        raise QSO3Error(f"file not found: {path}")
    try:
        from ase.io import read
    except ImportError:
        raise QSO3Error("extxyz input needs ASE: pip install 'qso3-tvm[ase]'") from None
    frames = read(path, index=":")
    numbers = np.concatenate([a.numbers for a in frames]).astype(np.int64)
    positions = np.concatenate([a.positions for a in frames])
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in frames])]).astype(np.int64)
    energies = forces = None
    if all(a.calc is not None and "energy" in a.calc.results for a in frames):
        energies = np.array([a.get_potential_energy() for a in frames])
    if all(a.calc is not None and "forces" in a.calc.results for a in frames):
        forces = np.concatenate([a.get_forces() for a in frames])
    mols = MoleculeSet(numbers, positions, offsets, energies, forces, name=path.stem)
    validate(mols, source=str(path))
    return mols


def load_dataset(spec: str, split: str = "train") -> MoleculeSet:
    """Dispatch on the spec: 'qm9', an .xyz/.extxyz file, or an rMD17 molecule/npz.
    QM9 'train' is the standard train+validation pool (120k), 'test' the standard test split."""
    if spec == "qm9":
        mols = load_qm9()
        parts = qm9_split(len(mols))
        idx = parts["test"] if split == "test" else np.concatenate([parts["train"], parts["val"]])
        return mols.subset(np.sort(idx))
    if Path(spec).suffix in (".xyz", ".extxyz"):
        return load_extxyz(spec)
    return load_rmd17(spec, split)


# ---------------------------------------------------------------- graphs and batches
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


@dataclass
class Batch:
    """Several molecules as one graph. `species` are indices into the model's species list."""

    species: torch.Tensor  # (N,) int64
    pos: torch.Tensor  # (N, 3)
    mol: torch.Tensor  # (N,) int64 molecule of each atom
    src: torch.Tensor  # (E,) int64
    dst: torch.Tensor  # (E,) int64
    n_mol: int
    energy: torch.Tensor | None = None  # (n_mol,)
    forces: torch.Tensor | None = None  # (N, 3)

    @property
    def n_atoms(self) -> torch.Tensor:
        return torch.bincount(self.mol, minlength=self.n_mol)


def species_index(numbers: np.ndarray, species: tuple[int, ...]) -> np.ndarray:
    table = np.full(max(max(species), int(numbers.max(initial=0))) + 1, -1, np.int64)
    table[list(species)] = np.arange(len(species))
    idx = table[numbers]
    if (idx < 0).any():
        raise QSO3Error(f"element(s) Z={sorted(set(numbers[idx < 0].tolist()))} not known to the model "
                        f"(species {list(species)})")
    return idx


def make_batch(mols: MoleculeSet, frames, species: tuple[int, ...], cutoff: float,
               dtype: torch.dtype = torch.float32) -> Batch:
    """Collate frames into one graph; edges never cross molecules."""
    srcs, dsts, mol_ids, numbers, positions = [], [], [], [], []
    energies, forces, base = [], [], 0
    for m, f in enumerate(frames):
        z, pos = mols.frame(int(f))
        s, d = radius_graph(pos, cutoff)
        srcs.append(s + base), dsts.append(d + base)
        numbers.append(z), positions.append(pos), mol_ids.append(np.full(len(z), m))
        if mols.energies is not None:
            energies.append(mols.energies[f])
        if mols.forces is not None:
            a = mols.offsets[f]
            forces.append(mols.forces[a:a + len(z)])
        base += len(z)
    numbers = np.concatenate(numbers)
    t = lambda a, dt=torch.int64: torch.as_tensor(np.asarray(a), dtype=dt)  # noqa: E731
    return Batch(species=t(species_index(numbers, species)), pos=t(np.concatenate(positions), dtype),
                 mol=t(np.concatenate(mol_ids)), src=t(np.concatenate(srcs)), dst=t(np.concatenate(dsts)),
                 n_mol=len(frames),
                 energy=t(energies, dtype) if energies else None,
                 forces=t(np.concatenate(forces), dtype) if forces else None)
