"""`qso3-tvm evaluate`: accuracy (energy/force MAE) and LEE of a checkpoint or a compiled artifact."""

from __future__ import annotations

from pathlib import Path

from ..errors import QSO3Error
from ..graph.convention import MANIFEST
from ..graph.datasets import load_dataset
from ..graph.metrics import error_metrics, lee_metric
from ..graph.molecules import validate
from ..nn.checkpoint import load_model, precision
from ..nn.metrics import evaluate_model
from ..runtime.compiled import CompiledModel


def evaluate(model: str, data: str, lee_frames: int = 100, max_frames: int = 0) -> dict:
    """Energy/force MAE and LEE of a checkpoint or compiled artifact on a dataset
    (molecule names resolve to the test split). The model is checked before the data is read."""
    if lee_frames < 1 or max_frames < 0:
        raise QSO3Error(f"--lee-frames must be >= 1 and --max-frames >= 0 (0: all), not {lee_frames} and {max_frames}")
    compiled_dir = (Path(model) / MANIFEST).is_file()
    net = None if compiled_dir else load_model(model)
    mols = load_dataset(data, split="test")
    if max_frames:
        mols = mols.subset(range(min(max_frames, len(mols))))
    if compiled_dir:
        compiled = CompiledModel(model)
        validate(mols, species=compiled.species, source=data)
        energies, forces = compiled.predict(mols, forces=mols.forces is not None)  # QM9: energy-only calls
        result = {"model": str(model), "data": str(data), "precision": compiled.manifest["model"]["precision"],
                  "backend": f"tvm:{compiled.manifest['target']['name']}"}
        result.update(error_metrics(energies, forces, mols))
        result["lee_mev_per_a"] = lee_metric(compiled.forces_fn(), mols, lee_frames)
        result["lee_frames"] = min(lee_frames, len(mols))
        return result
    validate(mols, species=net.cfg.species, source=data)
    result = {"model": str(model), "data": str(data), "precision": precision(net), "backend": "torch"}
    result.update(evaluate_model(net, mols, lee_frames=lee_frames))
    return result
