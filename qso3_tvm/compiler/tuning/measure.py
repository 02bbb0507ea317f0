"""Where tuning measures: MetaSchedule builders and runners (this machine, or boards through an RPC
tracker), the untuned baseline of each task, and per-kernel times of an untuned build."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from ...errors import BucketError, QSO3Error
from ...graph.convention import Bucket, call_arrays
from ...graph.molecules import MoleculeSet, random_molecule


def _call_args(model, bucket: Bucket, device):
    """Device tensors of a sample-like call (a random 9-atom molecule) padded to the bucket."""
    import tvm

    species = model.cfg.species
    for n in range(min(max(1, bucket.atoms - 2), 9), 0, -1):  # the largest molecule that fits
        z, p = random_molecule(n, species=species, seed=0)
        try:
            arrays, _ = call_arrays(MoleculeSet.from_molecules([(z, p)]), [0], species, model.cfg.cutoff, [bucket.as_list()])
            return [tvm.runtime.tensor(a, device) for a in arrays]
        except BucketError:
            continue
    raise QSO3Error(f"bucket {bucket.text}: not even one atom fits")


def profile_kernels(mod, target, model, bucket: Bucket, runs: int = 3) -> dict[str, float]:
    """Seconds per module call spent in each kernel (by global symbol) on this machine, untuned."""
    import tvm
    from tvm import relax

    ex = tvm.compile(mod, target=target)
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    args = _call_args(model, bucket, dev)
    vm["main"](*args)
    acc: dict[str, float] = {}
    start: dict[str, float] = {}

    def instrument(func, sym, before, ret, *a):
        if before:
            start[sym] = time.perf_counter()
        else:
            acc[sym] = acc.get(sym, 0.0) + time.perf_counter() - start[sym]
        return 0

    vm.set_instrument(instrument)
    for _ in range(runs):
        vm["main"](*args)
    return {k: v / runs for k, v in acc.items()}


def build_kernel(mod, target, _params):
    """MetaSchedule builder: the default one without its `import tvm.s_tir.tensor_intrin`, which costs
    ~40 s of CPU in every builder process (the builder starts new processes for every batch). Our
    search space has no tensorize rules, so no intrinsic has to be registered to build a candidate."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def export_aarch64(mod) -> str:
    """MetaSchedule builder export for arm64 boards: a cross-linked .so (boards have no linker)."""
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    return path


def export_native(mod) -> str:
    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path)
    return path


def alloc_local(device, args_info, alloc_repeat):
    """LocalRunner arguments: see alloc_host_random (valid gather/scatter indices)."""
    return alloc_host_random(None, device, args_info, alloc_repeat)


def alloc_host_random(session, device, args_info, alloc_repeat):
    """Arguments filled on the host (copied over RPC: works on a board whose runtime lacks
    tvm.contrib.random.random_fill). Integer tensors get 0/1: many kernels (take, scatter_elements)
    read them as indices, and MetaSchedule's default random fill makes them crash the runner."""
    import tvm

    rng = np.random.default_rng(0)
    out = []
    for _ in range(alloc_repeat):
        args = []
        for info in args_info:
            _, dtype, shape = info
            if "int" in dtype or "bool" in dtype:
                a = rng.integers(0, 2, size=shape).astype(dtype)
            else:
                a = rng.uniform(-1, 1, size=shape).astype(dtype)
            args.append(tvm.runtime.tensor(a, device))
        out.append(args)
    return out


def make_builder_runner(spec, rpc_tracker: str | None, rpc_key: str | None, n_parallel: int | None):
    from tvm.s_tir import meta_schedule as ms

    from ...runtime.remote import split_addr

    evaluator = ms.runner.EvaluatorConfig(number=5, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False)
    cross = spec.arch == "aarch64"
    # a builder process imports tvm.s_tir.tensor_intrin (~30 s here): the default 30 s timeout kills it
    builder = ms.builder.LocalBuilder(timeout_sec=300, f_build=build_kernel, f_export=export_aarch64 if cross else export_native)
    if rpc_tracker:
        if not rpc_key:
            raise QSO3Error("--rpc-tracker needs --rpc-key")
        host, port = split_addr(rpc_tracker, "--rpc-tracker")
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc_key,
                                     session_priority=1, session_timeout_sec=600)
        try:
            from tvm import rpc

            queue = rpc.connect_tracker(host, port).summary()["queue_info"].get(rpc_key, {})
        except Exception as e:
            raise QSO3Error(f"cannot reach the RPC tracker {rpc_tracker}: {str(e).strip().splitlines()[-1]}") from None
        boards = int(queue.get("free", 0)) + int(queue.get("pending", 0))
        if boards == 0:
            raise QSO3Error(f"no board under key {rpc_key!r} at tracker {rpc_tracker}")
        runner = ms.runner.RPCRunner(config, evaluator, max_workers=n_parallel or boards,
                                     f_alloc_argument=alloc_host_random)
        return builder, runner, f"RPC tracker {rpc_tracker} key {rpc_key} ({boards} board(s))"
    if not spec.local:
        raise QSO3Error(f"target {spec.name} does not run on this machine: measure on boards with "
                        "--rpc-tracker HOST:PORT --rpc-key KEY")
    return builder, ms.runner.LocalRunner(evaluator, f_alloc_argument=alloc_local), "this machine"


def measure_untuned(tasks, target, builder, runner) -> list[float | None]:
    """Mean seconds of each task's kernel as legalized (no schedule), with the tuning builder/runner
    (one build batch, so one builder start)."""
    from tvm.s_tir import meta_schedule as ms

    out: list[float | None] = [None] * len(tasks)
    try:
        mods = [t.dispatched[0] for t in tasks]
        built = builder.build([ms.builder.BuilderInput(m, target) for m in mods])
        inputs, where = [], []
        for i, (m, res) in enumerate(zip(mods, built)):
            if not res.error_msg:
                func = next(f for _, f in m.functions_items())
                inputs.append(ms.runner.RunnerInput(res.artifact_path, "cpu", ms.arg_info.ArgInfo.from_prim_func(func)))
                where.append(i)
        for i, fut in zip(where, runner.run(inputs)):
            r = fut.result()
            if not r.error_msg:
                out[i] = float(np.mean([float(x) for x in r.run_secs]))
    except Exception:  # the baseline column is informative only
        pass
    return out
