"""Equivariance-preserving quantization: LSQ scalars, MDDQ vectors, fixed-grid attention, staged QAT.

Integer semantics (what the compiled int8 code reproduces; rounding is floor(x + 0.5) everywhere):
  LSQ      q = clamp(floor(x / s + 0.5), qmin, qmax),  x̃ = q · s          s: learned step (> 0)
           signed: qmin = -qmax, qmax = 2^(b-1) - 1 (int8: ±127, int4: ±7); unsigned: [0, 2^b - 1]
  MDDQ     r = sqrt(|v|² + ε²), u = v / r                                   ε = 1e-6 (zero-vector guard)
           r_q = LSQ_unsigned8(r)  (per channel step)      d = floor(127 u / m + 0.5)  (int8 per component)
           m = max_x |u_x| ("cube" grid, default) or m = 1 (the paper's fixed "sphere" grid)
           (direction_bits > 8: 2^(bits-1) - 1 levels instead of 127; the codes no longer fit int8)
           ṽ = r_q · d / sqrt(|d|² + ε²)                   renormalized: the orientation survives
  attention q̂, k̂ (unit vectors per head) -> floor(127 q̂ + 0.5); logit = τ · (q_int · k_int) / 127²
           (direction_bits > 8: the same with 2^(bits-1) - 1; |q_int · k_int| <= (levels + 2)² still fits int32)

Why MDDQ keeps symmetry: |v| is rotation invariant, so its quantization commutes with rotations
exactly; only the direction sees the Cartesian grid, with angular error at most
asin(√3 / 254) = 0.391° (each component is off by at most 1/254; renormalizing does not change the
angle). Scaling the largest component to ±127 before rounding ("cube" grid, the default) keeps
the int8 codes and lowers the bound to asin(√2 / 254) = 0.319°. Component-wise (naive) int8 instead
moves small vectors by up to √3·s/2, any angle.

Which tensors are quantized (QuantConfig defaults):
  int8 (int4 with w_bits=4): the weights of every nn.Linear (per output channel, learned step).
  int8 activations: the input of every scalar-branch Linear (per tensor, learned step; the radial
    basis input is unsigned; with silu_offset, SiLU outputs are unsigned with a learned offset, LSQ+), the vector features after each residual update (MDDQ), q̂ and k̂.
  higher precision, and why: biases (added in the int32 accumulator domain, scale s_x·s_w, simulated
    in float); the species embedding (a 5×64 lookup table, no arithmetic); edge geometry (distances,
    unit vectors, radial basis, cutoff: the inputs whose precision decides force accuracy); softmax
    (exp and normalization) and the neighbor sums (accumulators); the per-element energy shifts.
  vector-branch Linears (channel mixing of l=1 features) take the MDDQ-decoded vectors: their
    weights are int8 but their inputs are not re-quantized component-wise, which would undo MDDQ.

Precisions (`PRECISIONS`, QuantConfig.precision()):
  w8a8   the above (the paper's; fastest). `float_head=True` leaves the energy head's input and hidden
         activations in float (its weights stay int8): most of w8a8's energy error is rounding there.
  w8a8-mddq-dir16 (`direction_bits=16`): w8a8 with the unit-vector codes (MDDQ directions, q̂, k̂) at 16 bits: they
         set the LEE (reports/quantization.md), and the kernels decode them to float or sum them in int32, so no slower.
  w8     weights only (`weight_only=True`): int8 weights, every activation in float (no LSQ activation
         quantizers, no MDDQ, no fixed-grid attention). The energy is a smooth function of the
         positions, the forces are its exact gradient and the features stay exactly equivariant.
  w4a8, w4: the same with int4 weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import QSO3Error
from .model import InteractionLayer, So3krates

MDDQ_EPS = 1e-6
DIRECTION_LEVELS = 127
MDDQ_MAX_ANGLE_DEG = {"sphere": math.degrees(math.asin(math.sqrt(3) / (2 * DIRECTION_LEVELS))),  # 0.391°
                      "cube": math.degrees(math.asin(math.sqrt(2) / (2 * DIRECTION_LEVELS)))}  # 0.319°


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """floor(x + 0.5) forward, identity gradient (straight-through)."""
    return x + (torch.floor(x + 0.5) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    return x * g + (x - x * g).detach()


class LSQ(nn.Module):
    """Learned-step-size fake quantizer (Esser et al. 2020). `channels` > 1: one step per channel
    along `channel_dim`; the step is initialized from the first tensor it sees (calibration): "lsq", LSQ's
    2·E|x|/√qmax (activations), "mse", the step of least squared error, or "max", no clipping (weights).
    `offset=True` (LSQ+, Bhalgat et al. 2020; unsigned, per tensor): x̃ = clamp(floor((x - β)/s + 0.5), 0, qmax)·s + β
    with a learned offset β, for inputs bounded below but not at 0 (SiLU outputs ≥ -0.278)."""

    def __init__(self, bits: int = 8, signed: bool = True, channels: int = 1, channel_dim: int = -1,
                 init: str = "lsq", offset: bool = False):
        super().__init__()
        if offset and (signed or channels != 1):
            raise ValueError("a learned offset needs an unsigned per-tensor quantizer")
        self.bits, self.signed, self.channel_dim, self.init = bits, signed, channel_dim, init
        self.qmax = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
        self.qmin = -self.qmax if signed else 0
        self.step = nn.Parameter(torch.ones(channels))
        self.offset = nn.Parameter(torch.zeros(())) if offset else None
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = True

    def _shape(self, x: torch.Tensor) -> list[int]:
        shape = [1] * x.dim()
        if self.step.numel() > 1:
            shape[self.channel_dim] = self.step.numel()
        return shape

    def _reduce_dims(self, x: torch.Tensor) -> list[int]:
        dims = list(range(x.dim()))
        if self.step.numel() > 1:
            dims.remove(self.channel_dim % x.dim())
        return dims

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        if self.offset is not None:  # β at the smallest value seen, the step from what lies above it
            self.offset.copy_(x.detach().min())
            x = x - self.offset
        a = x.detach().abs()
        dims = self._reduce_dims(x)
        if self.init == "max":  # weights: no clipping at the start
            s = a.amax(dim=dims) / self.qmax
        elif self.init == "mse":  # activations: the step of least squared rounding + clipping error
            s = self._mse_step(x.detach(), a.amax(dim=dims, keepdim=True) / self.qmax, dims)
        else:  # LSQ's 2·E|x|/sqrt(qmax)
            s = 2 * a.mean(dim=dims) / math.sqrt(self.qmax)
        self.step.copy_(s.reshape(-1).clamp(min=1e-8).expand_as(self.step))
        if self.offset is not None:  # the smallest value a quarter step inside code 0, off the clamp's edge
            self.offset.sub_(self.step[0] / 4)
        self.initialized.fill_(True)

    def _mse_step(self, x: torch.Tensor, s_max: torch.Tensor, dims: list[int], n: int = 64) -> torch.Tensor:
        """Per channel (or tensor), the candidate step in s_max · (1/n .. 1) with the least mean squared error."""
        best_err, best = None, s_max
        for k in range(1, n + 1):
            s = (s_max * k / n).clamp(min=1e-12)
            err = ((torch.clamp(torch.floor(x / s + 0.5), self.qmin, self.qmax) * s - x) ** 2).mean(dim=dims, keepdim=True)
            if best_err is None:
                best_err, best = err, s
            else:
                better = err < best_err
                best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
        return best

    def scale(self) -> torch.Tensor:
        return self.step.abs().clamp(min=1e-8)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integers, as float tensors (exact for |q| < 2^24)."""
        s = self.scale().reshape(self._shape(x))
        return torch.clamp(torch.floor((x - self.beta()) / s + 0.5), self.qmin, self.qmax)

    def beta(self) -> torch.Tensor | float:
        return 0.0 if self.offset is None else self.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not bool(self.initialized):
            self.calibrate(x)
        n = x.numel() / max(self.step.numel(), 1)
        g = 1.0 / math.sqrt(max(n * self.qmax, 1.0))
        s = grad_scale(self.scale(), g).reshape(self._shape(x))
        if self.offset is None:
            return round_ste(torch.clamp(x / s, self.qmin, self.qmax)) * s
        beta = grad_scale(self.offset, g)
        return round_ste(torch.clamp((x - beta) / s, self.qmin, self.qmax)) * s + beta

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, channels={self.step.numel()}, offset={self.offset is not None}"


