"""Molecular dynamics with a QSO3Calculator (ASE VelocityVerlet or Langevin) and stability checks.

OUTDIR gets traj.extxyz (every `traj_every` steps), log.csv (step, time, Epot, Ekin, Etot, T),
energy.png and summary.json. Each file is written to a temporary name and renamed when complete;
summary.json is written last (a run stopped by Ctrl-C still gets one, with `aborted` saying why), and no
file is ever half-written; a run that fails on its input touches nothing in OUTDIR.

Checks (summary["stability"]), all from the start geometry:
- bonds: pairs closer than 1.2 × the sum of covalent radii; flagged if one stretches beyond 1.5× or
  compresses below 0.6× its start length;
- close contacts: a pair that is neither bonded nor H–H coming closer than 0.6 Å;
- lost atoms: an atom farther than `max_com_distance` Å from the centre of mass; NaN coordinates or energies;
- NVE only: total-energy drift, the slope of a linear fit of Etot per atom against time (meV/atom/ps),
  and max |Etot − Etot(0)|.

Multiple time stepping (`mts_model`, `mts_every` = M; NVE): reversible RESPA in impulse form. The inner
steps are velocity Verlet with the cheap forces of `model` (e.g. w8a8, whose forces are not the gradient
of its energy); every M steps the momenta get the slow force F_cons − F_cheap of the conservative model
(w8 or fp32) as two kicks of M·dt/2, one before the first and one after the last inner step. The
dynamics follow F_cons on average, so Etot = Ekin + E_cons is the conserved quantity: it is what the log
records, every `log_every` steps (a multiple of M, when momenta are synchronized).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ase import units
from ase.md.verlet import VelocityVerlet

from ..errors import QSO3Error
from ..files import atomic_path

BOND_FACTOR, STRETCH_MAX, COMPRESS_MIN, CONTACT_MIN_A = 1.2, 1.5, 0.6, 0.6
ENSEMBLES = ("nve", "langevin")


@dataclass
class MDConfig:
    ensemble: str = "nve"
    steps: int | None = None  # or time_ps; neither: 1000 steps
    time_ps: float | None = None
    dt_fs: float = 0.5
    temperature: float = 300.0  # K: start velocities (and the Langevin bath)
    friction: float = 10.0  # 1/ps, Langevin only
    seed: int = 0
    traj_every: int = 20
    log_every: int | None = None  # default 1, with MTS every M
    max_com_distance: float = 10.0  # Å
    mts_model: str | None = None  # conservative model (checkpoint or artifact) of multiple time stepping
    mts_every: int = 8  # M: inner steps per conservative correction

    def n_steps(self) -> int:
        if self.ensemble not in ENSEMBLES:
            raise QSO3Error(f"--ensemble must be one of {', '.join(ENSEMBLES)}, not {self.ensemble!r}")
        if self.steps is not None and self.time_ps is not None:
            raise QSO3Error("give --steps or --time-ps, not both")
        if self.mts_model and (not isinstance(self.mts_every, int) or self.mts_every < 1):
            raise QSO3Error(f"--mts-every must be an integer >= 1, not {self.mts_every!r}")
        if self.log_every is None:
            self.log_every = self.mts_every if self.mts_model else 1
        finite = {"--dt-fs": self.dt_fs, "--temperature": self.temperature, "--friction": self.friction,
                  "--max-com-distance": self.max_com_distance, "--time-ps": self.time_ps}
        bad = [f"{k} {v}" for k, v in finite.items() if v is not None and not math.isfinite(v)]
        if bad:
            raise QSO3Error(f"not a finite number: {', '.join(bad)}")
        if self.max_com_distance <= 0 or (self.time_ps is not None and self.time_ps <= 0):
            raise QSO3Error("--max-com-distance and --time-ps must be > 0")
        if self.dt_fs <= 0 or self.temperature < 0 or self.friction < 0 or self.traj_every < 1 or self.log_every < 1:
            raise QSO3Error("--dt-fs must be > 0; --temperature, --friction >= 0; --traj-every, --log-every >= 1")
        n = self.steps if self.steps is not None else (round(self.time_ps * 1000 / self.dt_fs) if self.time_ps is not None else 1000)
        if n < 1:
            raise QSO3Error(f"the run must have at least one step (got {n})")
        if self.mts_model:
            self.check_mts(n)
        return int(n)

    def check_mts(self, n: int) -> None:
        """Multiple time stepping: NVE, whole outer steps, energies logged when momenta are synchronized."""
        if self.ensemble != "nve":
            raise QSO3Error("--mts-model needs --ensemble nve (multiple time stepping is implemented for NVE)")
        M = self.mts_every
        if n % M or self.log_every % M:
            raise QSO3Error(f"with --mts-every {M}, the number of steps ({n}) and --log-every ({self.log_every}) "
                            f"must be multiples of {M}")


# ---------------------------------------------------------------- inputs
def load_start(data: str, frame: int = 0):
    """ase.Atoms of one frame: an rMD17 molecule name (test split), an rMD17 .npz or an .extxyz file."""
    from ase import Atoms

    from ..graph.datasets import load_dataset

    mols = load_dataset(data, split="test")
    if not 0 <= frame < len(mols):
        raise QSO3Error(f"--frame {frame} out of range: {data} has {len(mols)} frames")
    numbers, positions = mols.frame(frame)
    return Atoms(numbers=numbers, positions=positions, pbc=False)


def is_artifact(model: str) -> bool:
    from ..graph.convention import MANIFEST

    return (Path(model) / MANIFEST).is_file()


def make_calculator(model: str, rpc: str | None = None, tracker: str | None = None, key: str | None = None,
                    threads: int = 0):
    """A checkpoint spec → eager; a folder with manifest.json → compiled here; with rpc/tracker → a board."""
    from ..runtime.calculator import QSO3Calculator

    if rpc or tracker:
        return QSO3Calculator.from_rpc(model, rpc=rpc, tracker=tracker, key=key, threads=threads)
    if is_artifact(model):
        return QSO3Calculator.from_compiled(model, threads=threads)
    from ..nn.eager import EagerModel

    return QSO3Calculator.from_model(EagerModel(model, threads=threads))


def init_velocities(atoms, temperature: float, seed: int) -> None:
    """Maxwell–Boltzmann at `temperature`, zero total momentum, rescaled to exactly `temperature`."""
    from ase.md import velocitydistribution as vd

    thermalize = getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution  # ASE >= 3.28 / older
    thermalize(atoms, temperature_K=temperature, rng=np.random.default_rng(seed))
    vd.Stationary(atoms)
    if temperature > 0 and len(atoms) > 1:
        atoms.set_velocities(atoms.get_velocities() * np.sqrt(temperature / atoms.get_temperature()))


def ps(dyn) -> float:
    return dyn.get_time() / (1000 * units.fs)


def make_dynamics(atoms, cfg: MDConfig, conservative=None):
    """ASE dynamics for the config; RESPA (multiple time stepping) when a conservative calculator is given."""
    from ase.md.langevin import Langevin

    dt = cfg.dt_fs * units.fs
    if conservative is not None:
        return RESPA(atoms, dt, conservative, cfg.mts_every)
    if cfg.ensemble == "nve":
        return VelocityVerlet(atoms, timestep=dt)
    return Langevin(atoms, timestep=dt, temperature_K=cfg.temperature, friction=cfg.friction / (1000 * units.fs),
                    fixcm=False, rng=np.random.default_rng(cfg.seed + 1))  # the centre of mass: FixCom in run_md


class RESPA(VelocityVerlet):
    """Reversible RESPA (impulse form, see module docstring): inner velocity Verlet on atoms.calc (the cheap
    forces); the slow force `conservative` − cheap as kicks of every·dt/2 around each block of `every` steps."""

    def __init__(self, atoms, timestep: float, conservative, every: int):
        super().__init__(atoms, timestep=timestep)
        self.conservative, self.every = conservative, every

    def kick(self) -> None:
        slow = self.conservative.get_forces(self.atoms) - self.atoms.get_forces(md=True)
        self.atoms.set_momenta(self.atoms.get_momenta() + 0.5 * self.every * self.dt * slow)

    def step(self, forces=None):
        if self.nsteps % self.every == 0:
            self.kick()
        forces = super().step(forces)
        if (self.nsteps + 1) % self.every == 0:
            self.kick()
        return forces

    def potential_energy(self) -> float:
        """The conserved potential: the conservative model's energy."""
        return self.conservative.get_potential_energy(self.atoms)


