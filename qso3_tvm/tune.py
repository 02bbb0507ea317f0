"""`qso3-tvm tune`: MetaSchedule auto-tuning of the compiled energy+forces module, static size buckets,
and applying a tuning database at compile time.

Why buckets: MetaSchedule cannot tune kernels with symbolic loop extents, so a tuned build is exported
with static shapes. A bucket (atoms, edges, molecules) is the padded size of every call: the real
molecules, then a ghost molecule (two atoms 1 Å apart, plus every padding atom, each ≥ 2×cutoff from
everything else, so they have no neighbours), padding edges that duplicate the ghost pair's edge, and
empty molecule slots (energy 0). Ghost outputs are dropped. A call needs atoms + 2, edges + 2 and
molecules + 1 slots; `fits` checks that.

Tuning runs on the module compile.build makes (same export, same import), legalized and fused as
tvm.compile's CPU pipeline does (`prepare`), so the database's workloads match the build's
(`apply_tuning_records`, MetaScheduleApplyDatabase). The database is MetaSchedule's own JSON layout
(database_workload.json, database_tuning_record.json, logs/) plus our tasks.json (buckets, target,
per-task table). JSONDatabase appends each measured record as it comes, so an interrupted run keeps its
records and a re-run tunes only what is left of each task's budget.

Task choice: the module has ~200 distinct kernels (~950 calls on ethanol) and most are tiny. The
trial budget goes to the tasks that take the most time: measured per kernel on an instrumented run of
the untuned bucket build when the target runs here, else ranked by estimated FLOPs × calls.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BucketError, QSO3Error

SCHEDULES_DIR = Path(os.environ.get("QSO3_SCHEDULES_DIR", Path(__file__).resolve().parents[1] / "schedules"))
WORKLOAD_FILE, RECORD_FILE, TASKS_FILE = "database_workload.json", "database_tuning_record.json", "tasks.json"
# documented buckets (README, reports/tuning.md)
NAMED_BUCKETS = {
    "ethanol": (12, 80, 2),  # ethanol batch 1: 9 atoms, 72 edges (+2 ghost atoms, +2 ghost edges, +1 ghost molecule)
    "qm9-32": (640, 10752, 33),  # 32 QM9-sized molecules (~18 atoms, ~300 edges each at 5 Å)
}


# ----------------------------------------------------------------------------- buckets
@dataclass(frozen=True)
class Bucket:
    atoms: int
    edges: int
    molecules: int

    @classmethod
    def parse(cls, spec) -> "Bucket":
        """'ATOMS,EDGES,MOLS', a named bucket (ethanol, qm9-32), a list/tuple or a Bucket."""
        if isinstance(spec, Bucket):
            return spec
        if isinstance(spec, str):
            spec = NAMED_BUCKETS.get(spec.strip(), spec)
        try:
            vals = [int(v) for v in (spec.split(",") if isinstance(spec, str) else spec)]
        except (TypeError, ValueError):
            vals = []
        if len(vals) != 3:
            raise QSO3Error(f"bucket must be ATOMS,EDGES,MOLECULES (or one of {', '.join(NAMED_BUCKETS)}), not {spec!r}")
        b = cls(*vals)
        if b.atoms < 3 or b.edges < 2 or b.molecules < 2:
            raise QSO3Error(f"bucket {b.text}: needs ≥ 3 atoms, ≥ 2 edges, ≥ 2 molecules (room for the ghost molecule)")
        return b

    @property
    def text(self) -> str:
        return f"{self.atoms},{self.edges},{self.molecules}"

    def as_list(self) -> list[int]:
        return [self.atoms, self.edges, self.molecules]

    def fits(self, atoms: int, edges: int, molecules: int) -> bool:
        """Room for real atoms/edges/molecules plus the ghost pair (2 atoms, 2 edges, 1 molecule)."""
        return atoms + 2 <= self.atoms and edges + 2 <= self.edges and molecules + 1 <= self.molecules


def choose_bucket(buckets, atoms: int, edges: int, molecules: int) -> Bucket | None:
    """The smallest bucket (by atoms, then edges) the call fits in, or None."""
    fitting = [b for b in map(Bucket.parse, buckets) if b.fits(atoms, edges, molecules)]
    return min(fitting, key=lambda b: (b.atoms, b.edges, b.molecules)) if fitting else None


def pad_to_bucket(arrays: list, buckets, cutoff: float, where: str) -> list:
    """A call's graph arrays (species, pos, mol, src, dst, mol_slots; the 2-atom ghost molecule last)
    padded to the smallest bucket that fits; BucketError names the limits otherwise."""
    n, e, molecules = len(arrays[0]) - 2, len(arrays[3]) - 2, len(arrays[5]) - 1
    bucket = choose_bucket(buckets, n, e, molecules)
    if bucket is None:
        raise BucketError(f"{molecules} molecule(s) with {n} atoms and {e} edges exceed every size bucket "
                          f"of {where} ({buckets} as atoms,edges,molecules incl. a 2-atom ghost); "
                          "compile with a larger --bucket or use an untuned (dynamic) build")
    return list(pad_arrays(*arrays[:5], molecules + 1, bucket, cutoff, ghost=(n, n + 1)))


def pad_arrays(species, pos, mol, src, dst, n_mol: int, bucket: Bucket, cutoff: float, ghost: tuple[int, int] | None = None):
    """Pad graph arrays to a bucket. `ghost` is the (i, j) atom pair of an existing ghost molecule
    (the last molecule) whose edge is duplicated; None when the arrays have no ghost yet (export):
    then atoms are padded onto the last molecule and edges duplicate its first edge.
    Returns (species, pos, mol, src, dst, mol_slots) as numpy arrays of the bucket's sizes."""
    n, e = len(species), len(src)
    if n > bucket.atoms or e > bucket.edges or n_mol > bucket.molecules or e == 0:
        raise QSO3Error(f"{n} atoms / {e} edges / {n_mol} molecules do not fit bucket {bucket.text}")
    k = bucket.atoms - n
    gap = 2.0 * cutoff + 1.0  # ≥ 2×cutoff (with a margin for float32) from everything and each other
    extra_pos = np.zeros((k, 3), pos.dtype)
    extra_pos[:, 0] = float(np.abs(pos).max(initial=0.0)) + gap * np.arange(1, k + 1)
    i, j = ghost if ghost is not None else (int(src[0]), int(dst[0]))
    reps = bucket.edges - e
    pad_src = np.where(np.arange(reps) % 2 == 0, i, j).astype(src.dtype)
    pad_dst = np.where(np.arange(reps) % 2 == 0, j, i).astype(dst.dtype)
    return (np.concatenate([species, np.full(k, species[-1], species.dtype)]),
            np.concatenate([pos, extra_pos]),
            np.concatenate([mol, np.full(k, n_mol - 1, mol.dtype)]),
            np.concatenate([src, pad_src]), np.concatenate([dst, pad_dst]),
            np.zeros(bucket.molecules, pos.dtype))


