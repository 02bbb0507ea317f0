"""Bond-length distributions of MD runs, side by side: per bond type (element pair of the bonds at the
start), mean, standard deviation and 1st/99th percentiles over every trajectory frame, and the largest
shift of a histogram's mean between runs in units of the reference's standard deviation.
Usage: python reports/md/bond_lengths.py RUN_DIR [RUN_DIR ...]   (qso3-tvm md output folders; the first
is the reference). Skips the first 10 % of each trajectory (equilibration)."""
import sys
from pathlib import Path

import numpy as np
from ase.data import chemical_symbols, covalent_radii
from ase.io import read

BOND_FACTOR = 1.2  # as qso3_tvm.apps.md: pairs closer than 1.2 × the sum of covalent radii at the start


def bonds(atoms):
    d = atoms.get_all_distances()
    r = covalent_radii[atoms.numbers]
    i, j = np.triu_indices(len(atoms), 1)
    keep = d[i, j] < BOND_FACTOR * (r[i] + r[j])
    return i[keep], j[keep]


def lengths(run: Path) -> dict[str, np.ndarray]:
    frames = read(run / "traj.extxyz", index=":")
    frames = frames[len(frames) // 10:]
    i, j = bonds(frames[0])
    pos = np.stack([f.positions for f in frames])
    d = np.linalg.norm(pos[:, i] - pos[:, j], axis=-1)  # (frames, bonds)
    z = frames[0].numbers
    out: dict[str, list] = {}
    for b, (a, c) in enumerate(zip(i, j)):
        name = "-".join(sorted((chemical_symbols[z[a]], chemical_symbols[z[c]])))
        out.setdefault(name, []).append(d[:, b])
    return {k: np.concatenate(v) for k, v in out.items()}


def main(runs: list[Path]) -> None:
    data = [lengths(r) for r in runs]
    print("| bond | run | frames × bonds | mean (Å) | std (Å) | p1 (Å) | p99 (Å) | mean shift / ref std |")
    print("|---|---|---|---|---|---|---|---|")
    for name in sorted(data[0]):
        ref = data[0][name]
        for run, d in zip(runs, data):
            x = d.get(name)
            if x is None:
                continue
            shift = (x.mean() - ref.mean()) / ref.std()
            print(f"| {name} | {run.name} | {len(x)} | {x.mean():.4f} | {x.std():.4f} | {np.percentile(x, 1):.4f} | "
                  f"{np.percentile(x, 99):.4f} | {shift:+.2f} |")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
