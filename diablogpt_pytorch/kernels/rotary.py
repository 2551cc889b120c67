"""Rotary position embedding applied to queries or keys.

- :func:`rotate` ``(x, cos, signed_sin)``: ``x * cos + swap_halves(x) * signed_sin``. Fused
  (:class:`_Rotation`: no swapped copy of x, nothing saved but the tables): always, outside
  :func:`~diablogpt_pytorch.kernels.use_reference`.

Reference implementation: :func:`rotate_reference`, the formula in composite ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diablogpt_pytorch.kernels._switch import reference_enabled

def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + (x2, x1) * sin, with (x1, x2) the halves of x's last dim: one product pass and
    one in-place pass per half, with no swapped copy of x."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half])
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


class _Rotation(torch.autograd.Function):
    """:func:`_rotate` with its transpose as backward (the same kernel with the sine's halves
    swapped); it saves no activation."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_out, cos, sin.roll(sin.shape[-1] // 2, dims=-1)), None, None



def rotate_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + (x2, x1) * sin`` with a swapped copy of x, differentiated by autograd."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (..., len, d) by ``cos`` and ``sin`` (len, d), the sine's first half negated
    (as :class:`~diablogpt_pytorch.model.Rotary` makes them): pairs (x_i, x_{i+d/2}) turn by their
    angle. All three in the same dtype."""
    if reference_enabled():
        return rotate_reference(x, cos, sin)
    return _Rotation.apply(x, cos, sin)
