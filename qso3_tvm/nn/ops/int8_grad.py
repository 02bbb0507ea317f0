"""The int8 backward product of a scalar-branch Linear as a torch custom operator
`qso3::int8_grad_product` (the eager reference; nn.int8.int8_grad_product defines the numerics).

nn.int8.to_int8(custom_ops=True) makes Int8Linear's backward call it, so the exported graph holds one
`qso3.int8_grad_product` node per product, which compiler.relax_import maps to one TIR kernel
(compiler.kernels.int8_matmul.grad_product_func): row steps, int8 codes, both int8 products and the
float result in one pass over the rows, on the target's dot-product instruction.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("qso3::int8_grad_product", mutates_args=())
def int8_grad_product_op(grad: torch.Tensor, w_codes_t: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """grad (rows, out), w_codes_t (in, out) int8, s_w (out,) -> (rows, in)."""
    from ..int8 import int8_grad_product

    return int8_grad_product(grad, w_codes_t, s_w)


@int8_grad_product_op.register_fake
def _(grad, w_codes_t, s_w):
    return grad.new_empty((grad.shape[0], w_codes_t.shape[0]))