class FixedGrid(nn.Module):
    """int8 on the fixed grid step 1/127 (`levels`; 32767 for int16), for components known to lie in [-1, 1]
    (unit vectors)."""

    def __init__(self, levels: int = DIRECTION_LEVELS):
        super().__init__()
        self.enabled, self.levels = True, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return round_ste(x.clamp(-1.0, 1.0) * self.levels) / self.levels


def direction_levels(bits: int) -> int:
    """The largest direction code of `bits`-bit MDDQ directions: 127 for int8, 32767 for int16."""
    return 2 ** (bits - 1) - 1


def direction_codes(u: torch.Tensor, grid: str, levels: int = DIRECTION_LEVELS) -> torch.Tensor:
    """Direction codes (int8: |d| <= 127) of unit vectors u (..., 3, F) along dim -2, straight-through."""
    if grid == "cube":  # scale the largest component to ±levels: same codes, finer angles
        u = u / u.abs().amax(-2, keepdim=True).clamp(min=MDDQ_EPS)
    return round_ste(u * levels)


class MDDQ(nn.Module):
    """Magnitude–direction decoupled quantization of l=1 features (N, 3, F).

    grid "sphere": the paper's fixed grid, d = floor(127 u + 0.5), angle error <= 0.391°.
    grid "cube": d = floor(127 u / max|u_x| + 0.5); the largest component is exactly ±127, so
    only two components carry rounding error and |127 u / max|u_x|| >= 127:
    angle error <= asin(√2 / 254) = 0.319°, and typically ~1.7× smaller than "sphere".
    ste "geometric": the backward treats the decoded direction as u = v/|v| (the gradient is projected on
    the sphere's tangent plane at u, the same in every frame); "grid": straight through the rounding of the
    grid codes (the backward sees the grid's axes and, for "cube", which component is the largest).
    direction_bits: 8 (the paper's int8 codes) or more (16: int16 codes, angle error 127/32767 of int8's).
    """

    def __init__(self, channels: int, bits: int = 8, grid: str = "cube", ste: str = "grid", direction_bits: int = 8):
        super().__init__()
        self.magnitude = LSQ(bits, signed=False, channels=channels)  # always "lsq": MSE would clip the few long vectors
        self.grid, self.ste, self.levels = grid, ste, direction_levels(direction_bits)
        self.enabled = True

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return v
        r = torch.sqrt((v * v).sum(1) + MDDQ_EPS**2)  # (N, F)
        u = v / r[:, None, :]
        d = direction_codes(u, self.grid, self.levels)  # |d_x| <= levels (127: int8)
        unit = d * torch.rsqrt((d * d).sum(1, keepdim=True) + MDDQ_EPS**2)
        if self.ste == "geometric":  # backward as if the direction were u: its gradient lies in u's tangent plane
            unit = u + (unit - u).detach()
        return self.magnitude(r)[:, None, :] * unit


