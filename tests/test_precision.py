"""Deployment precisions: w8 (int8 weights, float activations: smooth energy, exact-gradient forces),
w8a8 with a float energy head, int8 weight storage in checkpoints, and both through quantize, compile
and the calculator."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qso3_tvm.cli import app
from qso3_tvm.compiler.compile import compile_model
from qso3_tvm.errors import QSO3Error
from qso3_tvm.graph.molecules import MoleculeSet, random_molecule
from qso3_tvm.nn.checkpoint import load_model, precision, save_model
from qso3_tvm.nn.int8 import Int8Linear, Int8WeightLinear, to_int8
from qso3_tvm.nn.metrics import predict
from qso3_tvm.nn.quant import (
    LSQ,
    MDDQ,
    FixedGrid,
    QuantConfig,
    parse_precision,
    quantize_model,
    quantizers,
    with_direction_bits,
    with_float_head,
)
from qso3_tvm.nn.testing import ENERGY_SHIFT_EV, EQUIVARIANCE_TOL, equivariance_errors, model_energy_forces, tiny_model
from qso3_tvm.runtime.calculator import QSO3Calculator

runner = CliRunner()


def calibrated(cfg: QuantConfig, dtype=torch.float64, **overrides):
    model = quantize_model(tiny_model(dtype, seed=4, energy_shift=ENERGY_SHIFT_EV, **overrides), cfg)
    model_energy_forces(model, *random_molecule(12, seed=1))  # calibrates every quantizer
    return model


def fd_error(model, z, pos, h=1e-5) -> float:
    """max |F + dE/dx| (central differences) relative to max |F|."""
    _, f = model_energy_forces(model, z, pos)
    fd = np.zeros_like(pos)
    for i in range(len(z)):
        for k in range(3):
            e = []
            for s in (h, -h):
                p = pos.copy()
                p[i, k] += s
                e.append(model_energy_forces(model, z, p)[0])
            fd[i, k] = -(e[0] - e[1]) / (2 * h)
    return float(np.abs(fd - f).max() / np.abs(f).max())


def test_w8_quantizes_weights_only():
    model = calibrated(QuantConfig(weight_only=True))
    assert precision(model) == "w8" and model.quant_cfg.vector == "none" and not model.quant_cfg.attention
    kinds = {type(m) for _, m, _ in quantizers(model)}
    assert kinds == {LSQ} and all(name.endswith("w_quant") for name, _, _ in quantizers(model))
    assert not any(isinstance(m, (MDDQ, FixedGrid)) for m in model.modules())
    deployed = to_int8(model)
    assert not any(isinstance(m, Int8Linear) for m in deployed.modules())
    assert deployed.layers[0].q.w_codes.dtype == torch.int8


def test_w8_forces_are_the_energy_gradient_and_equivariant():
    """w8: smooth energy (forces = -dE/dx to float64 round-off) and exact equivariance; w8a8 is neither."""
    z, pos = random_molecule(7, seed=3)
    w8, w8a8 = calibrated(QuantConfig(weight_only=True)), calibrated(QuantConfig())
    assert fd_error(w8, z, pos) < 1e-7
    assert fd_error(w8a8, z, pos) > 1e-3  # straight-through forces of a piecewise-constant energy
    assert max(equivariance_errors(w8, z, pos)) <= EQUIVARIANCE_TOL["float64"]


def test_float_head_keeps_head_activations_in_float():
    w8a8 = calibrated(QuantConfig())
    head = with_float_head(w8a8)
    assert precision(head) == "w8a8-mddq-float-head" and head.quant_cfg.float_head
    assert all(isinstance(head.head[i].act, torch.nn.Identity) for i in (0, 2))
    assert isinstance(head.layers[0].q.act, LSQ)  # the rest of the model is untouched
    deployed = to_int8(head)
    assert isinstance(deployed.head[0], Int8WeightLinear) and isinstance(deployed.layers[0].q, Int8Linear)
    fresh = quantize_model(tiny_model(torch.float64, seed=4), QuantConfig(float_head=True))
    assert set(fresh.state_dict()) == set(head.state_dict())  # a converted checkpoint loads into its config
    mols = MoleculeSet.from_molecules([random_molecule(9, seed=s) for s in range(4)])
    e_q, _ = predict(w8a8, mols)
    e_h, _ = predict(head, mols)
    assert np.abs(e_q - e_h).max() > 1e-4  # the head's activation codes did move the energy
    with pytest.raises(QSO3Error, match="quantized activations"):
        with_float_head(calibrated(QuantConfig(weight_only=True)))


@pytest.mark.parametrize("cfg", [QuantConfig(), QuantConfig(weight_only=True), QuantConfig(float_head=True)])
def test_checkpoint_stores_int8_weight_codes(cfg, tmp_path):
    model = calibrated(cfg, torch.float32)
    save_model(tmp_path / "q.pt", model)
    state = torch.load(tmp_path / "q.pt", weights_only=True)["state_dict"]
    assert state["layers.0.q.weight"].dtype == torch.int8 and state["head.2.weight"].dtype == torch.int8
    assert state["embed.weight"].dtype == torch.float32
    loaded = load_model(tmp_path / "q.pt")
    assert loaded.quant_cfg == model.quant_cfg
    mols = MoleculeSet.from_molecules([random_molecule(8, seed=s) for s in range(3)])
    (e0, f0), (e1, f1) = predict(model.eval(), mols), predict(loaded, mols)
    assert np.abs(e0 - e1).max() < 1e-5 and np.abs(f0 - f1).max() < 1e-5


def test_parse_precision():
    assert parse_precision(None, None) == (8, False) and parse_precision("w8", None) == (8, True)
    assert parse_precision(None, 4) == (4, False) and parse_precision("w4", 4) == (4, True)
    with pytest.raises(QSO3Error, match="--precision must be one of"):
        parse_precision("int8", None)
    with pytest.raises(QSO3Error, match="contradicts"):
        parse_precision("w8", 4)


def test_weight_only_precisions_get_the_fp32_parity_bound_on_compile_and_on_boards():
    from qso3_tvm.compiler.compile import DEFAULT_TOL_MEV, tolerances
    from qso3_tvm.graph.convention import float_activations

    assert [float_activations(p) for p in ("fp32", "w8", "w4", "w8a8-mddq", "w4a8-mddq")] == [True, True, True, False, False]
    assert tolerances("w8") == DEFAULT_TOL_MEV["fp32"] and tolerances("w8a8-mddq") == DEFAULT_TOL_MEV["quantized"]


def test_cli_quantize_w8_post_training_and_float_head(tmp_path, ethanol_train):
    save_model(tmp_path / "fp32.pt", tiny_model(torch.float32, energy_shift=ENERGY_SHIFT_EV))
    common = ["--data", str(ethanol_train), "--n-train", "16", "--n-val", "8", "--epochs", "0"]
    r = runner.invoke(app, ["quantize", str(tmp_path / "fp32.pt"), "-o", str(tmp_path / "w8"), "--precision", "w8", *common])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["epochs"] == 0
    w8 = load_model(tmp_path / "w8" / "best.pt")
    assert precision(w8) == "w8" and not (tmp_path / "w8" / "last.pt").exists()
    assert w8.cfg.energy_shift != ENERGY_SHIFT_EV  # refitted to the training frames
    r = runner.invoke(app, ["quantize", str(tmp_path / "fp32.pt"), "-o", str(tmp_path / "w8_kept"), "--precision", "w8",
                            "--no-refit-shifts", *common])
    assert r.exit_code == 0 and load_model(tmp_path / "w8_kept" / "best.pt").cfg.energy_shift == ENERGY_SHIFT_EV, r.output
    r = runner.invoke(app, ["quantize", str(tmp_path / "fp32.pt"), "-o", str(tmp_path / "q"), *common])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["float-head", str(tmp_path / "q" / "best.pt"), "-o", str(tmp_path / "fh.pt")])
    assert r.exit_code == 0 and "w8a8-mddq-float-head" in r.stdout, r.output
    assert load_model(tmp_path / "fh.pt").quant_cfg.float_head
    r = runner.invoke(app, ["direction-bits", str(tmp_path / "fh.pt"), "16", "-o", str(tmp_path / "d16.pt")])
    assert r.exit_code == 0 and "w8a8-mddq-dir16-float-head" in r.stdout, r.output
    r = runner.invoke(app, ["quantize", str(tmp_path / "fp32.pt"), "-o", str(tmp_path / "q16"), "--direction-bits", "12", *common])
    assert r.exit_code == 0 and precision(load_model(tmp_path / "q16" / "best.pt")) == "w8a8-mddq-dir12", r.output
    for args, message in ((["float-head", str(tmp_path / "fp32.pt"), "-o", str(tmp_path / "x.pt")], "quantized activations"),
                          (["direction-bits", str(tmp_path / "fh.pt"), "20", "-o", str(tmp_path / "x.pt")], "direction_bits 20"),
                          (["direction-bits", str(tmp_path / "fp32.pt"), "16", "-o", str(tmp_path / "x.pt")], "MDDQ vectors"),
                          (["quantize", str(tmp_path / "fp32.pt"), "-o", str(tmp_path / "x"), "--precision", "w16"],
                           "--precision must be one of"),
                          (["train", "--data", str(ethanol_train), "-o", str(tmp_path / "t"), "--epochs", "0"], "quantize only")):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    # outputs that are not what the command writes: refused, left as they were
    (tmp_path / "notes.txt").write_text("mine")
    for args, message in ((["float-head", str(tmp_path / "q" / "best.pt"), "-o", str(tmp_path / "notes.txt")], "not a qso3-tvm checkpoint"),
                          (["direction-bits", str(tmp_path / "fh.pt"), "16", "-o", str(tmp_path)], "is a folder"),
                          (["quantize", str(tmp_path / "fp32.pt"), "-o", str(tmp_path / "notes.txt"), *common], "not a folder"),
                          (["train", "--data", str(ethanol_train), "-o", str(tmp_path / "notes.txt"), "--epochs", "1"], "not a folder")):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def w8_artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("w8")
    save_model(tmp / "w8.pt", calibrated(QuantConfig(weight_only=True), torch.float32, layers=1))
    info = compile_model(str(tmp / "w8.pt"), "x86-64", tmp / "x86", specialize=[], log=lambda *_: None)
    return tmp / "x86", info


def test_w8_compiles_with_fp32_parity(w8_artifact):
    artifact, info = w8_artifact
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["model"]["precision"] == "w8" and manifest["quantization"]["weight_only"]
    assert info["parity"]["tolerance_mev"] == [0.1, 0.1]  # no activation codes: held to the fp32 bound
    assert info["parity"]["max_force_error_mev_per_a"] <= 0.1 and info["parity"]["max_energy_error_mev"] <= 0.1


def test_w8_calculator_forces_are_the_compiled_energy_gradient(w8_artifact):
    """Central differences of the compiled energy (float32) match the compiled forces."""
    from ase import Atoms

    artifact, _ = w8_artifact
    calc = QSO3Calculator.from_compiled(artifact, threads=1)
    assert calc.backend.endswith(":w8")
    z, pos = random_molecule(7, seed=3)
    atoms = Atoms(numbers=z, positions=pos)
    atoms.calc = calc
    forces, h = atoms.get_forces(), 5e-3
    fd = np.zeros_like(forces)
    for i in range(len(z)):
        for k in range(3):
            e = []
            for s in (h, -h):
                a = atoms.copy()
                a.positions[i, k] += s
                e.append(calc.get_potential_energy(a))
            fd[i, k] = -(e[0] - e[1]) / (2 * h)
    assert np.abs(fd - forces).max() <= 2e-3 * max(1.0, np.abs(forces).max())


def test_float_head_compiles_and_follows_float_head_semantics(tmp_path):
    """The compiled float-head model matches the eager float-head model far closer than the float head
    differs from the int8 head."""
    from qso3_tvm.runtime.compiled import CompiledModel

    w8a8 = calibrated(QuantConfig(), torch.float32, layers=1)
    head = with_float_head(w8a8)
    save_model(tmp_path / "fh.pt", head)
    info = compile_model(str(tmp_path / "fh.pt"), "x86-64", tmp_path / "art", specialize=[], log=lambda *_: None)
    assert info["model"]["precision"] == "w8a8-mddq-float-head"
    mols = MoleculeSet.from_molecules([random_molecule(9, seed=s) for s in range(4)])
    e_tvm, f_tvm = CompiledModel(tmp_path / "art").predict(mols)
    e_head, f_head = predict(load_model(tmp_path / "fh.pt"), mols)
    e_int8, _ = predict(w8a8.eval(), mols)
    gap = np.abs(e_head - e_int8).max()
    assert gap > 1e-4 and np.abs(e_tvm - e_head).max() < 0.1 * gap
    assert np.abs(f_tvm - f_head).max() < 1e-3 * max(1.0, np.abs(f_head).max())


def test_wide_direction_codes_compile_and_follow_their_semantics(tmp_path):
    """16-bit MDDQ directions (with_direction_bits) through compile: the manifest names them, the MDDQ kernels are
    built for their levels (their numerics: tests/test_kernels.py), the artifact matches the eager model, and the
    forces are closer to equivariant than with int8 codes."""
    from qso3_tvm.compiler.export import export_energy_forces
    from qso3_tvm.compiler.module import deployable
    from qso3_tvm.compiler.relax_import import import_to_relax
    from qso3_tvm.runtime.compiled import CompiledModel

    w8a8 = calibrated(QuantConfig(), torch.float32)  # two layers: the first one's MDDQ output feeds the second
    wide = with_direction_bits(w8a8, 16)
    save_model(tmp_path / "d16.pt", wide)
    info = compile_model(str(tmp_path / "d16.pt"), "x86-64", tmp_path / "art", specialize=[], log=lambda *_: None)
    assert info["model"]["precision"] == "w8a8-mddq-dir16"
    names = {gv.name_hint for gv in import_to_relax(export_energy_forces(deployable(wide))).functions}
    assert {"qso3_mddq_16_255_1_dir32767", "qso3_mddq_backward_16_255_1_dir32767", "qso3_l2_attention_2x8_dir32767",
            "qso3_l2_attention_backward_2x8_dir32767"} <= names
    mols = MoleculeSet.from_molecules([random_molecule(9, seed=s) for s in range(4)])
    e_tvm, f_tvm = CompiledModel(tmp_path / "art").predict(mols)
    e_wide, f_wide = predict(load_model(tmp_path / "d16.pt"), mols)
    assert np.abs(f_tvm - f_wide).max() < 1e-3 * max(1.0, np.abs(f_wide).max())
    assert np.abs(e_tvm - e_wide).max() < 1e-3
    z, pos = random_molecule(9, seed=2)  # and the point of wider codes: forces closer to equivariant
    assert 5 * equivariance_errors(wide, z, pos)[1] < equivariance_errors(w8a8, z, pos)[1]


def test_silu_folds_into_the_next_int8_linear():
    """to_int8 with custom operators folds each MLP's SiLU into the int8 Linear after it (one kernel); energies and
    forces equal those of the unfolded form (SiLU its own module) up to float rounding."""
    z, pos = random_molecule(9, seed=5)
    model = calibrated(QuantConfig(), dtype=torch.float32)
    folded = to_int8(model)
    for mlp in (folded.layers[0].filter, folded.layers[0].update):
        assert isinstance(mlp[1], torch.nn.Identity) and mlp[2].input_silu
    e_i, f_i = model_energy_forces(to_int8(model, custom_ops=False), z, pos)
    e_o, f_o = model_energy_forces(folded, z, pos)
    assert abs(e_o - e_i) < 1e-5 and np.abs(f_o - f_i).max() < 1e-4 * np.abs(f_i).max()


def test_int8_backward_products_stay_close_to_float():
    """to_int8's default backward (gradient rows as two int8 code vectors) against the float backward of
    the same int8 model; the custom-operator form gives the same numbers as the plain torch form."""
    z, pos = random_molecule(9, seed=5)
    model = calibrated(QuantConfig(), dtype=torch.float32)
    e_f, f_f = model_energy_forces(to_int8(model, backward="float"), z, pos)
    e_i, f_i = model_energy_forces(to_int8(model, custom_ops=False), z, pos)
    e_o, f_o = model_energy_forces(to_int8(model), z, pos)  # qso3::int8_grad_product (and the other custom ops)
    assert e_f == e_i and np.abs(f_i - f_f).max() < 1e-3 * np.abs(f_f).max()
    np.testing.assert_allclose(f_o, f_i, rtol=0, atol=1e-4 * np.abs(f_i).max())  # float summation order only
    with pytest.raises(ValueError, match="backward"):
        to_int8(model, backward="int4")
