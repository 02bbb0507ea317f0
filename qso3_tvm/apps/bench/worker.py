"""One benchmark route in its own process (see qso3_tvm.apps.bench.run).

    python -m qso3_tvm.apps.bench.worker prepare SPEC.json OUT.json   build/cache the route's artifact
    python -m qso3_tvm.apps.bench.worker serve SPEC.json              long-lived timing worker

A serving worker loads its engine with a fixed thread count (set by the parent in the environment
before anything is imported), builds one callable per case (workload x mode), warms each up, then
answers JSON commands on stdin: {"cmd": "run", "case": ..., "budget_s": ..., "max_calls": ...}
runs one untimed call and then timed calls until the budget is spent (at least one), and replies
with the per-call times; {"cmd": "quit"} replies with the process's peak RSS and exits. Replies are
stdout lines starting with REPLY (anything else a library prints there is ignored by the parent).

TVM workers import only the TVM runtime (TVM_USE_RUNTIME_LIB=1, torch blocked), as a deployment
would; if the library needs more than the runtime, they fall back to a full `import tvm`.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from ...files import atomic_write
from .routes import ROUTES

REPLY = "@@qso3-bench "


def reply(obj) -> None:
    sys.stdout.write("\n" + REPLY + json.dumps(obj) + "\n")
    sys.stdout.flush()


def rss_kb() -> int:
    """Current resident set size (kB)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def load_inputs(path: str) -> dict:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


# ---------------------------------------------------------------- engines: case -> (call, n_ops)
def torch_case(route: str, spec: dict, inputs: dict, mode: str):
    import torch

    model = _torch_model(route, spec)
    species, pos, mol, src, dst = (torch.as_tensor(inputs[k]) for k in ("species", "pos", "mol", "src", "dst"))
    n_mol = int(inputs["n_mol"])
    compiled = ROUTES[route].torch_compile
    if compiled:
        onehot = torch.nn.functional.one_hot(mol, n_mol).to(pos.dtype)
        fn = _torch_model.compiled

        def energy(p):
            return fn(species, p, onehot, src, dst)
    else:
        def energy(p):
            return model(species, p, mol, src, dst, n_mol)

    if mode == "E":
        def call():
            with torch.inference_mode():
                return energy(pos).numpy(), None
    else:
        def call():
            p = pos.detach().requires_grad_(True)
            e = energy(p)
            (g,) = torch.autograd.grad(e.sum(), p)
            return e.detach().numpy(), (-g).numpy()
    if compiled:  # a dispatch mode around compiled code would trace it again
        return call, lambda: None
    return call, lambda: count_torch_ops(call)


def _torch_model(route: str, spec: dict):
    """One model per worker (cached on the function); torch.compile wraps it once (dynamic shapes)."""
    if getattr(_torch_model, "model", None) is None:
        import torch

        from ...nn.checkpoint import load_model

        torch.set_num_threads(int(spec["threads"]))
        model = load_model(spec["model"])
        if ROUTES[route].int8:
            from ...nn.int8 import to_int8

            model = to_int8(model)
        _torch_model.model = model.eval()
        if ROUTES[route].torch_compile:
            # symbolic sizes: one compile per mode serves every molecule size (as MD needs: the edge
            # count changes every step); static shapes would recompile per workload (minutes each)
            _torch_model.compiled = torch.compile(OneHotReadout(model), dynamic=True)
    return _torch_model.model


def OneHotReadout(model):  # noqa: N802 (a module factory)
    """Per-molecule energy as a dense one-hot product: torch.compile asserts on an atomic-add
    scatter into a size-1 output (one molecule)."""
    import torch

    class _Readout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, species, pos, onehot, src, dst):
            return onehot.T @ self.model.atomic_energies(species, pos, src, dst)

    return _Readout().eval()


