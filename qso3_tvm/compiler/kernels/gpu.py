"""CUDA builds: GPU schedules for every fused kernel, and device code compiled ahead of time.

TVM 0.27's CUDA pipeline schedules fused kernels with dlight's rules; `default_gpu_schedule` applies
the same rules in the same order, past a rule that asserts (tvm_fixes 2), and keeps kernels that
bind their own threads (TOPI's GPU scatter, which replaces the serial CPU scatter here).

A CUDA artifact as TVM builds it carries CUDA C++ source that the Python runtime compiles when it
is loaded (`tvm_callback_cuda_compile`); a board running only the C++ runtime (our firmware on a
Jetson) cannot. `precompile_device_code` compiles that source here, with nvcc, into a fatbin
(SASS for the target's arch + PTX for newer GPUs) and puts it into the library in its place.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from ...errors import QSO3Error


def gpu_rules():
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def binds_threads(func) -> bool:
    """Whether a kernel already launches its own GPU threads (TOPI's GPU kernels do)."""
    from tvm import tirx

    return _walk(func, tirx.AttrStmt, lambda n: n.attr_key == "thread_extent")


def _walk(func, node_type, pred) -> bool:
    import tvm_ffi

    found = []
    tvm_ffi.structural_walk(func.body, [(node_type, lambda n: found.append(pred(n)))], order="post")
    return any(found)


def drop_empty_loops(func):
    """`func` without its zero-extent loops. Slices of length 0 (x[n:] with n = len(x)) appear in the
    model's backward; a GPU schedule of such a loop launches one block of threads that read and
    write out of bounds (seen as CUDA_ERROR_ILLEGAL_ADDRESS on an H100)."""
    import tvm
    from tvm import tirx

    if not _walk(func, tirx.For, lambda n: isinstance(n.extent, tirx.IntImm) and n.extent.value == 0):
        return func
    return tirx.transform.RemoveNoOp()(tvm.IRModule({"main": func}))["main"]


def schedule_gpu_func(func, target):
    """`func` as it is if it binds its own threads or does nothing, else the first dlight rule's
    schedule that does not fail; None if no rule applies."""
    from tvm import tirx

    func = drop_empty_loops(func)
    if binds_threads(func) or not _walk(func, tirx.BufferStore, lambda n: True):
        return func.with_attr("tirx.is_scheduled", True)
    from ..tvm_fixes import apply_gpu_rule

    for rule in gpu_rules():
        sch = apply_gpu_rule(rule, func, target)
        if sch is not None:
            sch = sch[0] if isinstance(sch, list) else sch
            return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return None


def default_gpu_schedule(target):
    """Module pass: schedule every unscheduled PrimFunc for the GPU (see module docstring)."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="QSO3DefaultGPUSchedule")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or (func.attrs and func.attrs.get("tirx.is_scheduled")):
                continue
            scheduled = schedule_gpu_func(func, target)
            if scheduled is None:
                raise QSO3Error(f"no GPU schedule for kernel {gv.name_hint} (target {target.kind.name})")
            updates[gv] = scheduled
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def _scatter_elements_gpu(bb, call):
    """relax.scatter_elements with TOPI's thread-bound GPU kernel (the default legalization is a
    serial CPU loop that no GPU schedule can bind)."""
    from tvm import topi

    return bb.call_te(topi.gpu.scatter_elements, *call.args, int(call.attrs.axis), str(call.attrs.reduction))


GPU_LEGALIZE = {"relax.scatter_elements": _scatter_elements_gpu}


# ---- device code ahead of time -------------------------------------------------------------------

def nvcc_path() -> str:
    nvcc = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
    if nvcc is None:
        raise QSO3Error("CUDA targets need nvcc to compile device code ahead of time (install the CUDA "
                        "toolkit, or `pip install nvidia-cuda-nvcc` and put its bin/ on PATH)")
    return nvcc


def compile_fatbin(source: str, arch: str) -> bytes:
    """CUDA C++ -> fatbin with SASS for `arch` (e.g. sm_87) and PTX for later GPUs."""
    compute = arch.replace("sm_", "compute_")
    with tempfile.TemporaryDirectory(prefix="qso3-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(source)
        cmd = [nvcc_path(), "--fatbin", "-O3", "-std=c++17", f"-gencode=arch={compute},code={arch}",
               f"-gencode=arch={compute},code={compute}", "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise QSO3Error(f"nvcc failed on the generated CUDA kernels ({arch}):\n{proc.stderr[-3000:]}")
        return out.read_bytes()


def _string(blob: bytes, at: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("<Q", blob, at)
    return blob[at + 8: at + 8 + n], at + 8 + n


def precompiled_cuda_payload(payload: bytes, sources: list[str], arch: str) -> bytes:
    """A serialized CUDA module (fmt, function table, data) with its CUDA source replaced by a fatbin."""
    fmt, at = _string(payload, 0)
    for source in sources:
        data = source.encode()
        if fmt == b"cuda" and payload.endswith(struct.pack("<Q", len(data)) + data):
            fmap = payload[at: len(payload) - 8 - len(data)]
            binary = compile_fatbin(source, arch)
            return struct.pack("<Q", 6) + b"fatbin" + fmap + struct.pack("<Q", len(binary)) + binary
    raise QSO3Error(f"unexpected CUDA module layout (fmt {fmt!r}): this TVM version's CUDA modules are not "
                    "supported for ahead-of-time device code")


def precompile_device_code(blob: bytes, sources: list[str], arch: str) -> bytes:
    """A library's serialized module tree with every CUDA module's source replaced by a fatbin.

    The tree holds each module as a kind string and a payload, both length-prefixed (u64 LE);
    a CUDA payload is (fmt, function table, data) with fmt "cuda" and data its source."""
    key = struct.pack("<Q", 4) + b"cuda"
    out, at, n = bytearray(), 0, 0
    while (hit := blob.find(key, at)) >= 0:
        size_at = hit + len(key)
        payload, end = _string(blob, size_at)
        if not payload.startswith(key):  # "cuda" inside some other string, not a module entry
            out += blob[at: size_at]
            at = size_at
            continue
        new = precompiled_cuda_payload(payload, sources, arch)
        out += blob[at: size_at] + struct.pack("<Q", len(new)) + new
        at, n = end, n + 1
    if n != len(sources):
        raise QSO3Error(f"found {n} CUDA modules in the library, expected {len(sources)}")
    return bytes(out + blob[at:])


def pack_imports_precompiled(executable, arch: str):
    """An `export_library(fpack_imports=...)` hook: TVM's packed module tree (a C array), with the
    CUDA modules' device code compiled ahead of time for `arch`."""
    import tvm

    sources = [m.inspect_source() for m in executable.mod._collect_from_import_tree(lambda m: m.kind == "cuda")]

    def fpack(mod, is_system_lib, prefix, workspace_dir):
        text = tvm.get_global_func("runtime.ModulePackImportsToC")(mod, is_system_lib, prefix)
        head, rest = text.split("] = {", 1)
        body, tail = rest.split("};", 1)
        blob = bytes(int(x, 16) for x in re.findall(r"0x([0-9a-fA-F]{2})", body))
        (size,) = struct.unpack_from("<Q", blob, 0)
        if size != len(blob) - 8:
            raise QSO3Error("unexpected layout of TVM's packed module tree")
        new = precompile_device_code(blob[8:], sources, arch)
        new = struct.pack("<Q", len(new)) + new
        head = head[: head.rindex("[") + 1] + str(len(new))
        rows = ",\n".join(",".join(f"0x{b:02x}" for b in new[i: i + 32]) for i in range(0, len(new), 32))
        path = os.path.join(workspace_dir, f"{prefix}devc.c")
        with open(path, "w") as f:
            f.write(f"{head}] = {{\n{rows}\n}};{tail}")
        return path

    return fpack
