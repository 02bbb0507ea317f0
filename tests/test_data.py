"""Loaders, unit conversions, validation errors, neighbor lists and batching."""

import numpy as np
import pytest

from qso3_tvm.errors import QSO3Error
from qso3_tvm.graph.datasets import _parse_qm9_csv, load_extxyz, load_rmd17, qm9_split
from qso3_tvm.graph.molecules import KCAL_MOL_TO_EV, MoleculeSet, random_molecule
from qso3_tvm.graph.neighbors import radius_graph
from qso3_tvm.nn.batch import make_batch


def brute_force_graph(pos, cutoff):
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    dst, src = np.nonzero((d < cutoff) & ~np.eye(len(pos), dtype=bool))
    return set(zip(src.tolist(), dst.tolist()))


@pytest.mark.parametrize("n_atoms,cutoff", [(1, 5.0), (2, 5.0), (30, 2.5), (300, 5.0), (2500, 3.0)])
def test_radius_graph_equals_brute_force(n_atoms, cutoff):
    pos = np.random.default_rng(n_atoms).uniform(0, 2.0 * n_atoms ** (1 / 3), size=(n_atoms, 3))
    src, dst = radius_graph(pos, cutoff)
    assert set(zip(src.tolist(), dst.tolist())) == brute_force_graph(pos, cutoff)
    assert np.all(np.diff(dst) >= 0)  # grouped by receiving atom


def test_rmd17_units(ethanol_train):
    raw = np.load(ethanol_train)
    mols = load_rmd17(ethanol_train)
    assert len(mols) == len(raw["energies"])
    np.testing.assert_allclose(mols.energies, raw["energies"] * 0.0433641)
    np.testing.assert_allclose(mols.forces.reshape(raw["forces"].shape), raw["forces"] * KCAL_MOL_TO_EV)
    np.testing.assert_array_equal(mols.frame(3)[1], raw["coords"][3])


def test_batch_edges_stay_inside_molecules(aspirin_test):
    mols = load_rmd17(aspirin_test)
    b = make_batch(mols, [0, 1, 2], (1, 6, 7, 8, 9), 5.0)
    assert b.n_mol == 3 and b.pos.shape == (63, 3)
    assert np.all(b.mol[b.src].numpy() == b.mol[b.dst].numpy())
    assert b.energy.shape == (3,) and b.forces.shape == (63, 3)


def _write_npz(path, **overrides):
    z = np.array([6, 1, 1], np.uint8)
    coords = np.array([[[0, 0, 0], [1.1, 0, 0], [0, 1.1, 0]]], float)
    data = {"nuclear_charges": z, "coords": coords, "energies": np.zeros(1), "forces": np.zeros_like(coords)}
    data.update(overrides)
    np.savez(path, **{k: v for k, v in data.items() if v is not None})
    return path


@pytest.mark.parametrize("overrides,message", [
    ({"forces": None}, "missing keys ['forces']"),
    ({"coords": np.array([[[0, 0, 0], [np.nan, 0, 0], [0, 1.1, 0]]])}, "contain NaN"),
    ({"coords": np.array([[[0, 0, 0], [0.01, 0, 0], [0, 1.1, 0]]])}, "atoms 0 and 1 of frame 0 are 0.010 Å apart"),
])
def test_bad_npz_gets_clear_error(tmp_path, overrides, message):
    with pytest.raises(QSO3Error, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_rmd17(_write_npz(tmp_path / "bad.npz", **overrides))


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(QSO3Error, match="dataset file not found.*figshare"):
        load_rmd17(tmp_path / "nope.npz")
    with pytest.raises(QSO3Error, match="unknown dataset 'water'"):
        load_rmd17("water")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(QSO3Error, match="not a readable .npz"):
        load_rmd17(tmp_path / "junk.npz")


def test_unknown_element(tmp_path):
    mols = load_rmd17(_write_npz(tmp_path / "si.npz", nuclear_charges=np.array([14, 1, 1], np.uint8)))
    with pytest.raises(QSO3Error, match=r"Z=\[14\] not known to the model"):
        make_batch(mols, [0], (1, 6, 7, 8, 9), 5.0)


def test_extxyz_roundtrip(tmp_path):
    pytest.importorskip("ase")
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    z, pos = random_molecule(5, seed=0)
    atoms = ase.Atoms(numbers=z, positions=pos)
    atoms.calc = SinglePointCalculator(atoms, energy=-1.5, forces=np.ones((5, 3)))
    ase.io.write(tmp_path / "m.extxyz", [atoms, atoms])
    mols = load_extxyz(tmp_path / "m.extxyz")
    assert len(mols) == 2 and mols.energies.tolist() == [-1.5, -1.5]
    np.testing.assert_allclose(mols.positions[:5], pos)


def test_qm9_csv_parser_and_split(tmp_path):
    header = "XYZ_file,Index,Elements,XYZ_Ang,InternalEnergy_0K_au\n"
    row = '"a.xyz",1,"[\'C\',\'H\',\'H\',\'H\',\'H\']","[[0,0,0],[1,0,0],[0,1,0],[0,0,1],[-1,0,0]]",-40.47893\n'
    for part in ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv"):
        (tmp_path / part).write_text(header + row)
    arrays = _parse_qm9_csv(tmp_path)
    assert arrays["offsets"].tolist() == [0, 5, 10, 15] and arrays["numbers"][:5].tolist() == [6, 1, 1, 1, 1]
    assert arrays["u0_ha"][0] == -40.47893
    split = qm9_split(130_831)
    assert len(split["train"]) == 110_000 and len(split["val"]) == 10_000 and len(split["test"]) == 10_831
    assert not set(split["train"][:1000]) & set(split["test"])
    np.testing.assert_array_equal(split["test"], qm9_split(130_831)["test"])


def test_subset_keeps_frames(ethanol_train):
    mols = load_rmd17(ethanol_train)
    sub = mols.subset([5, 2])
    np.testing.assert_array_equal(sub.frame(0)[1], mols.frame(5)[1])
    assert isinstance(sub, MoleculeSet) and sub.energies.tolist() == [mols.energies[5], mols.energies[2]]
