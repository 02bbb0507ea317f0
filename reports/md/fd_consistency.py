"""Energy-force consistency at rMD17 ethanol test frame 0: max/mean |F + dE/dx| by central differences."""
import sys, numpy as np
from ase import Atoms
from qso3_tvm.graph.datasets import load_dataset
from qso3_tvm.apps.md import make_calculator
z, pos = load_dataset("ethanol", split="test").frame(0)
for spec in sys.argv[1:]:
    calc = make_calculator(spec, threads=1)
    a = Atoms(numbers=z, positions=pos); a.calc = calc
    f = a.get_forces()
    for h in (1e-2, 1e-3):
        fd = np.zeros_like(f)
        for i in range(len(a)):
            for k in range(3):
                e = []
                for s in (h, -h):
                    b = a.copy(); b.calc = calc; b.positions[i, k] += s; e.append(b.get_potential_energy())
                fd[i, k] = -(e[0] - e[1]) / (2 * h)
        d = np.abs(fd - f)
        print(f"{spec} [{calc.backend}] h={h:g} Å: max |F_fd - F| {d.max()*1e3:.2f} meV/Å, mean {d.mean()*1e3:.2f} meV/Å, mean |F| {np.abs(f).mean()*1e3:.0f} meV/Å")
