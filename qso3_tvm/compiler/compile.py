"""`qso3-tvm compile`: model -> energy+forces graph -> Relax -> library for a target + manifest.json.

The compiled module is checked against the PyTorch model on the packaged sample molecules when the
target runs on this machine; above tolerance nothing is written and the command fails (NequIP
style). Tolerances (max abs error over atoms/molecules) can be overridden with
QSO3_COMPILE_TOL_E_MEV and QSO3_COMPILE_TOL_F_MEV.

Artifacts are written to a temporary sibling folder and renamed into place at the end, so a
failure or an interrupt never leaves a half-written artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import QSO3Error
from ..files import log_tail, sha256, umask_mode
from ..graph.convention import (
    ENTRY_POINTS,
    MANIFEST,
    Bucket,
    bucket_function,
    dynamic_inputs,
    fits_buckets,
    float_activations,
    max_errors,
    merge_buckets,
    sample_buckets,
    sample_set,
    write_manifest,
)
from ..nn.checkpoint import load_model, precision, resolve_model_path
from ..nn.int8 import int8_weight_bytes
from ..nn.metrics import predict
from ..resources import git_commit
from ..runtime.compiled import CompiledModel
from .kernels.pipeline import kernel_summary, relax_pipeline
from .module import deployable, relax_module
from .stages import Stages, native_output_to
from .targets import TargetSpec, resolve_target, tuning_target
from .tuning.database import apply_tuning_records, database_buckets, static_build_info, tuning_info

LIBRARY = "model.so"
# float32 graph vs PyTorch float32: reassociated sums only. Quantized models: a different summation
# order (vectorized kernels, int32 GEMMs) can flip a rounding tie of one activation code, which moves
# that molecule by one quantization step: measured 15.9 meV / 1.4 meV/Å on one of the six bundled
# samples (aspirin[1]) for the 10-epoch ethanol-int8 on x86-avx512, the other five within 0.002 meV / 0.06 meV/Å;
# 3.1 meV / 6.0 meV/Å for the float-head ethanol-int8 bundled since (x86-avx512 and arm64 alike).
# The bound is set above one step and below the model's own error (6–20 meV, 12–14 meV/Å MAE).
# Weight-only precisions (w8, w4) have no activation codes to flip: float arithmetic on dequantized
# weights, held to the fp32 bound.
DEFAULT_TOL_MEV = {"fp32": (0.1, 0.1), "quantized": (30.0, 50.0)}


def tolerances(prec: str) -> tuple[float, float]:
    e, f = DEFAULT_TOL_MEV["fp32" if float_activations(prec) else "quantized"]
    return (float(os.environ.get("QSO3_COMPILE_TOL_E_MEV", e)), float(os.environ.get("QSO3_COMPILE_TOL_F_MEV", f)))


def build(model, spec: TargetSpec, bucket=None, tuning_records=None, stages: Stages | None = None, specialize=(),
          tuning: dict | None = None):
    """Relax executable of the model's energy+forces graph for a target (symbolic sizes, or the
    static sizes of a bucket); `specialize`: buckets that get static copies of the entry points in a
    symbolic build (graph.convention); `tuning_records`: a MetaSchedule database applied to the static
    kernels (compiler.tuning), the number of kernels it scheduled goes to tuning["tuned_kernels"]."""
    import tvm

    stages = stages or Stages(STAGES, log=lambda *_: None)
    target = spec.tvm_target()
    with stages.run("export and import to Relax"):
        mod = relax_module(model, spec, bucket=bucket, specialize=specialize)
        if tuning_records:
            mod, applied = apply_tuning_records(mod, tuning_target(spec), tuning_records)
            if tuning is not None:
                tuning["tuned_kernels"] = applied
    with stages.run("build with TVM"):
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
        mols, ref = parity_subset(compiled, mols, ref)
    errors = [max_errors(ref, *compiled.predict(mols))]  # one call on all samples: the symbolic function
    if compiled.manifest["inputs"].get("specialized"):  # one call per sample: the specialized copies
        errors.append(max_errors(ref, *compiled.predict(mols, batch_size=1)))
    return {k: max(e[k] for e in errors) for k in errors[0]} | {"samples_checked": len(mols)}


def parity_subset(compiled, mols, ref: dict):
    """The sample molecules that fit one of a static build's buckets, and their reference values."""
    buckets = compiled.manifest["inputs"]["buckets"]
    keep = [i for i in range(len(mols)) if fits_buckets(buckets, *mols.frame(i), compiled.species, compiled.cutoff)]
    if not keep:
        raise QSO3Error(f"no packaged sample molecule fits the buckets {buckets}: "
                        "cannot check the build against PyTorch (use --no-check or a larger bucket)")
    rows = np.concatenate([np.arange(mols.offsets[i], mols.offsets[i + 1]) for i in keep])
    ref = {**ref, "energy_ev": np.asarray(ref["energy_ev"])[keep], "forces_ev_per_a": np.asarray(ref["forces_ev_per_a"])[rows]}
    return mols.subset(keep), ref


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
        "inputs": dynamic_inputs(),
        "outputs": {"energy": ["molecules"], "forces": ["atoms", 3], "units": "eV, eV/Å; add energy_shift per atom"},
        "functions": dict(ENTRY_POINTS),
        "versions": {"tvm": tvm.__version__, "torch": torch.__version__, "qso3_tvm": __version__},
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


