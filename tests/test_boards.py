"""Boards over the real TVM RPC protocol: the C++ firmware under qemu-aarch64 (emulated Pi 4 / Pi 5),
TVM's own tracker, remote profiling and its failure modes. Every process a test starts, it stops."""

import gc
import shutil
import threading

import pytest
import torch
from tvm import rpc

from qso3_tvm.boards.firmware import free_port, start_board, start_tracker
from qso3_tvm.boards.profile import profile
from qso3_tvm.compiler.compile import compile_model
from qso3_tvm.errors import QSO3Error
from qso3_tvm.nn.checkpoint import save_model
from qso3_tvm.nn.testing import ENERGY_SHIFT_EV, save_tiny_model, tiny_model
from qso3_tvm.runtime.remote import RemoteModel, connect

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-aarch64") is None or shutil.which("aarch64-linux-gnu-g++") is None,
    reason="needs qemu-user and g++-aarch64-linux-gnu")



@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("boards")
    save_tiny_model(root / "tiny.pt")
    quiet = lambda *_: None  # noqa: E731
    return {t: compile_model(str(root / "tiny.pt"), t, root / t, log=quiet) and root / t
            for t in ("arm64-cortex-a72", "arm64-cortex-a76")}


@pytest.fixture
def board_a72():
    with start_board(cpu="cortex-a72", port=free_port(), key="pi4") as board:
        yield board


def test_profile_direct_verifies_and_reports(artifacts, board_a72, tmp_path):
    result = profile(artifacts["arm64-cortex-a72"], rpc=board_a72.address, key="pi4", repeat=2,
                     report_dir=tmp_path, log=lambda *_: None)
    assert result["verified"] and result["emulated"] and result["board"]["machine"] == "aarch64"
    assert result["errors_vs_reference"]["max_force_error_mev_per_a"] < 0.5
    t = result["timing_ms"]["one_molecule"]
    assert t["repeat"] == 2 and t["min"] <= t["median"] <= t["max"]
    md = next(tmp_path.glob("*.md")).read_text()
    assert "Emulated board" in md and "mean ms" in md and len(list(tmp_path.glob("*.json"))) == 1


def test_wrong_key_is_refused(board_a72):
    with pytest.raises(QSO3Error, match="cannot reach the board"):
        connect(rpc=board_a72.address, key="jetson")
    assert board_a72.alive()


def test_dotprod_artifact_refused_on_cortex_a72_and_board_keeps_serving(artifacts, board_a72, tmp_path):
    with pytest.raises(QSO3Error, match=r"needs CPU features \['asimddp'\].*lacks"):
        profile(artifacts["arm64-cortex-a76"], rpc=board_a72.address, key="pi4", report_dir=tmp_path,
                log=lambda *_: None)
    assert not list(tmp_path.iterdir())
    ok = profile(artifacts["arm64-cortex-a72"], rpc=board_a72.address, key="pi4", repeat=1, report_dir=None,
                 log=lambda *_: None)
    assert ok["verified"]


def test_broken_upload_fails_that_load_only(board_a72, tmp_path):
    """A library that does not load is an error in that session, which goes on; the board serves the next."""
    session = connect(rpc=board_a72.address, key="pi4")
    (tmp_path / "model.so").write_bytes(b"not an ELF")
    session.upload(str(tmp_path / "model.so"))
    with pytest.raises(Exception):
        session.load_module("model.so")
    assert board_a72.alive() and session.get_function("qso3.board.info")()
    del session  # one session at a time: the next client is served once this one ends
    gc.collect()
    assert connect(rpc=board_a72.address, key="pi4").get_function("qso3.board.info")()


