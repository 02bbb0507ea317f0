"""Quantizers: integer semantics, MDDQ direction/angle bounds, rotations, zero vectors, STE, staging."""

import math

import pytest
import torch
from e3nn import o3

from qso3_tvm.errors import QSO3Error
from qso3_tvm.graph.molecules import random_molecule
from qso3_tvm.nn.quant import (
    DIRECTION_LEVELS,
    LSQ,
    MDDQ,
    MDDQ_MAX_ANGLE_DEG,
    FixedGrid,
    QuantConfig,
    direction_codes,
    param_groups,
    quantize_model,
    quantizers,
    set_stage,
    weight_bytes,
    with_direction_bits,
)
from qso3_tvm.nn.testing import EQUIVARIANCE_TOL, equivariance_errors, model_energy_forces, tiny_model


def random_vectors(n=2000, f=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(n, 1, f, generator=g, dtype=dtype))  # magnitudes over decades
    return torch.randn(n, 3, f, generator=g, dtype=dtype) * scale


def calibrated_mddq(v, grid):
    q = MDDQ(v.shape[-1], grid=grid).to(v.dtype)
    q(v)  # calibrates the magnitude steps
    return q


def angle_deg(a, b):
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


def test_lsq_integer_semantics():
    q = LSQ(8, signed=True)
    x = torch.tensor([-1000.0, -1.2, -0.25, 0.24, 0.25, 0.75, 1000.0])
    q.calibrate(x)
    q.step.data.fill_(0.5)
    assert q.codes(x).tolist() == [-127, -2, 0, 0, 1, 2, 127]  # floor(x/s + 0.5), clamped to ±127
    assert torch.equal(q(x), q.codes(x) * 0.5)
    u = LSQ(8, signed=False)
    u.calibrate(x.abs()), u.step.data.fill_(1.0)
    assert u.codes(torch.tensor([-3.0, 254.6, 300.0])).tolist() == [0, 255, 255]
    w4 = LSQ(4, signed=True)
    assert (w4.qmin, w4.qmax) == (-7, 7)


@pytest.mark.parametrize("grid", ["sphere", "cube"])
def test_direction_codes_are_int8_and_unit_after_renormalization(grid):
    v = random_vectors()
    u = v / v.norm(dim=1, keepdim=True)
    d = direction_codes(u, grid)
    assert torch.equal(d, d.round()) and d.abs().max() <= DIRECTION_LEVELS
    q = calibrated_mddq(v, grid)
    out, r_q = q(v), q.magnitude(v.norm(dim=1))
    nonzero = r_q > 0
    assert nonzero.float().mean() > 0.9
    # renormalized: the output's length is exactly the quantized magnitude
    assert torch.allclose(out.norm(dim=1)[nonzero] / r_q[nonzero], torch.ones((), dtype=v.dtype), atol=1e-12)


@pytest.mark.parametrize("grid", ["sphere", "cube"])
def test_mddq_angle_within_derived_bound(grid):
    v = random_vectors(seed=1)
    qv = calibrated_mddq(v, grid)(v)
    kept = qv.norm(dim=1) > 0  # magnitudes rounded to 0 have no direction
    assert kept.float().mean() > 0.9
    worst = angle_deg(v, qv)[kept].max().item()
    assert worst <= MDDQ_MAX_ANGLE_DEG[grid] + 1e-9
    assert worst > 0.5 * MDDQ_MAX_ANGLE_DEG[grid]  # the bound is tight, the test can fail
    assert MDDQ_MAX_ANGLE_DEG["sphere"] == pytest.approx(math.degrees(math.asin(math.sqrt(3) / 254)))


def test_direction_bits_refine_the_angle_and_convert_a_model():
    """16-bit direction codes: angle error within the int8 bound × 127/32767; with_direction_bits converts a trained
    model's MDDQ directions and attention q̂, k̂ without retraining; bad bit counts or models are refused."""
    v = random_vectors(seed=1)
    q8 = calibrated_mddq(v, "cube")
    q16 = MDDQ(v.shape[-1], grid="cube", direction_bits=16).to(v.dtype)
    q16.magnitude = q8.magnitude  # same magnitude codes: only the direction grid differs
    kept = q8(v).norm(dim=1) > 0
    worst8, worst16 = (angle_deg(v, q(v))[kept].max().item() for q in (q8, q16))
    assert worst16 <= MDDQ_MAX_ANGLE_DEG["cube"] * 127 / 32767 + 1e-9 and worst8 > 100 * worst16
    model = quantize_model(tiny_model(torch.float64, seed=4), QuantConfig())
    wide = with_direction_bits(model, 16)
    assert wide.quant_cfg.direction_bits == 16 and wide.quant_cfg.precision() == "w8a8-mddq-dir16"
    grids = lambda m: [x.levels for x in m.modules() if isinstance(x, (MDDQ, FixedGrid))]  # noqa: E731
    assert model.quant_cfg.direction_bits == 8 and set(grids(model)) == {127} and len(grids(model)) == 3 * 2
    assert set(grids(wide)) == {32767} and QuantConfig(direction_bits=16).precision() == "w8a8-mddq-dir16"
    assert QuantConfig(vector="naive", direction_bits=16).precision() == "w8a8-naive-dir16"  # the attention's grid
    fresh = quantize_model(tiny_model(torch.float64, seed=4), QuantConfig(direction_bits=16))
    assert set(grids(fresh)) == {32767}
    with pytest.raises(QSO3Error, match="direction_bits 17"):
        with_direction_bits(model, 17)
    with pytest.raises(QSO3Error, match="MDDQ"):
        with_direction_bits(tiny_model(torch.float64, seed=4), 16)


