"""fp32 training on energies and forces: 950/50 split of the rMD17 train frames, EMA weights,
best checkpoint by validation force MAE, resume after interrupt.

Loss = w_e * mean((ΔE / n_atoms)²) + w_f * mean(ΔF²), in eV and eV/Å.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from ..errors import QSO3Error
from ..graph.datasets import load_dataset
from ..graph.molecules import MoleculeSet
from .batch import Batch, make_batch
from .checkpoint import atomic_save, model_payload, save_model
from .model import ModelConfig, So3krates, energies_and_forces, energy_and_forces, fit_energy_shift


@dataclass
class TrainConfig:
    data: str = "ethanol"
    out: str = "runs/ethanol"
    epochs: int = 100
    batch_size: int = 8
    lr: float = 2e-3
    lr_min_factor: float = 0.02  # cosine decay to lr * this
    energy_weight: float = 1.0
    force_weight: float = 100.0
    n_train: int = 950
    n_val: int = 50
    ema_decay: float = 0.99
    seed: int = 0
    max_minutes: float = 0.0  # stop after this wall time (0: no limit); the cosine still spans `epochs`
    threads: int = 0  # torch threads (0: torch default)
    rotate: bool = False  # random rotation of every training batch (QAT: quantized models are not exactly equivariant)
    lee_weight: float = 0.0  # weight of the LEE penalty mean ‖Rᵀ F(R x) − F(x)‖² in (meV/Å)²
    device: str = "cpu"  # torch device of training ("cuda": a GPU; data is collated on the host, then moved)
    refit_shifts: bool = True  # QAT: refit the energy shifts after calibration and on the best model at the end
    teacher: str = ""  # QAT distillation: fp32 checkpoint (path or bundled name) whose outputs are targets too
    distill_weight: float = 0.0  # targets = (1 - w) labels + w teacher (energy, forces), plus w · per-atom energies

    def __post_init__(self):
        bad = [f"{k} {getattr(self, k)!r}" for k, ok in (
            ("epochs", self.epochs >= 0), ("batch_size", self.batch_size >= 1), ("lr", self.lr > 0),
            ("n_train", self.n_train >= 1), ("n_val", self.n_val >= 1), ("ema_decay", 0 <= self.ema_decay < 1),
            ("max_minutes", self.max_minutes >= 0), ("threads", self.threads >= 0), ("lee_weight", self.lee_weight >= 0),
            ("distill_weight", 0 <= self.distill_weight <= 1 and (self.distill_weight == 0 or bool(self.teacher))),
            ("energy_weight", self.energy_weight >= 0), ("force_weight", self.force_weight >= 0)) if not ok]
        if bad:
            raise QSO3Error("invalid training config: " + "; ".join(bad))
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise QSO3Error(f"--device {self.device}: this torch build sees no CUDA GPU")


def split_indices(cfg: TrainConfig, mols: MoleculeSet) -> tuple[np.ndarray, np.ndarray]:
    """The fixed-seed train/validation split (950/50 of the rMD17 train frames by default)."""
    if len(mols) < cfg.n_train + cfg.n_val:
        raise QSO3Error(f"{cfg.data}: {len(mols)} frames, fewer than n_train + n_val = {cfg.n_train + cfg.n_val}")
    if mols.energies is None:
        raise QSO3Error(f"{cfg.data}: training needs energies")
    perm = np.random.default_rng(cfg.seed).permutation(len(mols))
    return perm[:cfg.n_train], perm[cfg.n_train:cfg.n_train + cfg.n_val]


def fit_output_scaling(model_cfg: ModelConfig, mols: MoleculeSet, train_idx) -> None:
    """Per-element energy shifts and the output scale (force RMS) from the training frames."""
    frames = [mols.frame(i)[0] for i in train_idx]
    model_cfg.energy_shift = fit_energy_shift(frames, mols.energies[train_idx], model_cfg.species)
    if mols.forces is not None:
        model_cfg.energy_scale = float(np.sqrt(np.mean(mols.forces ** 2)))
    else:  # energy-only data (QM9): RMS of the per-atom residual after the shifts
        shift = np.array(model_cfg.energy_shift)
        resid = [(mols.energies[i] - shift[np.searchsorted(model_cfg.species, z)].sum()) / len(z)
                 for i, z in zip(train_idx, frames)]
        model_cfg.energy_scale = float(np.sqrt(np.mean(np.square(resid))))


def load_teacher(spec: str, student: So3krates) -> So3krates:
    """The fp32 distillation teacher, frozen; QSO3Error when it is quantized or built for other elements."""
    from .checkpoint import load_model

    teacher = load_model(spec).eval().requires_grad_(False)
    if getattr(teacher, "quant_cfg", None) is not None or tuple(teacher.cfg.species) != tuple(student.cfg.species):
        raise QSO3Error(f"teacher {spec}: needs an fp32 model with species {student.cfg.species}")
    return teacher


def rotate_batch(batch: Batch, rng: np.random.Generator | None = None, rot: torch.Tensor | None = None) -> Batch:
    """The batch rotated by `rot` (or a random rotation) about the origin; forces rotate with it."""
    if rot is None:
        rot = torch.as_tensor(Rotation.random(random_state=rng).as_matrix(), dtype=batch.pos.dtype)
    rot = rot.to(batch.pos.device)
    return dataclasses.replace(batch, pos=batch.pos @ rot.T,
                               forces=None if batch.forces is None else batch.forces @ rot.T)


class Trainer:
    """Holds model, EMA copy, optimizer and schedule; `fit` runs epochs and checkpoints each one."""

    def __init__(self, cfg: TrainConfig, model: So3krates, mols: MoleculeSet, param_groups=None, on_epoch=None,
                 select_from: int = 1):
        self.cfg, self.out, self.mols = cfg, Path(cfg.out), mols
        self.train_idx, self.val_idx = split_indices(cfg, mols)
        self.device = torch.device(cfg.device)
        self.model = model.to(self.device)
        self.on_epoch = on_epoch or (lambda model, epoch: None)  # e.g. the QAT stage switch
        self.teacher = load_teacher(cfg.teacher, model).to(self.device) if cfg.distill_weight else None
        self.on_epoch(self.model, 0)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(param_groups or self.model.parameters(), lr=cfg.lr, weight_decay=0.0, amsgrad=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.epoch, self.best = 0, math.inf
        self.select_from = select_from  # first epoch that may become best.pt (QAT: the first with every quantizer on)
        self.val_batches = [self._batch(self.val_idx[i:i + 32]) for i in range(0, len(self.val_idx), 32)]

    def _lr_factor(self, epoch: int) -> float:
        t = min(epoch / max(self.cfg.epochs, 1), 1.0)
        f = self.cfg.lr_min_factor
        return f + (1 - f) * 0.5 * (1 + math.cos(math.pi * t))

    def _batch(self, idx) -> Batch:
        return make_batch(self.mols, idx, self.model.cfg.species, self.model.cfg.cutoff).to(self.device)

    def loss(self, model: So3krates, batch: Batch, create_graph: bool, rng: np.random.Generator | None = None):
        if rng is not None and self.cfg.rotate:
            batch = rotate_batch(batch, rng)
        target_e = (batch.energy.double() - model.reference_energy(batch)).float()
        if batch.forces is None:  # energy-only data
            e = model(batch.species, batch.pos, batch.mol, batch.src, batch.dst, batch.n_mol)
            return self.cfg.energy_weight * (((e - target_e) / batch.n_atoms) ** 2).mean(), e - target_e, e.new_zeros(0)
        distill = self.teacher is not None and rng is not None  # training steps only: validation is on labels
        e, f, atoms = energies_and_forces(model, batch, create_graph=create_graph)
        n_atoms = batch.n_atoms.to(e.dtype)
        loss_e, loss_f = (((e - target_e) / n_atoms) ** 2).mean(), ((f - batch.forces) ** 2).mean()
        total = self.cfg.energy_weight * loss_e + self.cfg.force_weight * loss_f
        if distill:
            total = (1 - self.cfg.distill_weight) * total + self.cfg.distill_weight * self.distill_loss(model, batch, e, f, atoms)
        if rng is not None and self.cfg.lee_weight:
            rot = torch.as_tensor(Rotation.random(random_state=rng).as_matrix(), dtype=f.dtype, device=f.device)
            _, f_rot = energy_and_forces(model, rotate_batch(batch, rot=rot), create_graph=create_graph)
            total = total + self.cfg.lee_weight * 1e6 * ((f_rot @ rot - f) ** 2).sum(-1).mean()  # (meV/Å)²
        return total, e - target_e, f - batch.forces

    def distill_loss(self, model: So3krates, batch: Batch, e, f, atoms):
        """Loss against the fp32 teacher on the same (rotated) batch: molecule energies, forces and per-atom
        energies (each model's per-element shifts included: the student's are refitted after calibration)."""
        e_t, f_t, atoms_t = energies_and_forces(self.teacher, batch)
        de = (e - e_t.detach() + (model.reference_energy(batch) - self.teacher.reference_energy(batch)).float()) / batch.n_atoms
        da = atoms - atoms_t.detach() + (model.atom_shifts(batch.species) - self.teacher.atom_shifts(batch.species)).float()
        return (self.cfg.energy_weight * ((de ** 2).mean() + (da ** 2).mean())
                + self.cfg.force_weight * ((f - f_t.detach()) ** 2).mean())

    def train_epoch(self, bar) -> float:
        self.on_epoch(self.model, self.epoch)
        self.on_epoch(self.ema, self.epoch)
        self.model.train()
        rng = np.random.default_rng(self.cfg.seed * 100_003 + self.epoch)
        order = rng.permutation(self.train_idx)
        total = 0.0
        for i in range(0, len(order), self.cfg.batch_size):
            batch = self._batch(order[i:i + self.cfg.batch_size])
            loss, *_ = self.loss(self.model, batch, create_graph=True, rng=rng)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
            self.opt.step()
            loss = loss.detach()
            with torch.no_grad():
                for pe, p in zip(self.ema.parameters(), self.model.parameters()):
                    pe.lerp_(p, 1 - self.cfg.ema_decay)
            total += float(loss)
            bar.set_postfix(loss=f"{float(loss):.4g}", refresh=False)
        self.sched.step()
        return total / math.ceil(len(order) / self.cfg.batch_size)

    def validate(self) -> tuple[float, float]:
        """Validation MAE of the EMA model: energy (meV), forces (meV/Å)."""
        de, df = [], []
        for b in self.val_batches:
            _, e_err, f_err = self.loss(self.ema, b, create_graph=False)
            de.append(e_err.detach().abs()), df.append(f_err.detach().abs())
        val_f = float(torch.cat(df).mean() * 1e3) if self.mols.forces is not None else math.nan
        return float(torch.cat(de).mean() * 1e3), val_f

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "epoch": self.epoch, "best": self.best,
                "config": self.model.cfg.to_dict(), "train": asdict(self.cfg),
                "quant": model_payload(self.model).get("quant")}

    def load_state(self, st: dict) -> None:
        self.model.load_state_dict(st["model"]), self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["opt"]), self.sched.load_state_dict(st["sched"])
        self.epoch, self.best = st["epoch"], st["best"]
        self.on_epoch(self.model, self.epoch), self.on_epoch(self.ema, self.epoch)

    def fit(self) -> dict:
        start = time.time()
        log_path = self.out / "log.csv"
        bar = tqdm(total=self.cfg.epochs, initial=self.epoch, desc="train", unit="epoch")
        while self.epoch < self.cfg.epochs:
            train_loss = self.train_epoch(bar)
            self.epoch += 1
            val_e, val_f = self.validate()
            score = val_f if self.mols.forces is not None else val_e  # energy-only data: select on energy
            if score < self.best and self.epoch >= self.select_from:
                self.best = score
                save_model(self.out / "best.pt", self.ema, epoch=self.epoch, val_energy_mae_mev=val_e,
                           val_force_mae_mev_per_a=val_f, data=self.cfg.data)
            atomic_save(self.state(), self.out / "last.pt")
            new = not log_path.exists()
            with open(log_path, "a", newline="") as fh:
                w = csv.writer(fh)
                if new:
                    w.writerow(["epoch", "lr", "train_loss", "val_energy_mae_mev", "val_force_mae_mev_per_a", "seconds"])
                w.writerow([self.epoch, self.sched.get_last_lr()[0], train_loss, val_e, val_f, time.time() - start])
            bar.set_postfix(loss=f"{train_loss:.4g}", val_E=f"{val_e:.2f}", val_F=f"{val_f:.2f}")
            bar.update(1)
            if self.cfg.max_minutes and time.time() - start > 60 * self.cfg.max_minutes:
                break
        bar.close()
        key = "best_val_force_mae_mev_per_a" if self.mols.forces is not None else "best_val_energy_mae_mev"
        return {"epochs": self.epoch, key: self.best, "seconds": time.time() - start}


def start_run(cfg: TrainConfig, resume: bool) -> dict | None:
    """Set torch threads; the state of an interrupted run (out/last.pt) when resuming, else None."""
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise QSO3Error(f"output {cfg.out} exists and is not a folder: -o names the run folder")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    last = Path(cfg.out) / "last.pt"
    return torch.load(last, map_location="cpu", weights_only=True) if resume and last.exists() else None


def train(cfg: TrainConfig, model_cfg: ModelConfig | None = None, resume: bool = True) -> dict:
    """Train fp32 (or resume from out/last.pt) and return a summary; best EMA weights in out/best.pt."""
    if cfg.epochs == 0:
        raise QSO3Error("--epochs 0 (no training) is for quantize only (post-training quantization)")
    mols = load_dataset(cfg.data, "train")
    state = start_run(cfg, resume)
    if state is not None:
        model_cfg = ModelConfig.from_dict(state["config"])
    else:
        model_cfg = model_cfg or ModelConfig()
        fit_output_scaling(model_cfg, mols, split_indices(cfg, mols)[0])
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, So3krates(model_cfg), mols)
    if state is not None:
        trainer.load_state(state)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return trainer.fit()


def train_qat(cfg: TrainConfig, fp32_model: str, qcfg, resume: bool = True) -> dict:
    """Quantization-aware training from an fp32 checkpoint (see nn.quant); best EMA in out/best.pt.
    `cfg.epochs == 0`: post-training quantization (calibrated, shifts refitted, validated, saved)."""
    from .checkpoint import build_model, load_model
    from .quant import param_groups, quantize_model, set_stage

    state = start_run(cfg, resume and cfg.epochs > 0)
    base = None if state is not None else load_model(fp32_model)  # model errors before reading data
    if base is not None and getattr(base, "quant_cfg", None) is not None:
        raise QSO3Error(f"{fp32_model} is already quantized: quantize starts from an fp32 checkpoint")
    mols = load_dataset(cfg.data, "train")
    train_idx, _ = split_indices(cfg, mols)
    if state is not None:
        model = build_model(state["config"], state["quant"])
    else:
        model = quantize_model(base, qcfg)
        with torch.no_grad():  # calibrate every quantizer's step on training frames before staging
            batch = make_batch(mols, train_idx[:32], model.cfg.species, model.cfg.cutoff)
            model(batch.species, batch.pos, batch.mol, batch.src, batch.dst, batch.n_mol)
        if cfg.refit_shifts:
            refit_energy_shift(model, mols.subset(train_idx[:1000]))
    qcfg = model.quant_cfg
    torch.manual_seed(cfg.seed)
    staging = lambda m, epoch: set_stage(m, epoch if cfg.epochs else qcfg.warmup_epochs, qcfg)  # noqa: E731 (0 epochs: all on)
    first_full = qcfg.warmup_epochs + 1 if qcfg.staged and cfg.epochs > qcfg.warmup_epochs else 1
    trainer = Trainer(cfg, model, mols, param_groups=param_groups(model, qcfg), on_epoch=staging, select_from=first_full)
    if state is not None:
        trainer.load_state(state)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    if not cfg.epochs:
        return post_training(trainer)
    summary = trainer.fit()
    return {**summary, **refit_best(trainer)} if cfg.refit_shifts else summary


def refit_best(trainer: Trainer) -> dict:
    """After QAT: out/best.pt with its energy shifts refitted on the training frames (the energy offset wanders
    during QAT: the loss weighs forces ~100× more), re-validated; its validation metrics."""
    from .checkpoint import load_model, load_payload

    path = trainer.out / "best.pt"
    if not path.is_file():
        return {}
    model, meta = load_model(path), load_payload(path).get("meta", {})
    delta = refit_energy_shift(model, trainer.mols.subset(trainer.train_idx[:1000]))
    trainer.ema = model.to(trainer.device)
    val_e, val_f = trainer.validate()
    save_model(path, model, **{**meta, "val_energy_mae_mev": val_e, "val_force_mae_mev_per_a": val_f,
                               "energy_shift_refit_ev": delta})
    return {"best_val_energy_mae_mev": val_e, "best_val_force_mae_mev_per_a": val_f}


def refit_energy_shift(model: So3krates, mols: MoleculeSet) -> list[float]:
    """Add to the per-element energy shifts their least-squares correction on `mols` (quantizing the weights
    offsets the energy by a near-constant); returns the correction (eV per element)."""
    from .metrics import predict

    if mols.energies is None or not len(mols):
        return []
    energies, _ = predict(model, mols)
    frames = [mols.frame(i)[0] for i in range(len(mols))]
    delta = fit_energy_shift(frames, mols.energies - energies, model.cfg.species)
    model.cfg.energy_shift = [a + b for a, b in zip(model.cfg.energy_shift or [0.0] * len(delta), delta)]
    return delta


def post_training(trainer: Trainer) -> dict:
    """--epochs 0: the calibrated model as it is (post-training quantization), validated, saved as out/best.pt."""
    start = time.time()
    val_e, val_f = trainer.validate()
    save_model(trainer.out / "best.pt", trainer.ema, epoch=0, val_energy_mae_mev=val_e, val_force_mae_mev_per_a=val_f,
               data=trainer.cfg.data, post_training=True)
    return {"epochs": 0, "val_energy_mae_mev": val_e, "val_force_mae_mev_per_a": val_f, "seconds": time.time() - start}
