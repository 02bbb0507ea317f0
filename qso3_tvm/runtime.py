"""Run a compiled artifact (library + manifest.json) on this machine: energies and forces.

Every call appends a ghost molecule (two atoms, 1 Å apart) so that the atom, edge and molecule
counts are never 0 or 1, the sizes torch.export specializes; its outputs are dropped.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from .data import MoleculeSet, make_batch, species_index
from .errors import BucketError, QSO3Error

MANIFEST = "manifest.json"


def sample_molecules(species: tuple[int, ...]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, numbers, positions) of the packaged sample frames whose elements the model knows."""
    out = []
    with np.load(str(resources.files("qso3_tvm") / "models" / "samples.npz")) as npz:
        for key in sorted(k for k in npz.files if k.endswith("_numbers")):
            name = key[: -len("_numbers")]
            numbers, coords = npz[key], npz[f"{name}_coords"]
            if set(numbers.tolist()) <= set(species):
                out += [(f"{name}[{i}]", numbers, c) for i, c in enumerate(coords)]
    return out


def sample_set(species) -> tuple[MoleculeSet, list[str]]:
    samples = sample_molecules(species)
    if not samples:
        raise QSO3Error(f"no packaged sample molecule uses only the model's species {species}")
    return MoleculeSet.from_molecules((z, p) for _, z, p in samples), [s[0] for s in samples]


def with_ghost(mols: MoleculeSet, frames, species: tuple[int, ...]) -> tuple[MoleculeSet, list[int]]:
    """The chosen frames plus a ghost molecule of two atoms of the first species."""
    parts = [mols.frame(int(f)) for f in frames]
    ghost = (np.full(2, species[0]), np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    return MoleculeSet.from_molecules(parts + [ghost]), list(range(len(parts) + 1))


def max_errors(ref: dict, energies: np.ndarray, forces: np.ndarray) -> dict:
    """Max abs deviation from a stored reference, in meV and meV/Å."""
    return {"max_energy_error_mev": float(np.abs(energies - np.asarray(ref["energy_ev"])).max() * 1e3),
            "max_force_error_mev_per_a": float(np.abs(forces - np.asarray(ref["forces_ev_per_a"])).max() * 1e3)}


class CompiledModel:
    """A compiled energy+forces module: loaded here (`CompiledModel(path)`) or on a board over RPC
    (qso3_tvm.deploy.RemoteModel). Subclasses change where the module runs, not the numerics."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        import tvm
        from tvm.runtime.vm import VirtualMachine  # runtime-only TVM installs have no tvm.relax

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        lib = tvm.runtime.load_module(str(self.path / self.manifest["library"]))
        self.device = tvm.cuda() if device == "cuda" else tvm.cpu()
        self.vm = VirtualMachine(lib, self.device)

    @property
    def species(self) -> tuple[int, ...]:
        return tuple(self.manifest["model"]["species"])

    def inputs(self, mols: MoleculeSet, frames) -> tuple[list, MoleculeSet]:
        """Device tensors for the frames plus a ghost molecule, and the padded frame set."""
        import tvm

        padded, idx = with_ghost(mols, list(frames), self.species)
        batch = make_batch(padded, idx, self.species, float(self.manifest["model"]["cutoff"]))
        arrays = [t.numpy() for t in (batch.species, batch.pos, batch.mol, batch.src, batch.dst)]
        arrays.append(np.zeros(batch.n_mol, np.float32))
        buckets = self.manifest["inputs"].get("buckets")
        if buckets:  # static build: pad to the bucket (qso3_tvm.tune)
            from .tune import pad_to_bucket

            arrays = pad_to_bucket(arrays, buckets, float(self.manifest["model"]["cutoff"]), str(self.path))
        return [tvm.runtime.tensor(a, self.device) for a in arrays], padded

    def call(self, args) -> tuple[np.ndarray, np.ndarray]:
        energy, forces = self.vm["main"](*args)
        return energy.numpy(), forces.numpy()

    def run_batch(self, mols: MoleculeSet, frames) -> tuple[np.ndarray, np.ndarray]:
        """Total energies (eV, float64) and forces (eV/Å) of the frames, in order."""
        args, padded = self.inputs(mols, frames)
        energy, forces = self.call(args)
        energy = energy[:len(padded)]  # a bucket's empty molecule slots come after the ghost
        shift = np.asarray(self.manifest["model"]["energy_shift"] or [0.0] * len(self.species), np.float64)
        shift = np.add.reduceat(shift[species_index(padded.numbers, self.species)], padded.offsets[:-1])
        n_real = int(padded.offsets[-2])
        return (energy.astype(np.float64) + shift)[:-1], forces[:n_real].astype(np.float64)

    def energy_forces(self, numbers: np.ndarray, positions: np.ndarray) -> tuple[float, np.ndarray]:
        e, f = self.run_batch(MoleculeSet.from_molecules([(numbers, positions)]), [0])
        return float(e[0]), f

    def forces_fn(self):
        return lambda numbers, pos: self.energy_forces(numbers, pos)[1]

    def predict(self, mols: MoleculeSet, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        energies, forces = [], []
        chunks = [list(range(start, min(start + batch_size, len(mols)))) for start in range(0, len(mols), batch_size)]
        while chunks:
            frames = chunks.pop(0)
            try:
                e, f = self.run_batch(mols, frames)
            except BucketError:
                if len(frames) == 1:
                    raise
                chunks[:0] = [frames[: len(frames) // 2], frames[len(frames) // 2:]]  # smaller calls fit a bucket
                continue
            energies.append(e), forces.append(f)
        return np.concatenate(energies), np.concatenate(forces)


def read_manifest(path: Path) -> dict:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise QSO3Error(f"{path}: not a compiled artifact (no {MANIFEST})")
    try:
        return json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise QSO3Error(f"{manifest_path}: corrupt manifest ({e})") from None
