"""Fault injection against the real firmware (native build, and the emulated arm64 board where it
matters): hostile or broken clients, a dead tracker, path traversal, unverified libraries, hostile
labels, and stopping a board mid-session. Loopback only; every process a test starts, it stops."""

import gc
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import rpc

from qso3_tvm.boards.firmware import ProcessGroup, firmware_binary, free_port, start_board

RPC_MAGIC = 0xFF271
KEY = "fault"
EMULATED = pytest.mark.skipif(
    shutil.which("qemu-aarch64") is None or shutil.which("aarch64-linux-gnu-g++") is None,
    reason="needs qemu-user and g++-aarch64-linux-gnu")


def wait_until(cond, timeout: float, step: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(step)
    return cond()


def group_members(pgid: int) -> list[int]:
    """Processes of process group `pgid` (from /proc; zombies included)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[2]) == pgid:
            members.append(int(entry.name))
    return members


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def raw_client(board, payload: bytes = b"", timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((board.host, board.port), timeout=timeout)
    if payload:
        sock.sendall(payload)
    return sock


def handshake_bytes(key: str) -> bytes:
    header = f"client:{key}".encode()
    return struct.pack("<ii", RPC_MAGIC, len(header)) + header


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the board closes (or resets) the connection within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    finally:
        sock.close()


def session_info(board, key: str = KEY) -> dict:
    session = rpc.connect(board.host, board.port, key=key)
    try:
        return json.loads(session.get_function("qso3.board.info")())
    finally:
        del session
        gc.collect()


def timed_info(board) -> float:
    start = time.time()
    assert session_info(board)["load_verified"] is True
    return time.time() - start


@pytest.fixture
def board(tmp_path):
    with start_board(cpu=None, port=free_port(), key=KEY, handshake_timeout=1,
                     work_dir=str(tmp_path / "board")) as b:
        yield b


@pytest.fixture(scope="module")
def add_one_lib(tmp_path_factory):
    """A tiny TVM library for this machine: B = A + 1 over 4 floats, exported as add_one.so."""
    from tvm import te

    a = te.placeholder((4,), "float32", name="A")
    b = te.compute((4,), lambda i: a[i] + 1.0, name="B")
    lib = tvm.compile(te.create_prim_func([a, b]).with_attr("global_symbol", "add_one"), target="llvm")
    path = tmp_path_factory.mktemp("lib") / "add_one.so"
    lib.export_library(str(path))
    return path


# ---------------------------------------------------------------- handshakes


def test_silent_and_broken_clients_do_not_block_the_next(board):
    hostile = [raw_client(board) for _ in range(3)]                          # connect, say nothing
    hostile.append(raw_client(board, struct.pack("<i", RPC_MAGIC)))          # magic, then nothing
    hostile.append(raw_client(board, struct.pack("<ii", RPC_MAGIC, 4000)))   # promise a header, never send it
    assert timed_info(board) < 3  # served at once, not after the silent clients time out
    for sock in hostile:  # each dropped after the handshake timeout (1 s)
        assert closed_by_peer(sock, 5)
    bad_magic = raw_client(board, b"GET / HTTP/1.0\r\n\r\n")
    assert closed_by_peer(bad_magic, 5)
    assert board.alive() and timed_info(board) < 3


def test_handshakes_are_served_during_a_session(board):
    busy = rpc.connect(board.host, board.port, key=KEY)  # holds the board
    try:
        wrong = raw_client(board, handshake_bytes("nope"))
        wrong.settimeout(5)
        assert struct.unpack("<i", wrong.recv(4))[0] == RPC_MAGIC + 2  # answered now, not after the session
        wrong.close()
        assert closed_by_peer(raw_client(board), 5)  # a silent client is dropped meanwhile too
        assert busy.get_function("qso3.board.info")()
    finally:
        del busy
        gc.collect()
    assert timed_info(board) < 3


@EMULATED
def test_handshake_timeout_on_the_emulated_board():
    with start_board(cpu="cortex-a76", port=free_port(), key=KEY, handshake_timeout=1) as b:
        silent = raw_client(b)
        start = time.time()
        info = session_info(b)
        assert time.time() - start < 10 and info["machine"] == "aarch64" and info["load_verified"] is True
        assert closed_by_peer(silent, 10)
        assert b.alive()


def test_wrong_key_flood_neither_freezes_nor_floods_the_log(board):
    assert board.proc.stdout is None and board.proc.stderr is None  # no pipe nobody reads
    for evil in ["\x1b[2J\"'/\\", "\n[qso3-rpc-server 1] forged line"]:  # control characters reach the log escaped
        with raw_client(board, handshake_bytes(evil)) as sock:
            assert struct.unpack("<i", sock.recv(4))[0] == RPC_MAGIC + 2
    long_key = "k" * 4000
    for _ in range(100):  # the old firmware froze after ~17 of these (a full stderr pipe)
        with raw_client(board, handshake_bytes(long_key)) as sock:
            assert struct.unpack("<i", sock.recv(4))[0] == RPC_MAGIC + 2
    assert board.alive() and timed_info(board) < 3
    log = Path(board.log_path).read_text(errors="replace")
    mismatches = [line for line in log.splitlines() if "key mismatch" in line]
    assert 1 <= len(mismatches) <= 10  # rate-limited
    assert all(len(line) < 300 for line in log.splitlines())  # the key is cut short
    assert "\x1b" not in log and len(log) < 16384
    assert not any(line.startswith("[qso3-rpc-server 1]") for line in log.splitlines())


def test_idle_session_ends_and_frees_the_board(tmp_path):
    with start_board(cpu=None, port=free_port(), key=KEY, idle_timeout=1, work_dir=str(tmp_path / "b")) as b:
        idle = rpc.connect(b.host, b.port, key=KEY)
        time.sleep(2)
        assert timed_info(b) < 3  # the idle session no longer holds the board
        with pytest.raises(Exception):
            idle.get_function("qso3.board.info")()
        del idle
        gc.collect()
        assert "idle" in b.log_tail()


def test_long_computation_is_not_idle(tmp_path, add_one_lib):
    """The idle timeout counts only time waiting for requests: a 2.5 s remote run with a 1 s idle timeout
    finishes."""
    with start_board(cpu=None, port=free_port(), key=KEY, idle_timeout=1, work_dir=str(tmp_path / "b")) as b:
        session = rpc.connect(b.host, b.port, key=KEY)
        session.upload(str(add_one_lib))
        mod = session.load_module("add_one.so")
        dev = session.cpu()
        x = tvm.runtime.tensor(np.zeros(4, "float32"), dev)
        y = tvm.runtime.tensor(np.zeros(4, "float32"), dev)
        result = mod.time_evaluator("add_one", dev, number=1000, repeat=1, min_repeat_ms=2500)(x, y)
        assert result.mean > 0
        mod["add_one"](x, y)
        assert y.numpy().tolist() == [1.0] * 4
        del session, mod, dev, x, y
        gc.collect()


# ---------------------------------------------------------------- the session directory


def test_paths_outside_the_session_directory_are_refused(board, tmp_path, add_one_lib):
    tmp_x_existed = Path("/tmp/x").exists()
    session = rpc.connect(board.host, board.port, key=KEY)
    workpath = session.get_function("tvm.rpc.server.workpath")
    for bad in ["../x", "../../x", "/tmp/x", "a/b", "..", "x/../../y"]:
        with pytest.raises(Exception, match="refused path"):
            workpath(bad)
        with pytest.raises(Exception, match="refused path"):
            session.upload(bytearray(b"payload"), bad)
    libm = "/lib/x86_64-linux-gnu/libm.so.6" if platform.machine() == "x86_64" else "/lib/libm.so.6"
    for bad in [libm, "../add_one.so", ""]:
        with pytest.raises(Exception, match="refused path"):
            session.load_module(bad)
    inside = Path(workpath("model.so"))
    assert inside.parent.parent == tmp_path / "board" and inside.parent.name.startswith("session-")
    session.upload(str(add_one_lib))  # plain names keep working, and stock load_module with them
    assert session.load_module("add_one.so") is not None
    assert not list(tmp_path.rglob("x")) and not list(tmp_path.rglob("y"))
    assert Path("/tmp/x").exists() == tmp_x_existed
    assert json.loads(session.get_function("qso3.board.info")())["load_verified"] is True
    del session, workpath
    gc.collect()
    assert board.alive()


def test_load_verified_checks_the_hash(board, add_one_lib):
    digest = hashlib.sha256(add_one_lib.read_bytes()).hexdigest()
    session = rpc.connect(board.host, board.port, key=KEY)
    load_verified = session.get_function("qso3.board.load_verified")
    session.upload(str(add_one_lib))
    with pytest.raises(Exception, match="SHA-256 mismatch"):
        load_verified("add_one.so", hashlib.sha256(b"something else").hexdigest())
    with pytest.raises(Exception, match="64 hex digits"):
        load_verified("add_one.so", "not-a-hash")
    with pytest.raises(Exception, match="refused path"):
        load_verified("../add_one.so", digest)
    with pytest.raises(Exception, match="cannot read"):
        load_verified("missing.so", digest)
    mod = load_verified("add_one.so", digest.upper())
    dev = session.cpu()
    x = tvm.runtime.tensor(np.arange(4, dtype="float32"), dev)
    y = tvm.runtime.tensor(np.zeros(4, "float32"), dev)
    mod["add_one"](x, y)
    assert y.numpy().tolist() == [1.0, 2.0, 3.0, 4.0]
    del session, load_verified, mod, dev, x, y
    gc.collect()


# ---------------------------------------------------------------- tracker, label


@pytest.mark.parametrize("tracker_kind", ["refused", "silent"])
def test_direct_connections_served_while_the_tracker_is_down(tmp_path, tracker_kind):
    silent = None
    if tracker_kind == "silent":  # accepts TCP connections (kernel backlog), never answers
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        tracker = f"127.0.0.1:{silent.getsockname()[1]}"
    else:
        tracker = f"127.0.0.1:{free_port()}"  # nobody listens
    try:
        with start_board(cpu=None, port=free_port(), key=KEY, tracker=tracker, work_dir=str(tmp_path / "b")) as b:
            for _ in range(3):
                assert timed_info(b) < 3
            if tracker_kind == "refused":
                assert wait_until(lambda: "direct connections are still served" in b.log_tail(), 5)
            assert b.alive()
    finally:
        if silent:
            silent.close()


def test_label_is_sanitized_and_info_is_valid_json(tmp_path):
    port = free_port()
    log = tmp_path / "board.log"
    label = 'evil"label/../\\x' + "\u00e9" + "A" * 100
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(firmware_binary(platform.machine())), "--port", str(port), "--key", KEY,
                                 "--work-dir", str(tmp_path / "w"), "--label", label],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    with ProcessGroup(proc):
        assert wait_until(lambda: "listening on 127.0.0.1:" in log.read_text(), 30), log.read_text()
        session = rpc.connect("127.0.0.1", port, key=KEY)
        info = json.loads(session.get_function("qso3.board.info")())  # valid JSON
        del session
        gc.collect()
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", info["label"]), info["label"]
    assert info["label"].startswith("evil_label_.._") and info["load_verified"] is True


def test_default_listen_address_is_loopback(tmp_path):
    port = free_port()
    log = tmp_path / "board.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(firmware_binary(platform.machine())), "--port", str(port), "--key", KEY,
                                 "--work-dir", str(tmp_path / "w")],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    with ProcessGroup(proc):
        assert wait_until(lambda: "listening on" in log.read_text(), 30), log.read_text()
    assert f"listening on 127.0.0.1:{port}" in log.read_text()


# ---------------------------------------------------------------- stopping


@pytest.mark.parametrize("cpu", [None, pytest.param("cortex-a76", marks=EMULATED)])
def test_stop_mid_session_leaves_no_process(cpu, tmp_path):
    b = start_board(cpu=cpu, port=free_port(), key=KEY)
    pgid = b.proc.pid
    try:
        session = rpc.connect(b.host, b.port, key=KEY)
        assert session.get_function("qso3.board.info")()
        assert len(group_members(pgid)) >= 2  # the server and its session child
        b.stop()
        assert group_gone(pgid), group_members(pgid)
        assert not Path(b.work_dir).exists()
        del session
        gc.collect()
    finally:
        b.kill()


def test_sigterm_to_the_server_alone_ends_its_session(tmp_path):
    """SIGTERM to the server process only (not its group): it kills its session child and exits."""
    b = start_board(cpu=None, port=free_port(), key=KEY, work_dir=str(tmp_path / "b"))
    pgid = b.proc.pid
    try:
        session = rpc.connect(b.host, b.port, key=KEY)
        session.upload(bytearray(b"x"), "scratch.bin")
        assert len(group_members(pgid)) == 2
        os.kill(b.proc.pid, signal.SIGTERM)
        assert b.proc.wait(10) == 0
        assert wait_until(lambda: group_gone(pgid), 5), group_members(pgid)
        assert not list((tmp_path / "b").glob("session-*"))  # its session directory removed
        del session
        gc.collect()
    finally:
        b.kill()


@pytest.mark.parametrize("command,sig", [
    ("native", signal.SIGKILL),
    pytest.param("emulate", signal.SIGTERM, marks=EMULATED),
    pytest.param("emulate", signal.SIGKILL, marks=EMULATED)])
def test_sigterm_to_the_cli_leaves_no_board_behind(command, sig):
    """`qso3-tvm board emulate|native` ended by SIGTERM (it stops its board) or SIGKILL (the board, in a
    process group of its own, notices its parent is gone): no server, qemu or session process is left."""
    port = free_port()
    cli = subprocess.Popen([sys.executable, "-c", "from qso3_tvm.cli import app; app()", "board", command,
                            "--port", str(port), "--key", KEY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    work_dir = None
    with ProcessGroup(cli):
        line = cli.stdout.readline()
        assert "listening on" in line, line + (cli.stdout.read() if cli.poll() is not None else "")
        children = [int(p) for p in Path(f"/proc/{cli.pid}/task/{cli.pid}/children").read_text().split()]
        assert len(children) == 1
        board_pgid = children[0]
        argv = Path(f"/proc/{board_pgid}/cmdline").read_bytes().split(b"\0")
        work_dir = argv[argv.index(b"--work-dir") + 1].decode()
        session = rpc.connect("127.0.0.1", port, key=KEY)  # a session child, too
        assert session.get_function("qso3.board.info")()
        assert len(group_members(board_pgid)) >= 2
        cli.send_signal(sig)
        cli.wait(10)
        try:
            assert wait_until(lambda: group_gone(board_pgid), 10), group_members(board_pgid)
        finally:
            if not group_gone(board_pgid):
                os.killpg(board_pgid, signal.SIGKILL)
            del session
            gc.collect()
            if sig == signal.SIGKILL:  # nobody left to remove the board's temporary work dir
                shutil.rmtree(work_dir, ignore_errors=True)
