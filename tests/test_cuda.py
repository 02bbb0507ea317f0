"""CUDA builds without a GPU: the GPU pipeline schedules every kernel (past TVM's bugs), CUDA
artifacts carry device code compiled ahead of time (a fatbin, so a board needs no CUDA compiler),
and a board without a GPU refuses them clearly. Running them on a GPU is checked on the device
machine (reports/cuda.md)."""

import shutil
import struct

import pytest
import torch

from qso3_tvm.boards.firmware import free_port, start_board
from qso3_tvm.boards.profile import profile
from qso3_tvm.compiler.compile import compile_model
from qso3_tvm.compiler.targets import resolve_target
from qso3_tvm.errors import QSO3Error
from qso3_tvm.nn.checkpoint import save_model
from qso3_tvm.nn.testing import ENERGY_SHIFT_EV, save_tiny_model, tiny_model
from qso3_tvm.runtime.remote import board_info, connect

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CUDA toolkit)")


@pytest.fixture(scope="module")
def fused_gpu_module():
    """The tiny model's energy+forces graph for cuda-sm90, legalized and fused (before scheduling)."""
    from qso3_tvm.compiler.kernels.pipeline import fused
    from qso3_tvm.compiler.module import relax_module

    spec = resolve_target("cuda-sm90")
    target = spec.tvm_target()
    return fused(relax_module(tiny_model(torch.float32), spec), target), target


def prim_funcs(mod):
    from tvm import tirx

    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def test_stock_dlight_gemv_still_asserts(fused_gpu_module):
    """TVM bug (tvm_fixes 2): dlight's gpu.GEMV raises on some of the model's reductions instead of
    declining them, which aborts TVM's default CUDA pipeline."""
    from tvm.s_tir import dlight as dl

    mod, target = fused_gpu_module
    raised = []
    for name, func in prim_funcs(mod).items():
        try:
            dl.gpu.GEMV().apply(func, target, False)
        except AssertionError:
            raised.append(name)
    assert raised, "dlight GEMV no longer asserts: tvm_fixes.apply_gpu_rule may be unnecessary"


def test_every_kernel_gets_a_gpu_schedule_without_empty_launches(fused_gpu_module):
    from tvm import tirx

    from qso3_tvm.compiler.kernels.gpu import _walk, drop_empty_loops, schedule_gpu_func

    mod, target = fused_gpu_module
    funcs = prim_funcs(mod)
    empty = [n for n, f in funcs.items() if drop_empty_loops(f) is not f]
    assert empty, "the model no longer has zero-length slices; drop_empty_loops is untested"
    for name, func in funcs.items():
        scheduled = schedule_gpu_func(func, target)
        assert scheduled is not None, name
        zero_launch = _walk(scheduled, tirx.For, lambda n: n.thread_binding is not None
                            and isinstance(n.extent, tirx.IntImm) and n.extent.value == 0)
        assert not zero_launch, f"{name} launches a zero-extent grid"
        if name in empty:
            assert not _walk(scheduled, tirx.BufferStore, lambda n: True), f"{name} should do nothing"


@pytest.fixture(scope="module")
def cuda_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    quiet = lambda *_: None  # noqa: E731
    save_tiny_model(root / "tiny.pt")
    arts = {"fp32-sm90": (compile_model(str(root / "tiny.pt"), "cuda-sm90", root / "sm90", log=quiet), root / "sm90")}
    if shutil.which("aarch64-linux-gnu-g++"):
        from qso3_tvm.graph.molecules import random_molecule
        from qso3_tvm.nn.quant import QuantConfig, quantize_model
        from qso3_tvm.nn.testing import model_energy_forces

        model = quantize_model(tiny_model(torch.float32, seed=4, energy_shift=ENERGY_SHIFT_EV), QuantConfig())
        model_energy_forces(model, *random_molecule(12, seed=1))  # calibrate
        save_model(root / "q.pt", model)
        arts["int8-orin"] = (compile_model(str(root / "q.pt"), "jetson-orin", root / "orin", log=quiet), root / "orin")
    return arts


@needs_nvcc
def test_cuda_artifacts_carry_a_fatbin_not_source(cuda_artifacts):
    for name, (manifest, path) in cuda_artifacts.items():
        lib = (path / manifest["library"]).read_bytes()
        assert manifest["target"]["device"] == "cuda" and manifest["parity"] is None, name
        assert lib.count(FATBIN_MAGIC) >= 1, f"{name}: no fatbin in the library"
        assert b"__global__" not in lib, f"{name}: CUDA source left in the library (needs a compiler on the board)"
        assert "specialized" not in manifest["inputs"], name  # static copies are CPU-only (compile refuses them)
    if "int8-orin" in cuda_artifacts:
        manifest, path = cuda_artifacts["int8-orin"]
        assert (path / manifest["library"]).read_bytes()[:20][18] == 183  # e_machine EM_AARCH64: Jetson host code
        assert "sm_87" in manifest["quantization"]["kernels"]["device_code"]


@needs_nvcc
def test_board_without_gpu_refuses_cuda_artifact_and_keeps_serving(cuda_artifacts, tmp_path):
    manifest, path = cuda_artifacts["fp32-sm90"]
    with start_board(port=free_port(), key="nogpu") as board:
        if board_info(connect(rpc=board.address, key="nogpu")).get("cuda_runtime") == "loaded":
            pytest.skip("this machine has a GPU: the refusal path does not apply")
        with pytest.raises(QSO3Error, match="cannot run CUDA artifacts"):
            profile(path, rpc=board.address, key="nogpu", repeat=1, report_dir=tmp_path)
        assert not list(tmp_path.iterdir()), "no report after a refusal"
        assert board_info(connect(rpc=board.address, key="nogpu"))["machine"]  # still serving


def test_specialize_is_refused_for_cuda_targets(tmp_path):
    from qso3_tvm.nn.testing import save_tiny_model

    save_tiny_model(tmp_path / "tiny.pt")
    with pytest.raises(QSO3Error, match="CPU targets only"):
        compile_model(str(tmp_path / "tiny.pt"), "cuda-sm90", tmp_path / "out", specialize=["12,80,2"], log=lambda *_: None)
    assert not (tmp_path / "out").exists()