class NaiveVector(nn.Module):
    """Baseline: component-wise int8 of l=1 features, one learned step per tensor."""

    def __init__(self, bits: int = 8):
        super().__init__()
        self.q = LSQ(bits, signed=True)
        self.enabled = True

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.q(v) if self.enabled else v


class QuantLinear(nn.Linear):
    """nn.Linear with per-output-channel weight quantization and an optional input quantizer."""

    def __init__(self, linear: nn.Linear, w_bits: int, act: nn.Module | None):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.load_state_dict(linear.state_dict())
        self.w_quant = LSQ(w_bits, signed=True, channels=linear.out_features, channel_dim=0, init="max")
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(x), self.w_quant(self.weight), self.bias)


@dataclass
class QuantConfig:
    w_bits: int = 8  # 8: int8 weights; 4: W4A8
    a_bits: int = 8
    vector: str = "mddq"  # "mddq" | "naive" | "none"
    direction_grid: str = "cube"  # MDDQ direction codes: "cube" (max-scaled) or "sphere" (fixed 1/127 grid)
    direction_bits: int = 8  # unit-vector codes (MDDQ directions, attention q̂ and k̂): 8 (the paper's int8) .. 16
    direction_ste: str = "grid"  # MDDQ backward: "grid" (straight through the codes) or "geometric" (tangent plane)
    silu_offset: bool = False  # LSQ+: unsigned codes with a learned offset for SiLU outputs (False: signed, symmetric)
    attention: bool = True  # fixed-grid int8 q̂, k̂ (l2norm models); per-tensor LSQ on q, k (dot models)
    staged: bool = True  # scalars first, vectors after warmup_epochs
    warmup_epochs: int = 5
    branch_separate: bool = True  # own quantizers and learning rates per branch
    lr_scalar: float = 3e-4
    lr_vector: float = 1e-4
    lr_steps_factor: float = 1.0  # quantizer steps and offsets learn at this fraction of their branch's rate
    calibration: str = "lsq"  # activation steps at the start: "lsq" (2·E|x|/√qmax) or "mse" (least squared error)
    weight_only: bool = False  # w8: int8 weights, float activations (implies vector "none", attention and staging off)
    float_head: bool = False  # w8a8: the energy head's activations in float (its weights int8)

    def __post_init__(self):
        if self.weight_only:  # nothing but weights is quantized: no vector/attention quantizers to stage
            self.vector, self.attention, self.staged = "none", False, False
        bad = [f"{k} {getattr(self, k)!r}" for k, ok in (
            ("w_bits", self.w_bits in (4, 8)), ("a_bits", self.a_bits == 8),
            ("vector", self.vector in ("mddq", "naive", "none")), ("direction_grid", self.direction_grid in ("cube", "sphere")),
            ("direction_bits", isinstance(self.direction_bits, int) and 8 <= self.direction_bits <= 16),
            ("direction_ste", self.direction_ste in ("geometric", "grid")),
            ("warmup_epochs", isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0),
            ("lr_scalar", self.lr_scalar > 0), ("lr_vector", self.lr_vector > 0), ("lr_steps_factor", self.lr_steps_factor > 0),
            ("weight_only", isinstance(self.weight_only, bool)), ("silu_offset", isinstance(self.silu_offset, bool)),
            ("calibration", self.calibration in ("mse", "lsq")), ("float_head", isinstance(self.float_head, bool))) if not ok]
        if bad:
            raise QSO3Error("invalid quantization config: " + "; ".join(bad))

    def to_dict(self) -> dict:
        return asdict(self)

    def precision(self) -> str:
        """The precision string of manifests and backends: 'w8' (weights only), 'w8a8-mddq',
        'w8a8-mddq-float-head'."""
        if self.weight_only:
            return f"w{self.w_bits}"
        dirs = f"-dir{self.direction_bits}" if self.direction_bits != 8 else ""  # MDDQ's and the attention's grids
        return f"w{self.w_bits}a{self.a_bits}-{self.vector}{dirs}" + ("-float-head" if self.float_head else "")


