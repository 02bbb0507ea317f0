"""Deploy and profile a compiled artifact on a board over TVM RPC (direct or through a tracker).

`profile` checks the artifact's manifest against the board (ISA, CPU features: a +dotprod artifact is
refused on a board without it, before anything runs), runs energy+forces on the sample molecules and
compares them with the reference stored at compile time, times the module with the runtime's time
evaluator, and writes reports/<date>_<model>_<board>.{json,md}. Emulated boards are labelled as such.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from .data import MoleculeSet
from .errors import QSO3Error
from .files import atomic_write
from .runtime import CompiledModel, max_errors, read_manifest, sample_set

TRACKER_ENV = ("TVM_TRACKER_HOST", "TVM_TRACKER_PORT", "TVM_TRACKER_KEY")
# profile tolerances: the board runs the same float32 code as the compile-time check
PROFILE_TOL_MEV = {"fp32": (0.5, 0.5), "quantized": (30.0, 50.0)}  # see compile.DEFAULT_TOL_MEV


def split_addr(addr: str, what: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise QSO3Error(f"{what} must be HOST:PORT, not {addr!r}")
    return host, int(port)


def connect(rpc: str | None = None, tracker: str | None = None, key: str | None = None, timeout: int = 60):
    """An RPC session: direct (`rpc` HOST:PORT, with `key` if the board has one), or a board of `key`
    from a tracker (flags, else TVM_TRACKER_HOST/PORT/KEY)."""
    from tvm import rpc as tvm_rpc

    if rpc is None and tracker is None and os.environ.get("TVM_TRACKER_HOST"):
        tracker = f"{os.environ['TVM_TRACKER_HOST']}:{os.environ.get('TVM_TRACKER_PORT', '9190')}"
    key = key or os.environ.get("TVM_TRACKER_KEY")
    try:
        if rpc:
            host, port = split_addr(rpc, "--rpc")
            return tvm_rpc.connect(host, port, key=key or "", session_timeout=timeout)
        if tracker:
            if not key:
                raise QSO3Error("--rpc-tracker needs --rpc-key (or TVM_TRACKER_KEY)")
            host, port = split_addr(tracker, "--rpc-tracker")
            return tvm_rpc.connect_tracker(host, port).request(key, session_timeout=timeout)
    except QSO3Error:
        raise
    except Exception as e:  # socket errors, key mismatch, no board under the key
        raise QSO3Error(f"cannot reach the board ({rpc or tracker}, key {key!r}): {str(e).strip().splitlines()[-1]}") from None
    raise QSO3Error("give --rpc HOST:PORT or --rpc-tracker HOST:PORT --rpc-key KEY (or set TVM_TRACKER_HOST)")


def board_info(session) -> dict:
    try:
        return json.loads(session.get_function("qso3.board.info")())
    except AttributeError:  # a stock TVM RPC server (python -m tvm.exec.rpc_server)
        return {"label": "tvm-rpc-server", "machine": None, "features": None}


def check_compatible(manifest: dict, info: dict) -> None:
    """Refuse, before running, an artifact the board cannot execute."""
    target = manifest["target"]
    if info.get("machine") and info["machine"] != target["arch"]:
        raise QSO3Error(f"artifact is for {target['arch']} ({target['name']}), the board is {info['machine']}")
    if info.get("features") is not None:
        missing = sorted(set(target["cpu_features"]) - set(info["features"]))
        if missing:
            raise QSO3Error(f"artifact {target['name']} needs CPU features {missing} that board "
                            f"{info.get('label')} lacks (e.g. +dotprod needs asimddp): compile for a matching target")


def cuda_device(session, manifest: dict, info: dict):
    """The board's GPU, checked against the artifact's CUDA arch (its fatbin runs on that arch or newer)."""
    label = info.get("label")
    if info.get("cuda_runtime", "loaded") != "loaded":
        raise QSO3Error(f"board {label} cannot run CUDA artifacts: its CUDA runtime is {info['cuda_runtime']!r} "
                        "(the firmware needs lib/libtvm_runtime_cuda.so, the NVIDIA driver and libcudart.so.13)")
    dev = session.cuda(0)
    if not dev.exist:
        raise QSO3Error(f"board {label} has no CUDA device, and artifact {manifest['target']['name']} needs one")
    need = manifest["target"]["tvm"]["arch"].removeprefix("sm_")
    have = dev.compute_version.replace(".", "")
    if int(have) < int(need):
        raise QSO3Error(f"artifact {manifest['target']['name']} is built for sm_{need}; the board's GPU "
                        f"({dev.device_name}) is sm_{have}: compile for a matching target")
    return dev


class RemoteModel(CompiledModel):
    """A compiled artifact uploaded to a board and run there."""

    def __init__(self, session, path: str | Path, info: dict | None = None):
        from tvm.runtime.vm import VirtualMachine  # runtime-only TVM installs have no tvm.relax

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.session, self.board = session, info or board_info(session)
        check_compatible(self.manifest, self.board)
        cuda = self.manifest["target"]["device"] == "cuda"
        self.device = cuda_device(session, self.manifest, self.board) if cuda else session.cpu()
        self.device_label = (f"cuda ({self.device.device_name}, sm_{self.device.compute_version.replace('.', '')})"
                             if cuda else "cpu")
        session.upload(str(self.path / self.manifest["library"]))
        lib = session.load_module(self.manifest["library"])
        self.vm = VirtualMachine(lib, self.device)
        self._getitem = session.get_function("ffi.ArrayGetItem")  # tuples do not cross RPC: index remotely

    def call(self, args):
        out = self.vm["main"](*args)
        return self._getitem(out, 0).numpy(), self._getitem(out, 1).numpy()

    def time(self, mols: MoleculeSet, frames, repeat: int, number: int) -> dict:
        """TVM's timing summary (ms) of one energy+forces call on the frames."""
        args, _ = self.inputs(mols, frames)
        self.vm.set_input("main", *args)
        timer = self.vm.time_evaluator("invoke_stateful", self.device, number=number, repeat=repeat)
        runs_ms = np.asarray(timer("main").results) * 1e3
        return {"mean": float(runs_ms.mean()), "median": float(np.median(runs_ms)), "max": float(runs_ms.max()),
                "min": float(runs_ms.min()), "std": float(runs_ms.std()), "repeat": repeat, "number": number}