def test_tracker_two_boards_one_key(artifacts, tmp_path):
    tport = free_port()
    tracker = start_tracker(tport)
    try:
        with start_board(cpu="cortex-a76", port=free_port(), key="pi5", tracker=f"127.0.0.1:{tport}"), \
                start_board(cpu="cortex-a76", port=free_port(), key="pi5", tracker=f"127.0.0.1:{tport}"):
            import time

            deadline = time.time() + 30
            while time.time() < deadline:  # both boards registered
                summary = rpc.connect_tracker("127.0.0.1", tport).summary()
                if summary["queue_info"].get("pi5", {}).get("free", 0) == 2:
                    break
                time.sleep(0.5)
            assert summary["queue_info"]["pi5"]["free"] == 2
            results = []

            def run():
                results.append(profile(artifacts["arm64-cortex-a72"], tracker=f"127.0.0.1:{tport}", key="pi5",
                                       repeat=1, report_dir=None, log=lambda *_: None))

            threads = [threading.Thread(target=run) for _ in range(2)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(300)
            assert len(results) == 2 and all(r["verified"] for r in results)
    finally:
        tracker.stop()


def test_env_tracker_settings(monkeypatch):
    monkeypatch.delenv("TVM_TRACKER_HOST", raising=False)
    with pytest.raises(QSO3Error, match="give --rpc HOST:PORT or --rpc-tracker"):
        connect()
    monkeypatch.setenv("TVM_TRACKER_HOST", "127.0.0.1")
    monkeypatch.setenv("TVM_TRACKER_PORT", str(free_port()))  # nothing listens there
    monkeypatch.setenv("TVM_TRACKER_KEY", "pi5")
    with pytest.raises(QSO3Error, match="cannot reach the board"):
        connect()


def test_session_timeout_ends_a_long_session(artifacts, tmp_path):
    with start_board(cpu="cortex-a72", port=free_port(), key="pi4", timeout=2) as board:
        with pytest.raises(QSO3Error, match="failed during the run"):
            profile(artifacts["arm64-cortex-a72"], rpc=board.address, key="pi4", repeat=50, number=5,
                    report_dir=tmp_path, log=lambda *_: None)
        assert board.alive() and not list(tmp_path.iterdir())


def test_board_killed_mid_run_gives_clear_error_and_no_report(artifacts, tmp_path, monkeypatch):
    board = start_board(cpu="cortex-a72", port=free_port(), key="pi4")
    original = RemoteModel.predict

    def predict_then_die(self, mols, batch_size=32):
        board.kill()
        return original(self, mols, batch_size)

    monkeypatch.setattr(RemoteModel, "predict", predict_then_die)
    try:
        with pytest.raises(QSO3Error, match="failed during the run"):
            profile(artifacts["arm64-cortex-a72"], rpc=board.address, key="pi4", report_dir=tmp_path,
                    log=lambda *_: None)
        assert not list(tmp_path.iterdir())
    finally:
        board.stop()


def test_int8_sdot_artifact_runs_on_emulated_pi5(tmp_path):
    """The quantized model's arm64 build (int8 GEMMs on `sdot`, forward and backward products; MDDQ and
    attention TIR kernels) gives PyTorch's energies and forces on an emulated Cortex-A76."""
    from qso3_tvm.graph.molecules import random_molecule
    from qso3_tvm.nn.quant import QuantConfig, quantize_model
    from qso3_tvm.nn.testing import model_energy_forces

    model = quantize_model(tiny_model(torch.float32, seed=4, energy_shift=ENERGY_SHIFT_EV), QuantConfig())
    model_energy_forces(model, *random_molecule(12, seed=1))  # calibrate
    save_model(tmp_path / "q.pt", model)
    info = compile_model(str(tmp_path / "q.pt"), "arm64-cortex-a76", tmp_path / "a76", specialize=[],
                         log=lambda *_: None)
    assert "arm-sdot" in info["quantization"]["kernels"]["scalar_linears"]
    assert "qso3_int8_grad_product, arm-sdot" in info["quantization"]["kernels"]["forces"]
    with start_board(cpu="cortex-a76", port=free_port(), key="pi5") as board:
        result = profile(tmp_path / "a76", rpc=board.address, key="pi5", repeat=1, report_dir=None,
                         log=lambda *_: None)
    assert result["verified"], result["errors_vs_reference"]
    assert result["errors_vs_reference"]["max_force_error_mev_per_a"] < 1.0  # tiny model: no rounding ties seen
