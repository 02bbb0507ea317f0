"""Tuning databases: MetaSchedule's own JSON layout (database_workload.json, database_tuning_record.json,
logs/) plus our tasks.json (buckets, target, per-task table), and applying one at compile time.

JSONDatabase appends each measured record as it comes, so an interrupted run keeps its records and a
re-run tunes only what is left of each task's budget.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...errors import QSO3Error
from ...graph.convention import Bucket, static_inputs
from ...resources import data_root, schedules_dir
from ..kernels.pipeline import fused

WORKLOAD_FILE, RECORD_FILE, TASKS_FILE = "database_workload.json", "database_tuning_record.json", "tasks.json"


def _database_name(model_spec: str, target: str) -> Path:
    return Path(Path(str(model_spec)).stem.replace("_", "-")) / target.replace("/", "_")


def default_work_dir(model_spec: str, target: str) -> Path:
    return schedules_dir() / _database_name(model_spec, target)


def committed_database(model_spec: str, target: str) -> Path | None:
    """The database shipped for a model and target (schedules/<model>/<target>, a checkout's or the
    installed package's), if there is one."""
    folder = data_root() / "schedules" / _database_name(model_spec, target)
    return folder if (folder / RECORD_FILE).is_file() else None


def open_database(db_dir: str | Path, must_exist: bool = False):
    """MetaSchedule's JSONDatabase in db_dir; a corrupt or unreadable file is a QSO3Error."""
    from tvm.s_tir import meta_schedule as ms

    db_dir = Path(db_dir)
    wl, rec = db_dir / WORKLOAD_FILE, db_dir / RECORD_FILE
    if must_exist and not (wl.is_file() and rec.is_file()):
        raise QSO3Error(f"{db_dir}: no tuning database ({WORKLOAD_FILE}, {RECORD_FILE}); run `qso3-tvm tune` first")
    for path in (wl, rec):  # JSONDatabase aborts on a bad line with a C++ error: check lines first
        if path.is_file():
            for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise QSO3Error(f"{path}: corrupt tuning database at line {lineno} ({e.msg}); "
                                    "delete the file or the line (an interrupted write leaves a partial last line)") from None
    db_dir.mkdir(parents=True, exist_ok=True)
    try:
        return ms.database.JSONDatabase(path_workload=str(wl), path_tuning_record=str(rec), allow_missing=True)
    except Exception as e:  # schema errors inside valid JSON
        raise QSO3Error(f"{db_dir}: corrupt tuning database ({str(e).strip().splitlines()[-1][:200]})") from None


def database_sha256(db_dir: str | Path) -> str:
    """sha256 over the workload and record files (what the build applies)."""
    h = hashlib.sha256()
    for name in (WORKLOAD_FILE, RECORD_FILE):
        path = Path(db_dir) / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    return h.hexdigest()


def read_tasks_file(db_dir: str | Path) -> dict:
    path = Path(db_dir) / TASKS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QSO3Error(f"{path}: corrupt ({e.msg})") from None


def database_buckets(db_dir: str | Path) -> list[Bucket]:
    return [Bucket.parse(b) for b in read_tasks_file(db_dir).get("buckets", [])]


def tuning_info(tuning_records) -> dict:
    """The manifest's "tuning" entry of a database (checked readable first: a clear error before a long export)."""
    open_database(tuning_records, must_exist=True)
    tasks = read_tasks_file(tuning_records)
    return {"database": str(tuning_records), "database_sha256": database_sha256(tuning_records),
            "buckets": tasks.get("buckets"), "target": tasks.get("target"),
            "tuned_tasks": len(tasks.get("tasks", [])), "trials": tasks.get("trials")}


def static_build_info(bucket, tuning_records, log=print) -> tuple[Bucket, dict]:
    """The bucket a static build uses (given, else the database's first) and its manifest entries."""
    info = {"tuning": tuning_info(tuning_records)} if tuning_records else {}
    if bucket is None:
        known = database_buckets(tuning_records) if tuning_records else []
        if not known:
            raise QSO3Error(f"{tuning_records}: no bucket recorded ({TASKS_FILE}); give --bucket ATOMS,EDGES,MOLECULES")
        bucket = known[0]
    bucket = Bucket.parse(bucket)
    info["inputs"] = static_inputs(bucket)
    tuned = info.get("tuning", {}).get("buckets")
    if tuned and bucket.as_list() not in tuned:
        log(f"warning: bucket {bucket.text} was not tuned (database buckets {tuned}): "
            "kernels of other sizes do not match, the build stays mostly unscheduled")
    log(f"static build at bucket {bucket.text} (atoms, edges, molecules)"
        + (f", tuning records {tuning_records}" if tuning_records else ""))
    return bucket, info


def apply_tuning_records(mod, target, db_dir: str | Path):
    """The Relax module with the database's schedules applied to the kernels it has records for
    (MetaScheduleApplyDatabase under the target; static kernels only: records are per size), and how many
    kernels got one; kernels without records stay as they are."""
    import tvm
    from tvm import relax

    db = open_database(db_dir, must_exist=True)
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    mod = fused(mod, target)
    before = scheduled_kernels(mod)
    with target, db:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    return mod, scheduled_kernels(mod) - before


def is_scheduled(func) -> bool:
    """A kernel marked as scheduled: ours (compiler.kernels), or given a schedule from a database."""
    import tvm

    return isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def scheduled_kernels(mod) -> int:
    return sum(map(is_scheduled, mod.functions.values()))