def profile(artifact: str | Path, rpc: str | None = None, tracker: str | None = None, key: str | None = None,
            repeat: int = 10, number: int = 1, report_dir: str | Path | None = "reports", log=print) -> dict:
    """Verify and time an artifact on a board; writes the report pair unless report_dir is None."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    session = connect(rpc, tracker, key)
    info = board_info(session)
    log(f"board {info.get('label')} ({info.get('machine')}) via {rpc or tracker}")
    remote = RemoteModel(session, artifact, info)
    if remote.device_label != "cpu":
        log(f"device {remote.device_label}")
    mols, samples = sample_set(remote.species)
    try:
        energies, forces = remote.predict(mols)
        errors = max_errors(manifest["reference"], energies, forces)
        first = mols.offsets[1]
        timing = {"one_molecule": {"molecule": samples[0], "atoms": int(first), **remote.time(mols, [0], repeat, number)},
                  "all_samples": {"molecules": len(samples), **remote.time(mols, range(len(samples)), repeat, number)}}
    except QSO3Error:
        raise
    except Exception as e:  # the board died or the session broke mid-run
        raise QSO3Error(f"board {info.get('label')} failed during the run: {str(e).strip().splitlines()[-1]}") from None
    tol_e, tol_f = PROFILE_TOL_MEV["fp32" if manifest["model"]["precision"] == "fp32" else "quantized"]
    verified = errors["max_energy_error_mev"] <= tol_e and errors["max_force_error_mev_per_a"] <= tol_f
    emulated = str(info.get("label", "")).startswith("emulated")
    result = {"artifact": str(artifact), "model": manifest["model"], "target": manifest["target"]["name"],
              "board": info, "device": remote.device_label, "emulated": emulated, "verified": verified, "errors_vs_reference": errors,
              "tolerance_mev": [tol_e, tol_f], "energies_ev": energies.tolist(), "samples": samples,
              "timing_ms": timing, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if report_dir is not None:
        result["report"] = write_report(result, Path(report_dir))
    if not verified:
        raise QSO3Error(f"board results disagree with the compile-time reference: {errors} (tol {tol_e}, {tol_f} meV)")
    return result


def write_report(result: dict, report_dir: Path) -> str:
    report_dir.mkdir(parents=True, exist_ok=True)
    model = Path(result["model"]["checkpoint"]).stem
    on_gpu = result["device"].startswith("cuda")
    stem = f"{time.strftime('%Y-%m-%d')}_{model}_{result['board'].get('label')}{'_cuda' if on_gpu else ''}"
    t1, ta = result["timing_ms"]["one_molecule"], result["timing_ms"]["all_samples"]
    speed_note = ("**Emulated board (qemu-user): these timings measure emulation, not board speed.**"
                  if result["emulated"] else "Timings from the board's own time evaluator.")
    md = "\n".join([
        f"# {model} on {result['board'].get('label')}{' ' + result['device'] if on_gpu else ''}", "",
        f"Artifact `{result['artifact']}` (target {result['target']}, {result['model']['precision']}).",
        f"Verified against the compile-time reference: {result['verified']} "
        f"(max |dE| {result['errors_vs_reference']['max_energy_error_mev']:.4f} meV, "
        f"max |dF| {result['errors_vs_reference']['max_force_error_mev_per_a']:.4f} meV/Å).", "", speed_note, "",
        "| workload | mean ms | median ms | max ms | min ms | std ms | repeat×number |", "|---|---|---|---|---|---|---|",
        f"| {t1['molecule']} ({t1['atoms']} atoms), energy+forces | {t1['mean']:.3f} | {t1['median']:.3f} | {t1['max']:.3f} | "
        f"{t1['min']:.3f} | {t1['std']:.3f} | {t1['repeat']}×{t1['number']} |",
        f"| {ta['molecules']} sample molecules, one batch | {ta['mean']:.3f} | {ta['median']:.3f} | {ta['max']:.3f} | "
        f"{ta['min']:.3f} | {ta['std']:.3f} | {ta['repeat']}×{ta['number']} |", "",
        f"Made by `qso3-tvm profile {result['artifact']} ...` at {result['created']}.", ""])
    atomic_write(report_dir / f"{stem}.json", json.dumps(result, indent=1))
    atomic_write(report_dir / f"{stem}.md", md)
    return str(report_dir / stem)
