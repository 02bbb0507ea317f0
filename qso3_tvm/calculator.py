"""ASE calculator: total energy (eV, per-element shifts included) and forces (eV/Å) from an eager
checkpoint, a compiled artifact run here, or a compiled artifact run on a board over TVM RPC.

    from qso3_tvm.calculator import QSO3Calculator
    atoms.calc = QSO3Calculator.from_checkpoint("ethanol-fp32")        # PyTorch
    atoms.calc = QSO3Calculator.from_compiled("build/x86")             # TVM, this machine
    atoms.calc = QSO3Calculator.from_rpc("build/arm64", rpc="pi:9090")  # TVM, a board

Every call checks the molecule first (finite coordinates, no atoms closer than 0.1 Å, elements the
model knows, the artifact's size limits) and raises QSO3Error naming what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from .data import MoleculeSet, radius_graph, validate
from .errors import QSO3Error

# (numbers (n,), positions (n, 3) float64) -> (total energy eV, forces (n, 3) eV/Å)
CALL_DIMS = ("atoms", "edges", "molecules")
EnergyForcesFn = Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]


class QSO3Calculator(Calculator):
    implemented_properties = ["energy", "forces"]

    def __init__(self, energy_forces: EnergyForcesFn, species, backend: str,
                 size_check: Callable[[np.ndarray, np.ndarray], None] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.energy_forces, self.species, self.backend = energy_forces, tuple(species), backend
        self.size_check = size_check

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_checkpoint(cls, spec: str | Path, threads: int = 0, dtype=None, **kwargs) -> "QSO3Calculator":
        """Eager PyTorch: a bundled model name ('ethanol-fp32') or a .pt checkpoint, as loaded (float32),
        or cast to `dtype` (e.g. torch.float64 for exact finite-difference checks)."""
        import torch

        from .checkpoint import load_model, precision
        from .metrics import predict

        if threads:
            torch.set_num_threads(threads)
        model = load_model(spec)
        if dtype is not None:
            model = model.to(dtype)

        def energy_forces(numbers, positions):
            energies, forces = predict(model, MoleculeSet.from_molecules([(numbers, positions)]))
            return float(energies[0]), forces

        return cls(energy_forces, model.cfg.species, f"torch:{precision(model)}", **kwargs)

    @classmethod
    def from_compiled(cls, path: str | Path, threads: int = 0, **kwargs) -> "QSO3Calculator":
        """A compiled artifact folder (library + manifest.json) run on this machine."""
        from .runtime import CompiledModel

        set_tvm_threads(threads)
        return cls._from_model(CompiledModel(path), "tvm", **kwargs)

    @classmethod
    def from_rpc(cls, path: str | Path, rpc: str | None = None, tracker: str | None = None,
                 key: str | None = None, threads: int = 0, **kwargs) -> "QSO3Calculator":
        """A compiled artifact uploaded to a board (direct `rpc` HOST:PORT, or `tracker` + `key`)."""
        from .deploy import RemoteModel, connect

        session = connect(rpc, tracker, key)
        if threads:
            set_tvm_threads(threads, session.get_function)
        return cls._from_model(RemoteModel(session, path), f"rpc:{rpc or tracker}", **kwargs)

    @classmethod
    def _from_model(cls, model, where: str, **kwargs) -> "QSO3Calculator":
        manifest = model.manifest
        backend = f"{where}:{manifest['target']['name']}:{manifest['model']['precision']}"
        return cls(model.energy_forces, model.species, backend,
                   size_check=lambda z, pos: check_size(manifest, z, pos), **kwargs)

    # ------------------------------------------------------------ ASE interface
    def calculate(self, atoms=None, properties=("energy", "forces"), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        numbers, positions = self.atoms.numbers.astype(np.int64), self.atoms.positions.astype(np.float64)
        if self.atoms.pbc.any():
            raise QSO3Error("periodic cells are not supported: the model is for isolated molecules (set pbc=False)")
        validate(MoleculeSet.from_molecules([(numbers, positions)]), species=self.species, source="molecule")
        if self.size_check is not None:
            self.size_check(numbers, positions)
        energy, forces = self.energy_forces(numbers, positions)
        self.results = {"energy": float(energy), "forces": np.asarray(forces, np.float64)}


def call_sizes(manifest: dict, numbers: np.ndarray, positions: np.ndarray) -> dict[str, int]:
    """Atom, edge and molecule counts of one compiled call (the molecule plus the runtime's ghost)."""
    from .runtime import with_ghost

    padded, _ = with_ghost(MoleculeSet.from_molecules([(numbers, positions)]), [0], tuple(manifest["model"]["species"]))
    cutoff = float(manifest["model"]["cutoff"])
    edges = sum(len(radius_graph(padded.frame(i)[1], cutoff)[0]) for i in range(len(padded)))
    return {"atoms": len(padded.numbers), "edges": edges, "molecules": len(padded)}


def check_size(manifest: dict, numbers: np.ndarray, positions: np.ndarray) -> None:
    """Refuse a molecule outside the artifact's limits: manifest["inputs"]["bounds"] ({dim: [lo, hi]},
    hi None = unbounded) and, when present, static "buckets" (each [atoms, edges, molecules] or
    {dim: max}, sizes of a whole call including the ghost: one must fit)."""
    inputs = manifest.get("inputs", {})
    bounds = inputs.get("bounds", {})
    buckets = [b if isinstance(b, dict) else dict(zip(CALL_DIMS, b)) for b in inputs.get("buckets") or []]
    limited = buckets or any(hi is not None for _, hi in bounds.values())
    if not limited:
        return
    sizes = call_sizes(manifest, numbers, positions)
    for dim, (lo, hi) in bounds.items():
        n = sizes.get(dim)
        if n is not None and ((lo is not None and n < lo) or (hi is not None and n > hi)):
            raise QSO3Error(f"molecule too large for this artifact: {n} {dim} per call (molecule + 2-atom ghost) "
                            f"outside the compiled bounds [{lo}, {hi}]")
    if buckets and not any(all(sizes.get(d, 0) <= m for d, m in b.items() if m is not None) for b in buckets):
        raise QSO3Error(f"molecule does not fit any compiled size bucket: needs {sizes} (molecule + 2-atom ghost), "
                        f"buckets {buckets}")


def set_tvm_threads(threads: int, get_function=None) -> None:
    """TVM CPU thread-pool size (0: leave the runtime's default); `get_function` of an RPC session for a board."""
    if not threads:
        return
    if get_function is None:
        import tvm

        os.environ["TVM_NUM_THREADS"] = str(threads)
        get_function = tvm.get_global_func
    try:
        get_function("runtime.config_threadpool")(1, int(threads))
    except Exception:  # a runtime without the function: the env variable (local) or the board's default
        pass
