"""Serial provisioning over a pty pair: the test plays the board's shell on one end."""

import os
import platform
import signal
import subprocess
import threading

import pytest

from qso3_tvm.boards.firmware import firmware_binary, free_port
from qso3_tvm.boards.serial_console import provision
from qso3_tvm.errors import QSO3Error
from qso3_tvm.runtime.remote import board_info, connect


class FakeBoardShell(threading.Thread):
    """Reads command lines from the pty master, runs them with /bin/sh, writes the output back."""

    def __init__(self, master_fd: int):
        super().__init__(daemon=True)
        self.fd, self.groups, self.stopped = master_fd, [], False

    def run(self):
        buf = b""
        while not self.stopped:
            try:
                data = os.read(self.fd, 1024)
            except OSError:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.strip()
                if not line:
                    continue
                proc = subprocess.Popen(line.decode(), shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                self.groups.append(proc.pid)
                out, _ = proc.communicate()
                os.write(self.fd, out.replace(b"\n", b"\r\n") + b"$ ")

    def stop(self):
        self.stopped = True
        for pgid in self.groups:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture
def pty_board():
    master, slave = os.openpty()
    shell = FakeBoardShell(master)
    shell.start()
    yield os.ttyname(slave), shell
    shell.stop()
    os.close(slave)
    os.close(master)


def test_provision_over_pty_starts_a_reachable_server(pty_board):
    tty, shell = pty_board
    port = free_port()
    server = str(firmware_binary(platform.machine()))
    host, got_port = provision(tty, port=port, key="serialkey", host="127.0.0.1", server=server, timeout=30,
                               log=lambda *_: None)
    assert (host, got_port) == ("127.0.0.1", port)
    info = board_info(connect(rpc=f"127.0.0.1:{port}", key="serialkey"))
    assert info["machine"] == platform.machine()


def test_provision_reports_a_board_that_says_nothing(pty_board):
    tty, _ = pty_board
    with pytest.raises(QSO3Error, match="no 'listening on' line"):
        provision(tty, server="/nonexistent/qso3-rpc-server", timeout=3, log=lambda *_: None)


def test_bad_serial_device():
    with pytest.raises(QSO3Error, match="cannot open serial console"):
        provision("/dev/does-not-exist", timeout=1, log=lambda *_: None)
