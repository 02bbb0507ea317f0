"""`qso3-tvm`: a thin typer CLI. Each command parses flags, calls the API, and prints."""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from .apps.bench.routes import DEFAULT_ROUTES, DEFAULT_WORKLOADS
from .apps.bench.routes import ROUTES as BENCH_ROUTES
from .errors import QSO3Error
from .runtime import DEFAULT_KEY

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Quantized SO(3)-equivariant force fields: train, quantize, compile with TVM, deploy.")


def user_errors(fn):
    """Turn QSO3Error (bad input) into one line on stderr and exit code 2; SIGTERM cleans up as Ctrl-C does
    (boards, trackers and workers stopped, no half-written output)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        terminate_as_interrupt()
        try:
            return fn(*args, **kwargs)
        except QSO3Error as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def terminate_as_interrupt() -> None:
    """SIGTERM raises KeyboardInterrupt (signals can only be set in the main thread)."""
    if threading.current_thread() is threading.main_thread():
        def _interrupt(*_):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _interrupt)


@app.command()
@user_errors
def train(
    data: str = typer.Option("ethanol", help="rMD17 molecule name or .npz path, 'qm9', or an .extxyz file"),
    out: Path = typer.Option(Path("runs/model"), "-o", "--out", help="run directory (best.pt, last.pt, log.csv)"),
    epochs: int = typer.Option(100),
    batch_size: int = typer.Option(8),
    lr: float = typer.Option(2e-3, help="peak learning rate (cosine decay)"),
    energy_weight: float = typer.Option(1.0),
    force_weight: float = typer.Option(100.0),
    n_train: int = typer.Option(950),
    n_val: int = typer.Option(50),
    ema_decay: float = typer.Option(0.99),
    channels: int = typer.Option(64),
    layers: int = typer.Option(6),
    heads: int = typer.Option(4),
    cutoff: float = typer.Option(5.0),
    attention: str = typer.Option("l2norm", help="l2norm (robust) or dot (plain scaled dot product)"),
    seed: int = typer.Option(0),
    max_minutes: float = typer.Option(0.0, help="wall-time budget (0: none)"),
    threads: int = typer.Option(0, help="torch threads (0: default)"),
    device: str = typer.Option("cpu", help="torch device: cpu, or cuda (a GPU; see reports/cuda/train_gpu.sh)"),
    resume: bool = typer.Option(True, help="continue from OUT/last.pt if present"),
):
    """Train an fp32 model on energies and forces."""
    from .nn.model import ModelConfig
    from .nn.train import TrainConfig
    from .nn.train import train as run

    if attention not in ("l2norm", "dot"):
        raise QSO3Error(f"--attention must be 'l2norm' or 'dot', not {attention!r}")
    cfg = TrainConfig(data=data, out=str(out), epochs=epochs, batch_size=batch_size, lr=lr,
                      energy_weight=energy_weight, force_weight=force_weight, n_train=n_train, n_val=n_val,
                      ema_decay=ema_decay, seed=seed, max_minutes=max_minutes, threads=threads, device=device)
    model_cfg = ModelConfig(channels=channels, layers=layers, heads=heads, cutoff=cutoff, attention=attention)
    summary = run(cfg, model_cfg, resume=resume)
    typer.echo(json.dumps(summary))


@app.command()
@user_errors
def quantize(
    model: str = typer.Argument(..., help="fp32 checkpoint path or bundled model name"),
    data: str = typer.Option("ethanol", help="rMD17 molecule name or .npz path (train split)"),
    out: Path = typer.Option(..., "-o", "--out", help="run directory (best.pt is the quantized model)"),
    precision: Optional[str] = typer.Option(None, help="w8a8 (int8 weights and activations, the paper's; default), "
                                            "w8 (int8 weights, float activations: a smooth energy whose gradient is "
                                            "the force), w4a8, w4"),
    epochs: int = typer.Option(30, help="QAT epochs (0: post-training quantization, calibrated and saved as is)"),
    warmup_epochs: int = typer.Option(5, help="scalar-only epochs before vectors are quantized"),
    staged: bool = typer.Option(True, help="--no-staged: quantize vectors from epoch 0"),
    branch_separate: bool = typer.Option(True, help="--no-branch-separate: one learning rate for all"),
    vector: str = typer.Option("mddq", help="vector features: mddq, naive (component-wise) or none"),
    direction_grid: str = typer.Option("cube", help="MDDQ direction codes: cube (max-scaled) or sphere (fixed 1/127)"),
    direction_bits: int = typer.Option(8, help="unit-vector code bits (MDDQ directions, attention q̂ and k̂): 8 (the "
                                       "paper's int8) .. 16 (lower LEE at the same speed; reports/quantization.md)"),
    direction_ste: str = typer.Option("grid", help="MDDQ backward: grid (straight through the grid codes) or "
                                      "geometric (tangent plane at the true direction)"),
    silu_offset: bool = typer.Option(False, help="LSQ+: SiLU outputs as unsigned codes with a learned offset "
                                     "(default: signed symmetric codes)"),
    lr_steps_factor: float = typer.Option(1.0, help="quantizer steps learn at this fraction of their branch's rate"),
    calibration: str = typer.Option("lsq", help="activation steps at the start: lsq (LSQ's 2·E|x|/√qmax) or mse "
                                    "(least squared error)"),
    attention_quant: bool = typer.Option(True, help="int8 q̂, k̂ in attention"),
    float_head: bool = typer.Option(False, help="keep the energy head's activations in float (weights int8)"),
    w_bits: Optional[int] = typer.Option(None, help="weight bits: 8 (W8A8) or 4 (W4A8, same as --precision w4a8)"),
    lr_scalar: float = typer.Option(3e-4),
    lr_vector: float = typer.Option(1e-4),
    lee_weight: float = typer.Option(0.0, help="weight of the LEE penalty (0: off)"),
    teacher: Optional[str] = typer.Option(None, help="fp32 teacher for distillation (path or bundled name; "
                                          "default: the fp32 MODEL itself when --distill-weight > 0)"),
    distill_weight: float = typer.Option(0.0, help="0..1: targets = (1 - w) labels + w teacher outputs "
                                         "(energies, forces, per-atom energies)"),
    energy_weight: float = typer.Option(1.0, help="loss weight of the per-atom energy error (eV²)"),
    force_weight: float = typer.Option(100.0, help="loss weight of the force error ((eV/Å)²)"),
    rotate: bool = typer.Option(True, help="random rotation of each training batch"),
    refit_shifts: bool = typer.Option(True, help="refit the per-element energy shifts on the training frames after "
                                      "calibration and at the end (--no-refit-shifts: the recipe before they were)"),
    batch_size: int = typer.Option(8),
    n_train: int = typer.Option(950),
    n_val: int = typer.Option(50),
    seed: int = typer.Option(0),
    max_minutes: float = typer.Option(0.0, help="wall-time budget (0: none)"),
    threads: int = typer.Option(0, help="torch threads (0: default)"),
    device: str = typer.Option("cpu", help="torch device: cpu, or cuda (a GPU; see reports/cuda/train_gpu.sh)"),
    resume: bool = typer.Option(True, help="continue from OUT/last.pt if present"),
):
    """Quantization-aware training (MDDQ, branch-separated, staged) from an fp32 checkpoint."""
    from .nn.quant import QuantConfig, parse_precision
    from .nn.train import TrainConfig, train_qat

    if vector not in ("mddq", "naive", "none") or direction_grid not in ("cube", "sphere") or w_bits not in (None, 4, 8):
        raise QSO3Error("--vector must be mddq|naive|none, --direction-grid cube|sphere, --w-bits 4|8")
    bits, weight_only = parse_precision(precision, w_bits)
    qcfg = QuantConfig(w_bits=bits, vector=vector, direction_grid=direction_grid, direction_bits=direction_bits,
                       attention=attention_quant,
                       direction_ste=direction_ste, silu_offset=silu_offset, lr_steps_factor=lr_steps_factor,
                       calibration=calibration,
                       staged=staged, warmup_epochs=warmup_epochs, branch_separate=branch_separate,
                       lr_scalar=lr_scalar, lr_vector=lr_vector, weight_only=weight_only, float_head=float_head)
    cfg = TrainConfig(data=data, out=str(out), epochs=epochs, batch_size=batch_size, lr=lr_scalar, n_train=n_train,
                      n_val=n_val, seed=seed, max_minutes=max_minutes, threads=threads, rotate=rotate,
                      lee_weight=lee_weight, energy_weight=energy_weight, force_weight=force_weight,
                      refit_shifts=refit_shifts, teacher=teacher or (model if distill_weight else ""),
                      distill_weight=distill_weight, device=device)
    typer.echo(json.dumps(train_qat(cfg, model, qcfg, resume=resume)))


@app.command("float-head")
@user_errors
def float_head_cmd(
    model: str = typer.Argument(..., help="w8a8 checkpoint path or bundled model name (e.g. ethanol-int8)"),
    out: Path = typer.Option(..., "-o", "--out", help="new checkpoint (.pt)"),
):
    """The same quantized model with its energy head's activations in float (int8 weights kept), no retraining."""
    from .nn.quant import with_float_head

    _write_converted(model, out, with_float_head, float_head_from=str(model))