STAGES = ["export and import to Relax", "build with TVM", "write library", "check against PyTorch"]
BUILD_LOG = "compile.log"  # TVM's own messages during the build, kept in the artifact folder


def compile_model(model_spec: str, target: str, out: str | Path, check: bool = True, log=print,
                  bucket=None, tuning_records=None, specialize=None) -> dict:
    """Compile a checkpoint for a target into `out` (library + manifest.json); returns the manifest.
    `tuning_records`: a MetaSchedule database folder (qso3-tvm tune): on CPU targets without `bucket`, a
    symbolic build whose static copies include the database's buckets (tuned kernels, padded calls) besides
    `specialize`; with `bucket` (or on other targets) a static build at that bucket (or the database's first).
    `specialize`: buckets for static copies of a symbolic build's entry points (None: one per packaged
    sample molecule the model covers, graph.convention.sample_buckets, on CPU targets; [] for none).
    `out` must be new, empty, or an earlier artifact (replaced only once the new one is complete)."""
    spec = resolve_target(target)
    log(f"target {target!r} -> {spec.source} {spec.name}: {json.dumps(spec.target)}")
    out = Path(out)
    check_output_dir(out)
    model_path = resolve_model_path(model_spec)
    model = load_model(model_path)
    static_info = None
    if bucket or (tuning_records and spec.device != "cpu"):
        bucket, static_info = static_build_info(bucket, tuning_records, log)
        specialize = []
    elif specialize is None:
        specialize = sample_buckets(model.cfg.species, model.cfg.cutoff) if spec.device == "cpu" else []
    elif specialize and spec.device != "cpu":
        raise QSO3Error(f"--specialize is for CPU targets only: static copies for {spec.name} fail in TVM 0.27's CUDA "
                        "codegen (a kernel allocates global scratch memory)")
    specialize = [Bucket.parse(b) for b in specialize]
    if tuning_records and static_info is None:  # tuned static copies at the database's buckets
        static_info = {"tuning": tuning_info(tuning_records)}
        tuned = database_buckets(tuning_records)
        specialize = sorted(set(merge_buckets([*tuned, *specialize])) | set(tuned), key=lambda b: b.as_list())
    if specialize:
        log(f"specialized buckets (atoms,edges,molecules incl. the ghost): {' '.join(b.text for b in specialize)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    stages = Stages(STAGES if check and spec.local else STAGES[:-1], log)
    try:
        with native_output_to(tmp / BUILD_LOG):
            info = _build_artifact(model, model_path, spec, tmp, stages, bucket, tuning_records, static_info, specialize)
        if check and spec.local:
            with stages.run("check against PyTorch"):
                info["parity"] = check_parity(model, tmp, info, log)
        else:
            info["parity"] = None
            log("parity check skipped: " + ("--no-check" if spec.local else f"target {spec.name} does not run on this machine"))
        write_manifest(tmp, info)
        tmp.chmod(umask_mode(folder=True))
        replace_dir(tmp, out)
    except BaseException:
        last = log_tail(tmp / BUILD_LOG, 15)
        if last:
            log(f"last TVM messages ({BUILD_LOG}):\n{last}")
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"compiled in {sum(stages.seconds.values()):.0f} s ({stages.summary()}); TVM's messages: {out / BUILD_LOG}")
    return info


