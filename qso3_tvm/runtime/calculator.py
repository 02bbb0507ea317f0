"""ASE calculator: total energy (eV, per-element shifts included) and forces (eV/Å) from an eager
checkpoint, a compiled artifact run here, or a compiled artifact run on a board over TVM RPC.
Needs ASE, numpy and the TVM runtime; PyTorch only for the eager backend (qso3_tvm.nn.eager).

    from qso3_tvm.runtime.calculator import QSO3Calculator
    atoms.calc = QSO3Calculator.from_model(EagerModel("ethanol-fp32"))  # PyTorch (qso3_tvm.nn.eager)
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

from ..errors import QSO3Error
from ..graph.convention import check_call_size
from ..graph.molecules import MoleculeSet, validate

# (numbers (n,), positions (n, 3) float64) -> (total energy eV, forces (n, 3) eV/Å)
EnergyForcesFn = Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]


class QSO3Calculator(Calculator):
    implemented_properties = ["energy", "forces"]

    def __init__(self, energy_forces: EnergyForcesFn, species, backend: str,
                 size_check: Callable[[np.ndarray, np.ndarray], None] | None = None,
                 energy_only: Callable[[np.ndarray, np.ndarray], float] | None = None, **kwargs):
        """`energy_only`: a cheaper energy without forces, used when ASE asks for the energy alone."""
        super().__init__(**kwargs)
        self.energy_forces, self.species, self.backend = energy_forces, tuple(species), backend
        self.size_check, self.energy_only = size_check, energy_only

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_compiled(cls, path: str | Path, threads: int = 0, **kwargs) -> "QSO3Calculator":
        """A compiled artifact folder (library + manifest.json) run on this machine."""
        from .compiled import CompiledModel

        set_tvm_threads(threads)
        return cls._from_model(CompiledModel(path), "tvm", **kwargs)

    @classmethod
    def from_rpc(cls, path: str | Path, rpc: str | None = None, tracker: str | None = None,
                 key: str | None = None, threads: int = 0, **kwargs) -> "QSO3Calculator":
        """A compiled artifact uploaded to a board (direct `rpc` HOST:PORT, or `tracker` + `key`)."""
        from .remote import RemoteModel, connect

        session = connect(rpc, tracker, key)
        if threads:
            set_tvm_threads(threads, session.get_function)
        return cls._from_model(RemoteModel(session, path), f"rpc:{rpc or tracker}", **kwargs)

    @classmethod
    def from_model(cls, model, **kwargs) -> "QSO3Calculator":
        """Any model with `species`, `backend` and `energy_forces(numbers, positions)`, e.g. an eager
        checkpoint: `QSO3Calculator.from_model(qso3_tvm.nn.eager.EagerModel("ethanol-fp32"))`."""
        return cls(model.energy_forces, model.species, model.backend, **kwargs)

    @classmethod
    def _from_model(cls, model, where: str, **kwargs) -> "QSO3Calculator":
        manifest = model.manifest
        backend = f"{where}:{manifest['target']['name']}:{manifest['model']['precision']}"
        energy_only = (lambda z, pos: model.energy_forces(z, pos, forces=False)[0]) if model.has_energy_entry else None
        return cls(model.energy_forces, model.species, backend, energy_only=energy_only,
                   size_check=lambda z, pos: check_call_size(manifest, z, pos), **kwargs)

    # ------------------------------------------------------------ ASE interface
    def calculate(self, atoms=None, properties=("energy", "forces"), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        numbers, positions = self.atoms.numbers.astype(np.int64), self.atoms.positions.astype(np.float64)
        if self.atoms.pbc.any():
            raise QSO3Error("periodic cells are not supported: the model is for isolated molecules (set pbc=False)")
        validate(MoleculeSet.from_molecules([(numbers, positions)]), species=self.species, source="molecule")
        if self.size_check is not None:
            self.size_check(numbers, positions)
        if "forces" not in properties and self.energy_only is not None:
            self.results = {"energy": float(self.energy_only(numbers, positions))}
            return
        energy, forces = self.energy_forces(numbers, positions)
        self.results = {"energy": float(energy), "forces": np.asarray(forces, np.float64)}


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
