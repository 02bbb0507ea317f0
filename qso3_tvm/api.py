"""The importable API behind the CLI: one function per stage."""

from __future__ import annotations

from .checkpoint import load_model, precision
from .data import load_dataset, validate
from .metrics import evaluate_model


def evaluate(model: str, data: str, lee_frames: int = 100, max_frames: int = 0) -> dict:
    """Energy/force MAE and LEE of a model on a dataset (molecule names resolve to the test split)."""
    net = load_model(model)
    mols = load_dataset(data, split="test")
    if max_frames:
        mols = mols.subset(range(min(max_frames, len(mols))))
    validate(mols, species=net.cfg.species, source=data)
    result = {"model": str(model), "data": str(data), "precision": precision(net)}
    result.update(evaluate_model(net, mols, lee_frames=lee_frames))
    return result
