"""`qso3-tvm demo`: the main job on built-in defaults, end to end."""

from __future__ import annotations

from pathlib import Path

from ..boards.firmware import free_port, start_board
from ..boards.profile import profile
from ..compiler.compile import compile_model


def demo(model: str = "ethanol-int8", target: str = "arm64-cortex-a76", cpu: str = "cortex-a76",
         out: str | Path = "build/demo", repeat: int = 5, report_dir: str | Path = "reports", log=print) -> dict:
    """The pipeline on built-in defaults: compile a bundled model for an arm64 board, bring up an
    emulated board (qemu) running the firmware RPC server, profile the artifact there (verified
    against the compile-time reference), stop the board."""

    artifact = Path(out) / target
    compile_model(model, target, artifact, log=log)
    with start_board(cpu=cpu, port=free_port(), key="demo") as board:
        log(f"emulated board {board.label} listening on {board.address}")
        return profile(artifact, rpc=board.address, key="demo", repeat=repeat, report_dir=report_dir, log=log)