@app.command("direction-bits")
@user_errors
def direction_bits_cmd(
    model: str = typer.Argument(..., help="MDDQ checkpoint path or bundled model name (e.g. ethanol-int8)"),
    bits: int = typer.Argument(..., help="unit-vector code bits, 8 .. 16"),
    out: Path = typer.Option(..., "-o", "--out", help="new checkpoint (.pt)"),
):
    """The same MDDQ model with BITS-bit unit-vector codes (MDDQ directions, attention q̂ and k̂; all else kept),
    no retraining."""
    from .nn.quant import with_direction_bits

    _write_converted(model, out, lambda m: with_direction_bits(m, bits), direction_bits_from=str(model))


def _write_converted(model: str, out: Path, convert, **meta) -> None:
    from .nn.checkpoint import check_checkpoint_output, load_model, load_payload, save_model

    check_checkpoint_output(out)
    converted = convert(load_model(model))
    save_model(out, converted, **{**load_payload(model).get("meta", {}), **meta})
    typer.echo(f"wrote {out} ({converted.quant_cfg.precision()})")


@app.command()
@user_errors
def evaluate(
    model: str = typer.Argument("ethanol-fp32", help="checkpoint path, bundled model name or compiled artifact folder"),
    data: str = typer.Option(..., help="rMD17 molecule name (test split), qm9, .npz or .extxyz"),
    lee_frames: int = typer.Option(100, help="frames used for LEE (evenly spaced)"),
    max_frames: int = typer.Option(0, help="evaluate only the first N frames (0: all)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Energy MAE (meV), force MAE (meV/Å) and LEE (meV/Å) on a dataset."""
    from .apps.evaluate import evaluate as run

    result = run(model, data, lee_frames=lee_frames, max_frames=max_frames)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{result['model']} on {result['data']} ({result['n_frames']} frames, {result['precision']})")
    typer.echo(f"  energy MAE  {result.get('energy_mae_mev', float('nan')):9.3f} meV")
    typer.echo(f"  force MAE   {result.get('force_mae_mev_per_a', float('nan')):9.3f} meV/Å")
    typer.echo(f"  LEE         {result['lee_mev_per_a']:9.4f} meV/Å  ({result['lee_frames']} frames)")


@app.command("compile")
@user_errors
def compile_cmd(
    model: str = typer.Argument("ethanol-int8", help="checkpoint path or bundled model name"),
    target: str = typer.Option("host", "--target", help="preset (qso3-tvm targets; host: the fastest this machine runs), TVM tag or JSON"),
    out: Path = typer.Option(..., "-o", "--out", help="artifact directory (library + manifest.json)"),
    check: bool = typer.Option(True, help="compare with PyTorch when the target runs here"),
    tuning_records: Optional[Path] = typer.Option(None, "--tuning-records",
                                                  help="MetaSchedule database folder from `qso3-tvm tune`: its buckets become "
                                                  "tuned static copies (with --bucket: one static build)"),
    bucket: Optional[str] = typer.Option(None, "--bucket", help="static sizes ATOMS,EDGES,MOLECULES or a name "
                                         "(ethanol, aspirin, qm9-32); default with --tuning-records: the database's first"),
    specialize: Optional[list[str]] = typer.Option(
        None, "--specialize", help="sizes ATOMS,EDGES,MOLECULES (or ethanol, aspirin, qm9-32) of calls that get a static copy of "
        "the model in the library, padded to the smallest that fits (repeatable; 'none' for none; default: one per "
        "packaged sample molecule of the model's elements)"),
):
    """Compile energy+forces for a target: shared library + manifest.json, checked against PyTorch."""
    from .compiler.compile import compile_model

    if specialize and [s.strip().lower() for s in specialize] == ["none"]:
        specialize = []
    info = compile_model(model, target, out, check=check, log=typer.echo, bucket=bucket, tuning_records=tuning_records,
                         specialize=specialize)
    typer.echo(f"wrote {out}/{info['library']} ({info['target']['name']}, {info['model']['precision']})")


@app.command()
@user_errors
def tune(
    model: str = typer.Argument("ethanol-int8", help="checkpoint path or bundled model name"),
    target: str = typer.Option("host", "--target", help="preset (qso3-tvm targets; host: the fastest this machine runs), TVM tag or JSON"),
    trials: int = typer.Option(64, "--trials", help="measured candidates in total (tvmc's --trials)"),
    trials_per_task: Optional[int] = typer.Option(None, help="cap per task (default min(trials, 8)): the budget "
                                                  "goes to the trials // cap heaviest kernels"),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="database folder (default schedules/<model>/<target>)"),
    bucket: Optional[list[str]] = typer.Option(None, "--bucket", help="static sizes ATOMS,EDGES,MOLECULES or ethanol, aspirin, "
                                               "qm9-32; repeat for several (default: the database's, else ethanol)"),
    rpc_tracker: Optional[str] = typer.Option(None, "--rpc-tracker", help="HOST:PORT: measure on the boards of --rpc-key"),
    rpc_key: Optional[str] = typer.Option(None, "--rpc-key"),
):
    """Auto-tune the model's kernels with MetaSchedule (static size buckets); a re-run resumes."""
    from .compiler.tuning.tune import tune as run

    summary = run(model, target, trials, work_dir=work_dir, buckets=bucket or None, rpc_tracker=rpc_tracker,
                  rpc_key=rpc_key, trials_per_task=trials_per_task, log=typer.echo)
    typer.echo(f"database {summary['work_dir']} (sha256 {summary['database_sha256'][:12]}); "
               f"apply with: qso3-tvm compile {model} --target {target} --tuning-records {summary['work_dir']} -o OUT")


@app.command()
@user_errors
def targets():
    """List target presets and what they resolve to."""
    from .compiler.targets import HOST, host_preset, presets

    try:
        host = host_preset()
    except QSO3Error as e:  # still list the presets (to name one with --target)
        host = f"none ({e})"
    typer.echo(f"{HOST:18s} the fastest preset this machine runs (the default): {host}")
    seen = set()
    for name, spec in presets().items():
        if spec.name in seen:
            continue
        seen.add(spec.name)
        aliases = [a for a, s in presets().items() if s is spec and a != spec.name]
        typer.echo(f"{spec.name:18s} {spec.description}" + (f"  (aliases: {', '.join(aliases)})" if aliases else ""))
        typer.echo(f"{'':18s} {json.dumps(spec.target)}")


board_app = typer.Typer(no_args_is_help=True, help="Boards: run the firmware RPC server (emulated arm64 or native).")
app.add_typer(board_app, name="board")


def _serve(board) -> None:
    typer.echo(f"board {board.label} listening on {board.address} key={board.key} (Ctrl-C stops it)")
    try:
        board.proc.wait()
        raise QSO3Error(f"board exited with code {board.proc.returncode}")
    except KeyboardInterrupt:
        typer.echo("stopping board")
    finally:
        board.stop()


@board_app.command("emulate")
@user_errors
def board_emulate(
    cpu: str = typer.Option("cortex-a76", help="qemu CPU: cortex-a53, cortex-a72 (Pi 4), cortex-a76 (Pi 5), neoverse-n1, max"),
    port: int = typer.Option(9090),
    host: str = typer.Option("127.0.0.1"),
    key: str = typer.Option(DEFAULT_KEY, "--key", "--rpc-key", help="RPC key clients must send"),
    tracker: Optional[str] = typer.Option(None, "--tracker", "--rpc-tracker", help="register with this tracker HOST:PORT"),
    timeout: int = typer.Option(0, help="session timeout in seconds (0: none)"),
):
    """An emulated arm64 board: the firmware RPC server under qemu-aarch64."""
    from .boards.firmware import start_board

    _serve(start_board(cpu=cpu, port=port, host=host, key=key, tracker=tracker, timeout=timeout))


@board_app.command("native")
@user_errors
def board_native(
    port: int = typer.Option(9090),
    host: str = typer.Option("127.0.0.1"),
    key: str = typer.Option(DEFAULT_KEY, "--key", "--rpc-key", help="RPC key clients must send"),
    tracker: Optional[str] = typer.Option(None, "--tracker", "--rpc-tracker"),
    timeout: int = typer.Option(0),
):
    """This machine as a board: the firmware RPC server built natively."""
    from .boards.firmware import start_board

    _serve(start_board(cpu=None, port=port, host=host, key=key, tracker=tracker, timeout=timeout))


@board_app.command("provision")
@user_errors
def board_provision(
    serial: str = typer.Option(..., "--serial", help="console: /dev/ttyUSB0, a pty, socket://host:port"),
    port: int = typer.Option(9090),
    key: str = typer.Option(DEFAULT_KEY, "--key", "--rpc-key", help="RPC key clients must send"),
    tracker: Optional[str] = typer.Option(None, "--tracker", "--rpc-tracker"),
    server: str = typer.Option("/opt/qso3/qso3-rpc-server", help="server path on the board"),
    timeout: float = typer.Option(60.0),
):
    """Start the RPC server on a board over its serial console and print where it listens."""
    from .boards.serial_console import provision

    host, port = provision(serial, port=port, key=key, tracker=tracker, server=server, timeout=timeout, log=typer.echo)
    typer.echo(f"board RPC server at {host}:{port} key={key}")


@board_app.command("console")
@user_errors
def board_console(serial: str = typer.Option(..., "--serial"), baudrate: int = typer.Option(115200)):
    """Interactive serial console (pyserial miniterm; Ctrl-] quits)."""
    from serial.tools import miniterm

    sys.argv = ["miniterm", serial, str(baudrate)]
    miniterm.main()


@app.command()
@user_errors
def profile(
    artifact: Path = typer.Argument(..., help="compiled artifact directory"),
    rpc: Optional[str] = typer.Option(None, "--rpc", help="board HOST:PORT (direct)"),
    rpc_tracker: Optional[str] = typer.Option(None, "--rpc-tracker", help="tracker HOST:PORT (else TVM_TRACKER_HOST/PORT)"),
    rpc_key: Optional[str] = typer.Option(None, "--rpc-key", help=f"board key (else TVM_TRACKER_KEY, else {DEFAULT_KEY!r} for --rpc)"),
    repeat: int = typer.Option(10),
    number: int = typer.Option(1),
    report_dir: Path = typer.Option(Path("reports"), help="where the .json/.md report goes"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Upload an artifact to a board, verify energies/forces against the compile-time reference, time it."""
    from .boards.profile import profile as run

    result = run(artifact, rpc=rpc, tracker=rpc_tracker, key=rpc_key, repeat=repeat, number=number,
                 report_dir=report_dir, log=(lambda *_: None) if as_json else typer.echo)
    if as_json:
        typer.echo(json.dumps(result))
        return
    err = result["errors_vs_reference"]
    typer.echo(f"verified: energies/forces within tolerance (max |dE| {err['max_energy_error_mev']:.4f} meV, "
               f"max |dF| {err['max_force_error_mev_per_a']:.4f} meV/Å) on {len(result['samples'])} samples")
    for name, t in result["timing_ms"].items():
        typer.echo(f"{name:13s} mean {t['mean']:.3f} ms  median {t['median']:.3f}  max {t['max']:.3f}  "
                   f"min {t['min']:.3f}  std {t['std']:.3f}" + ("  [EMULATED]" if result["emulated"] else ""))
    typer.echo(f"report: {result['report']}.md")


@app.command()
@user_errors
def demo(
    model: str = typer.Argument("ethanol-int8", help="bundled model name or checkpoint"),
    target: str = typer.Option("arm64-cortex-a76", "--target"),
    cpu: str = typer.Option("cortex-a76", help="emulated board CPU (qemu)"),
    out: Path = typer.Option(Path("build/demo"), "-o", "--out"),
    repeat: int = typer.Option(5),
):
    """Main job on built-in defaults: compile -> emulated arm64 board over RPC -> verified profile."""
    from .apps.demo import demo as run

    result = run(model, target=target, cpu=cpu, out=out, repeat=repeat, log=typer.echo)
    err = result["errors_vs_reference"]
    typer.echo(f"verified on {result['board']['label']}: max |dE| {err['max_energy_error_mev']:.4f} meV, "
               f"max |dF| {err['max_force_error_mev_per_a']:.4f} meV/Å vs PyTorch")
    t = result["timing_ms"]["one_molecule"]
    typer.echo(f"{t['molecule']}: median {t['median']:.1f} ms per energy+forces call (emulated: not board speed)")
    typer.echo(f"report: {result['report']}.md")


@app.command()
@user_errors
def md(
    model: str = typer.Argument(..., help="checkpoint path / bundled model name, or a compiled artifact folder"),
    data: str = typer.Option(..., help="start geometry: rMD17 molecule (test split), .npz or .extxyz"),
    out: Path = typer.Option(..., "-o", "--out", help="output folder (traj.extxyz, log.csv, energy.png, summary.json)"),
    frame: int = typer.Option(0, help="frame of --data to start from"),
    ensemble: str = typer.Option("nve", help="nve (VelocityVerlet) or langevin"),
    steps: Optional[int] = typer.Option(None, help="number of steps (default 1000)"),
    time_ps: Optional[float] = typer.Option(None, help="simulated time in ps (instead of --steps)"),
    dt_fs: float = typer.Option(0.5, help="time step (fs)"),
    temperature: float = typer.Option(300.0, help="K: Maxwell-Boltzmann start velocities and Langevin bath"),
    friction: float = typer.Option(10.0, help="Langevin friction (1/ps)"),
    seed: int = typer.Option(0),
    traj_every: int = typer.Option(20, help="write a trajectory frame every N steps"),
    log_every: Optional[int] = typer.Option(None, help="log energies and check stability every N steps "
                                            "(default 1; with --mts-model: every --mts-every steps)"),
    max_com_distance: float = typer.Option(10.0, help="Å from the centre of mass beyond which an atom counts as lost"),
    mts_model: Optional[str] = typer.Option(None, "--mts-model", help="multiple time stepping (NVE): conservative model "
                                            "(w8 or fp32 checkpoint, or artifact) whose correction F_cons − F_model "
                                            "kicks every --mts-every steps; MODEL gives the cheap inner forces"),
    mts_every: int = typer.Option(8, "--mts-every", help="M: inner steps per conservative correction (with --mts-model)"),
    rpc: Optional[str] = typer.Option(None, "--rpc", help="run the artifact on a board HOST:PORT"),
    rpc_tracker: Optional[str] = typer.Option(None, "--rpc-tracker", help="tracker HOST:PORT"),
    rpc_key: Optional[str] = typer.Option(None, "--rpc-key"),
    threads: int = typer.Option(0, help="torch / TVM threads (0: default)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
):
    """Molecular dynamics (NVE or Langevin) with stability checks and energy-drift summary; multiple time
    stepping (cheap MODEL forces, a conservative correction every M steps) with --mts-model."""
    try:
        from .apps.md import MDConfig, run
    except ImportError as e:
        raise QSO3Error(f"md needs ASE: pip install 'qso3-tvm[ase]' ({e})") from None

    cfg = MDConfig(ensemble=ensemble, steps=steps, time_ps=time_ps, dt_fs=dt_fs, temperature=temperature,
                   friction=friction, seed=seed, traj_every=traj_every, log_every=log_every,
                   max_com_distance=max_com_distance, mts_model=mts_model, mts_every=mts_every)
    summary = run(model, data, cfg, out, frame=frame, rpc=rpc, tracker=rpc_tracker, key=rpc_key, threads=threads,
                  log=(lambda *_: None) if as_json else typer.echo)
    if as_json:
        typer.echo(json.dumps(summary))


@app.command()
@user_errors
def models():
    """List the bundled models."""
    from .nn.checkpoint import BUNDLED, load_payload

    for name in BUNDLED:
        meta = load_payload(name).get("meta", {})
        typer.echo(f"{name:16s} {json.dumps(meta)}")


@app.command()
@user_errors
def bench(
    model_fp32: str = typer.Option("ethanol-fp32", help="fp32 checkpoint (eager, torch.compile, ONNX, TVM fp32)"),
    model_int8: str = typer.Option("ethanol-int8", help="int8 QAT checkpoint (TVM int8 routes)"),
    routes: str = typer.Option(",".join(DEFAULT_ROUTES), help="comma-separated: " + ", ".join(BENCH_ROUTES)),
    workloads: str = typer.Option(",".join(DEFAULT_WORKLOADS), help="ethanol-b1, aspirin-b1, qm9-bN"),
    modes: str = typer.Option("E,E+F", help="E (energy only), E+F (energy and forces)"),
    threads: str = typer.Option("1,2", help="thread counts, one set of route processes each"),
    rounds: int = typer.Option(7, help="alternating rounds per case"),
    budget_ms: float = typer.Option(300.0, help="timed milliseconds per route per round (at least one call)"),
    max_calls: int = typer.Option(50, help="timed calls per route per round at most"),
    warmup: int = typer.Option(3, help="untimed calls per case at setup"),
    target: str = typer.Option("host", "--target", help="target for artifacts compiled here (host: the fastest preset this machine runs)"),
    tvm_fp32: Optional[Path] = typer.Option(None, "--tvm-fp32", help="fp32 artifact folder (else compiled into the cache)"),
    tvm_int8: Optional[Path] = typer.Option(None, "--tvm-int8", help="int8 artifact folder (else compiled into the cache)"),
    tvm_int8_tuned: Optional[Path] = typer.Option(None, "--tvm-int8-tuned", help="tuned int8 artifact folder"),
    tuning_records: Optional[Path] = typer.Option(None, "--tuning-records", help="compile the tuned int8 route with these "
                                                  "(default: the database committed in schedules/ for the int8 model "
                                                  "and target, if any; 'none': no tuned route)"),
    cache_dir: Optional[Path] = typer.Option(None, help="artifact cache (default ~/.cache/qso3_tvm/bench)"),
    work_dir: Optional[Path] = typer.Option(None, help="inputs and worker logs (default: a temporary folder)"),
    report_dir: Path = typer.Option(Path("reports"), help="writes bench.md and bench/bench.{json,png} here"),
    as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object"),
):
    """Time every inference route side by side (own process each, alternating rounds); write reports/bench.md."""
    from .apps.bench.run import BenchConfig, run_bench

    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    try:
        n_threads = tuple(int(t) for t in split(threads))
    except ValueError:
        raise QSO3Error(f"--threads must be comma-separated integers, not {threads!r}") from None
    opt = lambda p: None if p is None else str(p)  # noqa: E731
    cfg = BenchConfig(model_fp32=model_fp32, model_int8=model_int8, routes=split(routes), workloads=split(workloads),
                      modes=split(modes), threads=n_threads, rounds=rounds, budget_s=budget_ms / 1e3,
                      max_calls=max_calls, warmup=warmup, target=target, tvm_fp32=opt(tvm_fp32),
                      tvm_int8=opt(tvm_int8), tvm_int8_tuned=opt(tvm_int8_tuned), tuning_records=opt(tuning_records),
                      cache_dir=opt(cache_dir), work_dir=opt(work_dir), report_dir=str(report_dir))
    result = run_bench(cfg, log=(lambda *_: None) if as_json else typer.echo)
    if as_json:
        typer.echo(json.dumps(result, default=float))
        return
    typer.echo(f"report: {result['reports']['md']}")


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # python -m qso3_tvm.cli
    app()