# ----------------------------------------------------------------------------- database
def default_work_dir(model_spec: str, target: str) -> Path:
    return SCHEDULES_DIR / Path(str(model_spec)).stem.replace("_", "-") / target.replace("/", "_")


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


def static_build_info(bucket, tuning_records, log=print) -> tuple[Bucket, dict]:
    """The bucket a static build uses (given, else the database's first) and its manifest entries."""
    if tuning_records:
        open_database(tuning_records, must_exist=True)  # clear error before a long export
    if bucket is None:
        known = database_buckets(tuning_records) if tuning_records else []
        if not known:
            raise QSO3Error(f"{tuning_records}: no bucket recorded ({TASKS_FILE}); give --bucket ATOMS,EDGES,MOLECULES")
        bucket = known[0]
    bucket = Bucket.parse(bucket)
    info = {"inputs": {"species": [bucket.atoms], "pos": [bucket.atoms, 3], "mol": [bucket.atoms],
                       "src": [bucket.edges], "dst": [bucket.edges], "mol_slots": [bucket.molecules],
                       "buckets": [bucket.as_list()],
                       "note": "static shapes: every call is padded to a bucket (atoms, edges, molecules) with a ghost "
                               "molecule; a call needs atoms+2, edges+2, molecules+1 slots"}}
    if tuning_records:
        tasks = read_tasks_file(tuning_records)
        info["tuning"] = {"database": str(tuning_records), "database_sha256": database_sha256(tuning_records),
                          "buckets": tasks.get("buckets"), "target": tasks.get("target"),
                          "tuned_tasks": len(tasks.get("tasks", [])), "trials": tasks.get("trials")}
        if tasks.get("buckets") and bucket.as_list() not in tasks["buckets"]:
            log(f"warning: bucket {bucket.text} was not tuned (database buckets {tasks['buckets']}): "
                "kernels of other sizes do not match, the build stays mostly unscheduled")
    log(f"static build at bucket {bucket.text} (atoms, edges, molecules)"
        + (f", tuning records {tuning_records}" if tuning_records else ""))
    return bucket, info


