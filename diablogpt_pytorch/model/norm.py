"""RMSNorm (optionally gated), and a norm fused into the projection that follows it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from diablogpt_pytorch import kernels


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain; ``gated`` adds an elementwise sigmoid gate ``sigmoid(w * x)``
    on the normalised output (gated RMSNorm, Zhang, Titov and Sennrich 2021, "Sparse Attention with
    Linear Units")."""

    def __init__(self, dim: int, gated: bool = False, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(dim))
        self.gate = nn.Parameter(torch.ones(dim)) if gated else None

    def forward(self, x: Tensor) -> Tensor:
        out = kernels.rms_norm(x, self.gamma, self.eps)
        if self.gate is not None:
            out = out * torch.sigmoid(x * self.gate)
        return out


def norm_linear(x: Tensor, norm: Optional[RMSNorm], linear: nn.Linear) -> Tensor:
    """``linear(norm(x))`` (just ``linear(x)`` when ``norm`` is None); for a plain (ungated)
    RMSNorm one kernel, :func:`diablogpt_pytorch.kernels.norm_linear`, that keeps only the
    normalised input for backward."""
    if norm is None:
        return linear(x)
    if norm.gate is not None:
        return linear(norm(x))
    return kernels.norm_linear(x, norm.gamma, norm.eps, linear.weight, linear.bias)
