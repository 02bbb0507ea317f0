"""`qso3-tvm bench`: every inference route side by side, each in its own process, timed alternately.

Routes (routes.py): PyTorch eager fp32, torch.compile fp32, ONNX Runtime fp32 and int8 (dynamic
quantization of the fp32 graph), TVM fp32, TVM int8 untuned and tuned (compiled artifacts; given as
folders or compiled here into a cache). Workloads: one ethanol, one aspirin, 32 QM9-sized molecules;
energy only ("E") and energy+forces ("E+F"); 1 and 2 threads.

Method. Each route runs in its own long-lived worker process (qso3_tvm.apps.bench.worker) with a fixed
thread count (torch and TVM thread pools in one process oversubscribe the cores). All inputs,
neighbor lists included, are built before timing; a timed call is the engine call from ready inputs
to outputs as numpy arrays. Workers warm up each case, then wait. For each case the parent runs
`rounds` rounds; in each round every route in turn (order rotated per round) runs one untimed call
and then timed calls until `budget_s` is spent (at least one). Only one worker runs at a time.
Speed-ups are paired: per round, the eager median over the route median; the report gives the median
over rounds. Peak RSS is the worker's own (ru_maxrss, setup included); weight bytes are the stored
model tensors of the route.

Modules: routes.py (the route table), prepare.py (artifacts), worker.py (the route processes),
stats.py (statistics, MAC counts, the physical limit), report.py (bench.md, bench.png, bench.json).
Reports: REPORT_DIR/bench.md, REPORT_DIR/bench/bench.json and bench.png, each written to a temporary
file and renamed: an interrupt leaves the previous report in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ...errors import QSO3Error
from ...files import log_tail
from ...resources import cache_dir, git_commit
from .prepare import RouteUnavailable, prepare_route
from .report import bench_command, write_reports
from .routes import DEFAULT_ROUTES, DEFAULT_WORKLOADS, MODES, REFERENCE_ROUTE, ROUTE_TABLE, ROUTES
from .stats import paired_speedup, physical_limit, stats, workload_macs
from .worker import REPLY, out_path


@dataclass
class BenchConfig:
    model_fp32: str = "ethanol-fp32"
    model_int8: str = "ethanol-int8"
    routes: tuple[str, ...] = DEFAULT_ROUTES
    workloads: tuple[str, ...] = DEFAULT_WORKLOADS
    modes: tuple[str, ...] = MODES
    threads: tuple[int, ...] = (1, 2)
    rounds: int = 7
    budget_s: float = 0.3  # timed seconds per route per round (at least one call)
    max_calls: int = 50  # per route per round
    warmup: int = 3  # untimed calls per case at setup, after the first
    target: str = "host"
    tvm_fp32: str | None = None  # artifact folders; compiled into the cache when not given
    tvm_int8: str | None = None
    tvm_int8_tuned: str | None = None
    tuning_records: str | None = None  # compile tvm-int8-tuned with these ('none': skip; default: the committed ones)
    cache_dir: str | None = None  # default $QSO3_CACHE/bench (~/.cache/qso3_tvm/bench)
    work_dir: str | None = None  # inputs, worker logs, outputs; a temporary folder when not given
    report_dir: str = "reports"
    setup_timeout_s: float = 3600.0
    command: str | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- helpers
def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return list(os.getloadavg())


def cpu_info() -> dict:
    info = {"model": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(), "mhz": None, "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and info["model"] in (platform.processor(), platform.machine(), ""):
            info["model"] = value
        elif key == "cpu MHz" and info["mhz"] is None:
            info["mhz"] = float(value)
        elif key == "flags" and not info["flags"]:
            info["flags"] = sorted(f for f in value.split() if f.startswith(("avx512", "avx2", "amx", "avx_vnni", "fma")))
    return info


def default_cache_dir() -> Path:
    return cache_dir() / "bench"


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "apache-tvm", "onnxruntime", "onnx", "onnxscript", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ---------------------------------------------------------------- workloads
def workload_molecules(name: str, species: tuple[int, ...]) -> tuple[list, str]:
    """(numbers, positions) of a workload and a line saying where they come from."""
    from importlib import resources

    if name in ("ethanol-b1", "aspirin-b1"):
        mol = name.split("-")[0]
        with np.load(str(resources.files("qso3_tvm") / "models" / "samples.npz")) as npz:
            numbers, coords = npz[f"{mol}_numbers"], npz[f"{mol}_coords"][0]
        return [(numbers, coords)], f"rMD17 {mol} frame (packaged samples.npz)"
    if name.startswith("qm9-b") and name[5:].isdigit() and int(name[5:]) > 0:
        return qm9_molecules(int(name[5:]), species)
    raise QSO3Error(f"unknown workload {name!r} (ethanol-b1, aspirin-b1, qm9-bN)")


def workload_buckets(molecules: dict, model_cfg) -> list[list[int]]:
    """Specialized buckets (graph.convention) for the workloads' calls, as a user who compiles for these
    sizes would give them (`room_for`, not the exact sizes)."""
    from ...graph.convention import call_arrays, room_for
    from ...graph.molecules import MoleculeSet

    out = []
    for mols, _ in molecules.values():
        arrays, _ = call_arrays(MoleculeSet.from_molecules(mols), range(len(mols)), tuple(model_cfg.species), model_cfg.cutoff)
        out.append(room_for(len(arrays[0]), len(arrays[3]), len(arrays[5])).as_list())
    return sorted(set(map(tuple, out)))


def qm9_molecules(n: int, species: tuple[int, ...], seed: int = 0) -> tuple[list, str]:
    """n QM9 molecules of 16-20 atoms (mean ~18) made of H, C, O only (what the bundled models
    were trained on); random H/C/O clouds of 18 atoms when QM9 (qm9pack) is not available."""
    hco = tuple(z for z in (1, 6, 8) if z in species) or tuple(species)
    try:
        from ...graph.datasets import load_qm9

        qm9 = load_qm9(atomization=False)
        sizes = np.diff(qm9.offsets)
        ok = [i for i in np.flatnonzero((sizes >= 16) & (sizes <= 20))
              if set(qm9.frame(int(i))[0].tolist()) <= set(hco)]
        if len(ok) >= n:
            pick = np.sort(np.random.default_rng(seed).choice(ok, n, replace=False))
            return ([qm9.frame(int(i)) for i in pick],
                    f"{n} QM9 molecules with 16-20 atoms of H/C/O (qm9pack, random pick, seed {seed})")
        reason = f"only {len(ok)} QM9 molecules fit"
    except Exception as e:  # no qm9pack / data: synthetic molecules of the same size
        reason = f"QM9 not available ({type(e).__name__}: {e})"
    from ...graph.molecules import random_molecule

    return ([random_molecule(18, species=hco, seed=seed + i) for i in range(n)],
            f"{n} random H/C/O clouds of 18 atoms (graph.molecules.random_molecule; {reason})")


def build_inputs(molecules: list, species: tuple[int, ...], cutoff: float, path: Path) -> dict:
    """Graph inputs (plain, and with the ghost molecule compiled artifacts expect) as one npz."""
    from ...graph.convention import with_ghost
    from ...graph.molecules import MoleculeSet
    from ...nn.batch import make_batch

    mols = MoleculeSet.from_molecules(molecules)
    frames = list(range(len(mols)))
    b = make_batch(mols, frames, species, cutoff)
    padded, idx = with_ghost(mols, frames, species)
    g = make_batch(padded, idx, species, cutoff)
    arrays = {"n_atoms": len(b.species), "n_edges": len(b.src), "n_mol": b.n_mol, "g_n_mol": g.n_mol}
    for prefix, batch in (("", b), ("g_", g)):
        for k in ("species", "pos", "mol", "src", "dst"):
            arrays[prefix + k] = getattr(batch, k).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return {"molecules": b.n_mol, "atoms": len(b.species), "edges": len(b.src),
            "neighbor_list_ms": neighbor_list_ms(padded, idx, species, cutoff)}


def neighbor_list_ms(mols, frames, species: tuple[int, ...], cutoff: float, repeats: int = 5) -> float:
    """Median host time (ms, numpy + scipy k-d tree) to build a call's graph: neighbor lists and collation.
    Routes are timed from ready inputs, so this comes on top of every route's time."""
    from ...graph.neighbors import graph_arrays

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        graph_arrays(mols, frames, species, cutoff)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def build_cases(cfg: BenchConfig, prepared: dict, runnable: list[str], molecules: dict,
                work_dir: Path) -> tuple[dict, list[dict]]:
    """Input files per (workload, graph signature: species and cutoff of the route's model) and the cases
    (workload x mode) naming each route's input file; workloads whose inputs fail are described anyway."""
    workloads, cases = {}, []
    sig_paths: dict = {}
    for w in cfg.workloads:
        mols, source = molecules[w]
        inputs = {}
        for route in runnable:
            sig = (tuple(prepared[route]["species"]), float(prepared[route]["cutoff"]))
            if (w, sig) not in sig_paths:
                path = work_dir / "inputs" / f"{w}_{hashlib.sha1(repr(sig).encode()).hexdigest()[:8]}.npz"
                try:
                    sizes = build_inputs(mols, sig[0], sig[1], path)
                    sig_paths[(w, sig)] = (str(path), sizes)
                except QSO3Error as e:
                    sig_paths[(w, sig)] = (None, str(e))
            path, sizes = sig_paths[(w, sig)]
            inputs[route] = path
            if path and w not in workloads:
                workloads[w] = {**sizes, "source": source}
        for mode in cfg.modes:
            cases.append({"key": f"{w}/{mode}", "workload": w, "mode": mode, "inputs": inputs})
    for w in cfg.workloads:
        if w not in workloads:
            mols, source = molecules[w]
            workloads[w] = {"molecules": len(mols), "atoms": int(sum(len(z) for z, _ in mols)), "edges": None,
                            "source": source}
    return workloads, cases


