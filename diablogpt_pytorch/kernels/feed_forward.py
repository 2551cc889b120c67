"""The feed-forward block's second half: GELU, dropout and the output projection.

- :func:`gelu_dropout_linear` ``(h, weight, bias, p)``: ``F.linear(dropout(gelu(h), p), weight,
  bias)``. Fused (:class:`_GeluDropoutLinear`: in float32 the activation is recomputed in
  backward instead of kept): always, outside :func:`~diablogpt_pytorch.kernels.use_reference`.

Reference implementation: :func:`gelu_dropout_linear_reference`, the same ops (and the same draw
of the dropout mask from the global generator) differentiated by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diablogpt_pytorch.kernels._common import _weight_grad
from diablogpt_pytorch.kernels._switch import reference_enabled

class _GeluDropoutLinear(torch.autograd.Function):
    """out = linear(dropout(gelu(h)), weight, bias). In float32 it saves h and the dropout mask, not
    the activated hidden layer, which backward recomputes (elementwise): one (tokens, 4 * dim)
    activation less per feed-forward block. In a lower precision (bf16 under autocast) the
    activation is half the size and the recompute a larger share of the step, so it is kept, and
    so is the weight cast to that precision (not cast again in backward). Matmuls run in h's dtype."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, p: float) -> Tensor:
        a = F.gelu(h)
        mask = None
        if p > 0:
            mask = _dropout_mask(a, p)
            a = a * mask / (1 - p)
        ctx.p = p
        low_precision = h.dtype in (torch.bfloat16, torch.float16)
        cast_weight = weight.to(a.dtype)
        # in a lower precision the activation and the cast weight are kept (see the class doc)
        ctx.save_for_backward(h, weight, bias, mask, a if low_precision else None,
                              cast_weight if cast_weight is not weight else None)
        return F.linear(a, cast_weight, bias.to(a.dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, weight, bias, mask, a, cast_weight = ctx.saved_tensors
        if a is None:  # recompute the activation (float32: it was not kept)
            a = F.gelu(h)
            if mask is not None:
                a = a * mask / (1 - ctx.p)
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = _weight_grad(grad_flat, a.reshape(-1, a.shape[-1]).to(grad_flat.dtype)).to(weight.dtype)
        grad_bias = grad_flat.sum(0).to(bias.dtype)
        grad_a = (grad_out @ (weight if cast_weight is None else cast_weight).to(grad_out.dtype)).to(h.dtype)
        if mask is not None:
            grad_a = grad_a * mask / (1 - ctx.p)
        grad_h = torch.ops.aten.gelu_backward(grad_a, h)
        return grad_h, grad_weight, grad_bias, None


def _dropout_mask(a: Tensor, p: float) -> Tensor:
    return torch.empty_like(a, dtype=torch.bool).bernoulli_(1 - p)


def gelu_dropout_linear_reference(h: Tensor, weight: Tensor, bias: Tensor, p: float) -> Tensor:
    """The composite ops; the dropout mask is drawn as the fused kernel draws it."""
    a = F.gelu(h)
    if p > 0:
        a = a * _dropout_mask(a, p) / (1 - p)
    return F.linear(a, weight.to(a.dtype), bias.to(a.dtype))


def gelu_dropout_linear(h: Tensor, weight: Tensor, bias: Tensor, p: float) -> Tensor:
    """``F.linear(dropout(gelu(h), p), weight, bias)``, the matmul in h's dtype."""
    if reference_enabled():
        return gelu_dropout_linear_reference(h, weight, bias, p)
    return _GeluDropoutLinear.apply(h, weight, bias, p)