def parity_subset(compiled, mols, ref: dict):
    """The sample molecules that fit one of a static build's buckets, and their reference values."""
    from .data import make_batch

    keep = []
    for i in range(len(mols)):
        b = make_batch(mols, [i], compiled.species, float(compiled.manifest["model"]["cutoff"]))
        if choose_bucket(compiled.manifest["inputs"]["buckets"], len(b.species), len(b.src), 1) is not None:
            keep.append(i)
    if not keep:
        raise QSO3Error(f"no packaged sample molecule fits the buckets {compiled.manifest['inputs']['buckets']}: "
                        "cannot check the build against PyTorch (use --no-check or a larger bucket)")
    rows = np.concatenate([np.arange(mols.offsets[i], mols.offsets[i + 1]) for i in keep])
    ref = {**ref, "energy_ev": np.asarray(ref["energy_ev"])[keep], "forces_ev_per_a": np.asarray(ref["forces_ev_per_a"])[rows]}
    return mols.subset(keep), ref


# ----------------------------------------------------------------------------- modules
def prepare(mod, target):
    """Legalize and fuse as tvm.compile's CPU pipeline does: the tuning tasks are these fused kernels."""
    import tvm
    from tvm import relax

    with tvm.target.Target(target):
        return tvm.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)


def apply_tuning_records(mod, target, db_dir: str | Path):
    """The Relax module with the database's schedules applied to the kernels it has records for
    (MetaScheduleApplyDatabase under the target); kernels without records stay as they are."""
    import tvm
    from tvm import relax

    db = open_database(db_dir, must_exist=True)
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    mod = prepare(mod, target)
    with target, db:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)


def relax_module(model, bucket: Bucket, target=None):
    """The Relax module compile.build imports, at a static bucket (with compile's custom kernels
    applied when compile.py has them, so that the tuned workloads are the build's)."""
    from . import compile as qcompile

    mod = qcompile.import_to_relax(qcompile.export_energy_forces(qcompile.deployable(model), bucket=bucket))
    if target is not None and hasattr(qcompile, "apply_kernels"):
        mod, _ = qcompile.apply_kernels(mod, target)
    return mod


def tuning_target(spec):
    """The TVM target with num-cores (MetaSchedule needs it)."""
    import tvm

    d = dict(spec.target)
    host = d.get("host") if d.get("kind") == "cuda" else None
    if host is None and "num-cores" not in d:
        d["num-cores"] = os.cpu_count() or 1
    return tvm.target.Target(d)


def _call_args(model, bucket: Bucket, device):
    """Device tensors of a sample-like call padded to the bucket (for the kernel-time profile)."""
    import tvm

    from .data import MoleculeSet, make_batch
    from .testing import random_molecule

    species = model.cfg.species
    cap = max(1, (bucket.atoms - 2))
    z, p = random_molecule(min(cap, 9), species=species, seed=0)
    mols = MoleculeSet.from_molecules([(z, p), (np.full(2, species[0]), np.array([[0.0, 0, 0], [1.0, 0, 0]]))])
    b = make_batch(mols, [0, 1], species, model.cfg.cutoff)
    keep = np.asarray(b.dst) >= 0
    src, dst = b.src.numpy()[keep], b.dst.numpy()[keep]
    if len(src) + 0 > bucket.edges:  # a too dense sample: keep the ghost pair and some edges
        src, dst = src[-bucket.edges:], dst[-bucket.edges:]
    n = len(z)
    arrays = pad_arrays(b.species.numpy(), b.pos.numpy(), b.mol.numpy(), src, dst, 2, bucket, model.cfg.cutoff,
                        ghost=(n, n + 1))
    return [tvm.runtime.tensor(a, device) for a in arrays]


def profile_kernels(mod, target, model, bucket: Bucket, runs: int = 3) -> dict[str, float]:
    """Seconds per module call spent in each kernel (by global symbol) on this machine, untuned."""
    import tvm
    from tvm import relax

    ex = tvm.compile(mod, target=target)
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    args = _call_args(model, bucket, dev)
    vm["main"](*args)
    acc: dict[str, float] = {}
    start: dict[str, float] = {}

    def instrument(func, sym, before, ret, *a):
        if before:
            start[sym] = time.perf_counter()
        else:
            acc[sym] = acc.get(sym, 0.0) + time.perf_counter() - start[sym]
        return 0

    vm.set_instrument(instrument)
    for _ in range(runs):
        vm["main"](*args)
    return {k: v / runs for k, v in acc.items()}


