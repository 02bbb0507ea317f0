"""Checkpoints: a CPU state dict + config dict, loadable with torch.load(weights_only=True).

Quantized models store the weights of their quantized Linears as int8 codes (`<linear>.weight`, dtype
int8, next to its per-channel step `<linear>.w_quant.step`); loading dequantizes them to codes · step,
which the model's weight quantizer maps back to the same codes. Older checkpoints with float weights load as before.

Writes are atomic (temporary file + rename): an interrupt never leaves a half-written checkpoint.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from ..errors import QSO3Error
from ..files import atomic_path
from .model import ModelConfig, So3krates

BUNDLED = {f"{mol}-{precision}": f"{mol}_{precision}.pt" for mol in ("ethanol", "aspirin") for precision in ("fp32", "int8", "w8")}
DEFAULT_MODEL = "ethanol-fp32"


def atomic_save(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def model_payload(model: So3krates, **meta) -> dict:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state.update(int8_weight_codes(model))
    payload = {"format": "qso3-tvm/1", "config": model.cfg.to_dict(), "state_dict": state, "meta": meta}
    if getattr(model, "quant_cfg", None) is not None:
        payload["quant"] = model.quant_cfg.to_dict()
    return payload


def int8_weight_codes(model: So3krates) -> dict:
    """{'<linear>.weight': int8 codes} of every calibrated quantized Linear of the model."""
    from .quant import QuantLinear

    return {f"{name}.weight": m.w_quant.codes(m.weight.detach()).to(torch.int8).cpu()
            for name, m in model.named_modules() if isinstance(m, QuantLinear) and bool(m.w_quant.initialized)}


def dequantize_state(state: dict) -> dict:
    """The state dict with int8 weight codes turned into float weights codes · step (see module docstring)."""
    out = dict(state)
    for key, codes in state.items():
        step = state.get(key[:-len("weight")] + "w_quant.step")
        if key.endswith(".weight") and codes.dtype == torch.int8 and step is not None:
            out[key] = codes.to(step.dtype) * step.abs().clamp(min=1e-8).reshape(-1, *[1] * (codes.dim() - 1))
    return out


def save_model(path: str | Path, model: So3krates, **meta) -> None:
    atomic_save(model_payload(model, **meta), path)


def resolve_model_path(spec: str | Path) -> Path:
    """A checkpoint path, or the name of a bundled model (see BUNDLED)."""
    if str(spec) in BUNDLED:
        return Path(str(resources.files("qso3_tvm") / "models" / BUNDLED[str(spec)]))
    path = Path(spec)
    if not path.is_file():
        raise QSO3Error(f"model not found: {path} (give a checkpoint path or one of {sorted(BUNDLED)})")
    return path


def load_payload(spec: str | Path) -> dict:
    path = resolve_model_path(spec)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors of a file that is not a checkpoint
        raise QSO3Error(f"{path}: not a qso3-tvm checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
        raise QSO3Error(f"{path}: not a qso3-tvm checkpoint (no config/state_dict)")
    return payload


def check_checkpoint_output(out: str | Path) -> None:
    """The -o of a command that writes one checkpoint: a new path, or an earlier checkpoint (replaced); never a
    folder or another file."""
    out = Path(out)
    if out.is_dir():
        raise QSO3Error(f"output {out} is a folder: give the path of a checkpoint file (.pt)")
    if out.exists():
        try:
            load_payload(out)
        except QSO3Error:
            raise QSO3Error(f"output {out} exists and is not a qso3-tvm checkpoint: choose another -o (nothing was "
                            "changed)") from None


def build_model(config: dict, quant: dict | None = None) -> So3krates:
    """An untrained model of a saved config; fake-quantized when a quant config is given."""
    model = So3krates(ModelConfig.from_dict(config))
    if quant is not None:
        from .quant import QuantConfig, quantize_model

        model = quantize_model(model, QuantConfig(**{"direction_ste": "grid", "silu_offset": False, "calibration": "lsq", **quant}))  # older: before these
    return model


def precision(model: So3krates) -> str:
    qcfg = getattr(model, "quant_cfg", None)
    return "fp32" if qcfg is None else qcfg.precision()


def load_model(spec: str | Path) -> So3krates:
    """A checkpoint's model, checked: config valid, weights matching it and finite."""
    payload = load_payload(spec)
    path = resolve_model_path(spec)
    try:
        model = build_model(payload["config"], payload.get("quant"))
        model.load_state_dict(dequantize_state(payload["state_dict"]))
    except QSO3Error as e:
        raise QSO3Error(f"{path}: {e}") from None
    except (TypeError, ValueError, RuntimeError, KeyError) as e:  # config fields, shapes, missing weights
        msg = str(e).strip().splitlines()[0][:300]
        raise QSO3Error(f"{path}: config and weights do not match ({type(e).__name__}: {msg})") from None
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise QSO3Error(f"{path}: non-finite (NaN/inf) weights in {bad[:3]}{' ...' if len(bad) > 3 else ''}")
    return model.eval()
