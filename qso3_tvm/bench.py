"""`qso3-tvm bench`: every inference route side by side, each in its own process, timed alternately.

Routes (ROUTES): PyTorch eager fp32, torch.compile fp32, ONNX Runtime fp32 and int8 (dynamic
quantization of the fp32 graph), TVM fp32, TVM int8 untuned and tuned (compiled artifacts; given as
folders or compiled here into a cache). Workloads: one ethanol, one aspirin, 32 QM9-sized molecules;
energy only ("E") and energy+forces ("E+F"); 1 and 2 threads.

Method. Each route runs in its own long-lived worker process (qso3_tvm.bench_worker) with a fixed
thread count (torch and TVM thread pools in one process oversubscribe the cores). All inputs,
neighbor lists included, are built before timing; a timed call is the engine call from ready inputs
to outputs as numpy arrays. Workers warm up each case, then wait. For each case the parent runs
`rounds` rounds; in each round every route in turn (order rotated per round) runs one untimed call
and then timed calls until `budget_s` is spent (at least one). Only one worker runs at a time.
Speed-ups are paired: per round, the eager median over the route median; the report gives the median
over rounds. Peak RSS is the worker's own (ru_maxrss, setup included); weight bytes are the stored
model tensors of the route.

Reports: REPORT_DIR/bench.md, REPORT_DIR/bench/bench.json and bench.png, each written to a temporary
file and renamed: an interrupt leaves the previous report in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import queue
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import QSO3Error
from .files import atomic_write

ROUTES = {
    "eager-fp32": "PyTorch eager, fp32 checkpoint (the reference route)",
    "eager-int8": "PyTorch eager, int8 checkpoint in deployment form (qso3_tvm.int8: torch._int_mm GEMMs)",
    "compile-fp32": "torch.compile (inductor, dynamic shapes), fp32, dense one-hot readout",
    "ort-fp32": "ONNX Runtime, fp32 graph (torch.onnx dynamo exporter)",
    "ort-int8": "ONNX Runtime, quantize_dynamic int8 of the fp32 graph (int8 weights, dynamic u8 activations; "
                "not the QAT model)",
    "tvm-fp32": "TVM, fp32 checkpoint compiled for the target",
    "tvm-int8": "TVM, int8 QAT checkpoint compiled for the target (untuned)",
    "tvm-int8-tuned": "TVM, int8 QAT checkpoint compiled with tuning records",
}
DEFAULT_ROUTES = ("eager-fp32", "compile-fp32", "ort-fp32", "ort-int8", "tvm-fp32", "tvm-int8", "tvm-int8-tuned")
INT8_ROUTES = ("eager-int8", "ort-int8", "tvm-int8", "tvm-int8-tuned")
DEFAULT_WORKLOADS = ("ethanol-b1", "aspirin-b1", "qm9-b32")
MODES = ("E", "E+F")
REFERENCE_ROUTE = "eager-fp32"
# peak multiply-accumulates per cycle per core (AVX-512: two 512-bit FMA ports on Xeon server cores)
MAC_PER_CYCLE = {"fp32": 2 * 16, "int8": 2 * 64}
# qso3_tvm modules that never change a compiled artifact (everything else is hashed into cache keys)
NOT_COMPILE_INPUTS = {"bench.py", "bench_worker.py", "cli.py", "calculator.py", "md.py", "board.py", "serial_console.py",
                      "deploy.py", "experiments.py", "api.py", "train.py", "metrics.py"}


class RouteUnavailable(Exception):
    """A route that cannot run here, with the reason (reported in the table, not an error)."""


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
    target: str = "x86-avx512"
    tvm_fp32: str | None = None  # artifact folders; compiled into the cache when not given
    tvm_int8: str | None = None
    tvm_int8_tuned: str | None = None
    tuning_records: str | None = None  # compile tvm-int8-tuned here when compile_model supports it
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
            info["flags"] = sorted(f for f in value.split() if f.startswith(("avx512", "amx", "avx_vnni", "fma")))
    return info


def default_cache_dir() -> Path:
    return Path(os.environ.get("QSO3_CACHE", Path.home() / ".cache" / "qso3_tvm")) / "bench"


def file_sha(path: Path, n: int = 12) -> str:
    from .compile import sha256

    return sha256(Path(path))[:n]


def compile_sources_hash() -> str:
    """Hash of the package sources an artifact depends on (new kernel/schedule modules included)."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        if p.name not in NOT_COMPILE_INPUTS:
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()[:10]


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
    if name.startswith("qm9-b") and name[5:].isdigit():
        return qm9_molecules(int(name[5:]), species)
    raise QSO3Error(f"unknown workload {name!r} (ethanol-b1, aspirin-b1, qm9-bN)")


def qm9_molecules(n: int, species: tuple[int, ...], seed: int = 0) -> tuple[list, str]:
    """n QM9 molecules of 16-20 atoms (mean ~18) made of H, C, O only (what the bundled models
    were trained on); random H/C/O clouds of 18 atoms when QM9 (qm9pack) is not available."""
    hco = tuple(z for z in (1, 6, 8) if z in species) or tuple(species)
    try:
        from .data import load_qm9

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
    from .testing import random_molecule

    return ([random_molecule(18, species=hco, seed=seed + i) for i in range(n)],
            f"{n} random H/C/O clouds of 18 atoms (qso3_tvm.testing.random_molecule; {reason})")


