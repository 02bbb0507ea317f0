"""Run a compiled artifact (library + manifest.json) on this machine: energies and forces.

Needs the TVM runtime and numpy only (no torch, no compiler): the calling convention is in
graph.convention.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from ..errors import BucketError, QSO3Error
from ..graph.convention import call_arrays, call_function, library_path, pad_to_specialized, read_manifest
from ..graph.molecules import MoleculeSet
from ..graph.neighbors import species_index


class CompiledModel:
    """A compiled energy+forces module: loaded here (`CompiledModel(path)`) or on a board over RPC
    (runtime.remote.RemoteModel). Subclasses change where the module runs, not the numerics."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        import tvm
        from tvm.runtime.vm import VirtualMachine  # runtime-only TVM installs have no tvm.relax

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        lib = library_path(self.path, self.manifest)
        check_runs_here(self.manifest, device)
        self.library = tvm.runtime.load_module(str(lib))
        self.device = tvm.cuda() if device == "cuda" else tvm.cpu()
        self.vm = VirtualMachine(self.library, self.device)

    @property
    def species(self) -> tuple[int, ...]:
        return tuple(self.manifest["model"]["species"])

    @property
    def cutoff(self) -> float:
        return float(self.manifest["model"]["cutoff"])

    def inputs(self, mols: MoleculeSet, frames) -> tuple[list, MoleculeSet]:
        """Device tensors for the frames plus a ghost molecule, and the padded frame set."""
        import tvm

        arrays, padded = call_arrays(mols, frames, self.species, self.cutoff,
                                     self.manifest["inputs"].get("buckets"), str(self.path))
        arrays = pad_to_specialized(arrays, self.manifest, self.cutoff)
        return [tvm.runtime.tensor(a, self.device) for a in arrays], padded

    @property
    def has_energy_entry(self) -> bool:
        """Whether the library has the energy-only function (artifacts compiled since it exists)."""
        return "energy" in (self.manifest.get("functions") or {})

    def function(self, entry: str, args) -> str:
        """The library function that runs `entry` on these arrays (a specialized copy when one fits exactly)."""
        return call_function(self.manifest, entry, args)

    def call(self, args, forces: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        if not forces and self.has_energy_entry:
            return self.vm[self.function("energy", args)](*args).numpy(), None
        energy, f = self.vm[self.function("main", args)](*args)
        return energy.numpy(), f.numpy()

    def run_batch(self, mols: MoleculeSet, frames, forces: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Total energies (eV, float64) and forces (eV/Å; None when not asked for) of the frames, in order."""
        args, padded = self.inputs(mols, frames)
        energy, f = self.call(args, forces)
        energy = energy[:len(padded)]  # a bucket's empty molecule slots come after the ghost
        shift = np.asarray(self.manifest["model"]["energy_shift"] or [0.0] * len(self.species), np.float64)
        frame_of_atom = np.repeat(np.arange(len(padded)), np.diff(padded.offsets))  # empty frames sum to 0
        shift = np.bincount(frame_of_atom, shift[species_index(padded.numbers, self.species)], minlength=len(padded))
        n_real = int(padded.offsets[-2])
        return (energy.astype(np.float64) + shift)[:-1], None if f is None else f[:n_real].astype(np.float64)

    def energy_forces(self, numbers: np.ndarray, positions: np.ndarray, forces: bool = True) -> tuple[float, np.ndarray | None]:
        e, f = self.run_batch(MoleculeSet.from_molecules([(numbers, positions)]), [0], forces)
        return float(e[0]), f

    def forces_fn(self):
        return lambda numbers, pos: self.energy_forces(numbers, pos)[1]

    def predict(self, mols: MoleculeSet, batch_size: int = 32, forces: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Energies (and forces) of every frame, in calls of up to `batch_size` frames (halved until a
        static build's bucket fits)."""
        energies, all_forces = [], []
        chunks = [list(range(start, min(start + batch_size, len(mols)))) for start in range(0, len(mols), batch_size)]
        while chunks:
            frames = chunks.pop(0)
            try:
                e, f = self.run_batch(mols, frames, forces)
            except BucketError:
                if len(frames) == 1:
                    raise
                chunks[:0] = [frames[: len(frames) // 2], frames[len(frames) // 2:]]  # smaller calls fit a bucket
                continue
            energies.append(e), all_forces.append(f)
        return np.concatenate(energies), np.concatenate(all_forces) if forces else None


def host_cpu_features() -> set[str]:
    """This machine's CPU feature flags (/proc/cpuinfo)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check_runs_here(manifest: dict, device: str = "cpu") -> None:
    """Refuse, with the reason, a library this machine cannot execute (before loading it)."""
    target = manifest["target"]
    if target.get("device", "cpu") != device:
        raise QSO3Error(f"artifact {target.get('name')} is for device {target.get('device', 'cpu')!r}, asked to run on {device!r}")
    features = host_cpu_features() if device == "cpu" else None
    check_compatible(manifest, {"label": "this machine", "machine": platform.machine(), "features": features})


def check_compatible(manifest: dict, info: dict) -> None:
    """Refuse, before anything loads, an artifact a machine (`info`: label, machine, CPU features, as a board
    reports them) cannot execute."""
    target = manifest["target"]
    where = info.get("label")
    if info.get("machine") and target.get("arch") and info["machine"] != target["arch"]:
        raise QSO3Error(f"artifact {target.get('name')} is built for {target['arch']}, {where} is {info['machine']}: "
                        "compile for a matching target, or run it on a matching board (qso3-tvm profile --rpc)")
    if info.get("features") is not None:
        missing = sorted(set(target.get("cpu_features") or []) - set(info["features"]))
        if missing:
            raise QSO3Error(f"artifact {target.get('name')} needs CPU features {missing} that {where} lacks "
                            "(e.g. +dotprod needs asimddp): compile for a matching target")
