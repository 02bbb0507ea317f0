"""Accuracy and symmetry metrics: energy/force MAE and LEE, the local equivariance error of forces.

LEE (meV/Å). For a frame x (centred), a random unit axis n and R(θ) the rotation by θ about n,
let G(θ) = R(θ)ᵀ F(R(θ) x), the forces of the rotated frame rotated back. For an exactly
equivariant model G is constant. LEE is the central difference of G at θ = 0,
    LEE = mean over frames, axes and atoms of ‖G(δ) − G(−δ)‖ / (2δ),   δ = 0.01 rad,
with 4 axes per frame by default. It is computed the same way for eager, quantized and compiled
models (any `forces_fn`). δ is finite on purpose: a quantized model is piecewise constant, so an
infinitesimal derivative would see only zero or a jump; a finite δ measures the rate of change.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .data import MoleculeSet, make_batch
from .model import So3krates, energy_and_forces

LEE_DELTA = 0.01
LEE_AXES = 4

# forces_fn(numbers (n,), positions (n, 3) float64) -> forces (n, 3) float64, eV/Å
ForcesFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def axis_rotation(axis: np.ndarray, theta: float) -> np.ndarray:
    """Rodrigues' formula."""
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * (k @ k)


def local_equivariance_error(forces_fn: ForcesFn, numbers: np.ndarray, pos: np.ndarray,
                             rng: np.random.Generator, axes: int = LEE_AXES, delta: float = LEE_DELTA) -> float:
    """LEE of one frame in eV/Å (see module docstring)."""
    x = pos - pos.mean(0)
    errs = []
    for _ in range(axes):
        n = rng.normal(size=3)
        g = []
        for theta in (delta, -delta):
            rot = axis_rotation(n, theta)
            g.append(forces_fn(numbers, x @ rot.T) @ rot)  # R^T F(R x), row vectors
        errs.append(np.linalg.norm(g[0] - g[1], axis=1).mean() / (2 * delta))
    return float(np.mean(errs))


def eager_forces_fn(model: So3krates) -> ForcesFn:
    cfg = model.cfg
    dtype = next(model.parameters()).dtype

    def fn(numbers, pos):
        mols = MoleculeSet(numbers, pos, np.array([0, len(numbers)]))
        _, f = energy_and_forces(model, make_batch(mols, [0], cfg.species, cfg.cutoff, dtype))
        return f.detach().double().numpy()

    return fn


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


def error_metrics(energies, forces, mols: MoleculeSet) -> dict:
    out = {"n_frames": len(mols)}
    if mols.energies is not None:
        out["energy_mae_mev"] = float(np.abs(energies - mols.energies).mean() * 1e3)
    if mols.forces is not None:
        out["force_mae_mev_per_a"] = float(np.abs(forces - mols.forces).mean() * 1e3)
    return out


def lee_metric(forces_fn: ForcesFn, mols: MoleculeSet, frames: int, seed: int = 0) -> float:
    """Mean LEE (meV/Å) over the first `frames` frames (evenly spaced if fewer than the set)."""
    rng = np.random.default_rng(seed)
    idx = np.linspace(0, len(mols) - 1, min(frames, len(mols))).round().astype(int)
    return float(np.mean([local_equivariance_error(forces_fn, *mols.frame(i), rng) for i in idx]) * 1e3)


def evaluate_model(model: So3krates, mols: MoleculeSet, lee_frames: int = 100, batch_size: int = 32) -> dict:
    energies, forces = predict(model, mols, batch_size)
    out = error_metrics(energies, forces, mols)
    out["lee_mev_per_a"] = lee_metric(eager_forces_fn(model), mols, lee_frames)
    out["lee_frames"] = min(lee_frames, len(mols))
    return out
