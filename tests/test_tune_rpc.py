"""qso3-tvm tune measuring on boards through a TVM RPC tracker: two emulated Pi 5 boards (our firmware
under qemu-aarch64) under one key. Protocol only: emulated timings are not a basis for schedules."""

import json
import shutil
import time

import pytest
import torch
from tvm import rpc

from qso3_tvm.boards.firmware import free_port, start_board, start_tracker
from qso3_tvm.compiler.tuning.database import RECORD_FILE
from qso3_tvm.compiler.tuning.tune import tune
from qso3_tvm.nn.checkpoint import save_model
from qso3_tvm.nn.testing import tiny_model

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-aarch64") is None or shutil.which("aarch64-linux-gnu-g++") is None,
    reason="needs qemu-user and g++-aarch64-linux-gnu")


def wait_for_boards(port: int, key: str, n: int, timeout: float = 60.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        queue = rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"].get(key, {})
        if queue.get("free", 0) == n:
            return queue
        time.sleep(0.5)
    raise AssertionError(f"boards did not register: {queue}")


def test_tuning_measures_on_two_emulated_boards_through_the_tracker(tmp_path):
    save_model(tmp_path / "tiny.pt", tiny_model(torch.float32, seed=2))
    tport = free_port()
    tracker = start_tracker(tport)
    try:
        with start_board(cpu="cortex-a76", port=free_port(), key="pi5", tracker=f"127.0.0.1:{tport}"), \
             start_board(cpu="cortex-a76", port=free_port(), key="pi5", tracker=f"127.0.0.1:{tport}"):
            wait_for_boards(tport, "pi5", 2)
            summary = tune(str(tmp_path / "tiny.pt"), "arm64-cortex-a76", trials=2, trials_per_task=1,
                           work_dir=tmp_path / "db", buckets=["12,80,2"], rpc_tracker=f"127.0.0.1:{tport}",
                           rpc_key="pi5", rank="flops", log=lambda *_: None)
            assert wait_for_boards(tport, "pi5", 2)["free"] == 2  # both boards back in the pool
    finally:
        tracker.stop()
    records = [json.loads(line) for line in (tmp_path / "db" / RECORD_FILE).read_text().splitlines() if line.strip()]
    assert len(records) == 2 and len(summary["tasks"]) == 2
    assert all(t["after_us"] > 0 for t in summary["tasks"])  # measured on a board, not failed runs
