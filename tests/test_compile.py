"""qso3-tvm compile on a tiny model: x86 parity and evaluate, refusal above tolerance with nothing left
behind, arm64 cross-compiled ELF, target resolution errors."""

import json
import shutil

import numpy as np
import pytest
import torch
import tvm
from typer.testing import CliRunner

from qso3_tvm.cli import app
from qso3_tvm.compiler import compile as qcompile
from qso3_tvm.compiler.targets import resolve_target
from qso3_tvm.errors import QSO3Error
from qso3_tvm.files import sha256
from qso3_tvm.graph.molecules import MoleculeSet, random_molecule
from qso3_tvm.nn.checkpoint import save_model
from qso3_tvm.nn.quant import QuantConfig, quantize_model
from qso3_tvm.nn.testing import ENERGY_SHIFT_EV, model_energy_forces, save_tiny_model, tiny_model
from qso3_tvm.runtime.compiled import CompiledModel

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def x86_artifact(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "x86"
    r = runner.invoke(app, ["compile", str(tiny_ckpt), "--target", "x86-64", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "parity vs PyTorch" in r.stdout
    return out


def test_x86_artifact_manifest_and_parity(x86_artifact, tiny_ckpt):
    m = json.loads((x86_artifact / "manifest.json").read_text())
    assert m["model"]["species"] == [1, 6, 7, 8, 9] and m["model"]["energy_shift"] == ENERGY_SHIFT_EV
    assert m["library_sha256"] == sha256(x86_artifact / m["library"])
    assert m["parity"]["max_force_error_mev_per_a"] <= m["parity"]["tolerance_mev"][1]
    assert m["target"]["name"] == "x86-64" and m["versions"]["tvm"].startswith("0.27")


def test_evaluate_compiled_matches_torch(x86_artifact, tiny_ckpt, ethanol_test):
    args = ["--data", str(ethanol_test), "--lee-frames", "2", "--json"]
    compiled = json.loads(runner.invoke(app, ["evaluate", str(x86_artifact), *args]).stdout)
    eager = json.loads(runner.invoke(app, ["evaluate", str(tiny_ckpt), *args]).stdout)
    assert compiled["backend"] == "tvm:x86-64" and eager["backend"] == "torch"
    assert compiled["energy_mae_mev"] == pytest.approx(eager["energy_mae_mev"], abs=0.01)
    assert compiled["force_mae_mev_per_a"] == pytest.approx(eager["force_mae_mev_per_a"], abs=0.01)
    assert compiled["lee_mev_per_a"] < 0.05


def test_refuses_above_tolerance_and_leaves_nothing(tiny_ckpt, x86_artifact, tmp_path, monkeypatch):
    import tvm

    lib = tvm.runtime.load_module(str(x86_artifact / "model.so"))

    class Prebuilt:  # skip the slow build: reuse the fixture's library
        def export_library(self, path, **kw):
            shutil.copy(x86_artifact / "model.so", path)

    monkeypatch.setattr(qcompile, "build", lambda model, spec, **kw: Prebuilt())
    monkeypatch.setenv("QSO3_COMPILE_TOL_F_MEV", "0")
    out = tmp_path / "refused"
    with pytest.raises(QSO3Error, match=r"disagrees with PyTorch.*tol 0\.0"):
        qcompile.compile_model(str(tiny_ckpt), "x86-64", out, log=lambda *_: None)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert lib is not None


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="needs g++-aarch64-linux-gnu")
def test_arm64_artifact_is_aarch64_elf(tiny_ckpt, tmp_path):
    info = qcompile.compile_model(str(tiny_ckpt), "arm64", tmp_path / "arm", log=lambda *_: None)
    header = (tmp_path / "arm" / "model.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    assert info["parity"] is None and info["target"]["arch"] == "aarch64"


def test_unknown_target_lists_valid_ones():
    with pytest.raises(QSO3Error, match="unknown target 'armv9'.*arm64-cortex-a76.*x86-avx512"):
        resolve_target("armv9")
    r = runner.invoke(app, ["compile", "ethanol-fp32", "--target", "armv9", "-o", "x"])
    assert r.exit_code == 2 and "use a preset" in r.stderr


def test_targets_command_lists_presets(monkeypatch):
    from qso3_tvm.compiler import targets

    r = runner.invoke(app, ["targets"])
    assert r.exit_code == 0
    for name in ("host", "x86-avx512", "x86-avx2", "arm64-cortex-a72", "arm64-cortex-a76", "jetson-orin", "cuda-sm90"):
        assert name in r.stdout
    monkeypatch.setattr(targets, "HOST_ORDER", ())  # a machine where no preset runs: still the list, and why
    r = runner.invoke(app, ["targets"])
    assert r.exit_code == 0 and "no target preset runs on this machine" in r.stdout and "x86-avx2" in r.stdout


def test_host_target_is_the_fastest_preset_that_runs_here(monkeypatch):
    """The default target (`host`) resolves to a preset this machine runs: AVX-512 VNNI where present, else AVX2,
    else generic x86-64; a machine with none of the features gets the next in line."""
    from qso3_tvm.compiler import targets

    spec = resolve_target("host")
    assert spec.local and spec.name in targets.HOST_ORDER
    if spec.arch == "x86_64":
        monkeypatch.setattr(targets, "host_cpu_features", lambda: {"avx2", "fma"})
        assert resolve_target("host").name == "x86-avx2"
        monkeypatch.setattr(targets, "host_cpu_features", lambda: {"avx512f", "avx512_vnni", "avx2", "fma"})
        assert resolve_target("host").name == "x86-avx512"
        monkeypatch.setattr(targets, "host_cpu_features", lambda: set())
        assert resolve_target("host").name == "x86-64"


def test_quantized_model_compiles_to_int8_gemms(tmp_path):
    """The int8 form matches the fake-quantized model in PyTorch, and the compiled module matches both."""
    from qso3_tvm.nn.int8 import Int8Linear, Int8WeightLinear, to_int8

    cfg = QuantConfig(silu_offset=True, direction_ste="geometric")  # the options' kernels too
    model = quantize_model(tiny_model(torch.float32, seed=4, energy_shift=ENERGY_SHIFT_EV), cfg)
    z, pos = random_molecule(12, seed=1)
    model_energy_forces(model, z, pos)  # calibrate
    int8 = to_int8(model)
    assert isinstance(int8.layers[0].q, Int8Linear) and int8.layers[0].q.w_codes_t.dtype == torch.int8
    assert isinstance(int8.layers[0].vec_uv, Int8WeightLinear)
    assert int8.layers[0].filter[2].offset is not None and int8.layers[0].filter[0].offset is None  # LSQ+ on SiLU outputs
    e0, f0 = model_energy_forces(model.eval(), *random_molecule(15, seed=9))
    e1, f1 = model_energy_forces(int8, *random_molecule(15, seed=9))
    assert abs(e0 - e1) < 1e-5 and np.abs(f0 - f1).max() < 1e-5 * max(1.0, np.abs(f0).max())
    save_model(tmp_path / "q.pt", model)
    # the host's preset: its int8 products (qso3_int8_linear, qso3_int8_grad_product) on this CPU's dot instruction
    from qso3_tvm.compiler.module import int8_backward

    int8_forces = int8_backward(resolve_target("host")) == "int8"
    info = qcompile.compile_model(str(tmp_path / "q.pt"), "host", tmp_path / "art", log=lambda *_: None)
    assert info["model"]["precision"] == "w8a8-mddq"
    assert info["parity"]["max_force_error_mev_per_a"] <= info["parity"]["tolerance_mev"][1]
    kernels = info["quantization"]["kernels"]
    assert "int8 x int8 -> int32" in kernels["scalar_linears"] and "qso3_mddq" in kernels["mddq"]
    assert ("qso3_int8_grad_product" in kernels["forces"]) == int8_forces
    if int8_forces:  # forces within the int8 backward's rounding of the int8 model's float-backward forces
        from qso3_tvm.nn.metrics import predict

        mols = MoleculeSet.from_molecules([random_molecule(15, seed=9)])
        e2, f2 = predict(to_int8(model, backward="float"), mols)
        e3, f3 = CompiledModel(tmp_path / "art").predict(mols)
        assert np.abs(e3 - e2).max() < 1e-4 and np.abs(f3 - f2).max() < 1e-3 * max(1.0, np.abs(f2).max())
    # the energy-only entry point of a quantized build (custom operators shared with main) gives main's energies
    mols = MoleculeSet.from_molecules([random_molecule(7, seed=s) for s in (3, 4)])
    compiled = CompiledModel(tmp_path / "art")
    e_main, _ = compiled.predict(mols)
    e_only, f_none = compiled.predict(mols, forces=False)
    assert f_none is None and np.array_equal(e_only, e_main)


def test_energy_only_entry_point(x86_artifact, monkeypatch):
    """Every artifact has an `energy` function (manifest `functions`); the calculator uses it when ASE asks
    for the energy alone, and it equals main's energy."""
    from ase import Atoms

    from qso3_tvm.runtime.calculator import QSO3Calculator

    assert {"main", "energy"} <= set(json.loads((x86_artifact / "manifest.json").read_text())["functions"])
    z, pos = random_molecule(6, seed=5)
    calc = QSO3Calculator.from_compiled(x86_artifact)
    e_both = calc.energy_forces(z, pos)[0]
    monkeypatch.setattr(calc, "energy_forces", lambda *a: pytest.fail("energy-only call computed forces"))
    atoms = Atoms(numbers=z, positions=pos)
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(e_both, abs=1e-9)


def test_specialized_copies_equal_the_symbolic_function(x86_artifact):
    """The default build holds static copies of main/energy for the packaged sample molecules' sizes; a
    call that fits is padded to the smallest and runs its copy, with the symbolic function's results;
    a larger call runs the symbolic function."""
    from qso3_tvm.graph.convention import call_arrays, sample_buckets

    compiled = CompiledModel(x86_artifact)
    buckets = compiled.manifest["inputs"]["specialized"]
    assert buckets == [b.as_list() for b in sample_buckets(compiled.species, compiled.cutoff)] and buckets
    assert all(f"{e}_b{a}_{n}_{m}" in compiled.manifest["functions"] for a, n, m in buckets for e in ("main", "energy"))
    mols = MoleculeSet.from_molecules([random_molecule(7, seed=2)])
    args, _ = compiled.inputs(mols, [0])
    assert [args[0].shape[0], args[3].shape[0], args[5].shape[0]] == buckets[0]
    assert compiled.function("main", args) == "main_b{}_{}_{}".format(*buckets[0])
    e_static, f_static = compiled.call(args)
    plain = [tvm.runtime.tensor(a) for a in call_arrays(mols, [0], compiled.species, compiled.cutoff)[0]]
    e_plain, f_plain = (x.numpy() for x in compiled.vm["main"](*plain))
    np.testing.assert_allclose(e_static[:1], e_plain[:1], rtol=1e-5, atol=1e-5)  # the molecule (padding joins the ghost)
    np.testing.assert_allclose(f_static[:7], f_plain[:7], rtol=1e-4, atol=1e-5)
    big = MoleculeSet.from_molecules([random_molecule(40, seed=3)])
    args, _ = compiled.inputs(big, [0])
    assert compiled.function("main", args) == "main" and compiled.run_batch(big, [0])[1].shape == (40, 3)

