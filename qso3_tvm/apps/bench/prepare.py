"""Route preparation: load the checkpoint, export the ONNX graphs, or compile the TVM library (cached),
and describe what the route will run. ONNX and TVM routes are prepared in a subprocess
(`python -m qso3_tvm.apps.bench.worker prepare`), checkpoint-only routes in the parent."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from ...errors import QSO3Error
from ...files import atomic_path, sha256
from .routes import ROUTES, Route

# the stages whose sources decide a compiled artifact (hashed into cache keys)
COMPILE_INPUTS = ("graph", "nn", "compiler")


class RouteUnavailable(Exception):
    """A route that cannot run here, with the reason (reported in the table, not an error)."""


def file_sha(path: Path, n: int = 12) -> str:
    return sha256(Path(path))[:n]


def compile_sources_hash() -> str:
    """Hash of the package sources an artifact depends on (new kernel/schedule modules included)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for p in sorted(f for sub in COMPILE_INPUTS for f in (root / sub).rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()[:10]


def prepare_route(spec: dict) -> dict:
    """Make the route's artifact (cached) and describe it; RouteUnavailable says why it cannot run."""
    route = ROUTES.get(spec["route"])
    if route is None:
        raise QSO3Error(f"unknown route {spec['route']!r}")
    if route.engine == "torch":
        return _prepare_checkpoint(spec, route)
    if route.engine == "ort":
        return _prepare_onnx(spec, int8=route.int8)
    return _prepare_tvm(spec, route)


# ---------------------------------------------------------------- PyTorch: the checkpoint itself
def _model_info(path: Path, model) -> dict:
    from ...nn.quant import weight_bytes

    return {"model": str(path), "species": list(model.cfg.species), "cutoff": float(model.cfg.cutoff),
            "weight_bytes": int(weight_bytes(model)), "file_bytes": path.stat().st_size,
            "config": model.cfg.to_dict()}


def _prepare_checkpoint(spec: dict, route: Route) -> dict:
    from ...nn.checkpoint import load_model, resolve_model_path

    path = resolve_model_path(spec[route.checkpoint])
    model = load_model(path)
    info = _model_info(path, model)
    if route.int8:
        if getattr(model, "quant_cfg", None) is None:
            raise RouteUnavailable(f"{path} is not a quantized checkpoint")
        from ...nn.int8 import int8_weight_bytes, to_int8

        info["weight_bytes"] = int(int8_weight_bytes(to_int8(model)))
    return info


# ---------------------------------------------------------------- ONNX Runtime: exported graphs
def _energy_module(model):
    import torch

    class EnergyOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, species, pos, mol, src, dst, mol_slots):
            return self.model(species, pos, mol, src, dst, mol_slots.shape[0])

    return EnergyOnly().eval()


def export_onnx(model, path: Path, forces: bool) -> None:
    """fp32 ONNX graph with symbolic atom/edge/molecule counts. Energy+forces: the make_fx trace of
    the joint energy+gradient function (as compiler.export), with silu_backward decomposed (the
    ONNX exporter has no function for it)."""
    import torch
    from torch._decomp import get_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    from ...compiler.export import EnergyForces, batch_inputs, example_batch

    model = model.eval()
    args = batch_inputs(example_batch(model))
    n, e, m = (torch.export.Dim(name, min=2) for name in ("atoms", "edges", "molecules"))
    shapes = ({0: n}, {0: n}, {0: n}, {0: e}, {0: e}, {0: m})
    if forces:
        with torch.enable_grad():
            traced = make_fx(EnergyForces(model), tracing_mode="symbolic", _allow_non_fake_inputs=True,
                             decomposition_table=get_decompositions([torch.ops.aten.silu_backward]))(*args)
        ep = torch.export.export(traced, args, dynamic_shapes=shapes)
    else:
        ep = torch.export.export(_energy_module(model), args, dynamic_shapes=shapes)
    with atomic_path(path, suffix=".onnx") as tmp:
        torch.onnx.export(ep, args, str(tmp), dynamo=True, external_data=False, verbose=False)


def onnx_weight_bytes(path: Path) -> int:
    import onnx
    from onnx import numpy_helper

    return int(sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer))


def _onnx_graph(model, folder: Path, stem: str, forces: bool, int8: bool) -> Path:
    """The cached fp32 graph of one mode, or its quantize_dynamic int8 form."""
    fp32 = folder / f"{stem}.onnx"
    if not fp32.exists():
        export_onnx(model, fp32, forces)
    if not int8:
        return fp32
    target = folder / f"{stem}_int8.onnx"
    if not target.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = target.with_name(f".{target.name}.tmp.onnx")
        quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8)
        os.replace(tmp, target)
    return target