def build_inputs(molecules: list, species: tuple[int, ...], cutoff: float, path: Path) -> dict:
    """Graph inputs (plain, and with the ghost molecule compiled artifacts expect) as one npz."""
    from .data import MoleculeSet, make_batch
    from .runtime import with_ghost

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
    return {"molecules": b.n_mol, "atoms": len(b.species), "edges": len(b.src)}


# ---------------------------------------------------------------- route preparation (in a subprocess)
def _model_info(path: Path, model) -> dict:
    from .quant import weight_bytes

    return {"model": str(path), "species": list(model.cfg.species), "cutoff": float(model.cfg.cutoff),
            "weight_bytes": int(weight_bytes(model)), "file_bytes": path.stat().st_size,
            "config": model.cfg.to_dict()}


def _energy_module(model):
    import torch

    class EnergyOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, species, pos, mol, src, dst, mol_slots):
            return self.model(species, pos, mol, src, dst, mol_slots.shape[0])

    return EnergyOnly().eval()


def export_onnx(model, path: Path, forces: bool) -> None:
    """fp32 ONNX graph with symbolic atom/edge/molecule counts. Energy+forces: the make_fx trace of
    the joint energy+gradient function (as qso3_tvm.export), with silu_backward decomposed (the
    ONNX exporter has no function for it)."""
    import torch
    from torch._decomp import get_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    from .export import EnergyForces, batch_inputs, example_batch

    model = model.eval()
    args = batch_inputs(example_batch(model))
    n, e, m = (torch.export.Dim(name, min=2) for name in ("atoms", "edges", "molecules"))
    shapes = ({0: n}, {0: n}, {0: n}, {0: e}, {0: e}, {0: m})
    if forces:
        with torch.enable_grad():
            traced = make_fx(EnergyForces(model), tracing_mode="symbolic", _allow_non_fake_inputs=True,
                             decomposition_table=get_decompositions([torch.ops.aten.silu_backward]))(*args)
        ep = torch.export.export(traced, args, dynamic_shapes=shapes)
    else:
        ep = torch.export.export(_energy_module(model), args, dynamic_shapes=shapes)
    tmp = path.with_name(f".{path.name}.tmp.onnx")
    torch.onnx.export(ep, args, str(tmp), dynamo=True, external_data=False, verbose=False)
    os.replace(tmp, path)


def onnx_weight_bytes(path: Path) -> int:
    import onnx
    from onnx import numpy_helper

    return int(sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer))


def _prepare_onnx(spec: dict, int8: bool) -> dict:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise RouteUnavailable(f"{e.name} not installed (pip install 'qso3-tvm[onnx]')") from None
    import torch

    from .checkpoint import load_model, resolve_model_path

    path = resolve_model_path(spec["model_fp32"])
    model = load_model(path)
    info = _model_info(path, model)
    key = f"{file_sha(path)}-torch{torch.__version__}-onnx{onnx.__version__}"
    folder = Path(spec["cache_dir"]) / f"onnx-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    onnx_paths, skip = {}, {}
    for mode, stem, forces in (("E", "energy", False), ("E+F", "energy_forces", True)):
        fp32 = folder / f"{stem}.onnx"
        try:
            if not fp32.exists():
                export_onnx(model, fp32, forces)
            target = fp32
            if int8:
                target = folder / f"{stem}_int8.onnx"
                if not target.exists():
                    from onnxruntime.quantization import QuantType, quantize_dynamic

                    tmp = target.with_name(f".{target.name}.tmp.onnx")
                    quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8)
                    os.replace(tmp, target)
            onnx_paths[mode] = str(target)
        except Exception as e:
            skip[mode] = f"{'energy+forces' if forces else 'energy'} graph not exported: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if not onnx_paths:
        raise RouteUnavailable("; ".join(skip.values()))
    main = onnx_paths.get("E+F", onnx_paths.get("E"))
    info.update(onnx=onnx_paths, skip_modes=skip, weight_bytes=onnx_weight_bytes(Path(main)),
                file_bytes=Path(main).stat().st_size, source=str(folder))
    if int8:
        info["model"] += " (quantize_dynamic int8)"
    return info


