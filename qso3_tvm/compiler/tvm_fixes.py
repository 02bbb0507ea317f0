"""Workarounds for Apache TVM 0.27 bugs, in one place. Each has a test that shows the bug (so we
notice when an upgrade fixes it): 1. tests/test_kernels.py, 2. tests/test_cuda.py, 3. tests/test_tune.py.

1. The stock x86 VNNI tensor intrinsic (`dot_16x4_vnni`, tvm.s_tir.tensor_intrin.x86) passes
   int32x16 operands to `llvm.x86.avx512.vpdpbusd.512`; the bundled LLVM (22) declares that
   intrinsic on <64 x i8> operands, so every build that tensorizes with it fails. We register the
   same description with an implementation that reinterprets the operands as u8x64 / i8x64.
2. dlight's `gpu.GEMV` rule raises AssertionError on some of the model's fused reductions instead of
   declining them (returning None), which aborts TVM's whole CUDA pipeline. `apply_gpu_rule` treats
   a rule that asserts as a rule that does not apply; the next rule schedules the kernel.
3. MetaSchedule's `get_loggers_from_work_dir` rebuilds its logging config from the names of the
   handlers already on the `tvm.s_tir.meta_schedule` logger; a handler without a name (pytest ≥ 9.2
   adds unnamed LogCaptureHandlers to such loggers, and so may any application) puts None in the
   config and the second tuning run in a process dies with "'NoneType' object has no attribute
   'format'". `meta_schedule_loggers` detaches unnamed handlers for that call and puts them back.
"""

from __future__ import annotations

import logging

VNNI_INTRIN = "qso3_dot_16x4_u8i8i32_vnni"
META_SCHEDULE_LOGGER = "tvm.s_tir.meta_schedule"


def register_vnni_intrin() -> str:
    """Register (once) the working VNNI 16x4 u8·i8 -> i32 intrinsic; returns its name."""
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin.x86 import dot_product_16x4_u8i8i32_desc
    from tvm.script import tirx as T

    from .kernels.int8_matmul import intrin_registered

    if intrin_registered(VNNI_INTRIN):
        return VNNI_INTRIN

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16")

    TensorIntrin.register(VNNI_INTRIN, dot_product_16x4_u8i8i32_desc, impl)
    return VNNI_INTRIN


def apply_gpu_rule(rule, func, target):
    """A dlight GPU rule's schedule for `func`, or None if it does not apply (or asserts, see 2.)."""
    try:
        return rule.apply(func, target, False)
    except AssertionError:
        return None


def meta_schedule_loggers(work_dir: str, task_names: list[str]) -> list:
    """MetaSchedule's per-task loggers under work_dir/logs, whatever handlers the logger already has."""
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir

    logger = logging.getLogger(META_SCHEDULE_LOGGER)
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for h in unnamed:
        logger.removeHandler(h)
    try:
        return get_loggers_from_work_dir(work_dir, task_names)
    finally:
        for h in unnamed:
            logger.addHandler(h)