@pytest.mark.parametrize("grid", ["sphere", "cube"])
def test_mddq_of_rotated_input_within_bound(grid):
    v = random_vectors(seed=2)
    q = calibrated_mddq(v, grid)
    rot = o3.rand_matrix(dtype=torch.float64)
    a = q(torch.einsum("ij,njf->nif", rot, v))  # Q(R v)
    b = torch.einsum("ij,njf->nif", rot, q(v))  # R Q(v)
    kept = (a.norm(dim=1) > 0) & (b.norm(dim=1) > 0)
    assert angle_deg(a, b)[kept].max() <= 2 * MDDQ_MAX_ANGLE_DEG[grid] + 1e-9
    ratio = a.norm(dim=1)[kept] / b.norm(dim=1)[kept]  # magnitude codes agree except at rounding ties
    assert ((ratio - 1).abs() < 1e-9).float().mean() > 0.999


def test_naive_quantization_breaks_the_bound():
    """The baseline the method is compared with really is worse for small vectors."""
    from qso3_tvm.nn.quant import NaiveVector

    v = random_vectors(seed=3)
    q = NaiveVector()
    q(v)
    assert angle_deg(v, q(v)).nan_to_num(180.0).max() > 10 * MDDQ_MAX_ANGLE_DEG["sphere"]


def test_zero_vectors_and_finite_ste_gradients():
    v = random_vectors(n=50, seed=4)
    v[:10] = 0.0
    v[10:20] = 1e-9
    v.requires_grad_(True)
    q = calibrated_mddq(v.detach(), "cube")
    out = q(v)
    assert torch.isfinite(out).all() and torch.equal(out[:10], torch.zeros_like(out[:10]))
    out.pow(2).sum().backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(q.magnitude.step.grad).all()
    assert v.grad[:20].abs().max() < 1.0  # no blow-up at |v| -> 0


def test_fixed_grid_attention_codes():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0, 1.2])
    assert torch.equal(FixedGrid()(x) * 127, torch.tensor([-127.0, -63.0, 0.0, 38.0, 127.0, 127.0]))


def test_staged_schedule_switches_at_warmup():
    model = quantize_model(tiny_model(torch.float32), QuantConfig(warmup_epochs=3))
    cfg = model.quant_cfg
    branches = {b for _, _, b in quantizers(model)}
    assert branches == {"scalar", "vector"}
    for epoch, vectors_on in [(0, False), (2, False), (3, True), (10, True)]:
        set_stage(model, epoch, cfg)
        for name, q, branch in quantizers(model):
            assert q.enabled == (branch == "scalar" or vectors_on), (epoch, name)
    unstaged = QuantConfig(staged=False)
    set_stage(model, 0, unstaged)
    assert all(q.enabled for _, q, _ in quantizers(model))


def test_branch_param_groups_cover_all_parameters():
    cfg = QuantConfig(lr_scalar=1e-3, lr_vector=1e-4, lr_steps_factor=0.1, silu_offset=True)
    model = quantize_model(tiny_model(torch.float32), cfg)
    groups = param_groups(model, model.quant_cfg)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    layer = model.layers[0]
    assert lr[id(layer.q.weight)] == 1e-3 and lr[id(layer.vec_uv.weight)] == 1e-4
    assert lr[id(layer.q.w_quant.step)] == pytest.approx(1e-4) and lr[id(layer.filter[2].act.offset)] == pytest.approx(1e-4)
    assert lr[id(layer.hooks.vector.magnitude.step)] == pytest.approx(1e-5) and lr[id(layer.vec_uv.w_quant.step)] == pytest.approx(1e-5)
    single = param_groups(model, QuantConfig(branch_separate=False, lr_scalar=1e-3, lr_steps_factor=0.01))
    assert sorted(g["lr"] for g in single) == pytest.approx([1e-5, 1e-3])


def test_weight_bytes_int8_and_int4():
    fp32 = tiny_model(torch.float32)
    b32 = weight_bytes(fp32)
    assert b32 == 4 * sum(p.numel() for p in fp32.parameters())
    b8 = weight_bytes(quantize_model(fp32, QuantConfig()))
    b4 = weight_bytes(quantize_model(fp32, QuantConfig(w_bits=4)))
    assert b4 < b8 < 0.6 * b32


def _quantized(vector, seed=0):
    model = quantize_model(tiny_model(torch.float64, seed=seed), QuantConfig(vector=vector))
    z, pos = random_molecule(10, seed=7)
    model_energy_forces(model, z, pos)  # calibrate all quantizers
    return model, z, pos


