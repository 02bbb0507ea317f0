"""qso3-tvm tune on a tiny model: static size buckets (padding, choice, refusal), a tiny MetaSchedule run
whose database compile applies (manifest, parity), resume after a re-run, corrupt databases."""

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qso3_tvm.cli import app
from qso3_tvm.compiler.compile import compile_model
from qso3_tvm.compiler.tuning.database import RECORD_FILE, WORKLOAD_FILE, database_sha256, open_database
from qso3_tvm.compiler.tuning.tune import tune
from qso3_tvm.errors import QSO3Error
from qso3_tvm.graph.convention import (
    Bucket,
    call_function,
    choose_bucket,
    merge_buckets,
    pad_arrays,
    pad_to_specialized,
    room_for,
)
from qso3_tvm.graph.molecules import MoleculeSet, random_molecule
from qso3_tvm.nn.testing import ENERGY_SHIFT_EV, model_energy_forces, save_tiny_model, tiny_model
from qso3_tvm.runtime.compiled import CompiledModel

BUCKET = "24,300,3"  # one ethanol (9 atoms, 72 edges) or paracetamol (20 atoms) per call, or two ethanols
quiet = lambda *_: None  # noqa: E731


def records(db):
    return [line for line in (db / RECORD_FILE).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    save_tiny_model(root / "tiny.pt")
    return root


@pytest.fixture(scope="module")
def tuned_db(tiny):
    db = tiny / "db"
    summary = tune(str(tiny / "tiny.pt"), "x86-64", trials=2, trials_per_task=2, work_dir=db, buckets=[BUCKET],
                   rank="flops", log=quiet)
    return db, summary


@pytest.fixture(scope="module")
def tuned_artifact(tiny, tuned_db):
    """The default tuned build: symbolic, plus a static copy at the database's bucket with its records."""
    db, _ = tuned_db
    info = compile_model(str(tiny / "tiny.pt"), "x86-64", tiny / "art", tuning_records=db, specialize=[], log=quiet)
    return tiny / "art", info


@pytest.fixture(scope="module")
def tuned_static(tiny, tuned_db):
    """A static build at the database's bucket (--bucket): nothing else fits it."""
    db, _ = tuned_db
    compile_model(str(tiny / "tiny.pt"), "x86-64", tiny / "static", tuning_records=db, bucket=BUCKET, log=quiet)
    return tiny / "static"


def test_bucket_parse_fit_and_choice():
    assert Bucket.parse("ethanol") == Bucket(12, 80, 2) and Bucket.parse(" 4,6,3") == Bucket(4, 6, 3)
    with pytest.raises(QSO3Error, match="ATOMS,EDGES,MOLECULES"):
        Bucket.parse("12,80")
    with pytest.raises(QSO3Error, match="ghost"):
        Bucket.parse("2,80,2")
    with pytest.raises(QSO3Error, match="≥ 4 edges"):
        Bucket.parse("4,2,3")
    with pytest.raises(QSO3Error, match="even"):
        Bucket.parse("12,81,2")
    assert Bucket(12, 80, 2).fits(9, 72, 1) and not Bucket(12, 80, 2).fits(11, 72, 1)
    assert not Bucket(12, 80, 2).fits(9, 79, 1) and not Bucket(12, 80, 2).fits(9, 72, 2)
    assert choose_bucket([[40, 400, 3], [12, 80, 2]], 9, 72, 1) == Bucket(12, 80, 2)
    assert choose_bucket([[40, 400, 3], [12, 80, 2]], 20, 72, 1) == Bucket(40, 400, 3)
    assert choose_bucket([[12, 80, 2]], 30, 72, 1) is None


def test_specialized_bucket_choice_and_merge():
    """Calls are padded to the smallest specialized bucket and run its copy; others stay as they are."""
    manifest = {"inputs": {"specialized": [[12, 80, 2], [24, 328, 2]]}}
    arrays = [np.zeros(11, np.int64), np.zeros((11, 3), np.float32), np.zeros(11, np.int64),
              np.zeros(74, np.int64), np.zeros(74, np.int64), np.zeros(2, np.float32)]
    padded = pad_to_specialized(arrays, manifest, 5.0)
    assert [len(padded[i]) for i in (0, 3, 5)] == [12, 80, 2]
    assert call_function(manifest, "energy", padded) == "energy_b12_80_2"
    assert call_function(manifest, "main", arrays) == "main"  # unpadded sizes: the symbolic function
    big = [np.zeros(30)] * 3 + [np.zeros(400)] * 2 + [np.zeros(2)]
    assert pad_to_specialized(big, manifest, 5.0) is big
    assert merge_buckets([[12, 80, 2], [24, 312, 2], [24, 328, 2], [12, 80, 2]]) == [Bucket(12, 80, 2), Bucket(24, 328, 2)]
    assert room_for(11, 74, 2) == Bucket(12, 80, 2)


def test_padding_ghosts_are_isolated_and_far():
    cutoff = 5.0
    pos = np.array([[0.0, 0, 0], [1.1, 0, 0], [0, 0, 0], [1, 0, 0]], np.float32)  # molecule + ghost pair
    args = (np.array([1, 0, 0, 0]), pos, np.array([0, 0, 1, 1]), np.array([1, 0, 3, 2]), np.array([0, 1, 2, 3]))
    sp, p, mol, src, dst, slots = pad_arrays(*args, 2, Bucket(10, 16, 4), cutoff, ghost=(2, 3))
    assert (len(sp), len(src), len(slots)) == (10, 16, 4)
    assert (mol[4:] == 1).all()  # padding atoms belong to the ghost molecule
    # padding edges repeat the ghost pair in both directions (every edge keeps a reverse: nn.ops.pairs) ...
    assert sorted(zip(src[2:], dst[2:])) == [(2, 3)] * 7 + [(3, 2)] * 7
    assert np.all(np.diff(dst) >= 0)  # ... inserted so that edges stay grouped by receiving atom
    far = p[4:]
    d = np.linalg.norm(far[:, None] - np.concatenate([p[:4], far])[None], axis=-1)
    d[np.arange(6), 4 + np.arange(6)] = np.inf
    assert d.min() >= 2 * cutoff


def test_tiny_tuning_round_trip(tuned_db, tuned_artifact, tiny):
    db, summary = tuned_db
    assert (db / WORKLOAD_FILE).is_file() and records(db) and (db / "logs").is_dir()
    assert summary["buckets"] == [[24, 300, 3]] and summary["tasks"][0]["trials"] >= 1
    assert summary["tasks"][0]["after_us"] > 0
    art, info = tuned_artifact
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["inputs"]["specialized"] == [[24, 300, 3]] and "buckets" not in manifest["inputs"]
    tuning = manifest["tuning"]
    assert tuning["database_sha256"] == database_sha256(db) and tuning["tuned_tasks"] >= 1
    assert tuning["tuned_kernels"] >= 1  # the records reached the static copy's kernels
    p = manifest["parity"]
    assert p["max_energy_error_mev"] < 0.1 and p["max_force_error_mev_per_a"] < 0.1
    # the tuned copy against PyTorch on a fresh molecule; three do not fit it and run the symbolic function
    model = CompiledModel(art)
    z, x = random_molecule(10, species=(1, 6, 8), seed=3)
    e, f = model.energy_forces(z, x)
    e_ref, f_ref = model_energy_forces(tiny_model(torch.float32, seed=2, energy_shift=ENERGY_SHIFT_EV).double(), z, x)
    e_ref += sum(ENERGY_SHIFT_EV[(1, 6, 7, 8, 9).index(int(zi))] for zi in z)  # the eager helper gives interaction energy
    assert abs(e - e_ref) < 1e-3 and np.abs(f - f_ref).max() < 1e-3
    mols = MoleculeSet.from_molecules([(z, x)] * 3)
    energies, forces = model.predict(mols)
    assert np.allclose(energies, e, atol=1e-5) and np.allclose(forces, np.tile(f, (3, 1)), atol=1e-5)


def test_static_build_splits_batches_and_refuses_molecules_beyond_its_bucket(tuned_static, tuned_db):
    model = CompiledModel(tuned_static)
    assert model.manifest["inputs"]["buckets"] == [[24, 300, 3]] and model.manifest["tuning"]["tuned_kernels"] >= 1
    z, x = random_molecule(10, species=(1, 6, 8), seed=3)
    e, f = model.energy_forces(z, x)
    energies, forces = model.predict(MoleculeSet.from_molecules([(z, x)] * 3))  # 3 never fit one call: split
    assert np.allclose(energies, e, atol=1e-6) and np.allclose(forces, np.tile(f, (3, 1)), atol=1e-6)
    z, x = random_molecule(30, species=(1, 6, 8), seed=1)
    with pytest.raises(QSO3Error, match="exceed every size bucket"):
        model.energy_forces(z, x)


def test_tasks_leave_our_scheduled_kernels_alone(tiny):
    """Our TIR kernels come scheduled (MetaSchedule fails on their tensorized or opaque loops): never tasks."""
    from qso3_tvm.compiler.targets import resolve_target, tuning_target
    from qso3_tvm.compiler.tuning.tune import rank_tasks
    from qso3_tvm.nn.checkpoint import load_model

    ranked = rank_tasks(load_model(tiny / "tiny.pt"), [Bucket.parse(BUCKET)], tuning_target(resolve_target("x86-64")),
                        use_profile=False, log=quiet)
    names = [r.task.task_name for r in ranked]
    assert names and not [n for n in names if n.startswith("qso3_")]
    assert abs(sum(r.score for r in ranked) - 1.0) < 1e-6  # shares of the bucket's FLOPs


def test_rerun_resumes_and_keeps_records(tuned_db, tiny):
    db, first = tuned_db
    again = tiny / "db_again"
    shutil.copytree(db, again)
    before = records(again)
    summary = tune(str(tiny / "tiny.pt"), "x86-64", trials=4, trials_per_task=4, work_dir=again, rank="flops", log=quiet)
    after = records(again)
    assert after[:len(before)] == before and len(after) > len(before)  # appended, nothing lost
    assert summary["buckets"] == first["buckets"]  # the database's bucket is reused
    assert summary["tasks"][0]["task"] == first["tasks"][0]["task"]  # the same task continues


def test_corrupt_database_is_a_clear_error(tuned_db, tiny):
    db, _ = tuned_db
    bad = tiny / "db_bad"
    shutil.copytree(db, bad)
    with open(bad / RECORD_FILE, "a") as fh:
        fh.write('[0, [[["b0", "tiling"')  # a write cut short
    with pytest.raises(QSO3Error, match="corrupt tuning database at line"):
        open_database(bad)
    with pytest.raises(QSO3Error, match="corrupt tuning database"):
        compile_model(str(tiny / "tiny.pt"), "x86-64", tiny / "never", tuning_records=bad, log=quiet)
    assert not (tiny / "never").exists()
    r = CliRunner().invoke(app, ["compile", str(tiny / "tiny.pt"), "--target", "x86-64", "-o", str(tiny / "never"),
                                 "--tuning-records", str(bad)])
    assert r.exit_code == 2 and "corrupt tuning database" in r.output
    r = CliRunner().invoke(app, ["compile", str(tiny / "tiny.pt"), "--target", "x86-64", "-o", str(tiny / "never"),
                                 "--tuning-records", str(tiny / "missing")])
    assert r.exit_code == 2 and "no tuning database" in r.output


def test_failed_tuning_leaves_no_empty_database(tiny, tuned_db, monkeypatch):
    """A bad bucket creates nothing; a run that fails before its first record removes the database it created,
    and never one that was there before."""
    import qso3_tvm.compiler.tuning.tune as tune_module

    r = CliRunner().invoke(app, ["tune", str(tiny / "tiny.pt"), "--target", "x86-64", "--bucket", "12,81,2",
                                 "--work-dir", str(tiny / "db_never")])
    assert r.exit_code == 2 and "must be even" in r.output and not (tiny / "db_never").exists()
    r = CliRunner().invoke(app, ["tune", str(tiny / "tiny.pt"), "--target", "x86-64", "--rpc-tracker", "127.0.0.1:1",
                                 "--rpc-key", "x", "--work-dir", str(tiny / "db_never")])
    assert r.exit_code == 2 and "tracker" in r.output and not (tiny / "db_never").exists(), r.output

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tune_module, "rank_tasks", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        tune(str(tiny / "tiny.pt"), "x86-64", trials=2, work_dir=tiny / "db_never", buckets=[BUCKET], log=quiet)
    assert not (tiny / "db_never").exists()
    def ctrl_c_swallowed(*args, **kwargs):  # what a Ctrl-C inside TVM's C++ amounts to: an error that gets caught
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except BaseException:
            pass
        return []

    monkeypatch.setattr(tune_module, "rank_tasks", ctrl_c_swallowed)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # remembered and raised at the next step, not tuned on
        tune(str(tiny / "tiny.pt"), "x86-64", trials=2, work_dir=tiny / "db_never", buckets=[BUCKET], log=quiet)
    assert not (tiny / "db_never").exists() and signal.getsignal(signal.SIGINT) is handler  # handlers restored
    monkeypatch.setattr(tune_module, "rank_tasks", broken)
    db, _ = tuned_db
    kept = records(db)
    with pytest.raises(RuntimeError, match="interrupted"):
        tune(str(tiny / "tiny.pt"), "x86-64", trials=2, work_dir=db, buckets=[BUCKET], log=quiet)
    assert records(db) == kept


def test_stock_meta_schedule_loggers_still_break_on_unnamed_handlers(tmp_path):
    """TVM bug (qso3_tvm.compiler.tvm_fixes, 3): an unnamed handler on MetaSchedule's logger breaks
    get_loggers_from_work_dir; meta_schedule_loggers works and leaves the handler in place."""
    import logging

    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir

    from qso3_tvm.compiler.tvm_fixes import META_SCHEDULE_LOGGER, meta_schedule_loggers

    logger = logging.getLogger(META_SCHEDULE_LOGGER)
    handler = logging.NullHandler()  # no name, as pytest's LogCaptureHandler
    logger.addHandler(handler)
    try:
        with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'format'"):
            get_loggers_from_work_dir(str(tmp_path / "stock"), ["task_a"])
        loggers = meta_schedule_loggers(str(tmp_path / "ours"), ["task_a"])
        assert len(loggers) == 1 and (tmp_path / "ours" / "logs").is_dir()
        assert handler in logger.handlers
    finally:
        logger.removeHandler(handler)