# ---------------------------------------------------------------- workers
def _worker_env(threads: int, tvm_runtime: bool = False) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TVM_NUM_THREADS"):
        env[k] = str(threads)
    if tvm_runtime:
        env["TVM_USE_RUNTIME_LIB"] = "1"
    src = str(Path(__file__).resolve().parents[3])  # the folder holding the qso3_tvm package
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Worker:
    """A route's serving process; replies arrive on a queue (a reader thread scans stdout)."""

    def __init__(self, route: str, threads: int, spec: dict, work_dir: Path):
        self.route, self.threads = route, threads
        spec_path = work_dir / f"worker_{route}_t{threads}.json"
        spec_path.write_text(json.dumps(spec))
        self.log_path = work_dir / f"worker_{route}_t{threads}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "qso3_tvm.apps.bench.worker", "serve", str(spec_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=_worker_env(threads, ROUTES[route].engine == "tvm"), cwd=work_dir)
        self.replies: queue.Queue = queue.Queue()
        self.dead_reason: str | None = None

        def read():
            for line in self.proc.stdout:
                if line.startswith(REPLY):
                    self.replies.put(json.loads(line[len(REPLY):]))
            self.replies.put(None)

        threading.Thread(target=read, daemon=True).start()

    def tail(self, n: int = 3) -> str:
        lines = [ln for ln in log_tail(self.log_path, 50).splitlines() if ln.strip()]
        return " | ".join(lines[-n:])[-400:]

    def get(self, timeout: float) -> dict:
        deadline = time.time() + timeout
        while True:  # short waits: Ctrl-C and SIGTERM get through
            try:
                msg = self.replies.get(timeout=0.5)
                break
            except queue.Empty:
                if time.time() > deadline:
                    raise RuntimeError(f"no reply within {timeout:.0f} s") from None
        if msg is None:
            self.proc.wait()
            raise RuntimeError(f"worker exited with code {self.proc.returncode}: {self.tail()}")
        return msg

    def send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _prepare_here(cfg: BenchConfig, route: str) -> dict:
    """A checkpoint-only route: no subprocess needed."""
    try:
        return prepare_route({"route": route, "model_fp32": cfg.model_fp32, "model_int8": cfg.model_int8})
    except RouteUnavailable as e:
        return {"skip": str(e)}