def count_torch_ops(call) -> int:
    """ATen operators dispatched by one call (forward and, for forces, backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        call()
    return Count.n


def ort_case(route: str, spec: dict, inputs: dict, mode: str):
    import onnxruntime as ort

    path = spec["onnx"].get(mode)
    if not path:
        raise RouteSkip(spec.get("skip_modes", {}).get(mode, f"no ONNX graph for {mode}"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(spec["threads"])
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    optimized = Path(spec["work_dir"]) / f"{route}_{mode}_t{spec['threads']}.optimized.onnx"
    opts.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    arrays = [inputs[k] for k in ("species", "pos", "mol", "src", "dst")]
    arrays.append(np.zeros(int(inputs["n_mol"]), np.float32))
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(arrays):
        raise RuntimeError(f"ONNX graph has {len(names)} inputs, expected 6")
    feeds = dict(zip(names, arrays))

    def call():
        out = sess.run(None, feeds)
        return out[0], (out[1] if len(out) > 1 else None)

    def n_ops():
        import onnx

        return len(onnx.load(str(optimized)).graph.node) if optimized.exists() else None

    return call, n_ops


def tvm_import():
    """The TVM runtime alone (TVM_USE_RUNTIME_LIB=1, torch blocked); a full import on request."""
    if os.environ.get("TVM_USE_RUNTIME_LIB") == "1":
        sys.modules.setdefault("torch", None)  # tvm_ffi imports torch if it can (~400 MB)
    import tvm
    from tvm.runtime import vm as rvm

    return tvm, rvm.VirtualMachine


def tvm_case(route: str, spec: dict, inputs: dict, mode: str):
    """The artifact through runtime.CompiledModel; the call's arrays are built once, outside the timing.
    Energy-only cases call the library's `energy` function (compiler.module.add_energy_entry)."""
    tvm, VirtualMachine = tvm_import()
    from ...errors import BucketError
    from ...graph.convention import pad_to_bucket, pad_to_specialized
    from ...runtime.compiled import CompiledModel

    if getattr(tvm_case, "model", None) is None:
        tvm_case.model = CompiledModel(spec["artifact"])
    model = tvm_case.model
    if mode != "E+F" and not model.has_energy_entry:
        raise RouteSkip("the artifact has no energy-only entry point (compiled before it existed)")
    arrays = [inputs[f"g_{k}"] for k in ("species", "pos", "mol", "src", "dst")]
    arrays.append(np.zeros(int(inputs["g_n_mol"]), np.float32))
    buckets = model.manifest["inputs"].get("buckets")
    if buckets:  # static (tuned) build: pad to its bucket, as CompiledModel does
        try:
            arrays = pad_to_bucket(arrays, buckets, model.cutoff, spec["artifact"])
        except BucketError as e:
            raise RouteSkip(str(e)) from None
    arrays = pad_to_specialized(arrays, model.manifest, model.cutoff)  # a static copy when one fits
    args = [tvm.runtime.tensor(a, model.device) for a in arrays]
    fn_name, dev = model.function("main" if mode == "E+F" else "energy", args), model.device
    fn = model.vm[fn_name]
    n_real_atoms, n_real_mol = int(inputs["n_atoms"]), int(inputs["n_mol"])

    def call():
        out = fn(*args)
        if mode == "E+F":
            return out[0].numpy()[:n_real_mol], out[1].numpy()[:n_real_atoms]
        return out.numpy()[:n_real_mol], None

    def n_ops():
        """VM call instructions of one invocation (a fresh VM so the timed one has no hook)."""
        counts = {"kernels": 0, "builtins": 0}

        def instrument(func, name, before, ret, *a):
            if before:
                counts["builtins" if str(name).startswith("vm.builtin") else "kernels"] += 1
            return 0

        vm = VirtualMachine(model.library, dev)
        vm.set_instrument(instrument)
        vm[fn_name](*args)
        return counts["kernels"]

    return call, n_ops


class RouteSkip(Exception):
    """A case this route cannot run, with the reason (reported, not an error)."""


def make_case(route: str, spec: dict, inputs: dict, mode: str):
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}")
    engine_case = {"torch": torch_case, "ort": ort_case, "tvm": tvm_case}[ROUTES[route].engine]
    return engine_case(route, spec, inputs, mode)


# ---------------------------------------------------------------- serving loop
def out_path(work_dir, route: str, threads: int, key: str) -> Path:
    """Where a worker leaves its first outputs of a case (compared with eager fp32 by the parent)."""
    return Path(work_dir) / f"out_{route}_t{threads}_{key.replace('/', '__')}.npz"


def timed(call, budget_s: float, max_calls: int, warm: bool) -> list[float]:
    if warm:
        call()
    gc.collect()
    gc.disable()
    try:
        times, start = [], time.perf_counter()
        while not times or (len(times) < max_calls and time.perf_counter() - start < budget_s):
            t0 = time.perf_counter_ns()
            call()
            times.append((time.perf_counter_ns() - t0) * 1e-9)
    finally:
        gc.enable()
    return times


def serve(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    route = spec["route"]
    calls, info = {}, {}
    t_setup = time.time()
    for case in spec["cases"]:
        key = case["key"]
        try:
            inputs = load_inputs(case["inputs"])
            call, n_ops = make_case(route, spec, inputs, case["mode"])
            t0 = time.perf_counter()
            out = call()  # first call: compiles (torch.compile), allocates, fills caches
            first_s = time.perf_counter() - t0
            for _ in range(int(spec.get("warmup", 3))):
                call()
            np.savez(out_path(spec["work_dir"], route, spec["threads"], key),
                     energy=np.asarray(out[0], np.float64),
                     **({} if out[1] is None else {"forces": np.asarray(out[1], np.float64)}))
            try:
                ops = n_ops()
            except Exception as e:  # counting is informational
                ops, _ = None, sys.stderr.write(f"op count failed: {e!r}\n")
            calls[key] = call
            info[key] = {"ok": True, "first_call_s": first_s, "ops_per_call": ops}
        except RouteSkip as e:
            info[key] = {"ok": False, "skip": str(e)}
        except Exception as e:
            traceback.print_exc()
            info[key] = {"ok": False, "skip": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    reply({"ready": True, "cases": info, "setup_s": time.time() - t_setup, "rss_kb": rss_kb(),
           "peak_rss_kb": peak_rss_kb(), "torch_loaded": sys.modules.get("torch") is not None})
    last = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            reply({"rss_kb": rss_kb(), "peak_rss_kb": peak_rss_kb()})
            return
        key = cmd["case"]
        budget = float(cmd["budget_s"])
        times = timed(calls[key], budget, int(cmd["max_calls"]), warm=last.get(key, 0.0) < budget)
        last[key] = float(np.median(times))
        reply({"times": times})


# ---------------------------------------------------------------- preparation (artifacts into the cache)
def prepare(spec_path: str, out_path: str) -> None:
    from .prepare import RouteUnavailable, prepare_route

    spec = json.loads(Path(spec_path).read_text())
    try:
        result = prepare_route(spec)
    except RouteUnavailable as e:
        result = {"skip": str(e)}
    except Exception as e:
        traceback.print_exc()
        result = {"skip": f"preparation failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    atomic_write(out_path, json.dumps(result))


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and argv[0] == "serve":
        serve(argv[1])
    elif len(argv) >= 3 and argv[0] == "prepare":
        prepare(argv[1], argv[2])
    else:
        sys.exit("usage: python -m qso3_tvm.apps.bench.worker serve SPEC.json | prepare SPEC.json OUT.json")


if __name__ == "__main__":
    main(sys.argv[1:])