def _task_flops(task) -> float:
    from tvm import tirx

    try:
        return float(tirx.analysis.estimate_tir_flops(task.dispatched[0]))
    except Exception:
        return 0.0


def _workload_records(db, mod) -> list[float]:
    """Mean run seconds of each valid record of a workload, best first."""
    if not db.has_workload(mod):
        return []
    wl = db.commit_workload(mod)
    recs = db.get_top_k(wl, 1 << 30)
    return [float(np.mean([float(x) for x in r.run_secs])) for r in recs if r.run_secs]


# ----------------------------------------------------------------------------- runners
def build_kernel(mod, target, _params):
    """MetaSchedule builder: the default one without its `import tvm.s_tir.tensor_intrin`, which costs
    ~40 s of CPU in every builder process (the builder starts new processes for every batch). Our
    search space has no tensorize rules, so no intrinsic has to be registered to build a candidate."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def export_aarch64(mod) -> str:
    """MetaSchedule builder export for arm64 boards: a cross-linked .so (boards have no linker)."""
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    return path


def export_native(mod) -> str:
    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path)
    return path


def alloc_local(device, args_info, alloc_repeat):
    """LocalRunner arguments: see alloc_host_random (valid gather/scatter indices)."""
    return alloc_host_random(None, device, args_info, alloc_repeat)


def alloc_host_random(session, device, args_info, alloc_repeat):
    """Arguments filled on the host (copied over RPC: works on a board whose runtime lacks
    tvm.contrib.random.random_fill). Integer tensors get 0/1: many kernels (take, scatter_elements)
    read them as indices, and MetaSchedule's default random fill makes them crash the runner."""
    import tvm

    rng = np.random.default_rng(0)
    out = []
    for _ in range(alloc_repeat):
        args = []
        for info in args_info:
            _, dtype, shape = info
            if "int" in dtype or "bool" in dtype:
                a = rng.integers(0, 2, size=shape).astype(dtype)
            else:
                a = rng.uniform(-1, 1, size=shape).astype(dtype)
            args.append(tvm.runtime.tensor(a, device))
        out.append(args)
    return out


def make_builder_runner(spec, rpc_tracker: str | None, rpc_key: str | None, n_parallel: int | None):
    from tvm.s_tir import meta_schedule as ms

    from .deploy import split_addr

    evaluator = ms.runner.EvaluatorConfig(number=5, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False)
    cross = spec.arch == "aarch64"
    # a builder process imports tvm.s_tir.tensor_intrin (~30 s here): the default 30 s timeout kills it
    builder = ms.builder.LocalBuilder(timeout_sec=300, f_build=build_kernel, f_export=export_aarch64 if cross else export_native)
    if rpc_tracker:
        if not rpc_key:
            raise QSO3Error("--rpc-tracker needs --rpc-key")
        host, port = split_addr(rpc_tracker, "--rpc-tracker")
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc_key,
                                     session_priority=1, session_timeout_sec=600)
        try:
            from tvm import rpc

            queue = rpc.connect_tracker(host, port).summary()["queue_info"].get(rpc_key, {})
        except Exception as e:
            raise QSO3Error(f"cannot reach the RPC tracker {rpc_tracker}: {str(e).strip().splitlines()[-1]}") from None
        boards = int(queue.get("free", 0)) + int(queue.get("pending", 0))
        if boards == 0:
            raise QSO3Error(f"no board under key {rpc_key!r} at tracker {rpc_tracker}")
        runner = ms.runner.RPCRunner(config, evaluator, max_workers=n_parallel or boards,
                                     f_alloc_argument=alloc_host_random)
        return builder, runner, f"RPC tracker {rpc_tracker} key {rpc_key} ({boards} board(s))"
    if not spec.local:
        raise QSO3Error(f"target {spec.name} does not run on this machine: measure on boards with "
                        "--rpc-tracker HOST:PORT --rpc-key KEY")
    return builder, ms.runner.LocalRunner(evaluator, f_alloc_argument=alloc_local), "this machine"


# ----------------------------------------------------------------------------- tuning
def _fmt_us(s: float | None) -> str:
    return "-" if s is None or not math.isfinite(s) else f"{s * 1e6:.1f}"


