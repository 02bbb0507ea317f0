"""`qso3-tvm tune`: MetaSchedule auto-tuning of the compiled energy+forces module at static size buckets.

Why buckets: MetaSchedule cannot tune kernels with symbolic loop extents, so a tuned build is exported
with static shapes (graph.convention: buckets and padding).

Tuning runs on the module compile builds (compiler.module.relax_module), legalized and fused as the
build's pipeline does (kernels.pipeline.fused), so the database's workloads match the build's
(tuning.database.apply_tuning_records). Databases: tuning.database; builders and runners: tuning.measure.

Task choice: the module has ~200 distinct kernels (~950 calls on ethanol) and most are tiny. The
trial budget goes to the tasks that take the most time: measured per kernel on an instrumented run of
the untuned bucket build when the target runs here, else ranked by estimated FLOPs × calls.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import QSO3Error
from ...graph.convention import Bucket
from ...nn.checkpoint import load_model, resolve_model_path
from ..kernels.pipeline import fused
from ..module import relax_module
from ..targets import resolve_target, tuning_target
from ..tvm_fixes import meta_schedule_loggers
from .database import RECORD_FILE, TASKS_FILE, database_sha256, default_work_dir, is_scheduled, open_database, read_tasks_file
from .measure import make_builder_runner, measure_untuned, profile_kernels


def _task_flops(task) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0]))
    except Exception:
        return 0.0


def _workload_records(db, mod) -> list[float]:
    """Mean run seconds of each valid record of a workload, best first."""
    if not db.has_workload(mod):
        return []
    wl = db.commit_workload(mod)
    recs = db.get_top_k(wl, 1 << 30)
    return [float(np.mean([float(x) for x in r.run_secs])) for r in recs if r.run_secs]


def _fmt_us(s: float | None) -> str:
    return "-" if s is None or not math.isfinite(s) else f"{s * 1e6:.1f}"


@dataclass
class Ranked:
    """A tuning task of one bucket and its share of the untuned time (or FLOPs × calls)."""
    score: float
    bucket: Bucket
    task: object

    @property
    def key(self) -> tuple[str, str]:
        return self.task.task_name, self.bucket.text


def rank_tasks(model, buckets: list[Bucket], tgt, use_profile: bool, log) -> list[Ranked]:
    """Every bucket's tuning tasks, scored by their share of the bucket's measured kernel time here (or of its
    FLOPs × calls). Our kernels come scheduled (compiler.kernels): MetaSchedule has nothing to search there."""
    from tvm.s_tir import meta_schedule as ms

    ranked, t0 = [], time.time()
    for b in buckets:
        mod = fused(relax_module(model, bucket=b, target=tgt), tgt)
        tasks = [t for t in ms.relax_integration.extract_tasks(mod, tgt) if not any(map(is_scheduled, t.dispatched[0].functions.values()))]
        kernel_s = profile_kernels(mod, tgt, model, b) if use_profile else None
        scores = [kernel_s.get(t.task_name, 0.0) if kernel_s is not None else _task_flops(t) * t.weight for t in tasks]
        total = sum(scores) or 1.0  # shares of the bucket's time: every bucket's heaviest kernels get tuned
        ranked += [Ranked(score / total, b, t) for score, t in zip(scores, tasks)]
        log(f"bucket {b.text}: {len(tasks)} tasks, {sum(t.weight for t in tasks)} kernel calls "
            f"({'profiled here' if kernel_s is not None else 'ranked by FLOPs × calls'}) [{time.time() - t0:.0f} s]")
    return ranked


def choose_tasks(ranked: list[Ranked], prev: dict, trials: int, per_task: int, max_tasks: int | None, log) -> list[Ranked]:
    """The heaviest trials // per_task tasks, plus as many again as reserve (a task whose search space is
    one schedule takes 1 trial and leaves its budget to the next); a re-run keeps its earlier choice first
    (profiled times are noisy)."""
    chosen_before = {(r["task"], r["bucket"]) for r in prev.get("tasks", [])}
    ranked.sort(key=lambda r: (-(r.key in chosen_before), -r.score))
    n_tasks = max(1, trials // per_task)
    chosen = ranked[:min(max_tasks or len(ranked), 2 * n_tasks)]
    total = sum(r.score for r in ranked) or 1.0
    log(f"tuning the heaviest of {len(ranked)} tasks until {trials} trials are spent: the first {n_tasks} make "
        f"{100 * sum(r.score for r in chosen[:n_tasks]) / total:.0f} % of the untuned kernel time/FLOPs")
    return chosen


def untuned_times(chosen: list[Ranked], prev: dict, tgt, builder, runner, log) -> dict:
    """µs of each chosen task's untuned kernel (the 'before' column), measured once and kept in tasks.json."""
    known = {(r["task"], r["bucket"]): r.get("before_us") for r in prev.get("tasks", [])}
    missing = [r for r in chosen if known.get(r.key) is None]
    log(f"measuring {len(missing)} untuned kernels (the 'before' column)")
    for r, sec in zip(missing, measure_untuned([r.task for r in missing], tgt, builder, runner)):
        known[r.key] = None if sec is None else sec * 1e6
    return known