def _prepare_tvm(spec: dict) -> dict:
    from .checkpoint import load_model, resolve_model_path
    from .runtime import read_manifest

    route = spec["route"]
    given = spec.get("artifact")
    if given:
        folder = Path(given)
        source = f"given: {folder}"
    else:
        import inspect

        import tvm

        from .compile import compile_model

        model_spec = spec["model_fp32"] if route == "tvm-fp32" else spec["model_int8"]
        kwargs = {}
        if route == "tvm-int8-tuned":
            records = spec.get("tuning_records")
            if not records:
                raise RouteUnavailable("no tuned artifact: pass --tvm-int8-tuned DIR (an artifact compiled with "
                                       "--tuning-records) or --tuning-records DIR")
            if "tuning_records" not in inspect.signature(compile_model).parameters:
                raise RouteUnavailable("compile_model does not take tuning records yet: pass --tvm-int8-tuned DIR")
            kwargs["tuning_records"] = records
            rec_hash = hashlib.sha256()
            for p in sorted(Path(records).rglob("*.json")):
                rec_hash.update(p.read_bytes())
            tag = "-rec" + rec_hash.hexdigest()[:8]
        else:
            tag = ""
        path = resolve_model_path(model_spec)
        key = f"{route}-{file_sha(path)}-{spec['target']}-tvm{tvm.__version__}-src{compile_sources_hash()}{tag}"
        folder = Path(spec["cache_dir"]) / key
        if not (folder / "manifest.json").exists():
            compile_model(str(path), spec["target"], folder, check=True, log=lambda *a: print(*a, file=sys.stderr), **kwargs)
        source = f"compiled here into {folder}"
    manifest = read_manifest(folder)
    lib = folder / manifest["library"]
    wbytes = (manifest.get("quantization") or {}).get("stored_weight_bytes")
    ckpt = Path(manifest["model"].get("checkpoint", ""))
    if wbytes is None and ckpt.is_file():
        from .quant import weight_bytes

        wbytes = weight_bytes(load_model(ckpt))
    return {"artifact": str(folder), "species": manifest["model"]["species"], "cutoff": float(manifest["model"]["cutoff"]),
            "weight_bytes": wbytes, "file_bytes": lib.stat().st_size, "source": source,
            "model": f"{manifest['model'].get('checkpoint')} ({manifest['model'].get('precision')}, "
                     f"target {manifest['target']['name']})",
            "parity": manifest.get("parity"), "functions": manifest.get("functions")}


def prepare_route(spec: dict) -> dict:
    """Make the route's artifact (cached) and describe it; RouteUnavailable says why it cannot run."""
    route = spec["route"]
    if route in ("eager-fp32", "compile-fp32", "eager-int8"):
        from .checkpoint import load_model, resolve_model_path

        path = resolve_model_path(spec["model_int8" if route == "eager-int8" else "model_fp32"])
        model = load_model(path)
        info = _model_info(path, model)
        if route == "eager-int8":
            if getattr(model, "quant_cfg", None) is None:
                raise RouteUnavailable(f"{path} is not a quantized checkpoint")
            from .int8 import int8_weight_bytes, to_int8

            info["weight_bytes"] = int(int8_weight_bytes(to_int8(model)))
        return info
    if route in ("ort-fp32", "ort-int8"):
        return _prepare_onnx(spec, int8=route == "ort-int8")
    if route in ("tvm-fp32", "tvm-int8", "tvm-int8-tuned"):
        return _prepare_tvm(spec)
    raise QSO3Error(f"unknown route {route!r}")


# ---------------------------------------------------------------- workers
def _worker_env(threads: int, route: str) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TVM_NUM_THREADS"):
        env[k] = str(threads)
    if route.startswith("tvm"):
        env["TVM_USE_RUNTIME_LIB"] = "1"
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Worker:
    """A route's serving process; replies arrive on a queue (a reader thread scans stdout)."""

    def __init__(self, route: str, threads: int, spec: dict, work_dir: Path):
        from .bench_worker import REPLY

        self.route, self.threads = route, threads
        spec_path = work_dir / f"worker_{route}_t{threads}.json"
        spec_path.write_text(json.dumps(spec))
        self.log_path = work_dir / f"worker_{route}_t{threads}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "qso3_tvm.bench_worker", "serve", str(spec_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=_worker_env(threads, route), cwd=work_dir)
        self.replies: queue.Queue = queue.Queue()
        self.dead_reason: str | None = None

        def read():
            for line in self.proc.stdout:
                if line.startswith(REPLY):
                    self.replies.put(json.loads(line[len(REPLY):]))
            self.replies.put(None)

        threading.Thread(target=read, daemon=True).start()

    def tail(self, n: int = 3) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
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


def _prepare_all(cfg: BenchConfig, cache_dir: Path, work_dir: Path, log) -> dict:
    prepared = {}
    given = {"tvm-fp32": cfg.tvm_fp32, "tvm-int8": cfg.tvm_int8, "tvm-int8-tuned": cfg.tvm_int8_tuned}
    for route in cfg.routes:
        if route in ("eager-fp32", "eager-int8", "compile-fp32"):  # a checkpoint only: no subprocess needed
            t0 = time.time()
            try:
                info = prepare_route({"route": route, "model_fp32": cfg.model_fp32, "model_int8": cfg.model_int8})
            except RouteUnavailable as e:
                info = {"skip": str(e)}
            prepared[route] = {**info, "prepare_s": round(time.time() - t0, 1)}
            log(f"[prepare] {route}: " + (f"skipped: {info['skip']}" if "skip" in info else "ready"))
            continue
        spec = {"route": route, "model_fp32": cfg.model_fp32, "model_int8": cfg.model_int8, "target": cfg.target,
                "cache_dir": str(cache_dir), "artifact": given.get(route), "tuning_records": cfg.tuning_records}
        spec_path, out_path = work_dir / f"prepare_{route}.json", work_dir / f"prepare_{route}.out.json"
        spec_path.write_text(json.dumps(spec))
        t0 = time.time()
        with open(work_dir / f"prepare_{route}.log", "w") as fh:
            rc = subprocess.run([sys.executable, "-m", "qso3_tvm.bench_worker", "prepare", str(spec_path), str(out_path)],
                                stdout=fh, stderr=subprocess.STDOUT, env=_worker_env(2, "prepare"), cwd=work_dir,
                                timeout=cfg.setup_timeout_s).returncode
        if out_path.exists():
            info = json.loads(out_path.read_text())
        else:
            info = {"skip": f"preparation crashed (exit {rc}; log {work_dir / f'prepare_{route}.log'})"}
        info["prepare_s"] = round(time.time() - t0, 1)
        prepared[route] = info
        log(f"[prepare] {route}: " + (f"skipped: {info['skip']}" if "skip" in info else f"ready ({info['prepare_s']} s)"))
    return prepared


