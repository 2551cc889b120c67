"""Rotary position embedding (Su et al. 2021, "RoFormer")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diablogpt_pytorch import kernels


class Rotary(nn.Module):
    """Rotary position embedding. ``forward(positions)`` -> (cos, signed_sin), each
    (len, dim_head), float32; ``signed_sin`` is sin with its first half negated, so that
    :func:`apply_rotary` needs no negation pass."""

    def __init__(self, dim_head: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim_head, 2).float() / dim_head))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        sin = freqs.sin()
        return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x: Tensor, rot: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate ``x`` (..., len, dim_head) by ``rot`` = (cos, signed_sin) (len, dim_head):
    pairs (x_i, x_{i+d/2}) turn by angle theta_i * position; the result has x's dtype."""
    cos, sin = rot
    return kernels.rotate(x, cos.to(x.dtype), sin.to(x.dtype))
