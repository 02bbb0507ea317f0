"""Checkpoint round trip and the CLI on the fixture (train, evaluate, one-line errors)."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qso3_tvm.cli import app
from qso3_tvm.graph.molecules import random_molecule
from qso3_tvm.nn.checkpoint import load_model, save_model
from qso3_tvm.nn.testing import model_energy_forces, tiny_model

runner = CliRunner()


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(torch.float32, energy_shift=[0.1, -2.0, 0.0, 3.0, 0.5])
    save_model(tmp_path / "m.pt", model, note="x")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)  # plain tensors and dicts only
    assert payload["meta"] == {"note": "x"}
    loaded = load_model(tmp_path / "m.pt")
    z, pos = random_molecule(6, seed=0)
    e0, f0 = model_energy_forces(model, z, pos)
    e1, f1 = model_energy_forces(loaded, z, pos)
    assert e0 == e1 and np.array_equal(f0, f1) and loaded.cfg == model.cfg
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_train_resume_and_evaluate(tmp_path, ethanol_train, ethanol_test):
    args = ["train", "--data", str(ethanol_train), "-o", str(tmp_path / "run"), "--n-train", "16", "--n-val", "8",
            "--channels", "8", "--layers", "1", "--heads", "2", "--batch-size", "8"]
    r = runner.invoke(app, args + ["--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "best.pt").exists() and (tmp_path / "run" / "last.pt").exists()
    r = runner.invoke(app, args + ["--epochs", "2"])  # resumes at epoch 1
    assert r.exit_code == 0, r.output
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["1", "2"]
    r = runner.invoke(app, ["evaluate", str(tmp_path / "run" / "best.pt"), "--data", str(ethanol_test),
                            "--lee-frames", "2", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["n_frames"] == 8 and result["lee_frames"] == 2
    for key in ("energy_mae_mev", "force_mae_mev_per_a", "lee_mev_per_a"):
        assert np.isfinite(result[key])
    assert result["force_mae_mev_per_a"] > 0


def test_evaluate_bundled_model_text(ethanol_test):
    r = runner.invoke(app, ["evaluate", "ethanol-fp32", "--data", str(ethanol_test), "--lee-frames", "2"])
    assert r.exit_code == 0, r.output
    assert "force MAE" in r.stdout and "LEE" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["evaluate", "nope.pt", "--data", "ethanol"], "error: model not found: nope.pt"),
    (["evaluate", "ethanol-fp32", "--data", "missing.npz"], "error: dataset file not found: missing.npz"),
    (["train", "--data", "ethanol", "--attention", "cosine"], "error: --attention must be"),
    (["evaluate", "ethanol-fp32", "--data", "ethanol", "--lee-frames", "-3"], "error: --lee-frames must be >= 1"),
    (["evaluate", "ethanol-fp32", "--data", "ethanol", "--max-frames", "-1"], "error: --lee-frames must be >= 1 and --max-frames >= 0"),
])
def test_cli_errors_are_one_line(args, message):
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    assert r.stderr.strip().startswith(message) and len(r.stderr.strip().splitlines()) == 1