# ---------------------------------------------------------------- monitoring
class Monitor:
    """Energies per logged step and the stability checks of the module docstring."""

    def __init__(self, atoms, dyn, cfg: MDConfig):
        from ase.data import covalent_radii
        from scipy.spatial.distance import pdist

        self.atoms, self.dyn, self.cfg = atoms, dyn, cfg
        self.potential_energy = getattr(dyn, "potential_energy", atoms.get_potential_energy)  # RESPA: conservative
        n = len(atoms)
        i, j = np.triu_indices(n, 1)
        d0, radii = pdist(atoms.positions), covalent_radii[atoms.numbers]
        self.bonded = d0 < BOND_FACTOR * (radii[i] + radii[j])
        self.bond_pairs = np.stack([i[self.bonded], j[self.bonded]], 1)
        self.d0 = d0[self.bonded]
        self.contact_mask = ~self.bonded & ~((atoms.numbers[i] == 1) & (atoms.numbers[j] == 1))
        self.rows: list[tuple] = []
        self.ratio = [np.inf, -np.inf]
        self.min_contact, self.max_com = np.inf, 0.0
        self.events: dict[str, dict | None] = {"bond": None, "close_contact": None, "atom_lost": None, "nan": None}

    def record(self) -> None:
        from scipy.spatial.distance import pdist

        step, t_ps = self.dyn.nsteps, ps(self.dyn)
        pos, atoms = self.atoms.positions, self.atoms
        epot, ekin = self.potential_energy(), atoms.get_kinetic_energy()
        self.rows.append((step, t_ps, epot, ekin, epot + ekin, atoms.get_temperature()))
        if not (np.isfinite(pos).all() and np.isfinite(epot)):
            self.flag("nan", step, t_ps, "non-finite coordinates or energy")
            return
        d = pdist(pos)
        self.check_bonds(d[self.bonded] / self.d0, step, t_ps)
        self.check_contacts(d, step, t_ps)
        com_dist = np.linalg.norm(pos - atoms.get_center_of_mass(), axis=1)
        self.max_com = max(self.max_com, float(com_dist.max()))
        if com_dist.max() > self.cfg.max_com_distance:
            self.flag("atom_lost", step, t_ps, f"atom {int(com_dist.argmax())} is {com_dist.max():.2f} Å from the centre of mass")

    def check_bonds(self, ratio: np.ndarray, step: int, t_ps: float) -> None:
        if not len(ratio):
            return
        self.ratio = [min(self.ratio[0], float(ratio.min())), max(self.ratio[1], float(ratio.max()))]
        bad = np.nonzero((ratio > STRETCH_MAX) | (ratio < COMPRESS_MIN))[0]
        if len(bad):
            i, j = self.bond_pairs[bad[0]]
            self.flag("bond", step, t_ps, f"bond {i}-{j} at {ratio[bad[0]]:.2f}× its start length")

    def check_contacts(self, d: np.ndarray, step: int, t_ps: float) -> None:
        if not self.contact_mask.any():
            return
        dc = d[self.contact_mask]
        self.min_contact = min(self.min_contact, float(dc.min()))
        if dc.min() < CONTACT_MIN_A:
            self.flag("close_contact", step, t_ps, f"non-bonded pair at {dc.min():.3f} Å")

    def flag(self, kind: str, step: int, t_ps: float, what: str) -> None:
        if self.events[kind] is None:  # keep the first occurrence
            self.events[kind] = {"step": int(step), "time_ps": float(t_ps), "what": what}

    def stability(self) -> dict:
        return {"bonds": len(self.d0), "min_bond_ratio": _finite(self.ratio[0]), "max_bond_ratio": _finite(self.ratio[1]),
                "min_nonbonded_distance_a": _finite(self.min_contact), "max_com_distance_a": self.max_com,
                "events": self.events,
                "thresholds": {"bond_factor": BOND_FACTOR, "stretch_max": STRETCH_MAX, "compress_min": COMPRESS_MIN,
                               "contact_min_a": CONTACT_MIN_A, "max_com_distance_a": self.cfg.max_com_distance}}


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def energy_stats(rows: np.ndarray, n_atoms: int, ensemble: str) -> dict:
    """NVE drift (meV/atom/ps, linear fit of Etot per atom) and max |ΔEtot|; temperatures for any ensemble."""
    t, etot, temp = rows[:, 1], rows[:, 4], rows[:, 5]
    out = {"initial_temperature_k": float(temp[0]), "mean_temperature_k": float(temp.mean())}
    if ensemble == "nve" and len(rows) > 2 and np.isfinite(etot).all():
        de = etot - etot[0]
        (slope, _), cov = np.polyfit(t, etot / n_atoms * 1e3, 1, cov="unscaled")
        resid = etot / n_atoms * 1e3 - np.polyval([slope, _], t)
        stderr = np.sqrt(cov[0, 0] * (resid @ resid) / (len(t) - 2))  # ordinary least squares, white-noise residuals
        out.update(drift_mev_per_atom_per_ps=float(slope), drift_stderr_mev_per_atom_per_ps=float(stderr),
                   max_abs_detot_mev=float(np.abs(de).max() * 1e3),
                   max_abs_detot_mev_per_atom=float(np.abs(de).max() * 1e3 / n_atoms),
                   etot_std_mev=float(etot.std() * 1e3), ekin_std_mev=float(rows[:, 3].std() * 1e3))
        # the drift over the whole run against the natural fluctuation of the kinetic energy (passes below 1)
        drift_run_mev = abs(slope) * (t[-1] - t[0]) * n_atoms
        out["drift_over_ekin_std"] = _finite(drift_run_mev / out["ekin_std_mev"]) if out["ekin_std_mev"] > 0 else None
    return out


