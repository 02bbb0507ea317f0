"""A compiled artifact on a board over TVM RPC (direct or through a tracker): the session, the
board's self-description, compatibility checks, and RemoteModel (CompiledModel run remotely)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ..errors import QSO3Error
from ..graph.convention import library_path, read_manifest
from ..graph.molecules import MoleculeSet
from . import DEFAULT_KEY
from .compiled import CompiledModel, check_compatible

TRACKER_ENV = ("TVM_TRACKER_HOST", "TVM_TRACKER_PORT", "TVM_TRACKER_KEY")


def split_addr(addr: str, what: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise QSO3Error(f"{what} must be HOST:PORT with a port 1..65535, not {addr!r}")
    return host, int(port)


def connect(rpc: str | None = None, tracker: str | None = None, key: str | None = None, timeout: int = 0):
    """An RPC session: direct (`rpc` HOST:PORT, with `key`, else TVM_TRACKER_KEY, else DEFAULT_KEY, the
    key of a board started by qso3-tvm, then "" for a stock TVM server without a key), or a board of
    `key` from a tracker (flags, else TVM_TRACKER_HOST/PORT/KEY). `timeout`: seconds after which the
    board ends the session (0: none; a session lasts as long as the work)."""
    if rpc is None and tracker is None and os.environ.get("TVM_TRACKER_HOST"):
        tracker = f"{os.environ['TVM_TRACKER_HOST']}:{os.environ.get('TVM_TRACKER_PORT', '9190')}"
    key = key if key is not None else os.environ.get("TVM_TRACKER_KEY")
    if rpc:
        keys = [key] if key is not None else [DEFAULT_KEY, ""]
        return _open_session(rpc, "--rpc", keys, lambda rpc_mod, host, port, k: rpc_mod.connect(
            host, port, key=k, session_timeout=timeout))
    if tracker:
        if not key:
            raise QSO3Error("--rpc-tracker needs --rpc-key (or TVM_TRACKER_KEY)")
        return _open_session(tracker, "--rpc-tracker", [key], lambda rpc_mod, host, port, k: rpc_mod.connect_tracker(
            host, port).request(k, session_timeout=timeout))
    raise QSO3Error("give --rpc HOST:PORT or --rpc-tracker HOST:PORT --rpc-key KEY (or set TVM_TRACKER_HOST)")


def _open_session(addr: str, flag: str, keys: list[str], open_fn):
    """open_fn(tvm.rpc, host, port, key) with each key in turn until one is accepted."""
    from tvm import rpc as tvm_rpc

    host, port = split_addr(addr, flag)
    for k in keys:
        try:
            return open_fn(tvm_rpc, host, port, k)
        except Exception as e:  # socket errors, key mismatch, no board under the key
            err = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            if "matches key" not in err or k == keys[-1]:
                raise QSO3Error(f"cannot reach the board ({addr}, key {k!r}): {err}") from None


def board_info(session) -> dict:
    """What the board says about itself; its label is sanitized (it names report files on this side)."""
    try:
        info = json.loads(session.get_function("qso3.board.info")())
    except AttributeError:  # a stock TVM RPC server (python -m tvm.exec.rpc_server)
        return {"label": "tvm-rpc-server", "machine": None, "features": None}
    except (ValueError, TypeError) as e:
        raise QSO3Error(f"the board sent an unreadable self-description ({e})") from None
    if not isinstance(info, dict):
        raise QSO3Error("the board sent an unreadable self-description (not a JSON object)")
    info["label"] = safe_label(info.get("label"))
    return info


def safe_label(label) -> str:
    """A board label usable in a file name: [A-Za-z0-9._-], at most 64 characters, never '.' or '..'."""
    text = re.sub(r"[^A-Za-z0-9._-]", "_", str(label or "board"))[:64].strip(".")
    return text or "board"


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
        lib_path = library_path(self.path, self.manifest)  # checked here before it is sent
        self.session, self.board = session, info or board_info(session)
        check_compatible(self.manifest, self.board)
        cuda = self.manifest["target"]["device"] == "cuda"
        self.device = cuda_device(session, self.manifest, self.board) if cuda else session.cpu()
        self.device_label = (f"cuda ({self.device.device_name}, sm_{self.device.compute_version.replace('.', '')})"
                             if cuda else "cpu")
        self.vm = VirtualMachine(upload_and_load(session, lib_path, self.manifest, self.board), self.device)
        self._getitem = session.get_function("ffi.ArrayGetItem")  # tuples do not cross RPC: index remotely

    def call(self, args, forces: bool = True):
        if not forces and self.has_energy_entry:
            return self.vm[self.function("energy", args)](*args).numpy(), None
        out = self.vm[self.function("main", args)](*args)
        return self._getitem(out, 0).numpy(), self._getitem(out, 1).numpy()

    def time(self, mols: MoleculeSet, frames, repeat: int, number: int) -> dict:
        """TVM's timing summary (ms) of one energy+forces call on the frames."""
        args, _ = self.inputs(mols, frames)
        name = self.function("main", args)
        self.vm.set_input(name, *args)
        timer = self.vm.time_evaluator("invoke_stateful", self.device, number=number, repeat=repeat)
        runs_ms = np.asarray(timer(name).results) * 1e3
        return {"mean": float(runs_ms.mean()), "median": float(np.median(runs_ms)), "max": float(runs_ms.max()),
                "min": float(runs_ms.min()), "std": float(runs_ms.std()), "repeat": repeat, "number": number}


def upload_and_load(session, lib_path: Path, manifest: dict, info: dict):
    """Upload the library and load it on the board; a qso3 board checks its sha256 before loading."""
    session.upload(str(lib_path))
    if info.get("load_verified"):
        return session.get_function("qso3.board.load_verified")(lib_path.name, manifest["library_sha256"])
    return session.load_module(lib_path.name)  # a stock TVM server: checked on this side only
