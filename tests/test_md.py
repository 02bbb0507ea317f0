"""ASE calculator (eager and compiled: forces are -dE/dx, input errors) and `qso3-tvm md` (outputs,
stability checks, atomic writes, bad input)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from typer.testing import CliRunner

from qso3_tvm.apps import md as qmd
from qso3_tvm.cli import app
from qso3_tvm.compiler.compile import compile_model
from qso3_tvm.errors import QSO3Error
from qso3_tvm.graph.convention import check_call_size as check_size
from qso3_tvm.graph.datasets import load_rmd17
from qso3_tvm.nn.eager import EagerModel
from qso3_tvm.nn.testing import ENERGY_SHIFT_EV, save_tiny_model
from qso3_tvm.runtime.calculator import QSO3Calculator

runner = CliRunner()
OUTPUTS = {"traj.extxyz", "log.csv", "energy.png", "summary.json"}


@pytest.fixture(scope="module")
def eager_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny64.pt"
    save_tiny_model(path, torch.float64)
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("art")
    save_tiny_model(tmp / "tiny32.pt", layers=1)  # 1 layer: faster build
    compile_model(str(tmp / "tiny32.pt"), "x86-64", tmp / "x86", log=lambda *_: None)
    return tmp / "x86"


@pytest.fixture
def ethanol(ethanol_test):
    numbers, positions = load_rmd17(ethanol_test).frame(0)
    return Atoms(numbers=numbers, positions=positions)


def fd_forces(atoms, h):
    """-dE/dx by central differences."""
    out = np.zeros((len(atoms), 3))
    for i in range(len(atoms)):
        for k in range(3):
            e = []
            for s in (h, -h):
                a = atoms.copy()
                a.calc = atoms.calc
                a.positions[i, k] += s
                e.append(a.get_potential_energy())
            out[i, k] = -(e[0] - e[1]) / (2 * h)
    return out


@pytest.mark.parametrize("kind", ["eager", "compiled"])
def test_forces_are_minus_energy_gradient(kind, eager_ckpt, artifact, ethanol):
    if kind == "eager":  # checkpoints load as float32; cast back to the saved float64
        calc = QSO3Calculator.from_model(EagerModel(eager_ckpt, dtype=torch.float64))
    else:
        calc = QSO3Calculator.from_compiled(artifact, threads=1)
    ethanol.calc = calc
    forces = ethanol.get_forces()
    # float64: round-off ~1e-9; float32 (compiled): energy round-off / 2h and force round-off dominate
    h, tol = (1e-4, 1e-6) if kind == "eager" else (5e-3, 2e-3)
    assert np.abs(fd_forces(ethanol, h) - forces).max() <= tol * max(1.0, np.abs(forces).max())
    shift = sum(ENERGY_SHIFT_EV[[1, 6, 7, 8, 9].index(z)] for z in ethanol.numbers)
    assert abs(ethanol.get_potential_energy() - shift) < 50  # the total energy includes the element shifts


def test_eager_and_compiled_agree(artifact, ethanol):
    e = [QSO3Calculator.from_model(EagerModel(artifact.parent / "tiny32.pt")).get_potential_energy(ethanol),
         QSO3Calculator.from_compiled(artifact).get_potential_energy(ethanol)]
    assert e[0] == pytest.approx(e[1], abs=1e-3)


@pytest.mark.parametrize("kind", ["eager", "compiled"])
def test_unknown_element_and_periodic_cell_raise(kind, eager_ckpt, artifact, ethanol):
    calc = QSO3Calculator.from_model(EagerModel(eager_ckpt)) if kind == "eager" else QSO3Calculator.from_compiled(artifact)
    ethanol.numbers[0] = 16
    with pytest.raises(QSO3Error, match=r"Z=\[16\] not known to the model"):
        calc.get_forces(ethanol)
    ethanol.numbers[0] = 6
    ethanol.pbc = True
    with pytest.raises(QSO3Error, match="periodic"):
        calc.get_forces(ethanol)


def test_size_limits_from_manifest(artifact, ethanol):
    manifest = json.loads((artifact / "manifest.json").read_text())
    z, pos = ethanol.numbers, ethanol.positions
    check_size(manifest, z, pos)  # symbolic sizes: no upper bound
    manifest["inputs"]["bounds"]["atoms"] = [2, 8]
    with pytest.raises(QSO3Error, match=r"11 atoms per call .* bounds \[2, 8\]"):
        check_size(manifest, z, pos)
    manifest["inputs"]["bounds"]["atoms"] = [2, None]
    manifest["inputs"]["buckets"] = [[16, 64, 2], {"atoms": 32, "edges": 1024}]
    check_size(manifest, z, pos)  # fits the second bucket (72 + 2 ghost edges)
    manifest["inputs"]["buckets"] = [[16, 64, 2], [12, 80, 1]]
    with pytest.raises(QSO3Error, match="does not fit any compiled size bucket"):
        check_size(manifest, z, pos)


def run_cli(model, out, data, *extra):
    return runner.invoke(app, ["md", str(model), "--data", str(data), "-o", str(out), "--steps", "20",
                               "--traj-every", "5", "--threads", "1", "--json", *extra])


@pytest.mark.parametrize("kind,ensemble", [("eager", "nve"), ("eager", "langevin"), ("compiled", "nve")])
def test_md_cli_writes_outputs(kind, ensemble, eager_ckpt, artifact, ethanol_test, tmp_path):
    r = run_cli(eager_ckpt if kind == "eager" else artifact, tmp_path, ethanol_test, "--ensemble", ensemble)
    assert r.exit_code == 0, r.output
    assert {p.name for p in tmp_path.iterdir()} == OUTPUTS  # no temporary files left
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == json.loads(r.stdout)
    assert summary["steps_done"] == 20 and summary["n_atoms"] == 9 and summary["stability"]["bonds"] == 8
    assert summary["backend"].startswith("torch" if kind == "eager" else "tvm")
    assert ("drift_mev_per_atom_per_ps" in summary["energy"]) == (ensemble == "nve")
    with open(tmp_path / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 21 and float(rows[0]["temperature_k"]) == pytest.approx(300.0)
    assert (tmp_path / "traj.extxyz").read_text().count("Properties=") == 5  # steps 0, 5, 10, 15, 20


def test_md_cli_over_rpc(artifact, ethanol_test, ethanol, tmp_path):
    """The board backend against a stock TVM RPC server on this machine: same numbers as running here."""
    from tvm import rpc

    from qso3_tvm.boards.firmware import free_port

    port = free_port()
    server = rpc.Server(host="127.0.0.1", port=port, port_end=port + 1, key="")
    try:
        r = run_cli(artifact, tmp_path, ethanol_test, "--steps", "5", "--rpc", f"127.0.0.1:{server.port}")
    finally:
        server.terminate()
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["backend"].startswith("rpc:127.0.0.1") and summary["steps_done"] == 5
    with open(tmp_path / "log.csv") as fh:
        epot0 = float(next(csv.DictReader(fh))["epot_ev"])
    assert epot0 == pytest.approx(QSO3Calculator.from_compiled(artifact).get_potential_energy(ethanol), abs=1e-6)


def free_atoms_calc():
    """No forces at all: a hot molecule flies apart, so every stability check must fire."""
    return QSO3Calculator(lambda z, pos: (0.0, np.zeros((len(z), 3))), (1, 6, 8), "test:free")


def test_stability_checks_flag_a_molecule_flying_apart(ethanol, tmp_path):
    cfg = qmd.MDConfig(steps=40, temperature=1e5, max_com_distance=3.0)
    s = qmd.run_md(ethanol, free_atoms_calc(), cfg, tmp_path, log=lambda *_: None)
    events = s["stability"]["events"]
    assert not s["stable"] and events["bond"] is not None and events["atom_lost"] is not None
    assert s["energy"]["drift_mev_per_atom_per_ps"] == pytest.approx(0.0, abs=1e-9)  # free flight conserves Ekin


def test_drift_is_compared_with_the_kinetic_energy_fluctuation():
    t = np.linspace(0.0, 2.0, 201)  # ps
    ekin = 0.3 + 0.01 * np.sin(40 * t)  # eV
    etot = 1.0 + 0.002 * t  # drifts 4 meV over the run
    rows = np.stack([np.arange(201), t, etot - ekin, ekin, etot, 300 + 0 * t], 1)
    e = qmd.energy_stats(rows, 9, "nve")
    assert e["drift_mev_per_atom_per_ps"] == pytest.approx(2.0 / 9)
    assert e["ekin_std_mev"] == pytest.approx(1e3 * ekin.std())
    assert e["drift_over_ekin_std"] == pytest.approx(4.0 / (1e3 * ekin.std()))


def test_nan_forces_end_the_run_with_an_unstable_summary(ethanol, tmp_path):
    calc = QSO3Calculator(lambda z, pos: (0.0, np.full((len(z), 3), np.nan)), (1, 6, 8), "test:nan")
    s = qmd.run_md(ethanol, calc, qmd.MDConfig(steps=10), tmp_path, log=lambda *_: None)
    assert not s["stable"] and s["steps_done"] == 0 and "NaN" in s["aborted"]
    assert s["stability"]["events"]["nan"]["step"] == 0 and (tmp_path / "summary.json").is_file()


def test_interrupted_run_leaves_no_summary(ethanol, tmp_path, monkeypatch):
    def interrupt(*_):
        raise KeyboardInterrupt

    (tmp_path / "summary.json").write_text("{}")  # a stale summary from an earlier run goes too
    monkeypatch.setattr(qmd, "write_plot", interrupt)
    with pytest.raises(KeyboardInterrupt):
        qmd.run_md(ethanol, free_atoms_calc(), qmd.MDConfig(steps=5), tmp_path, log=lambda *_: None)
    assert {p.name for p in tmp_path.iterdir()} == {"traj.extxyz", "log.csv"}


@pytest.mark.parametrize("args,message", [
    (["--data", "missing.npz"], "dataset file not found"),
    (["--frame", "999"], "--frame 999 out of range"),
    (["--time-ps", "1"], "not both"),
    (["--ensemble", "npt"], "--ensemble must be one of"),
    (["--temperature", "nan"], "not a finite number: --temperature nan"),
    (["--max-com-distance", "nan"], "not a finite number: --max-com-distance nan"),
])
def test_md_cli_bad_input(args, message, eager_ckpt, ethanol_test, tmp_path):
    base = ["md", str(eager_ckpt), "--data", str(ethanol_test), "-o", str(tmp_path / "out"), "--steps", "5"]
    r = runner.invoke(app, base + args)
    assert r.exit_code == 2 and message in r.stderr and r.stderr.startswith("error:")
    assert not (tmp_path / "out" / "summary.json").exists()


def test_md_input_error_keeps_the_earlier_run(eager_ckpt, ethanol_test, ethanol, tmp_path):
    """A run that fails on its input (here an element the model does not know, or a lone atom) changes
    nothing in the output folder of an earlier run."""
    from ase.io import write

    out = tmp_path / "out"
    base = ["md", str(eager_ckpt), "-o", str(out), "--steps", "2"]
    assert runner.invoke(app, base + ["--data", str(ethanol_test)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ethanol.numbers[0] = 16
    write(tmp_path / "sulfur.extxyz", ethanol)
    write(tmp_path / "lone.extxyz", ethanol[:1])
    for data, message in [("sulfur.extxyz", "Z=[16] not known"), ("lone.extxyz", "at least 2 atoms")]:
        r = runner.invoke(app, base + ["--data", str(tmp_path / data)])
        assert r.exit_code == 2 and message in r.stderr and r.stderr.startswith("error:"), r.output
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------- multiple time stepping (RESPA)
@pytest.fixture(scope="module")
def mts_ckpts(tmp_path_factory):
    """Tiny float64 checkpoints of one fp32 model: fp32, w8a8 (cheap, non-conservative) and w8 (conservative)."""
    from qso3_tvm.nn.checkpoint import save_model
    from qso3_tvm.nn.quant import QuantConfig, quantize_model
    from qso3_tvm.nn.testing import model_energy_forces, tiny_model

    tmp = tmp_path_factory.mktemp("mts")
    fp32 = tiny_model(torch.float64, seed=2, energy_shift=ENERGY_SHIFT_EV)
    z, pos = load_rmd17(Path(__file__).parent / "data" / "rmd17_ethanol_test_mini.npz").frame(0)
    save_model(tmp / "fp32.pt", fp32)
    for name, cfg in (("w8a8", QuantConfig()), ("w8", QuantConfig(weight_only=True))):
        q = quantize_model(fp32, cfg)
        model_energy_forces(q, z, pos)  # calibrate on the molecule the runs start from
        save_model(tmp / f"{name}.pt", q)
    return tmp


def eager64(path):
    return QSO3Calculator.from_model(EagerModel(path, dtype=torch.float64))


def test_mts_every_1_is_velocity_verlet_with_the_conservative_forces(mts_ckpts, ethanol):
    from ase import units
    from ase.md.verlet import VelocityVerlet

    def trajectory(dyn_of, calc, steps=15):
        atoms = ethanol.copy()
        atoms.calc = calc
        qmd.init_velocities(atoms, 300.0, seed=0)
        dyn_of(atoms).run(steps)
        return atoms.positions.copy(), atoms.get_momenta()

    dt, cons = 0.5 * units.fs, eager64(mts_ckpts / "fp32.pt")
    ref = trajectory(lambda a: VelocityVerlet(a, timestep=dt), cons)
    for every, same in ((1, True), (5, False)):
        got = trajectory(lambda a: qmd.RESPA(a, dt, cons, every), eager64(mts_ckpts / "w8a8.pt"))
        assert all(np.allclose(g, r, rtol=0, atol=1e-10) for g, r in zip(got, ref)) == same


def test_mts_conserves_energy_better_than_the_cheap_model(mts_ckpts, ethanol_test, tmp_path):
    runs = {}
    for name, extra in (("cheap", []), ("mts", ["--mts-model", str(mts_ckpts / "w8.pt"), "--mts-every", "4"])):
        r = runner.invoke(app, ["md", str(mts_ckpts / "w8a8.pt"), "--data", str(ethanol_test), "-o", str(tmp_path / name),
                                "--steps", "80", "--threads", "1", "--json", *extra])
        assert r.exit_code == 0, r.output
        runs[name] = json.loads(r.stdout)
    mts = runs["mts"]
    assert mts["mts_backend"] == "torch:w8" and mts["config"]["log_every"] == 4 and mts["steps_done"] == 80
    with open(tmp_path / "mts" / "log.csv") as fh:
        assert [int(row["step"]) for row in csv.DictReader(fh)] == list(range(0, 81, 4))
    cheap_e, mts_e = runs["cheap"]["energy"], mts["energy"]
    assert mts_e["max_abs_detot_mev"] < 0.2 * cheap_e["max_abs_detot_mev"]
    assert abs(mts_e["drift_mev_per_atom_per_ps"]) < 0.2 * abs(cheap_e["drift_mev_per_atom_per_ps"])


@pytest.mark.parametrize("args,message", [
    (["--mts-every", "3"], "must be multiples of 3"),
    (["--mts-every", "0"], "--mts-every must be an integer >= 1"),
    (["--ensemble", "langevin"], "needs --ensemble nve"),
    (["--log-every", "3"], "must be multiples of 4"),
])
def test_mts_bad_options(args, message, mts_ckpts, ethanol_test, tmp_path):
    base = ["md", str(mts_ckpts / "w8a8.pt"), "--data", str(ethanol_test), "-o", str(tmp_path / "out"), "--steps", "8",
            "--mts-model", str(mts_ckpts / "w8.pt"), "--mts-every", "4"]
    r = runner.invoke(app, base + args)
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