def _measure(cfg: BenchConfig, threads: int, routes: list[str], prepared: dict, cases: list[dict],
             work_dir: Path, log) -> dict:
    """Start one worker per route, wait until all are warm, then alternate them case by case."""
    out = {r: {"cases": {}, "setup": None} for r in routes}
    workers: dict[str, Worker] = {}
    try:
        for route in routes:
            info = prepared[route]
            rcases = [{"key": c["key"], "mode": c["mode"], "inputs": c["inputs"][route]} for c in cases if c["inputs"].get(route)]
            spec = {**info, "route": route, "threads": threads, "warmup": cfg.warmup, "cases": rcases,
                    "work_dir": str(work_dir)}
            workers[route] = Worker(route, threads, spec, work_dir)
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
        for case in cases:
            key = case["key"]
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
        for route, w in workers.items():
            try:
                w.send({"cmd": "quit"})
                bye = w.get(60)
                out[route]["peak_rss_kb"], out[route]["rss_kb"] = bye["peak_rss_kb"], bye["rss_kb"]
            except (RuntimeError, OSError) as e:
                out[route]["failed"] = out[route].get("failed") or f"no exit report: {e}"
    finally:
        for w in workers.values():
            w.stop()
    return out


# ---------------------------------------------------------------- statistics and the physical limit
def stats(rounds: list[list[float]]) -> dict | None:
    samples = np.array(sum(rounds, []))
    if not len(samples):
        return None
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    return {"median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "iqr_ms": (q3 - q1) * 1e3,
            "iqr_rel": (q3 - q1) / med, "min_ms": samples.min() * 1e3, "n": int(len(samples)), "rounds": len(rounds),
            "round_medians_ms": [float(np.median(r)) * 1e3 for r in rounds]}


def paired_speedup(ref_rounds: list[list[float]], rounds: list[list[float]]) -> dict | None:
    """Per round: reference median / route median (the routes alternate within a round)."""
    n = min(len(ref_rounds), len(rounds))
    if not n:
        return None
    r = np.array([np.median(ref_rounds[i]) / np.median(rounds[i]) for i in range(n)])
    return {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max()), "rounds": n}


def mac_count(cfg: dict, atoms: int, edges: int) -> dict:
    """Multiply-accumulates of one forward pass, from the model config (see qso3_tvm.model):
    per layer and edge: radial filter MLP (R->F->3F) plus ~23F elementwise (q/k normalisation and dot,
    attention weight, scalar and vector messages, neighbor sums); per layer and atom: q, k (FxF),
    value (Fx2F), W v and vec_uv on 3 components (3FxF, 3Fx2F), update MLP (2F->F->3F) plus ~12F
    elementwise; energy head F->F->1; radial basis R per edge. Forces need input gradients only: the
    backward of a Linear is one product (dX = dY W, no weight gradient), 1x its forward (FlopCounterMode
    agrees), the elementwise backward ~2x its forward; so E+F = 2 x Linear + 3 x elementwise."""
    F, L, R = cfg["channels"], cfg["layers"], cfg["n_rbf"]
    edge_lin, atom_lin = R * F + 3 * F * F, 18 * F * F
    lin = L * (edges * edge_lin + atoms * atom_lin) + atoms * (F * F + F)
    elem = L * (edges * 23 * F + atoms * 12 * F) + edges * R
    return {"forward_linear": int(lin), "forward_elementwise": int(elem), "forward": int(lin + elem),
            "energy_forces": int(2 * lin + 3 * elem), "edge_share": L * edges * (edge_lin + 23 * F) / (lin + elem)}


