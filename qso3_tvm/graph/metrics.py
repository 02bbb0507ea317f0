"""Accuracy and symmetry metrics: energy/force MAE and LEE, the local equivariance error of forces.

LEE (meV/Å): how far the per-atom forces are from rotating with the molecule,
    LEE = mean over frames x, rotations R and atoms i of ‖Rᵀ F(R x)_i − F(x)_i‖,
with x centred, R drawn uniformly from SO(3) (Haar; 4 per frame, fixed seed). An exactly
equivariant model has LEE = 0; float round-off gives a small floor. It is computed the same way for
eager, quantized and compiled models (any `forces_fn`).

Why not a derivative (d/dθ of Rᵀ F(R x) at θ = 0)? A quantized model is piecewise constant in the
orientation: the derivative is zero almost everywhere and a finite difference with step δ measures
the size of the jumps divided by δ, so its value depends on δ. The finite-rotation form above is the
per-atom force error a user sees when the same molecule arrives in another orientation.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.spatial.transform import Rotation

from .molecules import MoleculeSet

LEE_ROTATIONS = 4

# forces_fn(numbers (n,), positions (n, 3) float64) -> forces (n, 3) float64, eV/Å
ForcesFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def local_equivariance_error(forces_fn: ForcesFn, numbers: np.ndarray, pos: np.ndarray,
                             rng: np.random.Generator, rotations: int = LEE_ROTATIONS) -> float:
    """LEE of one frame in eV/Å (see module docstring)."""
    x = pos - pos.mean(0)
    f0 = forces_fn(numbers, x)
    errs = []
    for _ in range(rotations):
        rot = Rotation.random(random_state=rng).as_matrix()
        f_rot = forces_fn(numbers, x @ rot.T) @ rot  # R^T F(R x), row vectors
        errs.append(np.linalg.norm(f_rot - f0, axis=1).mean())
    return float(np.mean(errs))


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
