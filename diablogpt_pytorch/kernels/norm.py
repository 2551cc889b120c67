"""RMSNorm, and RMSNorm fused into the linear projection that follows it.

- :func:`rms_norm` ``(x, gain, eps)``: ``x * rsqrt(mean(x^2) + eps) * gain`` in x's dtype.
  Fused (:class:`_RMSNormFunction`): always, outside :func:`~diablogpt_pytorch.kernels.use_reference`.
- :func:`norm_linear` ``(x, gain, eps, weight, bias)``: ``linear(rms_norm(x), weight, bias)``.
  Fused (:class:`_RMSNormLinear`) when gradients are enabled (it changes what is saved for
  backward); without gradients it is :func:`rms_norm` then ``F.linear``.

Reference implementations: :func:`rms_norm_reference` and ``F.linear`` of it, in composite ops
that autograd differentiates.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from diablogpt_pytorch.kernels._common import _at_least_fp32, _scale_rows, _weight_grad
from diablogpt_pytorch.kernels._switch import reference_enabled

_FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm")
_SMALL_NORM_INPUT = 1 << 16  # elements: below this (decoding a few tokens) op count, not passes, rules


def _rms_norm_forward(x: Tensor, gain: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x * rsqrt(mean(x^2) + eps) * gain, the per-row scale), the statistics in at least float32
    and the output in x's dtype. Large inputs: one reduction pass (a vector norm, no squared copy)
    and one product pass, where torch's ``_fused_rms_norm`` makes four on CPU; small inputs (a
    decoding step) take that single op, since there the number of ops, not passes, sets the time."""
    if _FUSED_RMS_NORM and x.numel() <= _SMALL_NORM_INPUT:
        return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], gain.to(x.dtype), eps)
    rstd = _rms_scale(x, eps)
    return (x * rstd).mul_(gain.to(rstd.dtype)).to(x.dtype), rstd


def _rms_scale(x: Tensor, eps: float) -> Tensor:
    """rsqrt(mean(x^2) + eps) per row, (..., 1), in at least float32: one reduction pass (a vector
    norm, no squared copy of x)."""
    rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    return rstd.square_().div_(x.shape[-1]).add_(eps).rsqrt_()


