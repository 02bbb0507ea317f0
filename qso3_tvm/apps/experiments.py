"""Reproduce the tables in reports/: each row runs (or resumes) the exact CLI command it prints.

    python -m qso3_tvm.apps.experiments accuracy --runs runs
    python -m qso3_tvm.apps.experiments quantization --molecule ethanol --runs runs --qflags "--epochs 15"

Runs that finished are not repeated (train/quantize resume from RUN/last.pt); evaluation is always rerun.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from ..files import atomic_write
from ..nn.checkpoint import load_model
from ..nn.quant import weight_bytes


def run_cli(args: list[str]) -> str:
    cmd = [sys.executable, "-m", "qso3_tvm.cli"] + args  # this Python's qso3-tvm, not the PATH's
    print("$", shlex.join(["qso3-tvm"] + args), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(cmd)}")
    return proc.stdout


def evaluate_json(model: str, data: str, extra: list[str] = ()) -> tuple[dict, str]:
    args = ["evaluate", model, "--data", data, "--json", *extra]
    return json.loads(run_cli(args)), "qso3-tvm " + shlex.join(args)


def training_seconds(run: Path) -> float:
    """Wall time over all segments of a run (the clock restarts when a run is resumed)."""
    seconds = [float(r["seconds"]) for r in csv.DictReader(open(run / "log.csv"))]
    if not seconds:
        return float("nan")
    return sum(prev for prev, cur in zip(seconds, seconds[1:]) if cur < prev) + seconds[-1]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor()


def fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


# ---------------------------------------------------------------- quantization ablation
def ablation_rows(molecule: str, runs: Path, common: list[str]) -> list[tuple[str, str | None, list[str]]]:
    """(row name, fp32 base checkpoint, quantize flags) — None flags: the fp32 row itself."""
    l2, dot = str(runs / f"{molecule}_fp32" / "best.pt"), str(runs / f"{molecule}_dot_fp32" / "best.pt")
    return [
        ("fp32", l2, None),
        ("naive int8 (component-wise vectors, plain attention, no staging)", dot,
         common + ["--vector", "naive", "--no-staged", "--no-branch-separate"]),
        ("full method: MDDQ + branch-separated staged QAT + L2-normalized attention", l2, common),
        ("full − MDDQ (component-wise vectors)", l2, common + ["--vector", "naive"]),
        ("full − branch separation/staging", l2, common + ["--no-staged", "--no-branch-separate"]),
        ("full − attention normalization (plain dot product)", dot, common),
        ("full, paper's fixed direction grid (sphere)", l2, common + ["--direction-grid", "sphere"]),
        ("W4A8 (full method, 4-bit weights)", l2, common + ["--w-bits", "4"]),
        ("full + LEE penalty 1e-3", l2, common + ["--lee-weight", "1e-3"]),
        ("full + LEE penalty 1e-4", l2, common + ["--lee-weight", "1e-4"]),
        ("full + LEE penalty 1e-5", l2, common + ["--lee-weight", "1e-5"]),
        ("fp32 (plain dot-product attention)", dot, None),
    ]


def merge_json(out: Path, rows: list[dict]) -> None:
    """Replace rows of the same name in `out` (written atomically after every finished row)."""
    old = json.loads(out.read_text()) if out.exists() else []
    names = {r["row"] for r in rows}
    atomic_write(out, json.dumps([r for r in old if r["row"] not in names] + rows, indent=1))


def quantization_report(molecule: str, runs: Path, common: list[str], lee_frames: int, max_frames: int,
                        only: list[int] | None, out: Path) -> list[dict]:
    data = molecule
    results = []
    for i, (name, base, flags) in enumerate(ablation_rows(molecule, runs, common)):
        if only and i not in only:
            continue
        if not Path(base).exists():
            print(f"skip {name!r}: fp32 base {base} missing", flush=True)
            continue
        commands = []
        if flags is None:
            model_path, run = base, Path(base).parent
        else:
            run = runs / f"{molecule}_q{i}"
            args = ["quantize", base, "--data", data, "-o", str(run), "--threads", "1", *flags]
            run_cli(args)
            commands.append("qso3-tvm " + shlex.join(args))
            model_path = str(run / "best.pt")
        metrics, cmd = evaluate_json(model_path, data, ["--lee-frames", str(lee_frames), "--max-frames", str(max_frames)])
        commands.append(cmd)
        results.append({"row": name, **metrics, "weight_bytes": weight_bytes(load_model(model_path)),
                        "train_seconds": training_seconds(run), "commands": commands})
        merge_json(out, results[-1:])
    return results


ROW_ORDER = [name for name, _, _ in ablation_rows("m", Path("."), [])]


def quantization_md(blocks: dict[str, list[dict]], notes: str) -> str:
    lines = ["# Quantization: ablation on rMD17 and QM9", "", notes, ""]
    for molecule, rows in blocks.items():
        rows = sorted(rows, key=lambda r: ROW_ORDER.index(r["row"]) if r["row"] in ROW_ORDER else 99)
        fp32 = next((r for r in rows if r["row"] == "fp32"), None)
        lines += [f"## {molecule}", "",
                  "| row | precision | E MAE (meV) | F MAE (meV/Å) | LEE (meV/Å) | E / fp32 | F / fp32 | weight bytes | QAT time (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ratio = lambda k: fmt(r.get(k, float("nan")) / fp32[k]) if fp32 and k in fp32 and k in r else "n/a"  # noqa: E731
            lines.append(f"| {r['row']} | {r['precision']} | {fmt(r.get('energy_mae_mev'))} | "
                         f"{fmt(r.get('force_mae_mev_per_a'))} | {fmt(r['lee_mev_per_a'], 3)} | {ratio('energy_mae_mev')} | "
                         f"{ratio('force_mae_mev_per_a')} | {r['weight_bytes']:,} | "
                         f"{'(fp32 training)' if r['precision'] == 'fp32' else fmt(r['train_seconds'], 0)} |")
        lines += ["", f"Test frames: {rows[0]['n_frames']}; LEE over {rows[0]['lee_frames']} of them.", "", "Commands:", ""]
        for r in rows:
            lines += [f"- {r['row']}:"] + [f"  `{c}`" for c in r["commands"]]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- fp32 accuracy
def accuracy_rows(runs: Path, molecules: list[str], lee_frames: int) -> list[dict]:
    rows = []
    for mol in molecules:
        run = runs / f"{mol}_fp32"
        if not (run / "best.pt").exists():
            print(f"skip {mol}: {run}/best.pt missing", flush=True)
            continue
        done = [r for path in Path("reports").glob(f"quantization_{mol}*.json") for r in json.loads(path.read_text())
                if r["row"] == "fp32" and r["n_frames"] > 100]
        if done:  # the ablation's fp32 row ran exactly this evaluation
            metrics, cmd = {k: v for k, v in done[0].items() if k not in ("row", "commands")}, done[0]["commands"][-1]
        else:
            metrics, cmd = evaluate_json(str(run / "best.pt"), mol, ["--lee-frames", str(lee_frames)])
        log = list(csv.DictReader(open(run / "log.csv")))
        train_cfg = json.loads(json.dumps(__import__("torch").load(run / "last.pt", weights_only=True)["train"]))
        rows.append({"molecule": mol, **metrics, "epochs_run": len(log), "epochs_planned": train_cfg["epochs"],
                     "train_seconds": training_seconds(run), "max_minutes": train_cfg["max_minutes"],
                     "train_command": f"qso3-tvm train --data {mol} -o {run} --epochs {train_cfg['epochs']} "
                                      f"--threads {train_cfg['threads']}",
                     "eval_command": cmd})
    return rows


def accuracy_md(rows: list[dict], notes: str) -> str:
    lines = ["# fp32 accuracy on rMD17 (split 01)", "",
             f"Hardware: {cpu_name()}; training on 1 thread (`--threads 1`) while other runs shared the 2 cores.", "",
             "| molecule | test frames | E MAE (meV) | F MAE (meV/Å) | LEE (meV/Å) [frames] | epochs | train time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['molecule']} | {r['n_frames']} | {fmt(r['energy_mae_mev'])} | {fmt(r['force_mae_mev_per_a'])} | "
                     f"{fmt(r['lee_mev_per_a'], 4)} [{r['lee_frames']}] | {r['epochs_run']}/{r['epochs_planned']} | "
                     f"{fmt(r['train_seconds'], 0)} |")
    lines += ["", "Commands (train, then evaluate on the test split):", ""]
    for r in rows:
        lines += [f"- {r['molecule']}: `{r['train_command']}`", f"  `{r['eval_command']}`"]
    return "\n".join(lines + ["", notes, ""])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qso3_tvm.apps.experiments")
    sub = p.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quantization")
    q.add_argument("--molecule", default="ethanol")
    q.add_argument("--runs", type=Path, default=Path("runs"))
    q.add_argument("--qflags", default="--epochs 15", help="flags for every quantize command")
    q.add_argument("--lee-frames", type=int, default=100)
    q.add_argument("--max-frames", type=int, default=0)
    q.add_argument("--rows", type=int, nargs="*", help="row indices to run (default all)")
    q.add_argument("--json", type=Path, help="write/merge results here")
    a = sub.add_parser("accuracy")
    a.add_argument("--runs", type=Path, default=Path("runs"))
    a.add_argument("--molecules", nargs="*", default=["ethanol", "aspirin"])
    a.add_argument("--lee-frames", type=int, default=100)
    a.add_argument("--notes", type=Path, help="markdown appended under the table")
    w = sub.add_parser("write", help="reports/quantization.md from reports/quantization_*.json")
    w.add_argument("--notes", type=Path, help="markdown inserted under the title")
    args = p.parse_args(argv)
    if args.what == "write":
        blocks = {}
        for path in sorted(Path("reports").glob("quantization_*.json")):
            molecule = path.stem.split("_")[1]
            blocks.setdefault(molecule, []).extend(json.loads(path.read_text()))
        notes = args.notes.read_text() if args.notes else ""
        Path("reports/quantization.md").write_text(quantization_md(blocks, notes))
    if args.what == "accuracy":
        rows = accuracy_rows(args.runs, args.molecules, args.lee_frames)
        Path("reports/accuracy.json").write_text(json.dumps(rows, indent=1))
        Path("reports/accuracy.md").write_text(accuracy_md(rows, args.notes.read_text() if args.notes else ""))
        json.dump(rows, sys.stdout, indent=1)
    if args.what == "quantization":
        out = args.json or Path(f"reports/quantization_{args.molecule}.json")
        rows = quantization_report(args.molecule, args.runs, shlex.split(args.qflags), args.lee_frames,
                                   args.max_frames, args.rows, out)
        json.dump(rows, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
