"""`qso3-tvm profile`: verify and time a compiled artifact on a board over TVM RPC.

`profile` checks the artifact's manifest against the board (ISA, CPU features: a +dotprod artifact is
refused on a board without it, before anything runs), runs energy+forces on the sample molecules and
compares them with the reference stored at compile time, times the module with the runtime's time
evaluator, and writes reports/<date>_<model>_<board>.{json,md}. Emulated boards are labelled as such.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import QSO3Error
from ..files import atomic_write
from ..graph.convention import float_activations, max_errors, read_manifest, sample_set
from ..runtime.remote import RemoteModel, board_info, connect

# profile tolerances: the board runs the same float32 code as the compile-time check
PROFILE_TOL_MEV = {"fp32": (0.5, 0.5), "quantized": (30.0, 50.0)}  # see compiler.compile.DEFAULT_TOL_MEV


def profile(artifact: str | Path, rpc: str | None = None, tracker: str | None = None, key: str | None = None,
            repeat: int = 10, number: int = 1, report_dir: str | Path | None = "reports", log=print) -> dict:
    """Verify and time an artifact on a board; writes the report pair unless report_dir is None."""
    if repeat < 1 or number < 1:
        raise QSO3Error(f"--repeat and --number must be >= 1, not {repeat} and {number}")
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    session = connect(rpc, tracker, key)
    info = board_info(session)
    log(f"board {info.get('label')} ({info.get('machine')}) via {rpc or tracker}")
    remote = RemoteModel(session, artifact, info)
    if remote.device_label != "cpu":
        log(f"device {remote.device_label}")
    mols, samples = sample_set(remote.species)
    try:
        energies, forces = remote.predict(mols)
        errors = max_errors(manifest["reference"], energies, forces)
        first = mols.offsets[1]
        timing = {"one_molecule": {"molecule": samples[0], "atoms": int(first), **remote.time(mols, [0], repeat, number)},
                  "all_samples": {"molecules": len(samples), **remote.time(mols, range(len(samples)), repeat, number)}}
    except QSO3Error:
        raise
    except Exception as e:  # the board died or the session broke mid-run
        raise QSO3Error(f"board {info.get('label')} failed during the run: {str(e).strip().splitlines()[-1]}") from None
    tol_e, tol_f = PROFILE_TOL_MEV["fp32" if float_activations(manifest["model"]["precision"]) else "quantized"]
    verified = errors["max_energy_error_mev"] <= tol_e and errors["max_force_error_mev_per_a"] <= tol_f
    emulated = str(info.get("label", "")).startswith("emulated")
    result = {"artifact": str(artifact), "model": manifest["model"], "target": manifest["target"]["name"],
              "board": info, "device": remote.device_label, "emulated": emulated, "verified": verified, "errors_vs_reference": errors,
              "tolerance_mev": [tol_e, tol_f], "energies_ev": energies.tolist(), "samples": samples,
              "timing_ms": timing, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if report_dir is not None:
        result["report"] = write_report(result, Path(report_dir))
    if not verified:
        raise QSO3Error(f"board results disagree with the compile-time reference: {errors} (tol {tol_e}, {tol_f} meV)")
    return result


def write_report(result: dict, report_dir: Path) -> str:
    report_dir.mkdir(parents=True, exist_ok=True)
    model = Path(result["model"]["checkpoint"]).stem
    on_gpu = result["device"].startswith("cuda")
    stem = f"{time.strftime('%Y-%m-%d')}_{model}_{result['board'].get('label')}{'_cuda' if on_gpu else ''}"
    t1, ta = result["timing_ms"]["one_molecule"], result["timing_ms"]["all_samples"]
    speed_note = ("**Emulated board (qemu-user): these timings measure emulation, not board speed.**"
                  if result["emulated"] else "Timings from the board's own time evaluator.")
    md = "\n".join([
        f"# {model} on {result['board'].get('label')}{' ' + result['device'] if on_gpu else ''}", "",
        f"Artifact `{result['artifact']}` (target {result['target']}, {result['model']['precision']}).",
        f"Verified against the compile-time reference: {result['verified']} "
        f"(max |dE| {result['errors_vs_reference']['max_energy_error_mev']:.4f} meV, "
        f"max |dF| {result['errors_vs_reference']['max_force_error_mev_per_a']:.4f} meV/Å).", "", speed_note, "",
        "| workload | mean ms | median ms | max ms | min ms | std ms | repeat×number |", "|---|---|---|---|---|---|---|",
        f"| {t1['molecule']} ({t1['atoms']} atoms), energy+forces | {t1['mean']:.3f} | {t1['median']:.3f} | {t1['max']:.3f} | "
        f"{t1['min']:.3f} | {t1['std']:.3f} | {t1['repeat']}×{t1['number']} |",
        f"| {ta['molecules']} sample molecules, one batch | {ta['mean']:.3f} | {ta['median']:.3f} | {ta['max']:.3f} | "
        f"{ta['min']:.3f} | {ta['std']:.3f} | {ta['repeat']}×{ta['number']} |", "",
        f"Made by `qso3-tvm profile {result['artifact']} ...` at {result['created']}.", ""])
    atomic_write(report_dir / f"{stem}.json", json.dumps(result, indent=1))
    atomic_write(report_dir / f"{stem}.md", md)
    return str(report_dir / stem)
