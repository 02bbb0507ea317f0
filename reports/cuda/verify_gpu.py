"""GPU check (run by reports/cuda/run_gpu.sh on a machine with an NVIDIA GPU): the native firmware
serves CUDA artifacts (fatbin inside, no CUDA compiler needed) over TVM RPC on loopback; each is
profiled (energies/forces vs the compile-time reference, time evaluator). With QSO3_BOARD=HOST:PORT
(a board already running, e.g. under compute-sanitizer) each artifact runs once, untimed."""

import json
import os
import sys
import time
import traceback
from pathlib import Path

from qso3_tvm.boards.firmware import free_port, start_board
from qso3_tvm.boards.profile import profile
from qso3_tvm.runtime.remote import RemoteModel, board_info, connect
from qso3_tvm.graph.convention import max_errors, read_manifest, sample_set

OUT = Path(os.environ.get("OUT", "/tmp/out"))


def run_once(address: str, art: Path) -> dict:
    session = connect(rpc=address, key="h100")
    model = RemoteModel(session, art, board_info(session))
    energies, forces = model.predict(sample_set(model.species)[0])
    return max_errors(read_manifest(art)["reference"], energies, forces)


def main(names):
    results = {}
    if os.environ.get("QSO3_BOARD"):
        for name in names:
            print(name, "run once:", run_once(os.environ["QSO3_BOARD"], Path("gpu_check") / name), flush=True)
        return
    with start_board(port=free_port(), key="h100") as board:
        results["board"] = {k: v for k, v in board_info(connect(rpc=board.address, key="h100")).items() if k != "features"}
        print("board:", results["board"], flush=True)
        for name in names:
            t0 = time.time()
            try:
                r = profile(Path("gpu_check") / name, rpc=board.address, key="h100", repeat=20, number=10, report_dir=OUT)
                results[name] = {"device": r["device"], "verified": r["verified"], "errors": r["errors_vs_reference"],
                                 "timing_ms": r["timing_ms"], "wall_s": time.time() - t0}
            except Exception as e:  # noqa: BLE001 - record and go on with the next artifact
                traceback.print_exc()
                results[name] = {"error": str(e)[-2000:]}
            print(name, json.dumps(results[name]), flush=True)
        results["board_alive_after"] = board.proc.poll() is None
    (OUT / "gpu_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