def tuning_records(cfg: BenchConfig) -> str | None:
    """The database of the tuned route: --tuning-records ('none': none), else the one committed for the
    int8 model and target (schedules/), if there is one."""
    from ...compiler.tuning.database import committed_database

    if cfg.tuning_records:
        return None if cfg.tuning_records.lower() == "none" else cfg.tuning_records
    folder = committed_database(cfg.model_int8, cfg.target)
    return str(folder) if folder else None


def _prepare_in_subprocess(cfg: BenchConfig, route: str, cache_dir: Path, work_dir: Path) -> dict:
    """An artifact route: exported or compiled (into the cache) by `worker prepare`."""
    option = ROUTES[route].artifact_option
    spec = {"route": route, "model_fp32": cfg.model_fp32, "model_int8": cfg.model_int8, "target": cfg.target,
            "cache_dir": str(cache_dir), "artifact": getattr(cfg, option) if option else None,
            "tuning_records": tuning_records(cfg), "specialize": cfg.extra.get("specialize", [])}
    spec_path, result_path = work_dir / f"prepare_{route}.json", work_dir / f"prepare_{route}.out.json"
    spec_path.write_text(json.dumps(spec))
    with open(work_dir / f"prepare_{route}.log", "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "qso3_tvm.apps.bench.worker", "prepare", str(spec_path), str(result_path)],
                            stdout=fh, stderr=subprocess.STDOUT, env=_worker_env(2), cwd=work_dir,
                            timeout=cfg.setup_timeout_s).returncode
    if result_path.exists():
        return json.loads(result_path.read_text())
    return {"skip": f"preparation crashed (exit {rc}; log {work_dir / f'prepare_{route}.log'})"}