def _rms_norm_backward(grad_out: Tensor, x: Tensor, gain: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients (for x, for gain) of :func:`_rms_norm_forward` given the saved scale."""
    d = x.shape[-1]
    x32 = _at_least_fp32(x).reshape(-1, d)
    g32 = _at_least_fp32(grad_out).reshape(-1, d)
    r = rstd.reshape(-1, 1).to(x32.dtype)
    gain32 = gain.to(x32.dtype)
    # With u = g * gain and r = (mean(x^2) + eps)^-1/2:
    #   d/dx = r * u - x * r^3 * mean(u * x),   d/dgain = sum over rows of g * x * r.
    # Both reductions come from one product t = g * x, as matrix products (one pass each), and
    # d/dx is two more passes: 3 full-size temporaries instead of the composite formula's ~8.
    t = g32 * x32
    grad_gain = (r.t() @ t).reshape(d).to(gain.dtype)
    coef = (r.square() * r) * (t @ gain32)[:, None] / d
    grad_x = torch.addcmul((g32 * gain32).mul_(r), x32, coef, value=-1)
    return grad_x.to(x.dtype).reshape(x.shape), grad_gain


class _RMSNormFunction(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * gain, saving only x and the per-row scale for backward
    (the composite op also keeps the normalised output alive: one more activation per norm)."""

    @staticmethod
    def forward(ctx, x: Tensor, gain: Tensor, eps: float) -> Tensor:
        out, rstd = _rms_norm_forward(x, gain, eps)
        ctx.save_for_backward(x, gain, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return (*_rms_norm_backward(grad_out, *ctx.saved_tensors), None)



class _RMSNormLinear(torch.autograd.Function):
    """linear(rms_norm(x) * gain, weight, bias), computed as linear(x * r, weight * gain, bias)
    with r = rsqrt(mean(x^2) + eps): the gain is folded into the weight's columns (a weight-sized
    product instead of a token-sized one) and the normalised input is written once, straight in
    ``compute_dtype`` (from a bf16 x: one pass, no float32 copy; see :func:`_scale_rows`).

    Saved for backward: the normalised input (in ``compute_dtype``: under bf16 autocast half the
    size of a float32 x), not x; the norm's input gradient is written in terms of it,
    d/dx = r * (u - normed * mean(u * normed)), so backward remakes nothing token-sized. In a
    lower ``compute_dtype`` the folded weight is kept too (weight-sized, in that dtype) instead of
    being folded and cast again. Statistics and reductions are accumulated in at least float32."""

    @staticmethod
    def forward(ctx, x: Tensor, gain: Tensor, eps: float, weight: Tensor, bias: Optional[Tensor],
                compute_dtype: torch.dtype) -> Tensor:
        rstd = _rms_scale(x, eps)
        normed = _scale_rows(x, rstd, compute_dtype)
        folded = (weight * gain.to(weight.dtype)).to(compute_dtype)
        ctx.save_for_backward(normed, gain, rstd, weight, folded if folded.dtype != weight.dtype else None)
        ctx.has_bias, ctx.x_dtype = bias is not None, x.dtype
        return F.linear(normed, folded, None if bias is None else bias.to(compute_dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        normed, gain, rstd, weight, folded = ctx.saved_tensors
        d = normed.shape[-1]
        gain_w = gain.to(weight.dtype)
        if folded is None:
            folded = weight * gain_w
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1]).to(normed.dtype)
        # y = normed @ folded.T, folded = weight * gain: gradients of folded, then of weight and gain
        grad_folded = _weight_grad(grad_flat, normed.reshape(-1, d)).to(weight.dtype)
        grad_weight = grad_folded * gain_w
        grad_gain = torch.linalg.vecdot(grad_folded, weight, dim=0).to(gain.dtype)
        grad_bias = grad_flat.sum(0).to(weight.dtype) if ctx.has_bias else None
        u = (grad_flat @ folded).reshape(normed.shape)
        # through normed = x * r:  d/dx = r * u - x * r^3 * mean(u * x) = r * (u - normed * mean(u * normed)).
        # The projection is formed in u's dtype (under bf16 one rounding on top of u's own, of the
        # same size), then scaled by r in x's dtype: two passes, where float32 copies of u and
        # normed took four. For a bf16 x, r is rounded to bf16 first (once, like the product
        # itself): a bf16 product with a float32 operand runs at half the speed on CPU. float16
        # keeps the float32 r, whose range it lacks.
        s = torch.linalg.vecdot(u, normed)[..., None]
        r = rstd.to(torch.bfloat16) if ctx.x_dtype == torch.bfloat16 else rstd
        grad_x = torch.addcmul(u, normed, s / d, value=-1).to(ctx.x_dtype).mul_(r)
        return grad_x, grad_gain, None, grad_weight, grad_bias, None



def rms_norm_reference(x: Tensor, gain: Tensor, eps: float) -> Tensor:
    """The composite formula: statistics in at least float32, the output in x's dtype."""
    x32 = _at_least_fp32(x)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * gain).to(x.dtype)


def rms_norm(x: Tensor, gain: Tensor, eps: float) -> Tensor:
    """``x * rsqrt(mean(x^2) + eps) * gain`` over the last dim, in x's dtype."""
    if reference_enabled():
        return rms_norm_reference(x, gain, eps)
    return _RMSNormFunction.apply(x, gain, eps)


def norm_linear(x: Tensor, gain: Tensor, eps: float, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(rms_norm(x, gain, eps), weight, bias)``; with gradients enabled, one fused op
    that keeps only the normalised input (in the matmul's dtype) for backward. The matmul runs in
    the autocast dtype when autocast is on, else in the promoted dtype of x and the weight."""
    if reference_enabled() or not torch.is_grad_enabled():
        return F.linear(rms_norm(x, gain, eps), weight, bias)
    device_type = x.device.type
    dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
             else torch.promote_types(x.dtype, weight.dtype))
    return _RMSNormLinear.apply(x, gain, eps, weight, bias, dtype)
