"""Boards: the firmware RPC server, built and run natively or on an emulated arm64 board (qemu-user).

Emulated timings are emulation, not board speed: every report of an emulated board says so.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import QSO3Error
from ..files import log_tail
from ..resources import firmware_build_dir, firmware_dir
from ..runtime import DEFAULT_KEY

QEMU_SYSROOT = "/usr/aarch64-linux-gnu"
QEMU_CPUS = ("cortex-a53", "cortex-a72", "cortex-a76", "neoverse-n1", "max")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def firmware_binary(arch: str) -> Path:
    """<build dir>/<arch>/qso3-rpc-server (resources.firmware_build_dir), built on first use by
    firmware/build.sh with the Python that runs this (its apache-tvm wheels)."""
    binary = firmware_build_dir() / arch / "qso3-rpc-server"
    if not binary.exists():
        mode = "native" if arch == platform.machine() else arch
        if mode == "aarch64" and shutil.which("aarch64-linux-gnu-g++") is None:
            raise QSO3Error("building the arm64 firmware needs aarch64-linux-gnu-g++ "
                            "(Debian: apt-get install g++-aarch64-linux-gnu)")
        env = {**os.environ, "PYTHON": sys.executable, "BUILD_DIR": str(firmware_build_dir())}
        proc = subprocess.run(["bash", str(firmware_dir() / "build.sh"), mode], capture_output=True, text=True, env=env)
        if proc.returncode or not binary.exists():
            raise QSO3Error(f"firmware build failed ({mode}): {proc.stderr.strip().splitlines()[-1:]}")
    return binary


@dataclass
class ProcessGroup:
    """A child started in a process group of its own (start_new_session): stopping it stops
    everything it started (a server's session children, the tracker's worker process)."""

    proc: subprocess.Popen

    def _signal_all(self, sig: int) -> None:
        try:  # the group, even when the parent has exited: its children may still run
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """Pull the plug: the process and everything it started die at once."""
        self._signal_all(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        self._signal_all(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Board(ProcessGroup):
    """A running firmware server (a child process of this one) and its session children."""

    host: str
    port: int
    key: str
    label: str
    work_dir: str | None = None  # removed on stop when start_board made it
    log_path: str | None = None  # the board's stdout and stderr (in its work dir)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the board logged ("" when there is no log)."""
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        super().stop()
        if self.work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def _wait_listening(proc: subprocess.Popen, what: str, log_path: str | os.PathLike, timeout: float = 60.0) -> str:
    """Wait for the board's "listening on" line in its log file (the board writes its stdout and stderr
    there, never to a pipe that nobody reads once it runs)."""
    deadline, offset, pending = time.time() + timeout, 0, b""
    while time.time() < deadline:
        exited = proc.poll() is not None
        with open(log_path, "rb") as f:
            f.seek(offset)
            data = f.read()
        offset += len(data)
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if b"listening on" in line:
                return line.decode(errors="replace").strip()
        if exited:
            raise QSO3Error(f"{what} exited with code {proc.returncode}; its log ({log_path}) ends:\n"
                            f"{log_tail(log_path, 10)}")
        time.sleep(0.05)
    ProcessGroup(proc).kill()
    raise QSO3Error(f"{what} did not start within {timeout:.0f} s; its log ({log_path}) ends:\n{log_tail(log_path, 10)}")


def start_board(cpu: str | None = None, port: int = 9090, host: str = "127.0.0.1", key: str = DEFAULT_KEY,
                tracker: str | None = None, timeout: int = 0, work_dir: str | None = None,
                handshake_timeout: float | None = None, idle_timeout: float | None = None) -> Board:
    """Start the firmware server: under qemu-aarch64 -cpu CPU when `cpu` is given (emulated arm64
    board), else natively. It registers with `tracker` (host:port) under `key` when given.
    `timeout`: longest session (0: none); `handshake_timeout`, `idle_timeout`: seconds (None: the
    firmware's defaults, 5 and 600). The board logs to `board.log_path` in its work dir, and exits
    when this process does."""
    if not 1 <= port <= 65535:
        raise QSO3Error(f"--port must be 1..65535, not {port}")
    args = ["--host", host, "--port", str(port), "--key", key, "--timeout", str(timeout), "--parent-pid", str(os.getpid())]
    if tracker:
        args += ["--tracker", tracker]
    if handshake_timeout is not None:
        args += ["--handshake-timeout", str(handshake_timeout)]
    if idle_timeout is not None:
        args += ["--idle-timeout", str(idle_timeout)]
    if cpu:
        if cpu not in QEMU_CPUS:
            raise QSO3Error(f"unknown emulated CPU {cpu!r}: choose from {', '.join(QEMU_CPUS)}")
        if shutil.which("qemu-aarch64") is None:
            raise QSO3Error("the emulated board needs qemu-aarch64 (Debian: apt-get install qemu-user)")
        label = f"emulated-qemu-{cpu}"
        cmd = ["qemu-aarch64", "-cpu", cpu, "-L", QEMU_SYSROOT, str(firmware_binary("aarch64"))]
    else:
        label = f"native-{platform.machine()}"
        cmd = [str(firmware_binary(platform.machine()))]
    work = work_dir or tempfile.mkdtemp(prefix=f"qso3-board-{label}-")
    os.makedirs(work, mode=0o700, exist_ok=True)
    args += ["--work-dir", work, "--label", label]
    log_path = os.path.join(work, f"board-{port}.log")
    try:
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd + args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        _wait_listening(proc, f"board {label} on {host}:{port}", log_path)
    except (QSO3Error, OSError):
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)
        raise
    return Board(proc=proc, host=host, port=port, key=key, label=label, work_dir=None if work_dir else work,
                 log_path=log_path)


class Tracker(ProcessGroup):
    """TVM's RPC tracker: its server runs in a worker process of its own, which stopping only the
    parent would leave behind."""


def start_tracker(port: int = 9190, host: str = "127.0.0.1") -> Tracker:
    """TVM's own RPC tracker (python -m tvm.exec.rpc_tracker) as a child process group."""
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
                             "--port-end", str(port + 1)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tracker, deadline = Tracker(proc), time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            tracker.stop()
            raise QSO3Error(f"RPC tracker exited: {proc.stdout.read()[-300:]}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return tracker
        except OSError:
            time.sleep(0.3)
    tracker.stop()
    raise QSO3Error(f"RPC tracker did not start on {host}:{port}")
