"""The neighbour encoder (Borgeaud et al. 2022, section 2.4, Algorithm 1's ENCODER)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from diablogpt_pytorch.model.attention import CrossAttention, SelfAttention
from diablogpt_pytorch.model.block import Residual
from diablogpt_pytorch.model.feed_forward import FeedForward
from diablogpt_pytorch.model.norm import RMSNorm
from diablogpt_pytorch.model.rotary import Rotary


class EncoderBlock(nn.ModuleList):
    """One encoder layer: ``attn`` (bidirectional self-attention within each neighbour),
    ``cross`` (cross-attention to the retrieving chunk's decoder states; None in a layer without
    it) and ``ff``, each a :class:`~diablogpt_pytorch.model.block.Residual`, held as a list (names
    ``encoder.layers.{i}.{0,1,2}``, as in every checkpoint so far)."""

    def __init__(self, attn: Residual, cross: Optional[Residual], ff: Residual):
        super().__init__([attn, cross, ff])

    @property
    def attn(self) -> Residual:
        return self[0]

    @property
    def cross(self) -> Optional[Residual]:
        return self[1]

    @property
    def ff(self) -> Residual:
        return self[2]


class Encoder(nn.Module):
    """Neighbour encoder: per-neighbour bidirectional self-attention, cross-attention to the
    decoder hidden states of the retrieving chunk (at ``cross_attn_layers``, 1-based), feed-forward.

    ``forward(neighbours (b, m, K, 2C, enc_dim), pad_mask (b, m, K, 2C), context (b, m, C, dec_dim))``
    -> (b, m, K*2C, enc_dim). The context is never repeated per neighbour: the K*2C neighbour tokens
    of a chunk attend to its C context tokens together.
    """

    def __init__(self, dim: int, depth: int, context_dim: int, heads: int, dim_head: int,
                 attn_dropout: float, ff_dropout: float, cross_attn_layers: Sequence[int],
                 gated: bool, deepnet: Optional[dict[str, float]]):
        super().__init__()
        alpha = deepnet["enc_alpha"] if deepnet else None
        self.cross_attends = any(1 <= i <= depth for i in cross_attn_layers)
        self.layers = nn.ModuleList()
        for layer_num in range(1, depth + 1):
            attn = Residual(dim, SelfAttention(dim, heads, dim_head, attn_dropout, causal=False), gated, alpha)
            cross = None
            if layer_num in cross_attn_layers:
                cross = Residual(dim, CrossAttention(dim, context_dim, heads, dim_head, attn_dropout), gated, alpha)
            ff = Residual(dim, FeedForward(dim, dropout=ff_dropout), gated, alpha)
            self.layers.append(EncoderBlock(attn, cross, ff))
        # without a cross-attending layer the context is unused: no norm for it (an unused
        # parameter would get no gradient, which DDP refuses)
        self.context_norm = RMSNorm(context_dim, gated=gated) if self.cross_attends else None
        self.final_norm = nn.Identity() if deepnet else RMSNorm(dim, gated=gated)
        self.rotary = Rotary(dim_head)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before an encoder without cross-attention dropped its context norm
        if self.context_norm is None:
            state_dict.pop(prefix + "context_norm.gamma", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, pad_mask: Tensor, context: Tensor) -> Tensor:
        b, m, k, length, dim = x.shape
        x = x.reshape(b * m * k, length, dim)
        rot = self.rotary(torch.arange(length, device=x.device))
        # a real token sees the real tokens of its neighbour; a padding token sees only itself, so
        # an all-padding neighbour stays finite (its output is masked out by CCA anyway)
        real = ~pad_mask.reshape(b * m * k, 1, 1, length)
        eye = torch.eye(length, dtype=torch.bool, device=x.device)
        key_mask = real | eye
        if self.context_norm is not None:
            context = self.context_norm(context.reshape(b * m, -1, context.shape[-1]))
        for block in self.layers:
            x = block.attn(x, rot, key_mask=key_mask)
            if block.cross is not None:  # the K*2C tokens of a chunk's neighbours attend to its C tokens
                x = block.cross(x.reshape(b * m, k * length, dim), context).reshape(b * m * k, length, dim)
            x = block.ff(x)
        return self.final_norm(x).reshape(b, m, k * length, dim)