def counted_linear_macs(model_spec: str, molecules: list) -> dict:
    """Matrix-product MACs of one eager pass, counted by torch's FlopCounterMode (forward; forward+backward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .checkpoint import load_model
    from .data import MoleculeSet, make_batch

    model = load_model(model_spec)
    mols = MoleculeSet.from_molecules(molecules)
    b = make_batch(mols, range(len(mols)), model.cfg.species, model.cfg.cutoff)
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        model(b.species, b.pos, b.mol, b.src, b.dst, b.n_mol)
    for prm in model.parameters():  # count dE/dpos only, not weight gradients
        prm.requires_grad_(False)
    pos = b.pos.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as both:  # (autograd.grad inside the mode is not supported)
        model(b.species, pos, b.mol, b.src, b.dst, b.n_mol).sum().backward()
    return {"forward": fwd.get_total_flops() // 2, "energy_forces": both.get_total_flops() // 2}


def peaks(cpu: dict, cores: int) -> dict:
    ghz = (cpu.get("mhz") or 2000.0) / 1e3
    flags = set(cpu.get("flags", []))
    out = {"cores": cores, "ghz": ghz, "clock_source": "/proc/cpuinfo 'cpu MHz'" if cpu.get("mhz") else "assumed 2.0 GHz",
           "fp32_gmac_s": cores * ghz * MAC_PER_CYCLE["fp32"] if "avx512f" in flags else cores * ghz * 16,
           "int8_gmac_s": cores * ghz * MAC_PER_CYCLE["int8"] if "avx512_vnni" in flags else None}
    return out


def floor_ms(macs: dict, mode: str, int8: bool, pk: dict) -> float:
    lin = macs["forward_linear"] * (2 if mode == "E+F" else 1)
    elem = macs["forward_elementwise"] * (3 if mode == "E+F" else 1)
    fp32 = pk["fp32_gmac_s"] * 1e9
    if int8 and pk.get("int8_gmac_s"):
        return (lin / (pk["int8_gmac_s"] * 1e9) + elem / fp32) * 1e3
    return (lin + elem) / fp32 * 1e3


# ---------------------------------------------------------------- the run
def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Prepare every route, time them alternately, and write the reports; returns the JSON result."""
    bad = [r for r in cfg.routes if r not in ROUTES]
    if bad:
        raise QSO3Error(f"unknown route(s) {bad}; choose from {list(ROUTES)}")
    bad = [m for m in cfg.modes if m not in MODES]
    if bad:
        raise QSO3Error(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    if not cfg.threads or any(t < 1 for t in cfg.threads) or cfg.rounds < 1:
        raise QSO3Error("--threads must be positive integers and --rounds >= 1")
    for given in (cfg.tvm_fp32, cfg.tvm_int8, cfg.tvm_int8_tuned):
        if given and not (Path(given) / "manifest.json").is_file():
            raise QSO3Error(f"{given}: not a compiled artifact (no manifest.json)")
    from .checkpoint import load_model, resolve_model_path

    if threading.current_thread() is threading.main_thread():  # SIGTERM cleans up like Ctrl-C (workers stopped)
        import signal

        def _interrupt(*_):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _interrupt)
    ref_model = load_model(resolve_model_path(cfg.model_fp32))
    molecules = {w: workload_molecules(w, tuple(ref_model.cfg.species)) for w in cfg.workloads}

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
        # inputs per (workload, graph signature)
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
        measured = {}
        for t in cfg.threads:
            measured[t] = _measure(cfg, t, runnable, prepared, cases, work_dir, log)
        load_end = loadavg()
        result = assemble(cfg, prepared, workloads, cases, measured, work_dir, molecules)
        result["environment"] = {"cpu": cpu_info(), "loadavg_start": load_start, "loadavg_end": load_end,
                                 "started": started, "wall_s": round(time.time() - t_start, 1),
                                 "versions": versions(), "git_commit": _git_commit(),
                                 "command": cfg.command or bench_command(cfg), "cache_dir": str(cache_dir)}
        result["physical_limit"] = physical_limit(result, cfg)
        write_reports(result, Path(cfg.report_dir))
        return result
    finally:
        if own_work:
            shutil.rmtree(work_dir, ignore_errors=True)


def _git_commit() -> str | None:
    from .compile import git_commit

    return git_commit()


def assemble(cfg: BenchConfig, prepared: dict, workloads: dict, cases: list, measured: dict, work_dir: Path,
             molecules: dict) -> dict:
    routes = {}
    for r in cfg.routes:
        p = prepared[r]
        routes[r] = {"description": ROUTES[r], **{k: p.get(k) for k in ("model", "weight_bytes", "file_bytes", "source",
                                                                          "skip", "skip_modes", "prepare_s", "parity")}}
        routes[r]["processes"] = {str(t): {k: measured[t][r].get(k) for k in ("peak_rss_kb", "rss_kb", "setup", "failed")}
                                  for t in measured if r in measured[t]}
    results = []
    for t, per_route in measured.items():
        for case in cases:
            key = case["key"]
            ref = per_route.get(REFERENCE_ROUTE, {}).get("cases", {}).get(key, {})
            ref_out = _load_out(work_dir, REFERENCE_ROUTE, t, key)
            for r in cfg.routes:
                entry = {"threads": t, "case": key, "workload": case["workload"], "mode": case["mode"], "route": r}
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
                results.append(entry)
    return {"format": "qso3-tvm-bench/1", "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
            "routes": routes, "workloads": workloads, "results": results,
            "macs": {w: _macs(cfg, workloads[w], molecules[w][0]) for w in workloads}}


def _macs(cfg: BenchConfig, wl: dict, mols: list) -> dict:
    from .checkpoint import load_payload

    if wl.get("edges") is None:
        return {}
    out = mac_count(load_payload(cfg.model_fp32)["config"], wl["atoms"], wl["edges"])
    try:
        out["counted_linear"] = counted_linear_macs(cfg.model_fp32, mols)
    except Exception as e:  # informational
        out["counted_linear"] = {"error": str(e)}
    return out


def _load_out(work_dir: Path, route: str, threads: int, key: str):
    from .bench_worker import out_path

    path = out_path(work_dir, route, threads, key)
    if not path.exists():
        return None
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def physical_limit(result: dict, cfg: BenchConfig) -> dict:
    cpu = result["environment"]["cpu"]
    pk = peaks(cpu, max(cfg.threads))
    rows = []
    for e in result["results"]:
        macs = result["macs"].get(e["workload"])
        if "median_ms" not in e or not macs:
            continue
        fl = floor_ms(macs, e["mode"], e["route"] in INT8_ROUTES, pk)
        row = {k: e[k] for k in ("threads", "workload", "mode", "route", "median_ms")}
        row.update(floor_ms=fl, fraction_of_peak=fl / e["median_ms"] * (max(cfg.threads) / e["threads"]))
        if e.get("ops_per_call"):
            row["us_per_op"] = e["median_ms"] * 1e3 / e["ops_per_call"]
            row["ops_per_call"] = e["ops_per_call"]
        rows.append(row)
    return {"peaks": pk, "rows": rows}