PRECISIONS = {"w8a8": (8, False), "w8": (8, True), "w4a8": (4, False), "w4": (4, True)}  # name: (w_bits, weight_only)


def parse_precision(precision: str | None, w_bits: int | None) -> tuple[int, bool]:
    """(w_bits, weight_only) of a --precision name and/or --w-bits; QSO3Error when unknown or inconsistent."""
    if precision is None:
        precision = "w4a8" if w_bits == 4 else "w8a8"
    if precision not in PRECISIONS:
        raise QSO3Error(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    bits, weight_only = PRECISIONS[precision]
    if w_bits is not None and w_bits != bits:
        raise QSO3Error(f"--w-bits {w_bits} contradicts --precision {precision} ({bits}-bit weights)")
    return bits, weight_only


VECTOR_LINEARS = ("vec_value", "vec_uv")


def _act(cfg: QuantConfig, signed: bool = True, offset: bool = False) -> LSQ | None:
    """The input quantizer of a scalar-branch Linear; None (float input) in weight-only precisions."""
    return None if cfg.weight_only else LSQ(cfg.a_bits, signed=signed and not offset, offset=offset, init=cfg.calibration)


def _quantize_mlp(seq: nn.Sequential, cfg: QuantConfig, first_signed: bool = True, float_inputs: bool = False) -> None:
    """Linear, SiLU, Linear: the second Linear's input is a SiLU output (LSQ+ offset when cfg.silu_offset)."""
    acts = (None, None) if float_inputs else (_act(cfg, first_signed), _act(cfg, offset=cfg.silu_offset))
    seq[0] = QuantLinear(seq[0], cfg.w_bits, acts[0])
    seq[2] = QuantLinear(seq[2], cfg.w_bits, acts[1])


def _quantize_layer(layer: InteractionLayer, cfg: QuantConfig) -> None:
    F_ = layer.F
    for name in ("q", "k", "value"):
        setattr(layer, name, QuantLinear(getattr(layer, name), cfg.w_bits, _act(cfg)))
    _quantize_mlp(layer.filter, cfg, first_signed=False)  # radial basis × cutoff >= 0
    _quantize_mlp(layer.update, cfg)
    for name in VECTOR_LINEARS:  # inputs are MDDQ-decoded vectors (see module docstring)
        setattr(layer, name, QuantLinear(getattr(layer, name), cfg.w_bits, None))
    if cfg.vector == "mddq":
        layer.hooks.vector = MDDQ(F_, cfg.a_bits, cfg.direction_grid, cfg.direction_ste, cfg.direction_bits)
    elif cfg.vector == "naive":
        layer.hooks.vector = NaiveVector(cfg.a_bits)
    if cfg.attention:
        if layer.attention == "l2norm":
            levels = direction_levels(cfg.direction_bits)
            layer.hooks.query, layer.hooks.key = FixedGrid(levels), FixedGrid(levels)
        else:  # unbounded q, k: per-tensor learned step
            layer.hooks.query, layer.hooks.key = _act(cfg), _act(cfg)


def quantize_model(model: So3krates, cfg: QuantConfig) -> So3krates:
    """A fake-quantized copy of an fp32 model (quantizer steps calibrate on the first forward)."""
    if cfg.vector not in ("mddq", "naive", "none"):
        raise ValueError(f"vector quantization must be mddq, naive or none, not {cfg.vector!r}")
    q = copy.deepcopy(model)
    for layer in q.layers:
        _quantize_layer(layer, cfg)
    _quantize_mlp(q.head, cfg, float_inputs=cfg.float_head)
    q.quant_cfg = cfg
    return q.to(next(model.parameters()).dtype)


def with_float_head(model: So3krates) -> So3krates:
    """A copy of a fake-quantized model whose energy head takes float activations (its int8 weights
    and everything else unchanged): no retraining needed."""
    cfg = getattr(model, "quant_cfg", None)
    if cfg is None or cfg.weight_only:
        raise QSO3Error("a float energy head needs a model with quantized activations (w8a8, w4a8), not "
                        + ("fp32" if cfg is None else cfg.precision()))
    out = copy.deepcopy(model)
    for linear in (out.head[0], out.head[2]):
        linear.act = nn.Identity()
    out.quant_cfg = QuantConfig(**{**cfg.to_dict(), "float_head": True})
    return out


def with_direction_bits(model: So3krates, bits: int) -> So3krates:
    """A copy of an MDDQ model whose unit-vector codes (MDDQ directions, attention q̂ and k̂) have `bits` bits
    (everything else unchanged): no retraining needed. The deployed kernels decode MDDQ directions to float
    before any product, and q̂ · k̂ of 16-bit codes still fits int32, so wider codes cost no measurable speed
    (reports/quantization.md, "What sets the LEE")."""
    cfg = getattr(model, "quant_cfg", None)
    if cfg is None or cfg.vector != "mddq":
        raise QSO3Error("direction bits need a model with MDDQ vectors, not " + ("fp32" if cfg is None else cfg.precision()))
    new_cfg = QuantConfig(**{**cfg.to_dict(), "direction_bits": bits})  # checks the range
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, (MDDQ, FixedGrid)):
            m.levels = direction_levels(bits)
    out.quant_cfg = new_cfg
    return out