def _prepare_onnx(spec: dict, int8: bool) -> dict:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise RouteUnavailable(f"{e.name} not installed (pip install 'qso3-tvm[onnx]')") from None
    import torch

    from ...nn.checkpoint import load_model, resolve_model_path

    path = resolve_model_path(spec["model_fp32"])
    model = load_model(path)
    info = _model_info(path, model)
    key = f"{file_sha(path)}-torch{torch.__version__}-onnx{onnx.__version__}"
    folder = Path(spec["cache_dir"]) / f"onnx-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    onnx_paths, skip = {}, {}
    for mode, stem, forces in (("E", "energy", False), ("E+F", "energy_forces", True)):
        try:
            onnx_paths[mode] = str(_onnx_graph(model, folder, stem, forces, int8))
        except Exception as e:
            skip[mode] = f"{'energy+forces' if forces else 'energy'} graph not exported: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if not onnx_paths:
        raise RouteUnavailable("; ".join(skip.values()))
    main = onnx_paths.get("E+F", onnx_paths.get("E"))
    info.update(onnx=onnx_paths, skip_modes=skip, weight_bytes=onnx_weight_bytes(Path(main)),
                file_bytes=Path(main).stat().st_size, source=str(folder))
    if int8:
        info["model"] += " (quantize_dynamic int8)"
    return info


# ---------------------------------------------------------------- TVM: compiled artifacts
def _tuning_kwargs(spec: dict) -> tuple[dict, str]:
    """compile_model's tuning-records argument and the cache-key tag of the records."""
    from ...compiler.tuning.database import database_sha256

    records = spec.get("tuning_records")
    if not records:
        raise RouteUnavailable("no tuned artifact: pass --tvm-int8-tuned DIR (an artifact compiled with "
                               "--tuning-records) or --tuning-records DIR")
    return {"tuning_records": records}, "-rec" + database_sha256(records)[:8]


def _compile_artifact(spec: dict, route: Route) -> Path:
    """The route's artifact compiled here into the cache (once per checkpoint, target, TVM and sources)."""
    import tvm

    from ...compiler.compile import compile_model
    from ...graph.convention import merge_buckets, sample_buckets
    from ...nn.checkpoint import load_model, resolve_model_path

    kwargs, tag = _tuning_kwargs(spec) if route.tuned else ({}, "")
    path = resolve_model_path(spec[route.checkpoint])
    # static copies for the packaged samples and the bench's workloads (tuned: and the database's buckets)
    model = load_model(path)
    kwargs["specialize"] = merge_buckets([*(spec.get("specialize") or []), *sample_buckets(model.cfg.species, model.cfg.cutoff)])
    tag += "-b" + hashlib.sha256(json.dumps([b.as_list() for b in kwargs["specialize"]]).encode()).hexdigest()[:8]
    key = f"{route.name}-{file_sha(path)}-{spec['target']}-tvm{tvm.__version__}-src{compile_sources_hash()}{tag}"
    folder = Path(spec["cache_dir"]) / key
    if not (folder / "manifest.json").exists():
        compile_model(str(path), spec["target"], folder, check=True, log=lambda *a: print(*a, file=sys.stderr), **kwargs)
    return folder


def _tuning_note(manifest: dict) -> str:
    tuning = manifest.get("tuning")
    if not tuning:
        return ""
    return (f"; {tuning.get('tuned_kernels', '?')} kernels scheduled from {tuning['database']} "
            f"(sha256 {tuning['database_sha256'][:12]}, buckets {tuning.get('buckets')})")


def _prepare_tvm(spec: dict, route: Route) -> dict:
    from ...graph.convention import read_manifest
    from ...nn.checkpoint import load_model

    given = spec.get("artifact")
    if given:
        folder = Path(given)
        source = f"given: {folder}"
    else:
        folder = _compile_artifact(spec, route)
        source = f"compiled here into {folder}"
    manifest = read_manifest(folder)
    lib = folder / manifest["library"]
    wbytes = (manifest.get("quantization") or {}).get("stored_weight_bytes")
    ckpt = Path(manifest["model"].get("checkpoint", ""))
    if wbytes is None and ckpt.is_file():
        from ...nn.quant import weight_bytes

        wbytes = weight_bytes(load_model(ckpt))
    return {"artifact": str(folder), "species": manifest["model"]["species"], "cutoff": float(manifest["model"]["cutoff"]),
            "weight_bytes": wbytes, "file_bytes": lib.stat().st_size, "source": source,
            "model": f"{manifest['model'].get('checkpoint')} ({manifest['model'].get('precision')}, "
                     f"target {manifest['target']['name']}{_tuning_note(manifest)})",
            "parity": manifest.get("parity")}
