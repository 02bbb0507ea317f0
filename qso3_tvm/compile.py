"""`qso3-tvm compile`: model -> energy+forces graph -> Relax -> library for a target + manifest.json.

The compiled module is checked against the PyTorch model on the packaged sample molecules when the
target runs on this machine; above tolerance nothing is written and the command fails (NequIP
style). Tolerances (max abs error over atoms/molecules) can be overridden with
QSO3_COMPILE_TOL_E_MEV and QSO3_COMPILE_TOL_F_MEV.

Artifacts are written to a temporary sibling folder and renamed into place at the end, so a
failure or an interrupt never leaves a half-written artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import load_model, precision, resolve_model_path
from .errors import QSO3Error
from .export import export_energy_forces
from .int8 import int8_weight_bytes, to_int8
from .kernels.pipeline import apply_kernels, kernel_summary, relax_pipeline
from .metrics import predict
from .relax_frontend import import_to_relax
from .runtime import MANIFEST, CompiledModel, max_errors, sample_set
from .targets import TargetSpec, resolve_target

LIBRARY = "model.so"
# float32 graph vs PyTorch float32: reassociated sums only. Quantized models: a different summation
# order (vectorized kernels, int32 GEMMs) can flip a rounding tie of one activation code, which moves
# that molecule by one quantization step: measured 15.9 meV / 1.4 meV/Å on one of the six bundled
# samples (aspirin[1]) for ethanol-int8 on x86-avx512, the other five within 0.002 meV / 0.06 meV/Å.
# The bound is set above one step and below the model's own error (20 meV, 14 meV/Å MAE).
DEFAULT_TOL_MEV = {"fp32": (0.1, 0.1), "quantized": (30.0, 50.0)}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def tolerances(prec: str) -> tuple[float, float]:
    e, f = DEFAULT_TOL_MEV["fp32" if prec == "fp32" else "quantized"]
    return (float(os.environ.get("QSO3_COMPILE_TOL_E_MEV", e)), float(os.environ.get("QSO3_COMPILE_TOL_F_MEV", f)))


def deployable(model, spec: TargetSpec | None = None):
    """The module that gets exported: quantized models in their int8 form (int8 weights, int8 GEMMs;
    MDDQ and attention as our TIR operators on CPU targets, generic operators elsewhere)."""
    if getattr(model, "quant_cfg", None) is None:
        return model
    return to_int8(model, custom_ops=spec is None or spec.device == "cpu")


def build(model, spec: TargetSpec, bucket=None, tuning_records=None):
    """Relax executable of the model's energy+forces graph for a target (symbolic sizes, or the
    static sizes of a bucket; with a MetaSchedule database applied, see qso3_tvm.tune)."""
    import tvm

    target = spec.tvm_target()
    mod, _ = apply_kernels(import_to_relax(export_energy_forces(deployable(model, spec), bucket=bucket)), target)
    if tuning_records:
        from .tune import apply_tuning_records, tuning_target

        mod = apply_tuning_records(mod, tuning_target(spec), tuning_records)
    return tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))


def write_library(executable, path: Path, spec: TargetSpec) -> None:
    import tvm

    kwargs = {}
    if spec.device == "cuda":
        from .kernels.gpu import pack_imports_precompiled

        kwargs["fpack_imports"] = pack_imports_precompiled(executable, spec.target["arch"])
    if spec.cross_compiler:
        if shutil.which(spec.cross_compiler) is None:
            raise QSO3Error(f"target {spec.name} needs the cross compiler {spec.cross_compiler} "
                            "(Debian: apt-get install g++-aarch64-linux-gnu)")
        executable.export_library(str(path), fcompile=tvm.support.cc.cross_compiler(spec.cross_compiler), **kwargs)
    else:
        executable.export_library(str(path), **kwargs)


def reference(model) -> dict:
    """PyTorch energies and forces on the sample molecules, stored in the manifest: boards are
    checked against them (`qso3-tvm profile`)."""
    mols, names = sample_set(model.cfg.species)
    e_ref, f_ref = predict(model, mols)
    return {"samples": names, "energy_ev": e_ref.tolist(), "forces_ev_per_a": f_ref.tolist()}


def parity(model, artifact: Path, ref: dict) -> dict:
    """Compiled (run here) vs PyTorch on the sample molecules: max abs errors in meV and meV/Å."""
    mols, _ = sample_set(model.cfg.species)
    compiled = CompiledModel(artifact)
    if compiled.manifest["inputs"].get("buckets"):  # a static build checks the samples that fit it
        from .tune import parity_subset

        mols, ref = parity_subset(compiled, mols, ref)
    return {**max_errors(ref, *compiled.predict(mols)), "samples_checked": len(mols)}


def manifest(model, model_path: Path, spec: TargetSpec, library: Path) -> dict:
    import tvm

    cfg = model.cfg
    return {
        "format": "qso3-tvm-artifact/1",
        "library": library.name,
        "library_sha256": sha256(library),
        "model": {"checkpoint": str(model_path), "checkpoint_sha256": sha256(model_path), "precision": precision(model),
                  "species": list(cfg.species), "cutoff": cfg.cutoff, "channels": cfg.channels, "layers": cfg.layers,
                  "heads": cfg.heads, "attention": cfg.attention, "energy_shift": list(cfg.energy_shift)},
        "quantization": getattr(model, "quant_cfg", None) and {
            **model.quant_cfg.to_dict(), "stored_weight_bytes": int8_weight_bytes(deployable(model)),
            "kernels": kernel_summary(spec.tvm_target())},
        "target": {"name": spec.name, "source": spec.source, "tvm": spec.target, "arch": spec.arch,
                   "cpu_features": spec.cpu_features, "device": spec.device},
        "inputs": {"species": ["atoms"], "pos": ["atoms", 3], "mol": ["atoms"], "src": ["edges"], "dst": ["edges"],
                   "mol_slots": ["molecules"],
                   "bounds": {"atoms": [2, None], "edges": [2, None], "molecules": [2, None]},
                   "note": "symbolic shapes: one library serves any molecule size; a ghost molecule pads each call"},
        "outputs": {"energy": ["molecules"], "forces": ["atoms", 3], "units": "eV, eV/Å; add energy_shift per atom"},
        "versions": {"tvm": tvm.__version__, "torch": torch.__version__, "qso3_tvm": __import__("qso3_tvm").__version__},
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def compile_model(model_spec: str, target: str, out: str | Path, check: bool = True, log=print,
                  bucket=None, tuning_records=None) -> dict:
    """Compile a checkpoint for a target into `out` (library + manifest.json); returns the manifest.
    `tuning_records`: a MetaSchedule database folder (qso3-tvm tune), built at `bucket` or its first."""
    spec = resolve_target(target)
    log(f"target {target!r} -> {spec.source} {spec.name}: {json.dumps(spec.target)}")
    model_path = resolve_model_path(model_spec)
    model = load_model(model_path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t0 = time.time()
        if tuning_records or bucket:
            from .tune import static_build_info

            bucket, static_info = static_build_info(bucket, tuning_records, log)
        executable = build(model, spec, bucket=bucket, tuning_records=tuning_records)
        library = tmp / LIBRARY
        write_library(executable, library, spec)
        log(f"built {library.name} in {time.time() - t0:.1f} s")
        info = manifest(model, model_path, spec, library)
        if bucket is not None:
            info.update(static_info)
        info["reference"] = reference(model)
        if check and spec.local:
            (tmp / MANIFEST).write_text(json.dumps(info, indent=1))
            result = parity(model, tmp, info["reference"])
            tol_e, tol_f = tolerances(info["model"]["precision"])
            log(f"parity vs PyTorch on {len(info['reference']['samples'])} samples: max |dE| {result['max_energy_error_mev']:.4f} meV "
                f"(tol {tol_e}), max |dF| {result['max_force_error_mev_per_a']:.4f} meV/Å (tol {tol_f})")
            info["parity"] = {**result, "tolerance_mev": [tol_e, tol_f]}
            if result["max_energy_error_mev"] > tol_e or result["max_force_error_mev_per_a"] > tol_f:
                raise QSO3Error(f"compiled model disagrees with PyTorch: max |dE| {result['max_energy_error_mev']:.3g} meV "
                                f"(tol {tol_e}), max |dF| {result['max_force_error_mev_per_a']:.3g} meV/Å (tol {tol_f}); "
                                "override with QSO3_COMPILE_TOL_E_MEV / QSO3_COMPILE_TOL_F_MEV")
        else:
            info["parity"] = None
            log(f"parity check skipped: target {spec.name} does not run on this machine")
        (tmp / MANIFEST).write_text(json.dumps(info, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info