def _prepare_all(cfg: BenchConfig, cache_dir: Path, work_dir: Path, log) -> dict:
    prepared = {}
    for route in cfg.routes:
        in_subprocess = ROUTES[route].needs_artifact
        t0 = time.time()
        info = _prepare_in_subprocess(cfg, route, cache_dir, work_dir) if in_subprocess else _prepare_here(cfg, route)
        prepared[route] = info = {**info, "prepare_s": round(time.time() - t0, 1)}
        ready = f"ready ({info['prepare_s']} s)" if in_subprocess else "ready"
        log(f"[prepare] {route}: " + (f"skipped: {info['skip']}" if "skip" in info else ready))
    return prepared


# ---------------------------------------------------------------- timing
def _start_workers(cfg: BenchConfig, threads: int, routes: list[str], prepared: dict, cases: list[dict],
                   work_dir: Path, workers: dict) -> None:
    for route in routes:
        info = prepared[route]
        rcases = [{"key": c["key"], "mode": c["mode"], "inputs": c["inputs"][route]} for c in cases if c["inputs"].get(route)]
        spec = {**info, "route": route, "threads": threads, "warmup": cfg.warmup, "cases": rcases,
                "work_dir": str(work_dir)}
        workers[route] = Worker(route, threads, spec, work_dir)


def _await_ready(cfg: BenchConfig, threads: int, workers: dict, out: dict, log) -> None:
    """Wait for each worker's setup (loading, compiling, warm-up); a failed one is stopped and dropped."""
    for route, w in list(workers.items()):
        try:
            ready = w.get(cfg.setup_timeout_s)
        except RuntimeError as e:
            out[route]["failed"] = f"worker setup failed: {e}"
            w.stop()
            del workers[route]
            continue
        out[route]["setup"] = {k: ready[k] for k in ("setup_s", "rss_kb", "peak_rss_kb", "torch_loaded")}
        for key, ci in ready["cases"].items():
            out[route]["cases"][key] = {**ci, "rounds": []}
        log(f"[t={threads}] {route} warm in {ready['setup_s']:.0f} s")


