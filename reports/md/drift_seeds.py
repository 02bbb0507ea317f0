"""NVE drift over several start velocities (seeds): is one model's drift larger than another's, beyond the
spread between trajectories?

    python reports/md/drift_seeds.py fp32='/tmp/z/md_fp32_s*' w8='/tmp/z/md_w8_s*'

Each argument is LABEL=GLOB over `qso3-tvm md ... --seed S -o DIR` folders; the first label is the reference.
Per-seed drift is summary.json's least-squares slope (meV/atom/ps); the spread between seeds is what a single
run's slope standard error leaves out (Etot fluctuations are correlated in time, so that error is a lower bound).
"""

import glob
import json
import sys
from pathlib import Path

import numpy as np


def load(pattern: str) -> dict[int, dict]:
    runs = {}
    for folder in sorted(glob.glob(pattern)):
        s = json.loads((Path(folder) / "summary.json").read_text())
        runs[s["config"]["seed"]] = s
    if not runs:
        sys.exit(f"error: no run folders match {pattern}")
    return runs


def drift(s: dict) -> float:
    return s["energy"]["drift_mev_per_atom_per_ps"]


def main(args: list[str]) -> None:
    groups = {label: load(pattern) for label, pattern in (a.split("=", 1) for a in args)}
    labels = list(groups)
    seeds = sorted(set.intersection(*(set(g) for g in groups.values())))
    print("| seed | " + " | ".join(f"{lb} drift (meV/atom/ps)" for lb in labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    for seed in seeds:
        print(f"| {seed} | " + " | ".join(f"{drift(groups[lb][seed]):+.5f}" for lb in labels) + " |")
    ref = np.array([abs(drift(groups[labels[0]][s])) for s in seeds]).mean()
    print("\n| model | runs | mean drift ± s.e.m. | std over seeds | mean abs drift | vs first | "
          "max drift over the run / std Ekin | max abs ΔEtot (meV), worst run |")
    print("|---|---|---|---|---|---|---|---|")
    for lb in labels:
        runs = [groups[lb][s] for s in seeds]
        d = np.array([drift(s) for s in runs])
        ratio = np.abs(d).mean() / ref
        print(f"| {lb} | {len(d)} | {d.mean():+.5f} ± {d.std(ddof=1) / np.sqrt(len(d)):.5f} | {d.std(ddof=1):.5f} | "
              f"{np.abs(d).mean():.5f} | {ratio:.2f}× | {max(abs(s['energy']['drift_over_ekin_std']) for s in runs):.3f} | "
              f"{max(s['energy']['max_abs_detot_mev'] for s in runs):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
