"""Symmetries and conservative forces of the fp32/fp64 model."""

import numpy as np
import pytest
import torch
from e3nn import o3
from e3nn.util.test import assert_equivariant

from qso3_tvm.graph.molecules import random_molecule
from qso3_tvm.nn.model import polynomial_cutoff
from qso3_tvm.nn.testing import EQUIVARIANCE_TOL, equivariance_errors, model_energy_forces, tiny_model


@pytest.mark.parametrize("attention", ["l2norm", "dot"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rotation_invariance_and_equivariance(dtype, attention):
    model = tiny_model(dtype, attention=attention)
    z, pos = random_molecule(12, seed=1)
    e_err, f_err = equivariance_errors(model, z, pos)
    tol = EQUIVARIANCE_TOL[str(dtype).split(".")[1]]
    assert e_err <= tol and f_err <= tol, (e_err, f_err, tol)


def test_float32_errors_are_not_zero_by_accident():
    """The float32 row must measure something: a broken rotation would show up far above it."""
    model = tiny_model(torch.float32)
    z, pos = random_molecule(10, seed=2)
    e0, f0 = model_energy_forces(model, z, pos)
    _, f1 = model_energy_forces(model, z, pos @ o3.rand_matrix(dtype=torch.float64).numpy().T)
    assert np.abs(f1 - f0).max() > 100 * EQUIVARIANCE_TOL["float32"] * np.abs(f0).max()


def test_e3nn_assert_equivariant_forces():
    model = tiny_model(torch.float64)
    z, _ = random_molecule(8, seed=3)

    def forces(pos):
        return torch.as_tensor(model_energy_forces(model, z, pos.numpy())[1])

    assert_equivariant(forces, irreps_in=[o3.Irreps("1o")], irreps_out=[o3.Irreps("1o")],
                       args_in=[torch.as_tensor(random_molecule(8, seed=3)[1])],
                       tolerance=EQUIVARIANCE_TOL["float64"] * 100)  # absolute, forces are O(1)


def test_translation_invariance():
    model = tiny_model()
    z, pos = random_molecule(9, seed=4)
    e0, f0 = model_energy_forces(model, z, pos)
    e1, f1 = model_energy_forces(model, z, pos + np.array([3.0, -7.0, 11.0]))
    assert abs(e1 - e0) < 1e-10 and np.abs(f1 - f0).max() < 1e-10


def test_permutation_invariance():
    model = tiny_model()
    z, pos = random_molecule(11, seed=5)
    perm = np.random.default_rng(0).permutation(len(z))
    e0, f0 = model_energy_forces(model, z, pos)
    e1, f1 = model_energy_forces(model, z[perm], pos[perm])
    assert abs(e1 - e0) < 1e-10 and np.abs(f1 - f0[perm]).max() < 1e-10


@pytest.mark.parametrize("attention", ["l2norm", "dot"])
def test_forces_are_minus_energy_gradient(attention):
    model = tiny_model(attention=attention)
    z, pos = random_molecule(7, seed=6)
    _, f = model_energy_forces(model, z, pos)
    h = 1e-5
    for atom, axis in [(0, 0), (3, 1), (6, 2)]:
        plus, minus = pos.copy(), pos.copy()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        fd = -(model_energy_forces(model, z, plus)[0] - model_energy_forces(model, z, minus)[0]) / (2 * h)
        assert abs(fd - f[atom, axis]) < 1e-7 * max(1.0, abs(fd)), (fd, f[atom, axis])


def test_smooth_at_cutoff():
    """Energy is continuous as a neighbor leaves the cutoff (polynomial envelope + attention sink)."""
    model = tiny_model(cutoff=3.0)
    z = np.array([6, 1])
    energies = [model_energy_forces(model, z, np.array([[0, 0, 0], [d, 0, 0]]))[0] for d in (2.999999, 3.000001, 3.5)]
    assert abs(energies[0] - energies[1]) < 1e-9 and abs(energies[1] - energies[2]) < 1e-12
    r = torch.tensor([0.0, 3.0, 4.0], dtype=torch.float64)
    assert polynomial_cutoff(r, 3.0).tolist() == [1.0, 0.0, 0.0]


def test_isolated_atom_has_finite_energy_and_zero_force():
    model = tiny_model()
    e, f = model_energy_forces(model, np.array([8]), np.zeros((1, 3)))
    assert np.isfinite(e) and np.all(f == 0)