def _time_case(cfg: BenchConfig, threads: int, key: str, routes: list[str], workers: dict, out: dict, log) -> None:
    """`rounds` rounds of the case, the routes alternating (order rotated per round)."""
    active = [r for r in routes if r in workers and out[r]["cases"].get(key, {}).get("ok")]
    t0 = time.time()
    for rnd in range(cfg.rounds):
        order = active[rnd % len(active):] + active[:rnd % len(active)] if active else []
        for route in order:
            w = workers.get(route)
            if w is None:
                continue
            try:
                w.send({"cmd": "run", "case": key, "budget_s": cfg.budget_s, "max_calls": cfg.max_calls})
                times = w.get(max(600.0, 100 * cfg.budget_s))["times"]
            except (RuntimeError, OSError) as e:
                out[route]["failed"] = f"worker died while timing {key}: {e}"
                w.stop()
                del workers[route]
                continue
            out[route]["cases"][key]["rounds"].append(times)
    summary = ", ".join(f"{r} {1e3 * np.median(sum(out[r]['cases'][key]['rounds'], [])):.2f}"
                        for r in active if out[r]["cases"][key]["rounds"])
    log(f"[t={threads}] {key} ({time.time() - t0:.0f} s): median ms {summary}")


def _quit_workers(workers: dict, out: dict) -> None:
    """Ask each worker to exit; its reply carries the process's peak RSS."""
    for route, w in workers.items():
        try:
            w.send({"cmd": "quit"})
            bye = w.get(60)
            out[route]["peak_rss_kb"], out[route]["rss_kb"] = bye["peak_rss_kb"], bye["rss_kb"]
        except (RuntimeError, OSError) as e:
            out[route]["failed"] = out[route].get("failed") or f"no exit report: {e}"


def _measure(cfg: BenchConfig, threads: int, routes: list[str], prepared: dict, cases: list[dict],
             work_dir: Path, log) -> dict:
    """Start one worker per route, wait until all are warm, then alternate them case by case."""
    out = {r: {"cases": {}, "setup": None} for r in routes}
    workers: dict[str, Worker] = {}
    try:
        _start_workers(cfg, threads, routes, prepared, cases, work_dir, workers)
        _await_ready(cfg, threads, workers, out, log)
        for case in cases:
            _time_case(cfg, threads, case["key"], routes, workers, out, log)
        _quit_workers(workers, out)
    finally:
        for w in workers.values():
            w.stop()
    return out