# ---------------------------------------------------------------- reports
def _fmt_ms(x: float) -> str:
    return f"{x:.3g}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def _fmt_bytes(n) -> str:
    return "—" if n is None else f"{n:,}"


def render_markdown(res: dict) -> str:
    env, cfgd = res["environment"], res["config"]
    cpu = env["cpu"]
    L = ["# Inference routes side by side", "",
         "Generated by `qso3-tvm bench` (qso3_tvm/bench.py); rerun the command below to refresh it.", "",
         "```bash", env["command"], "```", "",
         f"- started {env['started']}, wall time {env['wall_s']:.0f} s, git commit `{env.get('git_commit')}`",
         f"- CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs, {cpu.get('mhz')} MHz (/proc/cpuinfo); "
         f"flags: {' '.join(cpu['flags'])}",
         f"- load average (1/5/15 min) at start {env['loadavg_start']}, at end {env['loadavg_end']} "
         "(the machine is shared: a load above the thread count means other processes competed for the cores)",
         "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
         f"- method: every route in its own process with a fixed thread count; per case {cfgd['rounds']} rounds, "
         f"routes alternating within a round (order rotated), each running one untimed call then timed calls for "
         f"{cfgd['budget_s']} s (at least 1, at most {cfgd['max_calls']}); {cfgd['warmup']} warm-up calls at setup. "
         "A timed call starts from ready inputs (neighbor lists built beforehand) and ends with outputs as numpy arrays. "
         "Speed-up = per-round median of eager fp32 / median of the route, median over rounds (min-max in brackets).",
         "- TVM artifacts take a ghost molecule (2 atoms) with every call (qso3_tvm.runtime); it is in the timing.", ""]
    L += ["## Routes", "", "| route | what | model | weight bytes | file bytes | peak RSS (MB) per threads | status |",
          "|---|---|---|---|---|---|---|"]
    for r, info in res["routes"].items():
        rss = ", ".join(f"{t}t: {p['peak_rss_kb'] / 1024:.0f}" for t, p in info.get("processes", {}).items()
                        if p.get("peak_rss_kb"))
        status = f"skipped: {info['skip']}" if info.get("skip") else "ran"
        if info.get("skip_modes"):
            status += "; " + "; ".join(f"{m}: {why}" for m, why in info["skip_modes"].items())
        fails = [f"{t}t: {p['failed']}" for t, p in info.get("processes", {}).items() if p.get("failed")]
        if fails:
            status += "; " + "; ".join(fails)
        L.append(f"| {r} | {info['description']} | {info.get('model') or '—'} | {_fmt_bytes(info.get('weight_bytes'))} | "
                 f"{_fmt_bytes(info.get('file_bytes'))} | {rss or '—'} | {status} |")
    L += ["", "Weight bytes: stored model tensors of the route (quantized weights at their bit width plus steps, "
          "float biases); file bytes: the checkpoint, ONNX file or compiled library. Peak RSS: the route process "
          "(ru_maxrss), setup (loading, compiling, warm-up) included. TVM workers load the TVM runtime only (no torch) "
          "unless the library needs more.", ""]
    L += ["## Workloads", "", "| workload | molecules | atoms | directed edges (5 Å) | source |", "|---|---|---|---|---|"]
    for w, info in res["workloads"].items():
        L.append(f"| {w} | {info['molecules']} | {info['atoms']} | {info.get('edges') or '—'} | {info['source']} |")
    L += ["", "The bundled models are trained on ethanol (elements H, C, O); aspirin (C9H8O4) and the H/C/O QM9 "
          "molecules use the same elements, so the ethanol models run them: timing only, the energies mean nothing.", ""]
    threads = sorted({e["threads"] for e in res["results"]})
    for t in threads:
        L += [f"## {t} thread{'s' if t > 1 else ''}", ""]
        for key in dict.fromkeys(e["case"] for e in res["results"]):
            rows = [e for e in res["results"] if e["threads"] == t and e["case"] == key]
            wl, mode = key.split("/")
            L += [f"### {wl}, {'energy only' if mode == 'E' else 'energy + forces'} ({t} thread{'s' if t > 1 else ''})", "",
                  "| route | median ms | IQR ms (rel.) | n | speed-up vs eager fp32 | ops/call | max abs dE (meV) | max abs dF (meV/Å) |",
                  "|---|---|---|---|---|---|---|---|"]
            for e in rows:
                if "median_ms" not in e:
                    L.append(f"| {e['route']} | — | | | | | | {e.get('skip', '')} |")
                    continue
                sp = e.get("speedup")
                sp_s = f"{sp['median']:.2f}× [{sp['min']:.2f}–{sp['max']:.2f}]" if sp else "—"
                dE = f"{e['max_abs_dE_mev']:.3g}" if "max_abs_dE_mev" in e else "—"
                dF = f"{e['max_abs_dF_mev_per_a']:.3g}" if "max_abs_dF_mev_per_a" in e else "—"
                L.append(f"| {e['route']} | {_fmt_ms(e['median_ms'])} | {_fmt_ms(e['iqr_ms'])} ({100 * e['iqr_rel']:.0f} %) | "
                         f"{e['n']} | {sp_s} | {e.get('ops_per_call') or '—'} | {dE} | {dF} |")
            L.append("")
    L += ["ops/call: ATen operators dispatched (eager), nodes of the optimized ONNX graph (ONNX Runtime), VM kernel "
          "calls (TVM; allocation builtins not counted); torch.compile: not counted. dE, dF: deviation from eager "
          "fp32 on the same inputs (int8 routes: quantization error, and for ort-int8 an un-retrained model).", ""]
    L += render_physical_limit(res)
    L += ["![median time per route](bench/bench.png)", "", "Raw data: `reports/bench/bench.json`.", ""]
    return "\n".join(L)


