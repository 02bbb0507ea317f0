"""The Relax importer workarounds: each stock failure shown, each converter checked against PyTorch,
and energy+forces end to end (fp32 and fake-quantized) through Relax and the LLVM backend."""

import numpy as np
import pytest
import torch
import tvm
from torch.fx.experimental.proxy_tensor import make_fx
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from qso3_tvm.compiler.export import batch_inputs, export_energy_forces
from qso3_tvm.compiler.relax_import import import_to_relax
from qso3_tvm.graph.molecules import random_molecule
from qso3_tvm.nn.quant import QuantConfig, quantize_model
from qso3_tvm.nn.testing import model_energy_forces, tiny_model


def run_relax(mod, *args):
    ex = tvm.compile(mod, target=tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a.detach().numpy()) for a in args])
    return [o.numpy() for o in out] if isinstance(out, (list, tuple)) or hasattr(out, "__len__") else [out.numpy()]


def export_grad_graph(fn, *args, dims=None):
    traced = make_fx(fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*args)
    return torch.export.export(traced, args, dynamic_shapes=dims)


class Scatter(torch.nn.Module):  # index_add forward, index_put (x[idx] backward), split backward
    def forward(self, x, idx):
        x = x.detach().requires_grad_(True)
        a, b = (x[idx] * 2.0).split(2, dim=1)
        y = torch.zeros(5, 2).index_add(0, idx, torch.nn.functional.silu(a) * b)
        m = y.amax(0).detach()
        (g,) = torch.autograd.grad((y - m).pow(2).sum(), x)
        return y, g


def scatter_case():
    x = torch.randn(7, 4)
    idx = torch.tensor([0, 3, 3, 1, 4, 0, 6, 2, 2]) % 5
    rows = torch.export.Dim("rows", min=2, max=1024)
    return Scatter(), (x, idx), ({0: torch.export.Dim("n", min=2, max=1024)}, {0: rows})


def test_stock_importer_fails_on_our_graph_ops():
    """Why relax_frontend exists: the stock importer rejects the ops of a force graph."""
    fn, args, dims = scatter_case()
    with torch.enable_grad():
        ep = export_grad_graph(fn, *args, dims=dims)
    with pytest.raises(Exception, match="Unsupported function types|index tensors|constant int"):
        from_exported_program(ep)


def test_converters_match_torch():
    fn, args, dims = scatter_case()
    with torch.enable_grad():
        ep = export_grad_graph(fn, *args, dims=dims)
        y_ref, g_ref = fn(*args)
    y, g = run_relax(import_to_relax(ep), *args)
    np.testing.assert_allclose(y, y_ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g, g_ref.numpy(), rtol=1e-5, atol=1e-6)


class LayerNormBackward(torch.nn.Module):
    def forward(self, x):
        x = x.detach().requires_grad_(True)
        y = torch.nn.functional.layer_norm(x, (4,))
        (g,) = torch.autograd.grad((y * torch.arange(4.0)).sum(), x)
        return g


def test_layer_norm_backward_bug_is_refused():
    """native_layer_norm's mean/rstd outputs come back as the normalized tensor in TVM 0.27
    (silently wrong gradients); import_to_relax refuses such graphs instead."""
    from qso3_tvm.errors import QSO3Error

    x = torch.randn(6, 4)
    with torch.enable_grad():
        ep = export_grad_graph(LayerNormBackward(), x)
        ref = LayerNormBackward()(x)
    stock = run_relax(from_exported_program(ep), x)[0]
    assert not np.allclose(stock, ref.numpy(), atol=1e-3)  # the bug: wrong, with no error
    with pytest.raises(QSO3Error, match="native_layer_norm"):
        import_to_relax(ep)


@pytest.mark.parametrize("quantized", [False, True])
def test_energy_forces_through_relax(quantized):
    model = tiny_model(torch.float32, seed=3)
    if quantized:
        model = quantize_model(model, QuantConfig())
        model_energy_forces(model, *random_molecule(10, seed=1))  # calibrate
        model.eval()
    mod = import_to_relax(export_energy_forces(model))
    ex = tvm.compile(mod, target=tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    # a molecule larger than the export example: shapes are symbolic
    from qso3_tvm.graph.molecules import MoleculeSet
    from qso3_tvm.nn.batch import make_batch

    z1, p1 = random_molecule(14, seed=5)
    z2, p2 = random_molecule(9, seed=6)
    mols = MoleculeSet(np.concatenate([z1, z2]), np.concatenate([p1, p2]), np.array([0, 14, 23]))
    batch = make_batch(mols, [0, 1], model.cfg.species, model.cfg.cutoff)
    e, f = vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in batch_inputs(batch)])
    pos = batch.pos.clone().requires_grad_(True)
    e_ref = model(batch.species, pos, batch.mol, batch.src, batch.dst, batch.n_mol)
    f_ref = -torch.autograd.grad(e_ref.sum(), pos)[0]
    tol = 1e-4 if not quantized else 2e-3  # fake-quant rounding ties may flip a code in float32
    np.testing.assert_allclose(e.numpy(), e_ref.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(f.numpy(), f_ref.numpy(), rtol=tol, atol=tol * np.abs(f_ref.numpy()).max())
