"""Deployment form of a fake-quantized model: real int8 storage and int8 × int8 → int32 products.

`to_int8(model)` replaces every QuantLinear:
- scalar-branch Linears (with an activation quantizer) become Int8Linear: the activation codes
  q_x = clamp(floor(x / s_x + 0.5), ±127) (LSQ+ inputs: of x - β, in 0..255) are cast to int8 and multiplied with int8 weight codes by
  torch._int_mm (int32 accumulation, exact); the int32 result is scaled by s_x·s_w and the bias added.
  With custom operators (CPU targets) the whole of it is one operator, qso3::int8_linear (nn.ops.int8_linear):
  one kernel when compiled, with no int8 codes or int32 sums in memory.
- vector-branch Linears (inputs are MDDQ-decoded vectors) become Int8WeightLinear: int8 weight codes
  stored, dequantized by their per-channel step.

Forces (the backward) have straight-through semantics: dL/dx = (g · W_q^T) masked where x / s_x was
clipped, W_q = codes · s_w. `backward="float"` computes g · W_q^T in float: exactly the gradient of the
fake-quantized QAT model. `backward="int8"` (the default) makes it int8 products too: each row of
g ⊙ s_w becomes two int8 code vectors with the row's own step (max |row| / 127; int8_grad_product), each
multiplied with the weight codes, int8 × int8 → int32. On CPU the float product of the radial filter's
backward was the largest kernel of an energy+forces call. The gradients of these scalar-branch Linears
are (up to the model's own equivariance error) rotation invariant, so their quantization adds no
orientation dependence of its own; its effect on force MAE and LEE is measured in reports/quantization.md.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .model import InteractionLayer
from .quant import LSQ, MDDQ, FixedGrid, QuantLinear


def int8_linear(x, w_codes_t, s_x, s_w, bias, qmin: int, qmax: int, zp: int, silu: bool = False):
    """y = (q_x · W_codes) s_x s_w + b with q_x = clamp(floor(x/s_x + 0.5), qmin, qmax), x (rows, in) (with
    `silu`: of SiLU(x), the MLP's activation folded into the Linear after it).
    Unsigned codes (0..255) are shifted by zp = 128 into int8; zp · Σ_k W[k, n] is added back (in
    float: every term is an integer below 2^24, so exact; derived from the codes, not stored)."""
    if silu:
        x = nn.functional.silu(x)
    q = (torch.clamp(torch.floor(x / s_x + 0.5), qmin, qmax) - zp).to(torch.int8)
    acc = torch._int_mm(q, w_codes_t).to(x.dtype)  # int8 x int8 -> int32, exact
    if zp:
        acc = acc + zp * w_codes_t.to(x.dtype).sum(0)
    return acc * (s_x * s_w) + bias


class _Int8Linear(torch.autograd.Function):
    """int8_linear on rows (as the custom operator qso3::int8_linear when forward == "op"), with the
    straight-through backward of the module docstring."""

    @staticmethod
    def forward(ctx, x, w_codes_t, s_x, s_w, bias, qmin: int, qmax: int, zp: int, forward: str, backward: str,
                silu: bool = False):
        ctx.save_for_backward(x, w_codes_t, s_x, s_w)
        ctx.bounds, ctx.backward, ctx.silu = (qmin, qmax), backward, silu
        rows = x.reshape(-1, x.shape[-1])
        if forward == "op":
            from .ops.int8_linear import int8_linear_op

            y = int8_linear_op(rows, w_codes_t, s_x, s_w, bias, qmin, qmax, zp, silu)
        else:
            y = int8_linear(rows, w_codes_t, s_x, s_w, bias, qmin, qmax, zp, silu)
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x, w_codes_t, s_x, s_w = ctx.saved_tensors
        g_x = input_gradient(grad, x, w_codes_t, s_x, s_w, *ctx.bounds, ctx.backward, ctx.silu)
        return g_x, None, None, None, None, None, None, None, None, None, None


def input_gradient(grad, x, w_codes_t, s_x, s_w, qmin: int, qmax: int, backward: str, silu: bool):
    """dL/dx of an int8 Linear from dL/dy, straight through the codes, with the product `backward` names (module
    docstring: "int8-op" is "int8" as one custom operator, one kernel when compiled)."""
    if backward == "int8-op":
        from .ops.int8_linear import int8_grad_product_op

        rows, x_rows = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        return int8_grad_product_op(rows, w_codes_t, s_w, x_rows, s_x, qmin, qmax, silu).reshape(x.shape)
    if backward == "int8":
        g_x = int8_grad_product(grad, w_codes_t, s_w)
    else:
        g_x = grad @ (w_codes_t.to(grad.dtype) * s_w).T  # W_q (in, out): the fake-quantized weights
    return g_x * input_grad_mask(x, s_x, qmin, qmax, silu)


def input_grad_mask(x, s_x, qmin: int, qmax: int, silu: bool):
    """The straight-through factor of an int8 Linear's input gradient: 1 where the codes' input (x / s_x, of
    SiLU(x) with `silu`) lies within [qmin, qmax], else 0; with `silu` times SiLU'(x) as autograd computes it."""
    u = (nn.functional.silu(x) if silu else x) / s_x  # the codes' inputs, as the forward computed them
    inside = ((u >= qmin) & (u <= qmax)).to(x.dtype)
    if silu:
        sig = torch.sigmoid(x)
        inside = inside * (sig * (1 + x * (1 - sig)))
    return inside


def int8_grad_product(grad, w_codes_t, s_w):
    """grad · W_q^T as int8 products: each row of grad ⊙ s_w is split into two int8 code vectors,
    g ≈ s (q_hi + q_lo / 254) with s = max |row| / 127 (all-zero rows stay zero), and each is multiplied
    with the weight codes (int32 accumulation, exact). Relative error per element ≤ 1 / (2·127·254)
    of the row's largest: one int8 level (1/254) measurably coarsened forces and their equivariance."""
    g = (grad * s_w).reshape(-1, grad.shape[-1])
    amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    u = g * (amax.reciprocal() * 127)
    step = amax / 127
    hi = torch.clamp(torch.floor(u + 0.5), -127, 127)
    lo = torch.clamp(torch.floor((u - hi) * 254 + 0.5), -127, 127)
    w = w_codes_t.T  # (out, in)
    acc_hi = torch._int_mm(hi.to(torch.int8), w).to(grad.dtype)  # (rows, out) x (out, in) -> int32
    acc_lo = torch._int_mm(lo.to(torch.int8), w).to(grad.dtype)
    return ((acc_hi + acc_lo / 254) * step).reshape(*grad.shape[:-1], -1)


class Int8Linear(nn.Module):
    def __init__(self, layer: QuantLinear, backward: str = "int8", forward: str = "torch"):
        super().__init__()
        act, wq = layer.act, layer.w_quant
        assert isinstance(act, LSQ) and act.bits == 8, "the int8 GEMM needs 8-bit activation codes"
        with torch.no_grad():
            codes = wq.codes(layer.weight).to(torch.int8).T.contiguous()
            self.register_buffer("w_codes_t", codes)
            self.register_buffer("s_w", wq.scale().detach().clone().reshape(-1))
            self.register_buffer("s_x", act.scale().detach().clone().reshape(()))
            bias = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(layer.out_features)
            if act.offset is not None:  # LSQ+: x = x' + β, so β · Σ_k W_q[k, n] joins the bias
                bias = bias + act.offset.detach() * (codes.to(bias.dtype) * self.s_w).sum(0)
            self.register_buffer("bias", bias)
            self.register_buffer("offset", None if act.offset is None else act.offset.detach().clone())
        self.qmin, self.qmax, self.zp = act.qmin, act.qmax, 0 if act.signed else 128
        self.backward = backward  # "int8", "int8-op" (as a custom operator) or "float"
        self.forward_form = forward  # "torch" (torch._int_mm) or "op" (the custom operator qso3::int8_linear)
        self.input_silu = False  # True: the Linear of SiLU(x) (fold_silu)

    def forward(self, x):
        if self.offset is not None:
            x = x - self.offset
        return _Int8Linear.apply(x, self.w_codes_t, self.s_x, self.s_w, self.bias, self.qmin, self.qmax, self.zp,
                                 self.forward_form, self.backward, self.input_silu)


class Int8WeightLinear(nn.Module):
    """int8 weight codes with per-output-channel steps; float inputs (MDDQ-decoded vectors)."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        wq = layer.w_quant
        with torch.no_grad():
            self.register_buffer("w_codes", wq.codes(layer.weight).to(torch.int8))
            self.register_buffer("s_w", wq.scale().detach().clone().reshape(-1, 1))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """codes · step (out, in), the codes cast to `dtype` (default: the step's) before the product."""
        return self.w_codes.to(dtype or self.s_w.dtype) * self.s_w

    def forward(self, x):
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), self.bias)