def tune_task(r: Ranked, todo: int, ctx_args: dict, logger, log) -> None:
    """Spend `todo` trials on one task (records go to the database as they are measured)."""
    from tvm.s_tir import meta_schedule as ms

    ctx = ms.TuneContext(mod=r.task.dispatched[0], target=ctx_args["target"], space_generator="post-order-apply",
                         search_strategy=ms.search_strategy.EvolutionarySearch(
                             population_size=128, init_min_unmeasured=32, genetic_num_iters=2),
                         task_name=r.task.task_name, logger=logger, num_threads="physical", rand_state=ctx_args["seed"])
    ms.tune_tasks(tasks=[ctx], task_weights=[float(r.task.weight)], work_dir=ctx_args["work_dir"],
                  max_trials_global=todo, max_trials_per_task=todo, num_trials_per_iter=min(todo, 16),
                  builder=ctx_args["builder"], runner=ctx_args["runner"], database=ctx_args["db"],
                  cost_model=ctx_args["cost_model"], task_scheduler="round-robin")


class Interrupts:
    """Ctrl-C and SIGTERM during tuning. A signal that arrives while TVM runs C++ (task extraction, builder and
    runner futures) comes back as an ordinary error, which MetaSchedule and our informative measurements catch and
    carry on from: the signal is remembered here and raised again as KeyboardInterrupt at the next step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.seen, self.old = False, {}
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, *_):
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt

    def restore(self) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)


def tune_chosen(chosen: list[Ranked], before: dict, trials: int, per_task: int, ctx_args: dict, log,
                check_interrupt=lambda: None) -> list[dict]:
    """Tune the chosen tasks in order until the trial budget is spent; a row per task tuned."""
    db = ctx_args["db"]
    loggers = meta_schedule_loggers(ctx_args["work_dir"], [r.task.task_name for r in chosen])
    rows, spent = [], 0
    for idx, r in enumerate(chosen):
        check_interrupt()
        if spent >= trials:
            break
        tmod = r.task.dispatched[0]
        done = len(_workload_records(db, tmod))
        todo = max(0, min(per_task, trials - spent) - done)
        log(f"[{idx + 1}/{len(chosen)}] {r.task.task_name[:70]} (calls {r.task.weight}, bucket {r.bucket.text}): "
            f"{done} records, tuning {todo} trials")
        t1 = time.time()
        if todo:
            tune_task(r, todo, ctx_args, loggers[idx], log)
        secs = _workload_records(db, tmod)
        spent += len(secs)
        before_us = before.get(r.key)
        rows.append({"task": r.task.task_name, "bucket": r.bucket.text, "calls": int(r.task.weight), "trials": len(secs),
                     "before_us": before_us, "after_us": secs[0] * 1e6 if secs else None,
                     "tune_s": round(time.time() - t1, 1)})
        log(f"    before {_fmt_us(None if before_us is None else before_us / 1e6)} µs, best {_fmt_us(secs[0] if secs else None)} µs, "
            f"{len(secs)} records, {rows[-1]['tune_s']} s")
    return rows


def tune(model_spec: str, target: str, trials: int, work_dir: str | Path | None = None, buckets=None,
         rpc_tracker: str | None = None, rpc_key: str | None = None, trials_per_task: int | None = None,
         max_tasks: int | None = None, seed: int = 0, rank: str | None = None, log=print) -> dict:
    """Tune the int8 (or fp32) model's kernels at static buckets with MetaSchedule.

    trials: total measured candidates (tvmc's --trials); trials_per_task (default min(trials, 8))
    caps each task, so the budget reaches about trials // trials_per_task of the heaviest tasks.
    rank: "profile" (time each kernel in an untuned build here; the default when the target runs here
    and no tracker is given) or "flops" (estimated FLOPs × calls).
    Records go to work_dir (default schedules/<model>/<target>/); a re-run resumes."""
    from tvm.s_tir import meta_schedule as ms

    if trials < 1:
        raise QSO3Error("--trials must be ≥ 1")
    spec = resolve_target(target)
    if spec.device != "cpu":
        raise QSO3Error(f"target {spec.name}: tuning is implemented for CPU targets only")
    tgt = tuning_target(spec)
    model_path = resolve_model_path(model_spec)
    model = load_model(model_path)
    work = Path(work_dir) if work_dir else default_work_dir(model_spec, spec.name)
    prev = read_tasks_file(work)
    bks = [Bucket.parse(b) for b in (buckets or prev.get("buckets") or ["ethanol"])]
    created, runner = not work.exists(), None
    per_task = trials_per_task or min(trials, 8)
    interrupts = Interrupts()
    try:
        db = open_database(work)
        builder, runner, where = make_builder_runner(spec, rpc_tracker, rpc_key, None)  # fails on a dead tracker
        log(f"tuning {model_path.name} for {spec.name} ({json.dumps(spec.target)}), buckets "
            f"{[b.text for b in bks]}, {trials} trials (≤ {per_task} per task), measured on {where}; database {work}")
        use_profile = rank == "profile" or (rank is None and spec.local and not rpc_tracker)
        ranked = rank_tasks(model, bks, tgt, use_profile, log)
        interrupts.check()
        chosen = choose_tasks(ranked, prev, trials, per_task, max_tasks, log)
        before = untuned_times(chosen, prev, tgt, builder, runner, log)
        interrupts.check()
        cost_model = ms.cost_model.XGBModel(extractor=ms.feature_extractor.PerStoreFeature(), adaptive_training=True)
        ctx_args = {"target": tgt, "seed": seed, "work_dir": str(work), "builder": builder, "runner": runner,
                    "db": db, "cost_model": cost_model}
        t_start = time.time()
        rows = tune_chosen(chosen, before, trials, per_task, ctx_args, log, interrupts.check)
    except BaseException:  # failed or interrupted: a database this run created and filled with nothing goes
        if created and not _has_records(work):
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        interrupts.restore()
        if getattr(runner, "pool", None) is not None:  # LocalRunner keeps worker processes alive otherwise
            runner.pool.shutdown()
    return write_summary(work, prev, rows, {
        "model": str(model_path), "work_dir": str(work), "target": spec.name, "tvm_target": spec.target,
        "buckets": [b.as_list() for b in bks], "trials": trials, "trials_per_task": per_task, "measured_on": where,
        "tasks_total": len(ranked)}, time.time() - t_start, log)


def _has_records(work: Path) -> bool:
    path = work / RECORD_FILE
    return path.is_file() and path.stat().st_size > 0


def write_summary(work: Path, prev: dict, rows: list[dict], info: dict, elapsed: float, log) -> dict:
    """tasks.json (atomically), the per-task table and a closing line."""
    import tvm

    from ...files import atomic_write

    summary = {**info, "tasks": rows, "tuning_seconds": round(elapsed, 1) + float(prev.get("tuning_seconds", 0.0)),
               "database_sha256": database_sha256(work), "tvm": tvm.__version__,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write(work / TASKS_FILE, json.dumps(summary, indent=1))
    for path in (work / "logs").glob("*.log"):  # loggers of reserve tasks that were never tuned
        if path.stat().st_size == 0:
            path.unlink()
    log(task_table(rows))
    n_new = sum(r["trials"] for r in rows)
    log(f"{n_new} records in {work} ({elapsed:.0f} s this run"
        + (f", {elapsed / max(1, n_new):.2f} s per trial" if n_new else "") + ")")
    return summary


def task_table(rows: list[dict]) -> str:
    lines = ["| task | bucket | calls | trials | before µs | after µs | speedup |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r.get("before_us"), r.get("after_us")
        sp = f"{b / a:.1f}×" if b and a else "-"
        lines.append(f"| {r['task'][:60]} | {r['bucket']} | {r['calls']} | {r['trials']} | "
                     f"{'-' if b is None else f'{b:.1f}'} | {'-' if a is None else f'{a:.1f}'} | {sp} |")
    return "\n".join(lines)