# ---------------------------------------------------------------- outputs
def write_log(path: Path, rows: list[tuple]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "time_ps", "epot_ev", "ekin_ev", "etot_ev", "temperature_k"])
        w.writerows([(r[0], f"{r[1]:.6f}", *(f"{x:.8f}" for x in r[2:5]), f"{r[5]:.3f}") for r in rows])


def write_plot(path: Path, rows: np.ndarray, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t, e0 = rows[:, 1], rows[0, 4]
    fig, (ax, axe, axt) = plt.subplots(3, 1, figsize=(7, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1.5, 1]})
    ax.plot(t, rows[:, 2] - e0, lw=0.5, label="Epot − Etot(0)")
    ax.plot(t, rows[:, 3], lw=0.5, label="Ekin")
    ax.set_ylabel("energy (eV)"), ax.legend(loc="upper right", fontsize=8), ax.set_title(title, fontsize=9)
    axe.plot(t, (rows[:, 4] - e0) * 1e3, lw=0.5, color="k")
    if len(t) > 1 and np.isfinite(rows[:, 4]).all():
        axe.plot(t, np.polyval(np.polyfit(t, (rows[:, 4] - e0) * 1e3, 1), t), lw=1.2, color="tab:green", label="linear fit")
        axe.legend(loc="upper right", fontsize=8)
    axe.set_ylabel("Etot − Etot(0) (meV)")
    axt.plot(t, rows[:, 5], lw=0.5, color="tab:red")
    axt.set_ylabel("T (K)"), axt.set_xlabel("time (ps)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return True


def write_json(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


# ---------------------------------------------------------------- the run
def run_md(atoms, calc, cfg: MDConfig, outdir: str | Path, meta: dict | None = None, log=print, conservative=None) -> dict:
    """Run MD from `atoms` (positions only are used) and write the OUTDIR files; returns the summary.
    `conservative`: the calculator of the multiple-time-stepping correction (cfg.mts_every)."""
    from ase.io import write

    n_steps, outdir = cfg.n_steps(), Path(outdir)
    check_outdir(outdir)
    if len(atoms) < 2:
        raise QSO3Error(f"MD needs at least 2 atoms (the start geometry has {len(atoms)}): a lone atom has no forces")
    atoms = atoms.copy()
    atoms.calc = calc
    if cfg.ensemble == "langevin":  # ASE's recommended way to keep the centre of mass fixed in Langevin
        from ase.constraints import FixCom

        atoms.set_constraint(FixCom())
    init_velocities(atoms, cfg.temperature, cfg.seed)
    atoms.get_forces()  # input errors (unknown element, size limits) surface here, before any file is written
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "summary.json").unlink(missing_ok=True)  # never leave a stale summary beside new files
    dyn = make_dynamics(atoms, cfg, conservative)
    monitor = Monitor(atoms, dyn, cfg)
    dyn.attach(monitor.record, interval=cfg.log_every)
    start = time.perf_counter()
    with atomic_path(outdir / "traj.extxyz") as traj_tmp, open(traj_tmp, "w") as traj:
        dyn.attach(lambda: write(traj, atoms, format="extxyz"), interval=cfg.traj_every)
        aborted, failure = run_steps(dyn, monitor, n_steps, log)
    wall = time.perf_counter() - start
    meta = {**(meta or {}), "backend": calc.backend}
    if conservative is not None:
        meta["mts_backend"] = conservative.backend
    summary = finish(monitor, cfg, outdir, n_steps, wall, aborted, meta, log)
    if isinstance(failure, KeyboardInterrupt):
        raise failure
    if failure is not None:  # the backend broke (a board died, a session ended): the finished steps are kept
        raise QSO3Error(f"MD stopped at step {summary['steps_done']}: {aborted}; the finished steps are in {outdir}")
    return summary


OUTPUT_FILES = ("traj.extxyz", "log.csv", "energy.png", "summary.json")


def check_outdir(outdir: Path) -> None:
    """MD writes only into a new or empty folder or over an earlier run's files: never over other files."""
    if outdir.exists() and not outdir.is_dir():
        raise QSO3Error(f"output {outdir} exists and is not a folder")
    ours = lambda name: name in OUTPUT_FILES or (name.startswith(".") and name.endswith(".tmp"))  # noqa: E731
    foreign = sorted(p.name for p in outdir.iterdir() if not ours(p.name)) if outdir.is_dir() else []
    if foreign:
        raise QSO3Error(f"output folder {outdir} holds files an MD run did not write ({', '.join(foreign[:5])}): "
                        "choose a new or empty folder for -o")


def run_steps(dyn, monitor, n_steps: int, log) -> tuple[str | None, BaseException | None]:
    """Step the dynamics; returns (why it stopped early or None, the exception to raise after saving)."""
    progress = max(1, n_steps // 10)
    try:
        for _ in dyn.irun(n_steps):
            if dyn.nsteps % progress == 0 and dyn.nsteps:
                log(f"step {dyn.nsteps}/{n_steps}  Etot {monitor.rows[-1][4]:.6f} eV  T {monitor.rows[-1][5]:.0f} K")
    except QSO3Error as e:  # the molecule broke (NaN, overlapping atoms): a result, not a crash
        kind = "nan" if "NaN" in str(e) else "close_contact" if "Å apart" in str(e) else None
        if kind:
            monitor.flag(kind, dyn.nsteps, ps(dyn), str(e))
            return f"step {dyn.nsteps}: {e}", None
        return f"step {dyn.nsteps}: {e}", e
    except KeyboardInterrupt as e:
        return f"step {dyn.nsteps}: interrupted", e
    except Exception as e:  # the backend failed (RPC session lost, board died)
        return f"step {dyn.nsteps}: backend failed ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''})", e
    return None, None


def finish(monitor: Monitor, cfg: MDConfig, outdir: Path, n_steps: int, wall: float, aborted, meta: dict, log) -> dict:
    rows = np.array(monitor.rows, dtype=np.float64)
    n_atoms, steps_done = len(monitor.atoms), int(monitor.dyn.nsteps)
    write_log(outdir / "log.csv", monitor.rows)
    energies = energy_stats(rows, n_atoms, cfg.ensemble)
    drift = energies.get("drift_mev_per_atom_per_ps")
    title = f"{meta.get('model')} [{meta['backend']}] {cfg.ensemble} dt={cfg.dt_fs} fs" + (
        f", drift {drift:.3f} meV/atom/ps" if drift is not None else "")
    plotted = write_plot(outdir / "energy.png", rows, title)
    stability = monitor.stability()
    stable = aborted is None and all(v is None for v in stability["events"].values())
    summary = {**meta, "formula": monitor.atoms.get_chemical_formula(), "n_atoms": n_atoms, "config": asdict(cfg),
               "steps_requested": n_steps, "steps_done": steps_done, "simulated_ps": steps_done * cfg.dt_fs / 1000,
               "energy": energies, "stability": stability, "aborted": aborted, "stable": stable,
               "wall_s": wall, "ms_per_step": wall / max(steps_done, 1) * 1e3,
               "files": ["traj.extxyz", "log.csv"] + (["energy.png"] if plotted else []) + ["summary.json"],
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(outdir / "summary.json", summary)
    log(f"{'stable' if stable else 'UNSTABLE'}: {steps_done} steps ({summary['simulated_ps']:.3f} ps)"
        + (f", drift {drift:.4f} meV/atom/ps" if drift is not None else "") + f"; wrote {outdir}")
    return summary


def run(model: str, data: str, cfg: MDConfig, outdir: str | Path, frame: int = 0, rpc: str | None = None,
        tracker: str | None = None, key: str | None = None, threads: int = 0, log=print) -> dict:
    """`qso3-tvm md`: start geometry from `data`, calculator from `model`, MD into `outdir`."""
    cfg.n_steps()  # flag errors before loading anything
    check_outdir(Path(outdir))
    atoms = load_start(data, frame)
    calc = make_calculator(model, rpc, tracker, key, threads)
    conservative = None
    if cfg.mts_model:  # on the board too when it is an artifact and a board is given
        remote = (rpc or tracker) and is_artifact(cfg.mts_model)
        conservative = make_calculator(cfg.mts_model, rpc, tracker, key, threads) if remote else make_calculator(
            cfg.mts_model, threads=threads)
    meta = {"model": str(model), "data": str(data), "frame": frame}
    return run_md(atoms, calc, cfg, outdir, meta, log, conservative=conservative)
