"""Export energy AND forces as one graph: make_fx traces the joint energy+gradient function
(torch.export cannot export autograd.grad directly), then torch.export gives it symbolic shapes.

Graph inputs: species (N,) int64, pos (N, 3), mol (N,) int64, src (E,) int64, dst (E,) int64,
mol_slots (M,) (any float tensor: only its length, the number of molecules, is used).
Graph outputs: interaction energy (M,) in eV and forces (N, 3) in eV/Å. The per-element energy
shifts are added on the host in float64 (see So3krates.reference_energy).

For a fake-quantized model the traced backward is the straight-through one (round_ste's detach),
so exported forces equal the PyTorch QAT model's autograd forces.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from ..graph.convention import MIN_EDGES
from ..graph.molecules import MoleculeSet
from ..nn.batch import Batch, make_batch
from ..nn.model import So3krates

# No upper bounds: Relax would plan static memory for the largest allowed size.


class EnergyForces(torch.nn.Module):
    def __init__(self, model: So3krates):
        super().__init__()
        self.model = model

    def forward(self, species, pos, mol, src, dst, mol_slots):
        pos = pos.detach().requires_grad_(True)
        energy = self.model(species, pos, mol, src, dst, mol_slots.shape[0])
        (grad,) = torch.autograd.grad(energy.sum(), pos)
        return energy, -grad


def batch_inputs(batch: Batch) -> tuple[torch.Tensor, ...]:
    return (batch.species, batch.pos, batch.mol, batch.src, batch.dst, torch.zeros(batch.n_mol, dtype=batch.pos.dtype))


def example_batch(model: So3krates) -> Batch:
    """Two small molecules of different sizes: no dimension is 0 or 1, so none gets specialized."""
    rng = np.random.default_rng(0)
    species = np.array(model.cfg.species)
    numbers = np.concatenate([rng.choice(species, 5), rng.choice(species, 4)])
    pos = np.concatenate([rng.normal(scale=0.8, size=(5, 3)), rng.normal(scale=0.8, size=(4, 3))])
    mols = MoleculeSet(numbers, pos, np.array([0, 5, 9]))
    return make_batch(mols, [0, 1], model.cfg.species, model.cfg.cutoff)


def export_energy_forces(model: So3krates, bucket=None) -> torch.export.ExportedProgram:
    """An ExportedProgram of (energy, forces) with symbolic atom, edge and molecule counts, or with
    the static sizes of a bucket (graph.convention.Bucket: what MetaSchedule can tune)."""
    model = model.eval()
    wrapper = EnergyForces(model)
    args = batch_inputs(example_batch(model))
    if bucket is not None:  # the example padded to the bucket (see graph.convention.pad_arrays)
        from ..graph.convention import Bucket, pad_arrays

        bucket = Bucket.parse(bucket)
        b = example_batch(model)
        n = min(5, bucket.atoms)  # atoms of the first example molecule
        src, dst = b.src.numpy(), b.dst.numpy()
        e = (src < n) & (dst < n)
        arrays = pad_arrays(b.species.numpy()[:n], b.pos.numpy()[:n], b.mol.numpy()[:n], src[e][:bucket.edges],
                            dst[e][:bucket.edges], 1, bucket, model.cfg.cutoff)
        args = tuple(torch.from_numpy(a) for a in arrays)
        with torch.enable_grad():
            traced = make_fx(wrapper, tracing_mode="fake", _allow_non_fake_inputs=True)(*args)
        return torch.export.export(traced, args)
    with torch.enable_grad():
        traced = make_fx(wrapper, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*args)
    n, e, m = (torch.export.Dim(name, min=low) for name, low in (("atoms", 2), ("edges", MIN_EDGES), ("molecules", 2)))
    shapes = ({0: n}, {0: n}, {0: n}, {0: e}, {0: e}, {0: m})
    return torch.export.export(traced, args, dynamic_shapes=shapes)
