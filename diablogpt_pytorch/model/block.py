"""Residual sub-layers and the decoder block: self-attention, chunked cross-attention, feed-forward."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from diablogpt_pytorch.model.norm import RMSNorm


def deepnet_constants(enc_depth: int, dec_depth: int) -> dict[str, float]:
    """DeepNet residual scale (alpha) and init gain (beta) for an encoder-decoder with N encoder and
    M decoder layers (Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers"):
    encoder alpha = 0.81 (N^4 M)^(1/16), beta = 0.87 (N^4 M)^(-1/16);
    decoder alpha = (3M)^(1/4), beta = (12M)^(-1/4)."""
    n, m = enc_depth, dec_depth
    return {
        "enc_alpha": 0.81 * (n ** 4 * m) ** (1 / 16),
        "enc_beta": 0.87 * (n ** 4 * m) ** (-1 / 16),
        "dec_alpha": (3 * m) ** 0.25,
        "dec_beta": (12 * m) ** -0.25,
    }


class Residual(nn.Module):
    """A sub-layer ``fn`` with its norm: pre-norm ``x + fn(norm(x))`` or, with DeepNet
    (``deepnet_alpha`` set), post-norm ``norm(alpha * x + fn(x))``.

    ``forward(x, *args, **kwargs)`` calls ``fn(x, *args, norm=..., **kwargs)``: in pre-norm the
    sub-layer receives the norm and applies it itself, fused into its first projection
    (:func:`~diablogpt_pytorch.model.norm.norm_linear`); in post-norm it receives ``norm=None``.
    """

    def __init__(self, dim: int, fn: nn.Module, gated: bool, deepnet_alpha: Optional[float]):
        super().__init__()
        self.fn, self.norm, self.alpha = fn, RMSNorm(dim, gated=gated), deepnet_alpha

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.alpha is None:
            return x + self.fn(x, *args, norm=self.norm, **kwargs)
        return self.norm(x * self.alpha + self.fn(x, *args, norm=None, **kwargs))

    def skip(self, x: Tensor) -> Tensor:
        """The sub-layer switched off (CCA without retrieval): ``x``, or ``norm(alpha * x)`` in
        post-norm."""
        return x if self.alpha is None else self.norm(x * self.alpha)


class Block(nn.ModuleList):
    """One decoder layer (paper Algorithm 1): ``attn`` (causal self-attention), ``cca`` (chunked
    cross-attention, None in a layer without it) and ``ff`` (feed-forward), each a
    :class:`Residual`. :class:`~diablogpt_pytorch.model.DIABLOGPT` runs them in that order.

    The three are held as a list, so parameter names are ``layers.{i}.0`` (attn), ``.1`` (cca)
    and ``.2`` (ff): those of every checkpoint written since the first release, which load as
    they are."""

    def __init__(self, attn: Residual, cca: Optional[Residual], ff: Residual):
        super().__init__([attn, cca, ff])

    @property
    def attn(self) -> Residual:
        return self[0]

    @property
    def cca(self) -> Optional[Residual]:
        return self[1]

    @property
    def ff(self) -> Residual:
        return self[2]