def tune(model_spec: str, target: str, trials: int, work_dir: str | Path | None = None, buckets=None,
         rpc_tracker: str | None = None, rpc_key: str | None = None, trials_per_task: int | None = None,
         max_tasks: int | None = None, seed: int = 0, rank: str | None = None, log=print) -> dict:
    """Tune the int8 (or fp32) model's kernels at static buckets with MetaSchedule.

    trials: total measured candidates (tvmc's --trials); trials_per_task (default min(trials, 8))
    caps each task, so the budget reaches about trials // trials_per_task of the heaviest tasks.
    rank: "profile" (time each kernel in an untuned build here; the default when the target runs here
    and no tracker is given) or "flops" (estimated FLOPs × calls).
    Records go to work_dir (default schedules/<model>/<target>/); a re-run resumes."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .checkpoint import load_model, resolve_model_path
    from .targets import resolve_target

    if trials < 1:
        raise QSO3Error("--trials must be ≥ 1")
    spec = resolve_target(target)
    if spec.device != "cpu":
        raise QSO3Error(f"target {spec.name}: tuning is implemented for CPU targets only")
    tgt = tuning_target(spec)
    model_path = resolve_model_path(model_spec)
    model = load_model(model_path)
    work = Path(work_dir) if work_dir else default_work_dir(model_spec, spec.name)
    db = open_database(work)
    prev = read_tasks_file(work)
    bks = [Bucket.parse(b) for b in (buckets or prev.get("buckets") or ["ethanol"])]
    per_task = trials_per_task or min(trials, 8)
    builder, runner, where = make_builder_runner(spec, rpc_tracker, rpc_key, None)
    log(f"tuning {model_path.name} for {spec.name} ({json.dumps(spec.target)}), buckets "
        f"{[b.text for b in bks]}, {trials} trials (≤ {per_task} per task), measured on {where}; database {work}")

    # tasks of every bucket, ranked by time share
    ranked = []  # (score, seconds_before_estimate, bucket, task)
    t0 = time.time()
    for b in bks:
        mod = prepare(relax_module(model, b, tgt), tgt)
        tasks = ms.relax_integration.extract_tasks(mod, tgt)
        use_profile = rank == "profile" or (rank is None and spec.local and not rpc_tracker)
        kernel_s = profile_kernels(mod, tgt, model, b) if use_profile else None
        for task in tasks:
            if kernel_s is not None:
                score = kernel_s.get(task.task_name, 0.0)
            else:
                score = _task_flops(task) * task.weight
            ranked.append((score, b, task))
        log(f"bucket {b.text}: {len(tasks)} tasks, {sum(t.weight for t in tasks)} kernel calls "
            f"({'profiled here' if kernel_s is not None else 'ranked by FLOPs × calls'}) [{time.time() - t0:.0f} s]")
    # a re-run keeps the tasks it chose before first (profiled times are noisy), then the heaviest
    chosen_before = {(r["task"], r["bucket"]) for r in prev.get("tasks", [])}
    ranked.sort(key=lambda r: (-((r[2].task_name, r[1].text) in chosen_before), -r[0]))
    # the heaviest trials // per_task tasks, plus as many again as reserve: a task whose search space is
    # one schedule (scatter_elements, opaque loops) takes 1 trial and leaves its budget to the next
    n_tasks = max(1, trials // per_task)
    chosen = ranked[:min(max_tasks or len(ranked), 2 * n_tasks)]
    total_score = sum(r[0] for r in ranked) or 1.0
    log(f"tuning the heaviest of {len(ranked)} tasks until {trials} trials are spent: the first {n_tasks} make "
        f"{100 * sum(r[0] for r in chosen[:n_tasks]) / total_score:.0f} % of the untuned kernel time/FLOPs")

    known_before = {(r["task"], r["bucket"]): r.get("before_us") for r in prev.get("tasks", [])}
    missing = [r for r in chosen if known_before.get((r[2].task_name, r[1].text)) is None]
    log(f"measuring {len(missing)} untuned kernels (the 'before' column)")
    for (score, b, task), sec in zip(missing, _measure_untuned([r[2] for r in missing], tgt, builder, runner)):
        known_before[(task.task_name, b.text)] = None if sec is None else sec * 1e6
    cost_model = ms.cost_model.XGBModel(extractor=ms.feature_extractor.PerStoreFeature(), adaptive_training=True)
    loggers = ms.logging.get_loggers_from_work_dir(str(work), [r[2].task_name for r in chosen])
    rows, spent, t_start = [], 0, time.time()
    for idx, (score, b, task) in enumerate(chosen):
        if spent >= trials:
            break
        tmod = task.dispatched[0]
        done = len(_workload_records(db, tmod))
        todo = max(0, min(per_task, trials - spent) - done)
        name = task.task_name
        log(f"[{idx + 1}/{len(chosen)}] {name[:70]} (calls {task.weight}, bucket {b.text}): "
            f"{done} records, tuning {todo} trials")
        before_us = known_before.get((name, b.text))
        t1 = time.time()
        if todo:
            ctx = ms.TuneContext(mod=tmod, target=tgt, space_generator="post-order-apply",
                                 search_strategy=ms.search_strategy.EvolutionarySearch(
                                     population_size=128, init_min_unmeasured=32, genetic_num_iters=2),
                                 task_name=name, logger=loggers[idx], num_threads="physical", rand_state=seed)
            ms.tune_tasks(tasks=[ctx], task_weights=[float(task.weight)], work_dir=str(work),
                          max_trials_global=todo, max_trials_per_task=todo, num_trials_per_iter=min(todo, 16),
                          builder=builder, runner=runner, database=db, cost_model=cost_model,
                          task_scheduler="round-robin")
        secs = _workload_records(db, tmod)
        spent += max(0, len(secs) - done) + done
        rows.append({"task": name, "bucket": b.text, "calls": int(task.weight), "trials": len(secs),
                     "before_us": before_us, "after_us": secs[0] * 1e6 if secs else None,
                     "tune_s": round(time.time() - t1, 1)})
        r = rows[-1]
        log(f"    before {_fmt_us(None if before_us is None else before_us / 1e6)} µs, best {_fmt_us(secs[0] if secs else None)} µs, "
            f"{len(secs)} records, {r['tune_s']} s")
    elapsed = time.time() - t_start
    summary = {"model": str(model_path), "work_dir": str(work), "target": spec.name, "tvm_target": spec.target, "buckets": [b.as_list() for b in bks],
               "trials": trials, "trials_per_task": per_task, "measured_on": where, "tasks_total": len(ranked),
               "tasks": rows, "tuning_seconds": round(elapsed, 1) + float(prev.get("tuning_seconds", 0.0)),
               "database_sha256": database_sha256(work), "tvm": tvm.__version__,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (work / TASKS_FILE).write_text(json.dumps(summary, indent=1))
    for path in (work / "logs").glob("*.log"):  # loggers of reserve tasks that were never tuned
        if path.stat().st_size == 0:
            path.unlink()
    log(task_table(rows))
    n_new = sum(r["trials"] for r in rows)
    log(f"{n_new} records in {work} ({elapsed:.0f} s this run"
        + (f", {elapsed / max(1, n_new):.2f} s per trial" if n_new else "") + ")")
    if getattr(runner, "pool", None) is not None:  # LocalRunner keeps worker processes alive otherwise
        runner.pool.shutdown()
    return summary


def _measure_untuned(tasks, target, builder, runner) -> list[float | None]:
    """Mean seconds of each task's kernel as legalized (no schedule), with the tuning builder/runner
    (one build batch, so one builder start)."""
    from tvm.s_tir import meta_schedule as ms

    out: list[float | None] = [None] * len(tasks)
    try:
        mods = [t.dispatched[0] for t in tasks]
        built = builder.build([ms.builder.BuilderInput(m, target) for m in mods])
        inputs, where = [], []
        for i, (m, res) in enumerate(zip(mods, built)):
            if not res.error_msg:
                func = next(f for _, f in m.functions_items())
                inputs.append(ms.runner.RunnerInput(res.artifact_path, "cpu", ms.arg_info.ArgInfo.from_prim_func(func)))
                where.append(i)
        for i, fut in zip(where, runner.run(inputs)):
            r = fut.result()
            if not r.error_msg:
                out[i] = float(np.mean([float(x) for x in r.run_secs]))
    except Exception:  # the baseline column is informative only
        pass
    return out


def task_table(rows: list[dict]) -> str:
    lines = ["| task | bucket | calls | trials | before µs | after µs | speedup |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r.get("before_us"), r.get("after_us")
        sp = f"{b / a:.1f}×" if b and a else "-"
        lines.append(f"| {r['task'][:60]} | {r['bucket']} | {r['calls']} | {r['trials']} | "
                     f"{'-' if b is None else f'{b:.1f}'} | {'-' if a is None else f'{a:.1f}'} | {sp} |")
    return "\n".join(lines)
