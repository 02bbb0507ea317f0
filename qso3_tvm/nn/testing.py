"""Reusable model checks (NequIP-style mixins live in the package so every model kind gets them).

EQUIVARIANCE_TOL: max relative error of rotated energies / forces, per numeric kind. Float rows are
never loosened; quantized rows are added beside them with the bound they come from.
"""

from __future__ import annotations

import numpy as np
import torch
from e3nn import o3

from .metrics import eager_energy_forces as model_energy_forces  # noqa: F401 (the tests' name)
from .model import So3krates

EQUIVARIANCE_TOL = {
    "float64": 1e-9,
    "float32": 2e-4,  # float32 round-off (inputs rounded to ~1e-7 relative), measured up to 4.5e-5 on forces
    # int8 rows (float64 arithmetic, fake-quantized). Scalar-only quantization quantizes invariants, so
    # it keeps the symmetry up to rare rounding ties; MDDQ turns each vector feature by at most its
    # direction bound (0.32°/0.39°), which moves forces by a small relative amount (measured 1e-3 on
    # the tiny test model); naive component-wise int8 must stay above the MDDQ row.
    "int8-scalar-only": 1e-6,
    "int8-mddq": 0.05,
}


# per-element shifts of realistic size (eV; H, C, N, O, F): totals of ~1e3 eV exercise the float64 shift path
ENERGY_SHIFT_EV = [-13.6, -1030.0, -1480.0, -2040.0, -2700.0]


def save_tiny_model(path, dtype=torch.float32, seed: int = 2, **overrides):
    """A tiny model with realistic energy shifts saved as a checkpoint at `path`; returns the path."""
    from .checkpoint import save_model

    save_model(path, tiny_model(dtype, seed=seed, **{"energy_shift": ENERGY_SHIFT_EV, **overrides}))
    return path


def tiny_model(dtype=torch.float64, seed: int = 0, **overrides) -> So3krates:
    from .model import ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(**{"channels": 16, "layers": 2, "heads": 2, "n_rbf": 8, **overrides})
    model = So3krates(cfg).to(dtype)
    with torch.no_grad():  # untrained heads are near zero; make the outputs non-trivial
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def equivariance_errors(model: So3krates, numbers, pos, n_rotations: int = 8, seed: int = 0) -> tuple[float, float]:
    """Max relative error of energy invariance and force equivariance over random rotations."""
    torch.manual_seed(seed)
    e0, f0 = model_energy_forces(model, numbers, pos)
    e_err = f_err = 0.0
    for rot in o3.rand_matrix(n_rotations, dtype=torch.float64).numpy():
        e, f = model_energy_forces(model, numbers, pos @ rot.T)
        e_err = max(e_err, abs(e - e0) / max(abs(e0), 1e-12))
        f_err = max(f_err, np.abs(f - f0 @ rot.T).max() / max(np.abs(f0).max(), 1e-12))
    return e_err, f_err
