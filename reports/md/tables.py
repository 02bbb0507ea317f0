"""Tables and plots of reports/md.md from `qso3-tvm md` output folders.

    python reports/md/tables.py /work/runs/md/ethanol_fp32_nve /work/runs/md/ethanol_int8_x86_nve ...

Energy statistics are recomputed from each log.csv with qso3_tvm.apps.md.energy_stats (the code that writes
summary.json) and each energy.png is redrawn from log.csv into reports/md/<folder>.png; the stability
columns are the run's own summary.json.
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np

from qso3_tvm.apps.md import energy_stats, write_plot

HERE = Path(__file__).parent


def row(folder: Path) -> str:
    s = json.loads((folder / "summary.json").read_text())
    with open(folder / "log.csv") as fh:
        rows = np.array([[float(x) for x in r] for r in list(csv.reader(fh))[1:]])
    e, st = energy_stats(rows, s["n_atoms"], s["config"]["ensemble"]), s["stability"]
    title = f"{s['model']} [{s['backend']}] {s['config']['ensemble']}, drift {e['drift_mev_per_atom_per_ps']:.4f} meV/atom/ps"
    write_plot(HERE / f"{folder.name}.png", rows, title)
    events = [k for k, v in st["events"].items() if v] or ["none"]
    return (f"| {folder.name} | {s['backend']} | {s['steps_done']} ({s['simulated_ps']:.2f} ps) | "
            f"{e['initial_temperature_k']:.0f} / {e['mean_temperature_k']:.0f} | "
            f"{e['drift_mev_per_atom_per_ps']:+.4f} ± {e['drift_stderr_mev_per_atom_per_ps']:.4f} | "
            f"{e['max_abs_detot_mev']:.2f} | {e['etot_std_mev']:.2f} | {st['min_bond_ratio']:.3f}–{st['max_bond_ratio']:.3f} | "
            f"{st['min_nonbonded_distance_a']:.3f} | {st['max_com_distance_a']:.2f} | {', '.join(events)} | {s['ms_per_step']:.1f} |")


if __name__ == "__main__":
    print("| run | backend | steps | T start / mean (K) | drift (meV/atom/ps) | max abs ΔEtot (meV) | std Etot (meV) "
          "| bond length ratio min–max | min non-bonded (Å) | max from COM (Å) | events | ms/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for f in sys.argv[1:]:
        print(row(Path(f)))
