"""Eager (PyTorch) predictions and metrics of a model; the metric definitions are in graph.metrics."""

from __future__ import annotations

import numpy as np
import torch

from ..graph.metrics import ForcesFn, error_metrics, lee_metric
from ..graph.molecules import MoleculeSet
from .batch import make_batch
from .model import So3krates, energy_and_forces


def eager_energy_forces(model: So3krates, numbers: np.ndarray, pos: np.ndarray) -> tuple[float, np.ndarray]:
    """Interaction energy (eV) and forces (eV/Å) of one molecule with the eager model."""
    dtype = next(model.parameters()).dtype
    batch = make_batch(MoleculeSet.from_molecules([(numbers, pos)]), [0], model.cfg.species, model.cfg.cutoff, dtype)
    e, f = energy_and_forces(model, batch)
    return float(e.detach()), f.detach().double().numpy()


def eager_forces_fn(model: So3krates) -> ForcesFn:
    return lambda numbers, pos: eager_energy_forces(model, numbers, pos)[1]


def predict(model: So3krates, mols: MoleculeSet, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Total energies (eV) and forces (eV/Å) of every frame with the eager model."""
    dtype = next(model.parameters()).dtype
    energies, forces = [], []
    for start in range(0, len(mols), batch_size):
        batch = make_batch(mols, range(start, min(start + batch_size, len(mols))), model.cfg.species,
                           model.cfg.cutoff, dtype)
        e, f = energy_and_forces(model, batch)
        energies.append(e.detach().double() + model.reference_energy(batch))
        forces.append(f.detach().double())
    return torch.cat(energies).numpy(), torch.cat(forces).numpy()


def evaluate_model(model: So3krates, mols: MoleculeSet, lee_frames: int = 100, batch_size: int = 32) -> dict:
    energies, forces = predict(model, mols, batch_size)
    out = error_metrics(energies, forces, mols)
    out["lee_mev_per_a"] = lee_metric(eager_forces_fn(model), mols, lee_frames)
    out["lee_frames"] = min(lee_frames, len(mols))
    return out
