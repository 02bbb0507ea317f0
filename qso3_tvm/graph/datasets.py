"""Datasets: rMD17 (npz), QM9 (qm9pack CSVs, cached as npz) and extxyz, loaded into MoleculeSets in eV and Å."""

from __future__ import annotations

import ast
import csv
import importlib.util
import os
from pathlib import Path

import numpy as np

from ..errors import QSO3Error
from ..files import atomic_path
from .molecules import (
    ELEMENT_Z,
    HARTREE_TO_EV,
    KCAL_MOL_TO_EV,
    QM9_ATOM_REF_HA,
    RMD17_KEYS,
    RMD17_MOLECULES,
    RMD17_SOURCE,
    MoleculeSet,
    validate,
)


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
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in RMD17_KEYS if k not in npz.files]
            if missing:
                raise QSO3Error(f"{path}: missing keys {missing}; an rMD17 file has {list(RMD17_KEYS)} (found {npz.files})")
            data = {k: npz[k] for k in RMD17_KEYS}
    except QSO3Error:
        raise
    except Exception as e:  # not a zip, truncated, pickled objects: not a readable npz
        raise QSO3Error(f"{path}: not a readable .npz file ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        z = data["nuclear_charges"].astype(np.int64)
        coords = data["coords"].astype(np.float64)
        energies, forces = data["energies"].astype(np.float64).reshape(-1), data["forces"].astype(np.float64)
    except (TypeError, ValueError) as e:
        raise QSO3Error(f"{path}: nuclear_charges must be integers, coords/energies/forces numbers ({e})") from None
    if z.ndim != 1 or len(z) == 0 or (z < 1).any() or (z > 118).any() or (z != data["nuclear_charges"]).any():
        raise QSO3Error(f"{path}: nuclear_charges must be a non-empty list of atomic numbers 1..118")
    if coords.ndim != 3 or coords.shape[1:] != (len(z), 3) or forces.shape != coords.shape or len(energies) != len(coords):
        raise QSO3Error(f"{path}: coords {coords.shape} / forces {forces.shape} / energies {energies.shape} do not match "
                        f"{len(z)} atoms")
    mols = MoleculeSet.from_frames(z, coords, energies * KCAL_MOL_TO_EV, forces * KCAL_MOL_TO_EV, name=path.stem)
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
        with atomic_path(cache) as tmp, open(tmp, "wb") as fh:  # never leave a half-written cache
            np.savez(fh, **arrays)
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
    try:
        frames = read(path, index=":", format="extxyz")
    except Exception as e:  # ASE raises many kinds on malformed files
        raise QSO3Error(f"{path}: not a readable extxyz file ({type(e).__name__}: {str(e).strip()[:200]})") from None
    if not frames:
        raise QSO3Error(f"{path}: no frames")
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