# ---------------------------------------------------------------- the run
def _check_config(cfg: BenchConfig) -> None:
    empty = [opt for opt, given in (("--routes", cfg.routes), ("--workloads", cfg.workloads), ("--modes", cfg.modes))
             if not given]
    if empty:
        raise QSO3Error(f"nothing to measure: {', '.join(empty)} empty")
    bad = [r for r in cfg.routes if r not in ROUTES]
    if bad:
        raise QSO3Error(f"unknown route(s) {bad}; choose from {list(ROUTES)}")
    bad = [m for m in cfg.modes if m not in MODES]
    if bad:
        raise QSO3Error(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    if not cfg.threads or any(t < 1 for t in cfg.threads) or cfg.rounds < 1:
        raise QSO3Error("--threads must be positive integers and --rounds >= 1")
    for given in (getattr(cfg, r.artifact_option) for r in ROUTE_TABLE if r.artifact_option):
        if given and not (Path(given) / "manifest.json").is_file():
            raise QSO3Error(f"{given}: not a compiled artifact (no manifest.json)")
    _absolute_paths(cfg)


def _absolute_paths(cfg: BenchConfig) -> None:
    """Paths the user gave relative to here, made absolute: the workers run in the work folder."""
    for name in ("model_fp32", "model_int8", "tvm_fp32", "tvm_int8", "tvm_int8_tuned", "tuning_records"):
        given = getattr(cfg, name)
        if given and Path(given).exists():
            setattr(cfg, name, str(Path(given).resolve()))


def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Prepare every route, time them alternately, and write the reports; returns the JSON result."""
    _check_config(cfg)
    from ...compiler.targets import HOST, host_preset
    from ...nn.checkpoint import load_model, resolve_model_path

    if cfg.target == HOST:
        cfg.target = host_preset()

    ref_model = load_model(resolve_model_path(cfg.model_fp32))
    molecules = {w: workload_molecules(w, tuple(ref_model.cfg.species)) for w in cfg.workloads}
    cfg.extra["specialize"] = workload_buckets(molecules, ref_model.cfg)

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_start, t_start = loadavg(), time.time()
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    own_work = cfg.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="qso3-bench-")) if own_work else Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        log(f"work dir {work_dir}, cache {cache_dir}")
        prepared = _prepare_all(cfg, cache_dir, work_dir, log)
        runnable = [r for r in cfg.routes if "skip" not in prepared[r]]
        workloads, cases = build_cases(cfg, prepared, runnable, molecules, work_dir)
        measured = {t: _measure(cfg, t, runnable, prepared, cases, work_dir, log) for t in cfg.threads}
        load_end = loadavg()
        result = assemble(cfg, prepared, workloads, cases, measured, work_dir, molecules)
        result["environment"] = {"cpu": cpu_info(), "loadavg_start": load_start, "loadavg_end": load_end,
                                 "started": started, "wall_s": round(time.time() - t_start, 1),
                                 "versions": versions(), "git_commit": git_commit(),
                                 "command": cfg.command or bench_command(cfg), "cache_dir": str(cache_dir)}
        result["physical_limit"] = physical_limit(result, cfg)
        write_reports(result, Path(cfg.report_dir))
        return result
    finally:
        if own_work:
            shutil.rmtree(work_dir, ignore_errors=True)


# ---------------------------------------------------------------- the result
def _route_summary(r: str, prepared: dict, measured: dict) -> dict:
    p = prepared[r]
    summary = {"description": ROUTES[r].description,
               **{k: p.get(k) for k in ("model", "weight_bytes", "file_bytes", "source", "skip", "skip_modes",
                                        "prepare_s", "parity")}}
    summary["processes"] = {str(t): {k: measured[t][r].get(k) for k in ("peak_rss_kb", "rss_kb", "setup", "failed")}
                            for t in measured if r in measured[t]}
    return summary


def _case_entry(entry: dict, prepared: dict, per_route: dict, case: dict, ref: dict, ref_out, work_dir: Path) -> dict:
    """One route's result of one case: its statistics and deviation from the reference route, or why it is missing."""
    r, t, key = entry["route"], entry["threads"], entry["case"]
    rc = per_route.get(r, {}).get("cases", {}).get(key)
    if "skip" in prepared[r]:
        entry["skip"] = prepared[r]["skip"]
    elif not case["inputs"].get(r):
        entry["skip"] = "inputs could not be built for this model's species"
    elif rc is None:
        entry["skip"] = per_route.get(r, {}).get("failed", "no result")
    elif not rc.get("ok"):
        entry["skip"] = rc.get("skip")
    elif not rc["rounds"]:
        entry["skip"] = per_route[r].get("failed", "not timed")
    else:
        entry.update(stats(rc["rounds"]), first_call_s=rc.get("first_call_s"), ops_per_call=rc.get("ops_per_call"))
        if ref.get("rounds"):
            entry["speedup"] = paired_speedup(ref["rounds"], rc["rounds"])
        out = _load_out(work_dir, r, t, key)
        if ref_out is not None and out is not None:
            entry["max_abs_dE_mev"] = float(np.abs(out["energy"] - ref_out["energy"]).max() * 1e3)
            if "forces" in out and "forces" in ref_out:
                entry["max_abs_dF_mev_per_a"] = float(np.abs(out["forces"] - ref_out["forces"]).max() * 1e3)
    return entry


def assemble(cfg: BenchConfig, prepared: dict, workloads: dict, cases: list, measured: dict, work_dir: Path,
             molecules: dict) -> dict:
    routes = {r: _route_summary(r, prepared, measured) for r in cfg.routes}
    results = []
    for t, per_route in measured.items():
        for case in cases:
            key = case["key"]
            ref = per_route.get(REFERENCE_ROUTE, {}).get("cases", {}).get(key, {})
            ref_out = _load_out(work_dir, REFERENCE_ROUTE, t, key)
            for r in cfg.routes:
                entry = {"threads": t, "case": key, "workload": case["workload"], "mode": case["mode"], "route": r}
                results.append(_case_entry(entry, prepared, per_route, case, ref, ref_out, work_dir))
    return {"format": "qso3-tvm-bench/1", "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
            "routes": routes, "workloads": workloads, "results": results,
            "macs": {w: workload_macs(cfg.model_fp32, workloads[w], molecules[w][0]) for w in workloads}}


def _load_out(work_dir: Path, route: str, threads: int, key: str):
    path = out_path(work_dir, route, threads, key)
    if not path.exists():
        return None
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}