def is_vector_quantizer(name: str, module: nn.Module) -> bool:
    return isinstance(module, (MDDQ, NaiveVector)) or (
        isinstance(module, LSQ) and any(f".{v}.w_quant" in "." + name for v in VECTOR_LINEARS))


def quantizers(model: nn.Module):
    """(name, module, branch) for every quantizer; branch is 'scalar' or 'vector'."""
    for name, m in model.named_modules():
        if isinstance(m, (LSQ, FixedGrid, MDDQ, NaiveVector)) and not name.endswith((".magnitude", ".q")):
            yield name, m, "vector" if is_vector_quantizer(name, m) else "scalar"


def set_stage(model: nn.Module, epoch: int, cfg: QuantConfig) -> str:
    """Staged QAT: scalar quantizers always on; vector quantizers from epoch `warmup_epochs` on."""
    vectors_on = not cfg.staged or epoch >= cfg.warmup_epochs
    for _, m, branch in quantizers(model):
        m.enabled = branch == "scalar" or vectors_on
    return "scalar+vector" if vectors_on else "scalar"


def param_groups(model: nn.Module, cfg: QuantConfig) -> list[dict]:
    """Vector-branch parameters (vector Linears, MDDQ steps) get lr_vector when branches are separate;
    quantizer steps and offsets get lr_steps_factor × their branch's rate (Adam moves every parameter by about
    its learning rate per step: a weight step of 0.002 at lr 2e-4 can change 10 % per step; a factor below 1
    steadies training, but in reports/quantization.md it did not give a better model)."""
    rates = {"scalar": cfg.lr_scalar, "vector": cfg.lr_vector if cfg.branch_separate else cfg.lr_scalar}
    vector_prefixes = [n + "." for n, m, b in quantizers(model) if b == "vector"]
    vector_prefixes += [f"layers.{i}.{v}." for i in range(len(model.layers)) for v in VECTOR_LINEARS]
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        branch = "vector" if cfg.branch_separate and any(name.startswith(pre) for pre in vector_prefixes) else "scalar"
        groups.setdefault((branch, name.endswith((".step", ".offset"))), []).append(p)
    return [{"params": ps, "lr": rates[branch] * (cfg.lr_steps_factor if is_step else 1.0)}
            for (branch, is_step), ps in groups.items()]


def weight_bytes(model: So3krates) -> int:
    """Bytes of stored weights: quantized Linear weights at their bit width plus float32 steps,
    everything else (biases, embedding, temperatures, activation steps) at 4 bytes."""
    total = 0
    for name, p in model.named_parameters():
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(owner, QuantLinear) and name.endswith(".weight"):
            total += math.ceil(p.numel() * owner.w_quant.bits / 8)
        else:
            total += 4 * p.numel()
    return total
