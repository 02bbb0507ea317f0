"""The importable API behind the CLI: one function per stage."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import load_model, precision
from .data import load_dataset, validate
from .metrics import error_metrics, evaluate_model, lee_metric
from .runtime import MANIFEST, CompiledModel


def evaluate(model: str, data: str, lee_frames: int = 100, max_frames: int = 0) -> dict:
    """Energy/force MAE and LEE of a checkpoint or compiled artifact on a dataset
    (molecule names resolve to the test split). The model is checked before the data is read."""
    compiled_dir = (Path(model) / MANIFEST).is_file()
    net = None if compiled_dir else load_model(model)
    mols = load_dataset(data, split="test")
    if max_frames:
        mols = mols.subset(range(min(max_frames, len(mols))))
    if compiled_dir:
        compiled = CompiledModel(model)
        validate(mols, species=compiled.species, source=data)
        energies, forces = compiled.predict(mols)
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


def demo(model: str = "ethanol-int8", target: str = "arm64-cortex-a76", cpu: str = "cortex-a76",
         out: str | Path = "build/demo", repeat: int = 5, report_dir: str | Path = "reports", log=print) -> dict:
    """The pipeline on built-in defaults: compile a bundled model for an arm64 board, bring up an
    emulated board (qemu) running the firmware RPC server, profile the artifact there (verified
    against the compile-time reference), stop the board."""
    from .board import free_port, start_board
    from .compile import compile_model
    from .deploy import profile

    artifact = Path(out) / target
    compile_model(model, target, artifact, log=log)
    with start_board(cpu=cpu, port=free_port(), key="demo") as board:
        log(f"emulated board {board.label} listening on {board.address}")
        return profile(artifact, rpc=board.address, key="demo", repeat=repeat, report_dir=report_dir, log=log)
