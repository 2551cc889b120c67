"""The position-wise feed-forward block."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from diablogpt_pytorch import kernels
from diablogpt_pytorch.model.norm import RMSNorm, norm_linear


class FeedForward(nn.Module):
    """Linear -> GELU -> dropout -> Linear (the last three one kernel,
    :func:`diablogpt_pytorch.kernels.gelu_dropout_linear`)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult)
        self.proj_out = nn.Linear(dim * mult, dim)
        self.dropout = dropout

    def forward(self, x: Tensor, norm: Optional[RMSNorm] = None) -> Tensor:
        """``x`` (..., dim) -> (..., dim); with ``norm``, of ``norm(x)`` (fused, see :func:`norm_linear`)."""
        h = norm_linear(x, norm, self.proj_in)
        p = self.dropout if self.training else 0.0
        return kernels.gelu_dropout_linear(h, self.proj_out.weight, self.proj_out.bias, p)