BACKWARDS = ("int8", "float")


def _convert(module: nn.Module, name: str, child: QuantLinear, backward: str, custom_ops: bool) -> None:
    if isinstance(child.act, LSQ) and child.act.bits == 8:
        forward = "op" if custom_ops and child.in_features % 4 == 0 else "torch"  # the kernels take 4 products per lane
        setattr(module, name, Int8Linear(child, backward=_backward_form(child, backward, custom_ops), forward=forward))
    elif isinstance(child.act, nn.Identity):
        setattr(module, name, Int8WeightLinear(child))


def to_int8(model: nn.Module, custom_ops: bool = True, backward: str = "int8") -> nn.Module:
    """A copy of a fake-quantized model with int8 weights and int8 GEMMs, and MDDQ, the robust
    attention, the messages, the update and the edge geometry as custom operators (compiler.kernels; same outputs up to float summation order).
    `custom_ops=False` keeps MDDQ, attention and messages as generic operators (targets with no TIR kernels
    for them: GPUs). `backward`: how the scalar-branch Linears' input gradients are computed (module docstring)."""
    from .ops import fuse_operators
    from .ops.attention import L2AttentionKernel
    from .ops.mddq import MDDQKernel

    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, not {backward!r}")
    out = copy.deepcopy(model).eval()
    if custom_ops:
        fuse_operators(out)
    for layer in out.modules() if custom_ops else ():
        if isinstance(layer, InteractionLayer) and layer.attention == "l2norm" and _fixed_grid(layer.hooks):
            layer.fused_attention = L2AttentionKernel(layer.hooks.query.levels)
    for module in list(out.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, QuantLinear):
                _convert(module, name, child, backward, custom_ops)
            elif isinstance(child, MDDQ) and child.enabled and custom_ops:
                setattr(module, name, MDDQKernel(child))
    return fuse_qkv(fold_silu(out)) if custom_ops else out


