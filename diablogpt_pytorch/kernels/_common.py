"""Helpers shared by the fused kernels."""

from __future__ import annotations

import torch
from torch import Tensor


def _scale_rows(x: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``x * scale`` (per-row scale, at least float32) in ``dtype``. When x already has that lower
    precision the product is formed there in one pass (the scale rounded to it: a relative error of
    one bf16 rounding, as the product's own), instead of through a float32 copy of x."""
    if x.dtype == dtype and dtype in (torch.bfloat16, torch.float16):
        return x * scale.to(dtype)
    return (x * scale).to(dtype)


def _weight_grad(grad_flat: Tensor, inp: Tensor) -> Tensor:
    """A linear layer's weight gradient ``grad_flat.T @ inp``: (N, out), (N, in) -> (out, in). In
    bf16 on CPU when in >= 2 out (the feed-forward's output projection, in = 4 out), the transposed
    left operand is copied contiguous first: oneDNN's bf16 matmul is 1.2-1.5x faster then, copy
    included, while for the narrower shapes and in float32 the copy does not pay
    (``python -m benchmarks.micro.bench_weight_grad``)."""
    lhs = grad_flat.t()
    if lhs.device.type == "cpu" and lhs.dtype == torch.bfloat16 and 2 * lhs.shape[0] <= inp.shape[1]:
        lhs = lhs.contiguous()
    return lhs @ inp


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


