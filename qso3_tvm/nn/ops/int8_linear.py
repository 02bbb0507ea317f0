"""A scalar-branch int8 Linear as two torch custom operators (the eager references; nn.int8 defines the
numerics):
  qso3::int8_linear         forward: activation codes, int8 × int8 → int32 product, scale and bias
  qso3::int8_grad_product   backward: g · W_q^T with the gradient rows as two int8 code vectors, times the
                            straight-through mask of the input

  qso3::int8_qkv            the three Linears of a layer's scalars (q, k, value), each with its own step, and the
                            scalars passed on (so that their other use's gradient joins the backward kernel)
  qso3::int8_qkv_grad       its backward: the three masked int8 backward products and that gradient, summed

nn.int8.to_int8(custom_ops=True) makes Int8Linear (and Int8QKV) call them, so the exported graph holds one node per
forward and per backward product, which compiler.relax_import maps to one TIR kernel each
(compiler.kernels.int8_matmul: linear_func, grad_product_func): per row, the codes, the products on the
target's dot-product instruction and the float result in one pass, with no int8 or int32 tensor in memory.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("qso3::int8_linear", mutates_args=())
def int8_linear_op(x: torch.Tensor, w_codes_t: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor, bias: torch.Tensor,
                   qmin: int, qmax: int, zp: int, silu: bool = False) -> torch.Tensor:
    """x (rows, in) float, w_codes_t (in, out) int8, s_x () , s_w (out,), bias (out,) -> (rows, out); `silu`: the
    Linear of SiLU(x) (an MLP's activation folded into the Linear after it)."""
    from ..int8 import int8_linear

    return int8_linear(x, w_codes_t, s_x, s_w, bias, qmin, qmax, zp, silu)


@int8_linear_op.register_fake
def _(x, w_codes_t, s_x, s_w, bias, qmin, qmax, zp, silu=False):
    return x.new_empty((x.shape[0], w_codes_t.shape[1]))


@torch.library.custom_op("qso3::int8_grad_product", mutates_args=())
def int8_grad_product_op(grad: torch.Tensor, w_codes_t: torch.Tensor, s_w: torch.Tensor, x: torch.Tensor, s_x: torch.Tensor,
                         qmin: int, qmax: int, silu: bool) -> torch.Tensor:
    """The input gradient (rows, in) of an int8 Linear: grad (rows, out) times W_q^T as int8 products (w_codes_t
    (in, out) int8, s_w (out,)), times the straight-through mask of its input x (rows, in) (nn.int8.input_grad_mask)."""
    from ..int8 import input_grad_mask, int8_grad_product

    return int8_grad_product(grad, w_codes_t, s_w) * input_grad_mask(x, s_x, qmin, qmax, silu)


@int8_grad_product_op.register_fake
def _(grad, w_codes_t, s_w, x, s_x, qmin, qmax, silu):
    return grad.new_empty((grad.shape[0], w_codes_t.shape[0]))


@torch.library.custom_op("qso3::int8_qkv", mutates_args=())
def int8_qkv_op(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, s_xq: torch.Tensor,
                s_xk: torch.Tensor, s_xv: torch.Tensor, s_wq: torch.Tensor, s_wk: torch.Tensor, s_wv: torch.Tensor,
                b_q: torch.Tensor, b_k: torch.Tensor, b_v: torch.Tensor, qmin: int, qmax: int,
                zp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three int8 Linears of one input x (rows, in), each with its own step: (q, k, value) = int8_linear of
    (w_q, s_xq, s_wq, b_q), (w_k, ...), (w_v, ...), and a copy of x."""
    from ..int8 import int8_linear

    q, k, v = (int8_linear(x, w, s_x, s_w, b, qmin, qmax, zp)
               for w, s_x, s_w, b in ((w_q, s_xq, s_wq, b_q), (w_k, s_xk, s_wk, b_k), (w_v, s_xv, s_wv, b_v)))
    return q, k, v, x.clone()


@int8_qkv_op.register_fake
def _(x, w_q, w_k, w_v, *rest):
    return tuple(x.new_empty((x.shape[0], w.shape[1])) for w in (w_q, w_k, w_v)) + (x.new_empty(x.shape),)


@torch.library.custom_op("qso3::int8_qkv_grad", mutates_args=())
def int8_qkv_grad_op(g_q: torch.Tensor, g_k: torch.Tensor, g_v: torch.Tensor, g_x: torch.Tensor, x: torch.Tensor,
                     w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, s_xq: torch.Tensor, s_xk: torch.Tensor,
                     s_xv: torch.Tensor, s_wq: torch.Tensor, s_wk: torch.Tensor, s_wv: torch.Tensor, qmin: int,
                     qmax: int) -> torch.Tensor:
    """The gradient of x (rows, in) through int8_qkv: g_x (that of the copy) plus each Linear's int8_grad_product_op."""
    out = g_x
    for g, w, s_x, s_w in ((g_q, w_q, s_xq, s_wq), (g_k, w_k, s_xk, s_wk), (g_v, w_v, s_xv, s_wv)):
        out = out + int8_grad_product_op(g, w, s_w, x, s_x, qmin, qmax, False)
    return out


@int8_qkv_grad_op.register_fake
def _(g_q, g_k, g_v, g_x, x, *rest):
    return x.new_empty(x.shape)