def render_physical_limit(res: dict) -> list[str]:
    pl = res["physical_limit"]
    pk = pl["peaks"]
    L = ["## Physical limit", "",
         f"Peak arithmetic on {pk['cores']} core{'s' if pk['cores'] > 1 else ''} at {pk['ghz']:.2f} GHz ({pk['clock_source']}; turbo and the AVX-512 "
         f"frequency licence are unknown in this VM, so this is the nominal clock): fp32 AVX-512 FMA "
         f"{pk['cores']} × {pk['ghz']:.2f} GHz × 32 MAC/cycle (2 FMA ports × 16 lanes) = {pk['fp32_gmac_s']:.0f} GMAC/s; "
         + (f"int8 AVX-512 VNNI (vpdpbusd, 64 MAC per instruction, 2 ports assumed) = {pk['int8_gmac_s']:.0f} GMAC/s. "
            if pk.get("int8_gmac_s") else "no AVX-512 VNNI. ")
         + "AMX-INT8 would be far higher but no route here uses it.", "",
         "Multiply-accumulates of one pass, counted from the model config (qso3_tvm.bench.mac_count: per layer "
         "and edge the radial filter MLP R→F→3F plus ~23F elementwise; per layer and atom the q, k, value, vector "
         "and update Linears, 18F², plus ~12F elementwise). Energy+forces: forces need only input gradients, so the "
         "backward of a Linear is one product (1 × its forward) and the elementwise backward ≈ 2 × its forward: "
         "E+F = 2 × Linear + 3 × elementwise, about 2.1 × forward (the usual 'backward ≈ 2 × forward' counts weight "
         "gradients too and would give 3 ×). 'counted' is torch's FlopCounterMode on the eager model (matrix products "
         "only, forward and forward+input-backward); it matches the Linear column.", "",
         "| workload | atoms | edges | forward MAC | of which Linear | per-edge share | E+F MAC | counted Linear MAC fwd / E+F | "
         "fp32 floor E / E+F (ms) | int8 floor E / E+F (ms) |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for w, m in res["macs"].items():
        if not m:
            continue
        wl = res["workloads"][w]
        c = m.get("counted_linear", {})
        cs = f"{c['forward'] / 1e6:.1f} M / {c['energy_forces'] / 1e6:.1f} M" if "forward" in c else "—"
        f32 = [floor_ms(m, mode, False, pk) for mode in MODES]
        i8 = [floor_ms(m, mode, True, pk) for mode in MODES]
        L.append(f"| {w} | {wl['atoms']} | {wl['edges']} | {m['forward'] / 1e6:.1f} M | {m['forward_linear'] / 1e6:.1f} M | "
                 f"{100 * m['edge_share']:.0f} % | {m['energy_forces'] / 1e6:.1f} M | {cs} | "
                 f"{f32[0]:.3f} / {f32[1]:.3f} | {i8[0]:.3f} / {i8[1]:.3f} |")
    L += ["", f"Each route against its floor (fp32 floor for fp32 routes, int8 floor for int8 routes, both for "
          f"{pk['cores']} core{'s' if pk['cores'] > 1 else ''}; a run with fewer threads is compared with the floor "
          "scaled to its thread count):", "",
          "| threads | workload | mode | route | median ms | floor ms | share of peak | ops/call | µs per op |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in pl["rows"]:
        L.append(f"| {r['threads']} | {r['workload']} | {r['mode']} | {r['route']} | {_fmt_ms(r['median_ms'])} | "
                 f"{r['floor_ms']:.3f} | {100 * r['fraction_of_peak']:.1f} % | {r.get('ops_per_call', '—')} | "
                 f"{r['us_per_op']:.1f} |" if "us_per_op" in r else
                 f"| {r['threads']} | {r['workload']} | {r['mode']} | {r['route']} | {_fmt_ms(r['median_ms'])} | "
                 f"{r['floor_ms']:.3f} | {100 * r['fraction_of_peak']:.1f} % | — | — |")
    L += ["", *overhead_verdict(res), ""]
    return L


def overhead_verdict(res: dict) -> list[str]:
    """Generated conclusions: is batch 1 overhead-bound, and what overhead remains."""
    rows = res["physical_limit"]["rows"]
    out = []
    b1 = [r for r in rows if r["workload"].endswith("-b1")]
    if b1:
        worst = max(r["fraction_of_peak"] for r in b1)
        with_ops = [r for r in b1 if "us_per_op" in r]
        line = (f"- Batch 1 is overhead-bound: the best route reaches {100 * worst:.1f} % of the arithmetic peak "
                if worst < 0.1 else f"- Batch 1: the best route reaches {100 * worst:.1f} % of the arithmetic peak ")
        if with_ops:
            lo, hi = min(r["us_per_op"] for r in with_ops), max(r["us_per_op"] for r in with_ops)
            line += (f"while one call issues {min(r['ops_per_call'] for r in with_ops)}–"
                     f"{max(r['ops_per_call'] for r in with_ops)} operator/kernel calls at {lo:.1f}–{hi:.1f} µs each: "
                     "the time is per-operator dispatch, small-kernel launch and memory traffic of edge-sized "
                     "intermediates, not multiply-accumulates.")
        out.append(line)
    for route in dict.fromkeys(r["route"] for r in rows):
        pair = {(r["workload"], r["mode"], r["threads"]): r for r in rows if r["route"] == route}
        for (w, mode, t), r in pair.items():
            if not w.startswith("qm9-b") or not r.get("ops_per_call"):
                continue
            single = [x for (w2, m2, t2), x in pair.items() if w2.endswith("-b1") and m2 == mode and t2 == t
                      and x.get("ops_per_call")]
            if single:
                s = min(single, key=lambda x: x["median_ms"])
                n_mol = int(w[5:])
                out.append(f"- {route}, {mode}, {t} thread(s): {s['workload']} {_fmt_ms(s['median_ms'])} ms vs "
                           f"{_fmt_ms(r['median_ms'] / n_mol)} ms per molecule in {w} "
                           f"({s['ops_per_call']} vs {r['ops_per_call']} ops per call): batching amortises "
                           f"{100 * max(0.0, 1 - (r['median_ms'] / n_mol) / s['median_ms']):.0f} % of the single-molecule time.")
    return out


def render_chart(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({e["threads"] for e in res["results"]})
    cases = list(dict.fromkeys(e["case"] for e in res["results"]))
    routes = [r for r in res["routes"] if any("median_ms" in e for e in res["results"] if e["route"] == r)]
    fig, axes = plt.subplots(len(threads), 1, figsize=(max(8, 1.3 * len(cases) * max(1, len(routes)) / 3), 3.6 * len(threads)),
                             squeeze=False)
    width = 0.8 / max(1, len(routes))
    for ax, t in zip(axes[:, 0], threads):
        for i, r in enumerate(routes):
            ys, lo, hi, xs = [], [], [], []
            for j, c in enumerate(cases):
                e = next((e for e in res["results"] if e["threads"] == t and e["case"] == c and e["route"] == r), None)
                if e and "median_ms" in e:
                    xs.append(j + (i - (len(routes) - 1) / 2) * width)
                    ys.append(e["median_ms"])
                    lo.append(e["median_ms"] - e["q1_ms"])
                    hi.append(e["q3_ms"] - e["median_ms"])
            ax.bar(xs, ys, width, yerr=[lo, hi], label=r, capsize=2)
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)), cases, fontsize=8)
        ax.set_ylabel("median ms per call (IQR)")
        ax.set_title(f"{t} thread{'s' if t > 1 else ''}")
        ax.grid(axis="y", alpha=0.3, which="both")
    if routes:
        axes[0, 0].legend(fontsize=7, ncol=min(4, len(routes)))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_reports(res: dict, report_dir: Path) -> dict:
    """bench/bench.json and bench/bench.png first, bench.md last; each atomically."""
    sub = report_dir / "bench"
    paths = {"json": sub / "bench.json", "png": sub / "bench.png", "md": report_dir / "bench.md"}
    atomic_write(paths["json"], json.dumps(res, indent=1, default=float))
    try:
        render_chart(res, paths["png"])
    except ImportError as e:
        res["chart"] = f"not drawn: {e} (pip install 'qso3-tvm[plot]')"
    atomic_write(paths["md"], render_markdown(res))
    res["reports"] = {k: str(v) for k, v in paths.items()}
    return res["reports"]


def bench_command(cfg: BenchConfig) -> str:
    """The `qso3-tvm bench` command line that reruns this configuration (options that differ from the defaults)."""
    default = BenchConfig()
    flags = {"model_fp32": "--model-fp32", "model_int8": "--model-int8", "routes": "--routes", "workloads": "--workloads",
             "modes": "--modes", "threads": "--threads", "rounds": "--rounds", "budget_s": "--budget-ms",
             "max_calls": "--max-calls", "warmup": "--warmup", "target": "--target", "tvm_fp32": "--tvm-fp32",
             "tvm_int8": "--tvm-int8", "tvm_int8_tuned": "--tvm-int8-tuned", "tuning_records": "--tuning-records",
             "cache_dir": "--cache-dir", "work_dir": "--work-dir", "report_dir": "--report-dir"}
    parts = ["qso3-tvm", "bench"]
    for name, flag in flags.items():
        value, dflt = getattr(cfg, name), getattr(default, name)
        if value is None or tuple(value) == tuple(dflt) if isinstance(value, (tuple, list)) else value == dflt:
            continue
        if isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value)
        elif name == "budget_s":
            value = f"{value * 1e3:g}"
        parts += [flag, str(value)]
    return " ".join(shlex.quote(x) for x in parts)