def test_int8_equivariance_rows():
    model, z, pos = _quantized("none")
    e_err, f_err = equivariance_errors(model, z, pos)
    assert max(e_err, f_err) <= EQUIVARIANCE_TOL["int8-scalar-only"]
    model, z, pos = _quantized("mddq")
    e_mddq, f_mddq = equivariance_errors(model, z, pos)
    assert f_mddq <= EQUIVARIANCE_TOL["int8-mddq"] and f_mddq > EQUIVARIANCE_TOL["float64"]
    model, z, pos = _quantized("naive")
    _, f_naive = equivariance_errors(model, z, pos)
    assert f_naive > f_mddq


def test_cli_quantize_and_evaluate(tmp_path, ethanol_train, ethanol_test):
    import json

    from typer.testing import CliRunner

    from qso3_tvm.cli import app
    from qso3_tvm.nn.checkpoint import load_model, save_model

    fp32 = tiny_model(torch.float32, energy_shift=[-13.6, -1030.0, -1480.0, -2040.0, -2700.0])
    save_model(tmp_path / "fp32.pt", fp32)
    runner = CliRunner()
    r = runner.invoke(app, ["quantize", str(tmp_path / "fp32.pt"), "--data", str(ethanol_train), "-o",
                            str(tmp_path / "q"), "--epochs", "2", "--warmup-epochs", "1", "--n-train", "16",
                            "--n-val", "8", "--distill-weight", "0.5"])
    assert r.exit_code == 0, r.output
    q = load_model(tmp_path / "q" / "best.pt")
    assert q.quant_cfg == QuantConfig(warmup_epochs=1)
    assert all(bool(m.initialized) for _, m, _ in quantizers(q) if isinstance(m, LSQ))
    from qso3_tvm.nn.checkpoint import load_payload
    assert load_payload(tmp_path / "q" / "best.pt")["meta"]["epoch"] == 2  # not a warm-up epoch (vectors in float)
    r = runner.invoke(app, ["evaluate", str(tmp_path / "q" / "best.pt"), "--data", str(ethanol_test),
                            "--lee-frames", "2", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["precision"] == "w8a8-mddq" and result["lee_mev_per_a"] > 0
    r = runner.invoke(app, ["quantize", str(tmp_path / "q" / "best.pt"), "-o", str(tmp_path / "qq")])
    assert r.exit_code == 2 and "already quantized" in r.stderr


def test_distillation_loss_is_zero_on_the_teacher_and_sees_energy_offsets(tmp_path, ethanol_train):
    import copy

    from qso3_tvm.errors import QSO3Error
    from qso3_tvm.graph.datasets import load_dataset
    from qso3_tvm.nn.checkpoint import save_model
    from qso3_tvm.nn.model import energies_and_forces
    from qso3_tvm.nn.train import TrainConfig, Trainer

    teacher = tiny_model(torch.float32, energy_shift=[-13.6, -1030.0, -1480.0, -2040.0, -2700.0])
    save_model(tmp_path / "t.pt", teacher)
    cfg = TrainConfig(data=str(ethanol_train), out=str(tmp_path / "o"), n_train=16, n_val=8,
                      teacher=str(tmp_path / "t.pt"), distill_weight=1.0)
    student = copy.deepcopy(teacher)
    trainer = Trainer(cfg, student, load_dataset(str(ethanol_train), "train"))
    batch = trainer._batch(trainer.train_idx[:4])
    assert float(trainer.distill_loss(student, batch, *energies_and_forces(student, batch)).detach()) < 1e-10
    student.cfg.energy_shift = [-13.6 + 0.01] + teacher.cfg.energy_shift[1:]  # +10 meV per H atom
    loss = float(trainer.distill_loss(student, batch, *energies_and_forces(student, batch)).detach())
    from qso3_tvm.nn.model import segment_sum

    is_h = (batch.species == 0).double()  # species index 0: H
    per_molecule = 0.01 * segment_sum(is_h, batch.mol, batch.n_mol) / batch.n_atoms  # eV per atom
    expected = float((per_molecule ** 2).mean() + 1e-4 * is_h.mean())  # molecule energies + per-atom energies
    assert abs(loss - expected) < 1e-4 * expected
    with pytest.raises(QSO3Error, match="distill_weight"):
        TrainConfig(distill_weight=0.5)



def test_mse_calibration_beats_lsq_heuristic_and_offsets_start_off_the_edge():
    from qso3_tvm.errors import QSO3Error

    x = torch.nn.functional.silu(torch.randn(4096, dtype=torch.float64) * 2)
    errors = {}
    for init in ("lsq", "mse"):
        q = LSQ(8, signed=False, offset=True, init=init).double()
        q.calibrate(x)
        q.requires_grad_(False)
        assert float(q.offset) < float(x.min()) < float(q.offset) + float(q.scale())  # inside code 0, not on its edge
        errors[init] = float(((q.codes(x) * q.scale() + q.offset - x) ** 2).mean())
    assert errors["mse"] < errors["lsq"]
    with pytest.raises(QSO3Error, match="calibration"):
        QuantConfig(calibration="max")
