"""Serial console of a board (pyserial): provision the RPC server and read back where it listens.

`provision` types the start command at the board's shell prompt over the console and waits for the
server's "listening on HOST:PORT" line. URLs are anything pyserial opens: /dev/ttyUSB0, a pty path,
socket://host:port, loop://.
"""

from __future__ import annotations

import re
import shlex
import time

from ..errors import QSO3Error

LISTENING = re.compile(r"qso3-rpc-server listening on (\S+):(\d+) key=(\S+)")
DEFAULT_SERVER = "/opt/qso3/qso3-rpc-server"  # where firmware/install.sh puts it


def open_console(url: str, baudrate: int = 115200, timeout: float = 0.2):
    import serial

    try:
        return serial.serial_for_url(url, baudrate=baudrate, timeout=timeout)
    except (serial.SerialException, ValueError) as e:
        raise QSO3Error(f"cannot open serial console {url!r}: {e}") from None


def start_command(server: str, port: int, key: str, tracker: str | None, host: str) -> str:
    args = [server, "--host", host, "--port", str(port), "--key", key]
    if tracker:
        args += ["--tracker", tracker]
    log = f"/tmp/qso3-rpc-server-{port}.log"
    # background it so the console stays usable; its banner comes back over the console
    return f"nohup {shlex.join(args)} >{log} 2>&1 & sleep 1; cat {log}"


def provision(url: str, port: int = 9090, key: str = "qso3", tracker: str | None = None, host: str = "0.0.0.0",
              server: str = DEFAULT_SERVER, timeout: float = 60.0, log=print) -> tuple[str, int]:
    """Start the RPC server over the console; returns the (host, port) it reports."""
    console = open_console(url)
    try:
        console.write(b"\r\n")
        console.write((start_command(server, port, key, tracker, host) + "\n").encode())
        console.flush()
        seen = b""
        deadline = time.time() + timeout
        while time.time() < deadline:
            seen += console.read(4096)
            match = LISTENING.search(seen.decode(errors="replace"))
            if match:
                log(match.group(0))
                return match.group(1), int(match.group(2))
        tail = seen.decode(errors="replace").strip().splitlines()[-3:]
        raise QSO3Error(f"no 'listening on' line from the board within {timeout:.0f} s; console said: {tail}")
    finally:
        console.close()