def _build_artifact(model, model_path: Path, spec: TargetSpec, tmp: Path, stages: Stages, bucket, tuning_records,
                    static_info, specialize) -> dict:
    """Library and manifest (without the parity result) in `tmp`."""
    static_info = static_info or {}  # its "tuning" entry gets the count of kernels the records scheduled
    executable = build(model, spec, bucket=bucket, tuning_records=tuning_records, stages=stages, specialize=specialize,
                       tuning=static_info.get("tuning"))
    with stages.run("write library"):
        library = tmp / LIBRARY
        write_library(executable, library, spec)
        info = manifest(model, model_path, spec, library)
        info.update(static_info)
        if specialize:
            info["inputs"]["specialized"] = [b.as_list() for b in specialize]
            info["functions"].update({bucket_function(e, b): f"{ENTRY_POINTS[e]}, static sizes {b.text}"
                                      for b in specialize for e in ENTRY_POINTS})
        info["reference"] = reference(model)
    return info


def check_parity(model, tmp: Path, info: dict, log) -> dict:
    """Compiled (run here) vs PyTorch on the sample molecules; QSO3Error above tolerance."""
    write_manifest(tmp, info)
    result = parity(model, tmp, info["reference"])
    tol_e, tol_f = tolerances(info["model"]["precision"])
    de, df = result["max_energy_error_mev"], result["max_force_error_mev_per_a"]
    log(f"parity vs PyTorch on {result['samples_checked']} samples: max |dE| {de:.4f} meV (tol {tol_e}), "
        f"max |dF| {df:.4f} meV/Å (tol {tol_f})")
    if de > tol_e or df > tol_f:
        raise QSO3Error(f"compiled model disagrees with PyTorch: max |dE| {de:.3g} meV (tol {tol_e}), max |dF| {df:.3g} "
                        f"meV/Å (tol {tol_f}); override with QSO3_COMPILE_TOL_E_MEV / QSO3_COMPILE_TOL_F_MEV")
    return {**result, "tolerance_mev": [tol_e, tol_f]}


def is_artifact(path: Path) -> bool:
    """A folder qso3-tvm wrote: its manifest names our artifact format."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("format", "").startswith("qso3-tvm-artifact/")
    except (OSError, ValueError, AttributeError):
        return False


ARTIFACT_FILES = (LIBRARY, MANIFEST, BUILD_LOG)  # all that compile writes into an artifact folder


def check_output_dir(out: Path) -> None:
    """Refuse an output that is not new, not an empty folder and not an earlier artifact holding only its own
    files: the folder is replaced as a whole, so never delete what we did not write."""
    if not out.exists():
        return
    if is_artifact(out):
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ARTIFACT_FILES)
        if foreign:
            raise QSO3Error(f"output folder {out} holds an earlier artifact and other files ({', '.join(foreign[:5])}); "
                            "compile replaces the whole folder: move them or choose another -o (nothing was changed)")
        return
    if not out.is_dir():
        raise QSO3Error(f"output {out} exists and is not a folder: choose another -o")
    if any(out.iterdir()):
        raise QSO3Error(f"output folder {out} is not empty and holds no qso3-tvm artifact: choose a new or empty "
                        "folder for -o (nothing was changed)")


def replace_dir(new: Path, out: Path) -> None:
    """Move the finished folder `new` to `out`; an earlier artifact there is removed only after the move."""
    old = None
    if out.exists():
        if is_artifact(out):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
        else:
            out.rmdir()  # empty (check_output_dir)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
