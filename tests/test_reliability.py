"""Fault injection on the host side: careless or hostile inputs, outputs, artifacts and interrupts.
Every case ends in a correct result or one line `error: ...` with exit code 2, loses nothing the user
had, and leaves no half-written file. (Hostile clients against the board firmware: test_board_faults.py.)
The cases and their outcomes are listed in reports/reliability.md."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qso3_tvm.cli import app
from qso3_tvm.compiler.compile import compile_model
from qso3_tvm.errors import QSO3Error
from qso3_tvm.files import atomic_path, atomic_write, umask_mode
from qso3_tvm.graph.convention import MANIFEST, manifest_checksum, read_manifest
from qso3_tvm.graph.molecules import MoleculeSet, random_molecule
from qso3_tvm.nn.checkpoint import load_model, load_payload, save_model
from qso3_tvm.nn.metrics import predict
from qso3_tvm.nn.testing import save_tiny_model, tiny_model
from qso3_tvm.runtime.compiled import CompiledModel
from qso3_tvm.runtime.remote import board_info, connect, safe_label

runner = CliRunner()


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def assert_one_line_error(code, output, *words):
    assert code == 2, output
    lines = [line for line in output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("rel") / "tiny.pt")


@pytest.fixture(scope="module")
def artifact(tiny):
    out = tiny.parent / "art"
    compile_model(str(tiny), "x86-64", out, specialize=[], log=lambda *_: None)
    return out


def artifact_copy(artifact, tmp_path, edit=None, reseal=True):
    """A copy of the artifact, its manifest edited by `edit(manifest)` (and resealed, as a forger would)."""
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    if edit:
        m = json.loads((dst / MANIFEST).read_text())
        edit(m)
        if reseal:
            m["manifest_sha256"] = manifest_checksum(m)
        (dst / MANIFEST).write_text(json.dumps(m))
    return dst


# ---------------------------------------------------------------- outputs: nothing of the user's is lost
def test_compile_refuses_a_folder_it_did_not_write(tiny, tmp_path, monkeypatch):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    code, out = cli("compile", tiny, "--target", "x86-64", "-o", keep)
    assert_one_line_error(code, out, "not empty")
    assert (keep / "notes.txt").read_text() == "precious"
    monkeypatch.chdir(keep)  # `-o .` in a folder with files
    code, out = cli("compile", tiny, "--target", "x86-64", "-o", ".")
    assert_one_line_error(code, out, "not empty")
    assert (keep / "notes.txt").read_text() == "precious"


def test_compile_refuses_an_artifact_folder_holding_other_files(artifact, tiny, tmp_path):
    """compile replaces an artifact folder as a whole: other files there (notes, runs, the very checkpoint being
    compiled) make it refuse, before anything is built."""
    dst = artifact_copy(artifact, tmp_path)
    shutil.copy(tiny, dst / "my.pt")
    (dst / "runs").mkdir()
    (dst / "runs" / "log.csv").write_text("x")
    before = sorted(p.name for p in dst.iterdir())
    code, out = cli("compile", dst / "my.pt", "--target", "x86-64", "-o", dst)
    assert_one_line_error(code, out, "other files", "my.pt", "runs")
    assert sorted(p.name for p in dst.iterdir()) == before and (dst / "runs" / "log.csv").read_text() == "x"


def test_compile_replaces_an_earlier_artifact_only_when_done(artifact, tiny, tmp_path):
    dst = artifact_copy(artifact, tmp_path)
    before = (dst / "model.so").read_bytes()
    info = compile_model(str(tiny), "x86-64", dst, specialize=[], log=lambda *_: None)
    assert info["library_sha256"] and read_manifest(dst)["created"] >= read_manifest(artifact)["created"]
    assert (dst / "model.so").read_bytes()[:4] == before[:4]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    assert dst.stat().st_mode & 0o777 == umask_mode(folder=True)  # not mkdtemp's 0700


def test_atomic_path_unique_temp_and_nothing_left_after_failure(tmp_path):
    target = tmp_path / "out.json"
    with atomic_path(target) as a, atomic_path(target) as b:
        assert a != b  # two writers never share a temp file
        a.write_text("1"), b.write_text("2")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() in ("1", "2") and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_written_files_follow_the_umask(tmp_path):
    """Atomic writes go through mkstemp (mode 0600): the finished file gets the mode open() would give."""
    import os

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", "{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write(tmp_path / "b.json", "{}")
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_md_refuses_foreign_folder(artifact, ethanol_test, tmp_path):
    (tmp_path / "thesis.tex").write_text("x")
    code, out = cli("md", artifact, "--data", ethanol_test, "-o", tmp_path, "--steps", "2")
    assert_one_line_error(code, out, "did not write")
    assert (tmp_path / "thesis.tex").read_text() == "x"


def test_md_keeps_finished_steps_when_the_backend_dies(tmp_path):
    from ase import Atoms

    from qso3_tvm.apps import md as qmd
    from qso3_tvm.nn.eager import EagerModel
    from qso3_tvm.runtime.calculator import QSO3Calculator

    model = EagerModel(save_tiny_model(tmp_path / "m.pt"))
    calls = {"n": 0}

    def dying(numbers, positions):
        calls["n"] += 1
        if calls["n"] > 6:
            raise RuntimeError("RPC session lost: board went away")
        return model.energy_forces(numbers, positions)

    z, pos = random_molecule(5, seed=1, min_dist=1.1)
    calc = QSO3Calculator(dying, model.species, "fake-board")
    with pytest.raises(QSO3Error, match="backend failed"):
        qmd.run_md(Atoms(numbers=z, positions=pos), calc, qmd.MDConfig(steps=20), tmp_path / "md", log=lambda *_: None)
    summary = json.loads((tmp_path / "md" / "summary.json").read_text())
    rows = (tmp_path / "md" / "log.csv").read_text().splitlines()
    assert 0 < summary["steps_done"] < 20 and "backend failed" in summary["aborted"] and not summary["stable"]
    assert len(rows) - 1 == summary["steps_done"] + 1 and (tmp_path / "md" / "traj.extxyz").is_file()


# ---------------------------------------------------------------- artifacts: nothing loads unverified
def test_tampered_truncated_or_swapped_library_is_refused(artifact, tmp_path):
    dst = artifact_copy(artifact, tmp_path)
    lib = dst / "model.so"
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])  # truncated: would SIGBUS on load
    with pytest.raises(QSO3Error, match="sha256 differs"):
        CompiledModel(dst)
    shutil.copy(artifact / "model.so", lib)
    with open(lib, "r+b") as fh:  # one byte flipped in the code
        fh.seek(4096)
        b = fh.read(1)
        fh.seek(4096)
        fh.write(bytes([b[0] ^ 0xFF]))
    code, out = cli("evaluate", dst, "--data", "ethanol")
    assert_one_line_error(code, out, "sha256 differs")


@pytest.mark.parametrize("name", ["../model.so", "/tmp/evil.so", "", "sub/model.so"])
def test_library_outside_the_artifact_folder_is_refused(artifact, tmp_path, name):
    dst = artifact_copy(artifact, tmp_path, edit=lambda m: m.update(library=name))
    with pytest.raises(QSO3Error, match="plain file name|missing or not a regular"):
        CompiledModel(dst)


def test_edited_or_incomplete_manifest_is_refused(artifact, tmp_path):
    dst = artifact_copy(artifact, tmp_path, edit=lambda m: m["model"].update(cutoff=9.0), reseal=False)
    with pytest.raises(QSO3Error, match="checksum mismatch"):
        CompiledModel(dst)
    shutil.rmtree(dst)
    dst = artifact_copy(artifact, tmp_path, edit=lambda m: m.pop("inputs"))
    with pytest.raises(QSO3Error, match=r"lacks or mistypes \['inputs'\]"):
        CompiledModel(dst)
    (dst / MANIFEST).write_text("{ not json")
    with pytest.raises(QSO3Error, match="corrupt manifest"):
        CompiledModel(dst)


def test_foreign_architecture_is_refused_with_the_reason(artifact, tmp_path):
    dst = artifact_copy(artifact, tmp_path, edit=lambda m: m["target"].update(arch="aarch64", name="arm64-cortex-a76"))
    code, out = cli("evaluate", dst, "--data", "ethanol")
    assert_one_line_error(code, out, "built for aarch64")
    shutil.rmtree(dst)
    dst = artifact_copy(artifact, tmp_path, edit=lambda m: m["target"].update(cpu_features=["no_such_feature"]))
    with pytest.raises(QSO3Error, match="needs CPU features"):
        CompiledModel(dst)


# ---------------------------------------------------------------- boards: host never trusts board strings
def test_board_label_is_sanitized():
    assert safe_label("../../etc/passwd") == "_.._etc_passwd"
    assert safe_label("pi5'\"; rm -rf /") == "pi5____rm_-rf__"
    assert safe_label("..") == "board" and safe_label(None) == "board" and len(safe_label("x" * 500)) == 64

    class Session:
        def get_function(self, name):
            return lambda: json.dumps({"label": "../evil\"label", "machine": "aarch64", "features": []})

    assert board_info(Session())["label"] == "_evil_label"


def test_rpc_session_has_no_client_side_time_limit(monkeypatch):
    import tvm.rpc

    seen = {}
    monkeypatch.setattr(tvm.rpc, "connect", lambda host, port, key="", session_timeout=0: seen.update(
        key=key, session_timeout=session_timeout) or "session")
    assert connect(rpc="127.0.0.1:1") == "session"
    assert seen == {"key": "qso3", "session_timeout": 0}


@pytest.mark.parametrize("args,words", [
    (["profile", "ART", "--rpc", "127.0.0.1:99999"], "port 1..65535"),
    (["profile", "ART", "--rpc", "127.0.0.1:9090", "--number", "0"], "--repeat and --number must be >= 1"),
    (["board", "native", "--port", "99999"], "--port must be 1..65535"),
])
def test_board_options_out_of_range(artifact, args, words):
    code, out = cli(*[artifact if a == "ART" else a for a in args])
    assert_one_line_error(code, out, words)


# ---------------------------------------------------------------- inputs: one line, exit 2, same answer everywhere
def write_npz(path, **overrides):
    z = np.array([6, 1, 1, 8])
    data = {"nuclear_charges": z, "coords": np.random.default_rng(0).normal(size=(2, 4, 3)) * 1.5,
            "energies": np.zeros(2), "forces": np.zeros((2, 4, 3))}
    data.update(overrides)
    np.savez(path, **data)
    return path


@pytest.mark.parametrize("case,words", [
    ("truncated", "not a readable .npz"),
    ("strings", "must be integers"),
    ("empty", "atomic numbers"),
    ("fractional", "atomic numbers"),
    ("no_frames", "no frames"),
    ("extxyz", "not a readable extxyz"),
])
def test_malformed_data_gives_one_line(tmp_path, case, words):
    if case == "truncated":
        good = write_npz(tmp_path / "good.npz").read_bytes()
        (path := tmp_path / "bad.npz").write_bytes(good[: len(good) // 2])
    elif case == "strings":
        path = write_npz(tmp_path / "bad.npz", nuclear_charges=np.array(["C", "H", "H", "O"]))
    elif case == "fractional":
        path = write_npz(tmp_path / "bad.npz", nuclear_charges=np.array([6.5, 1, 1, 8]))
    elif case == "empty":
        path = write_npz(tmp_path / "bad.npz", nuclear_charges=np.zeros(0, int), coords=np.zeros((2, 0, 3)),
                         forces=np.zeros((2, 0, 3)))
    elif case == "no_frames":
        path = write_npz(tmp_path / "bad.npz", coords=np.zeros((0, 4, 3)), energies=np.zeros(0), forces=np.zeros((0, 4, 3)))
    else:
        (path := tmp_path / "bad.extxyz").write_text("3\nProperties=species:S:1:pos:R:3\nC 0 0\n")
    code, out = cli("evaluate", "ethanol-fp32", "--data", path)
    assert_one_line_error(code, out, words)


def test_bad_checkpoints_give_one_line(tmp_path):
    model = tiny_model(torch.float32)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    save_model(tmp_path / "nan.pt", model)
    code, out = cli("evaluate", tmp_path / "nan.pt", "--data", "ethanol")
    assert_one_line_error(code, out, "non-finite")
    payload = load_payload(save_tiny_model(tmp_path / "ok.pt"))
    payload["config"]["channels"] = 32  # config no longer matches the weights
    torch.save(payload, tmp_path / "mismatch.pt")
    code, out = cli("evaluate", tmp_path / "mismatch.pt", "--data", "ethanol")
    assert_one_line_error(code, out, "do not match")
    payload["config"]["cutoff"] = -1.0
    torch.save(payload, tmp_path / "cutoff.pt")
    code, out = cli("evaluate", tmp_path / "cutoff.pt", "--data", "ethanol")
    assert_one_line_error(code, out, "cutoff")


def test_negative_cutoff_flag_is_refused(tmp_path, ethanol_train):
    code, out = cli("train", "--data", ethanol_train, "-o", tmp_path / "run", "--cutoff", "-1", "--epochs", "1")
    assert_one_line_error(code, out, "cutoff")
    assert not (tmp_path / "run").exists()


def test_empty_molecule_same_answer_from_checkpoint_and_artifact(artifact, tiny):
    """Direct API: energy 0 for a molecule without atoms from both backends (it was −616 eV compiled)."""
    z, pos = random_molecule(4, seed=2)
    mols = MoleculeSet.from_molecules([(z, pos), (np.zeros(0, np.int64), np.zeros((0, 3)))])
    e_eager, _ = predict(load_model(tiny), mols)
    e_tvm, _ = CompiledModel(artifact).predict(mols)
    assert e_eager[1] == 0.0 and e_tvm[1] == 0.0
    assert e_tvm[0] == pytest.approx(e_eager[0], abs=1e-3)
    for backend in (tiny, artifact):  # through the CLI both refuse an empty frame the same way
        code, out = cli("md", backend, "--data", write_npz_empty_frame(artifact.parent), "-o", artifact.parent / "md_empty")
        assert_one_line_error(code, out, "has no atoms")


def write_npz_empty_frame(folder):
    import ase
    from ase.io import write

    path = folder / "empty.extxyz"
    write(path, [ase.Atoms()], format="extxyz")
    return path