class _Int8QKV(torch.autograd.Function):
    """qso3::int8_qkv forward (q, k, value and x passed on); backward: each Linear's masked input gradient (as
    _Int8Linear) and that of the copy, summed (one operator, qso3::int8_qkv_grad, when all three are "int8-op")."""

    @staticmethod
    def forward(ctx, x, q: "Int8Linear", k: "Int8Linear", v: "Int8Linear"):
        from .ops.int8_linear import int8_qkv_op

        ctx.save_for_backward(x)
        ctx.linears = (q, k, v)
        rows = x.reshape(-1, x.shape[-1])
        outs = int8_qkv_op(rows, q.w_codes_t, k.w_codes_t, v.w_codes_t, q.s_x, k.s_x, v.s_x, q.s_w, k.s_w, v.s_w,
                           q.bias, k.bias, v.bias, q.qmin, q.qmax, q.zp)
        return tuple(o.reshape(*x.shape[:-1], -1) for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        from .ops.int8_linear import int8_qkv_grad_op

        (x,) = ctx.saved_tensors
        lins = ctx.linears
        shapes = [(*x.shape[:-1], lin.w_codes_t.shape[1]) for lin in lins] + [x.shape]  # of q, k, value and the copy
        grads = [x.new_zeros(shape) if g is None else g for g, shape in zip(grads, shapes)]
        if all(lin.backward == "int8-op" for lin in lins):
            rows = [g.reshape(-1, g.shape[-1]) for g in (*grads, x)]
            q, k, v = lins
            g_x = int8_qkv_grad_op(*rows, q.w_codes_t, k.w_codes_t, v.w_codes_t, q.s_x, k.s_x, v.s_x, q.s_w, k.s_w,
                                   v.s_w, q.qmin, q.qmax)
            return g_x.reshape(x.shape), None, None, None
        parts = [input_gradient(g, x, lin.w_codes_t, lin.s_x, lin.s_w, lin.qmin, lin.qmax, lin.backward, False)
                 for g, lin in zip(grads, lins)]
        return sum(parts, grads[3]), None, None, None


class Int8QKV(nn.Module):
    """A layer's three int8 Linears of s (q, k, value) as one operator, qso3::int8_qkv (InteractionLayer.fused_qkv):
    one kernel computes the codes at each Linear's step and all products, and passes s on (the layer's other use of
    s takes the copy, so the backward kernel sums all of its gradient). The Linears stay the layer's own modules
    and are passed in by the layer."""

    def forward(self, q: Int8Linear, k: Int8Linear, value: Int8Linear, s):
        return _Int8QKV.apply(s, q, k, value)


def fuse_qkv(model: nn.Module) -> nn.Module:
    """`model` (changed in place) with the q, k and value Linears of each interaction layer as one Int8QKV, where
    all three are custom-operator Int8Linears with the same code range, no input offset or SiLU, and F outputs
    (F, F, 2F) a multiple of 16 (the widest instruction block)."""
    for layer in model.modules():
        if not isinstance(layer, InteractionLayer):
            continue
        lins = (layer.q, layer.k, layer.value)
        if not all(isinstance(lin, Int8Linear) and lin.forward_form == "op" and lin.offset is None and not lin.input_silu
                   for lin in lins):
            continue
        F = lins[0].w_codes_t.shape[1]
        if {(lin.qmin, lin.qmax, lin.zp) for lin in lins} == {(lins[0].qmin, lins[0].qmax, lins[0].zp)} and F % 16 == 0 \
                and [lin.w_codes_t.shape[1] for lin in lins] == [F, F, 2 * F] and lins[0].w_codes_t.shape[0] % 4 == 0:
            layer.fused_qkv = Int8QKV()
    return model


def fold_silu(model: nn.Module) -> nn.Module:
    """`model` (changed in place) with every SiLU that feeds an Int8Linear of the custom operator (in an
    nn.Sequential MLP) folded into that Linear: one kernel computes SiLU, the codes and the product."""
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            act, linear = seq[i], seq[i + 1]
            if (isinstance(act, nn.SiLU) and isinstance(linear, Int8Linear) and linear.forward_form == "op"
                    and linear.offset is None):
                seq[i], linear.input_silu = nn.Identity(), True
    return model


def _backward_form(layer: QuantLinear, backward: str, custom_ops: bool) -> str:
    """int8 backward products as the custom operator where its kernel applies (outputs a multiple of 4)."""
    return "int8-op" if custom_ops and backward == "int8" and layer.out_features % 4 == 0 else backward


def _fixed_grid(hooks) -> bool:
    return all(isinstance(h, FixedGrid) and h.enabled for h in (hooks.query, hooks.key))


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a deployed int8 model stores (int8 codes, float steps and biases)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
               if t.dtype != torch.bool)
