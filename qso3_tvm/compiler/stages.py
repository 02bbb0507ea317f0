"""A quiet terminal for long compiler runs: numbered stages with timings for the user, and TVM's own
C++ messages (warnings printed straight to file descriptor 2) in a log file instead of the screen."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path


class Stages:
    """`with stages.run("export"): ...` logs "[k/n] export ..." and records the stage's seconds."""

    def __init__(self, names: list[str], log=print):
        self.names, self.log, self.seconds = list(names), log, {}

    @contextlib.contextmanager
    def run(self, name: str):
        k = self.names.index(name) + 1
        self.log(f"[{k}/{len(self.names)}] {name} ...")
        t0 = time.time()
        yield
        self.seconds[name] = round(time.time() - t0, 1)

    def summary(self) -> str:
        return ", ".join(f"{n} {s:.1f} s" for n, s in self.seconds.items())


@contextlib.contextmanager
def native_output_to(path: Path):
    """Send everything written to file descriptor 2 (TVM's C++ logging, compiler subprocesses, Python
    warnings) to `path` while the block runs; the terminal's stderr is restored afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
