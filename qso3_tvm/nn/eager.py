"""A checkpoint run eagerly in PyTorch, with the interface of runtime.CompiledModel
(`species`, `backend`, `energy_forces`, `forces_fn`): what the calculator and MD take."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..graph.molecules import MoleculeSet
from .checkpoint import load_model, precision
from .metrics import predict


class EagerModel:
    def __init__(self, spec: str | Path, threads: int = 0, dtype: torch.dtype | None = None):
        """A bundled model name ('ethanol-fp32') or a .pt checkpoint, as loaded (float32), or cast to
        `dtype` (e.g. torch.float64 for exact finite-difference checks)."""
        if threads:
            torch.set_num_threads(threads)
        self.model = load_model(spec)
        if dtype is not None:
            self.model = self.model.to(dtype)
        self.species = tuple(self.model.cfg.species)
        self.backend = f"torch:{precision(self.model)}"

    def energy_forces(self, numbers: np.ndarray, positions: np.ndarray) -> tuple[float, np.ndarray]:
        """Total energy (eV, shifts included) and forces (eV/Å) of one molecule."""
        energies, forces = predict(self.model, MoleculeSet.from_molecules([(numbers, positions)]))
        return float(energies[0]), forces

    def forces_fn(self):
        return lambda numbers, pos: self.energy_forces(numbers, pos)[1]
