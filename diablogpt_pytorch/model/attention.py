"""Multi-head attention with rotary positions: self-attention (causal or not, with a key/value
cache) and cross-attention whose keys/values can be computed once and reused."""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange
from torch import Tensor, nn

from diablogpt_pytorch import kernels
from diablogpt_pytorch.model.norm import RMSNorm, norm_linear
from diablogpt_pytorch.model.rotary import apply_rotary


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions, causal or bidirectional.

    ``forward(x (B, n, dim), rot, kv_cache=None, start=0, key_mask=None, norm=None)`` -> (B, n, dim);
    with ``norm`` the attention is of ``norm(x)`` (fused into the projection, :func:`norm_linear`).
    With ``kv_cache`` (a pair of (B, h, max_len, dim_head) buffers) the new keys/values are
    written at [start, start+n) and the queries attend to [0, start+n).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, causal: bool):
        super().__init__()
        self.heads, self.dim_head, self.causal, self.dropout = heads, dim_head, causal, dropout
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(
        self,
        x: Tensor,
        rot: tuple[Tensor, Tensor],
        kv_cache: Optional[tuple[Tensor, Tensor]] = None,
        start: int = 0,
        key_mask: Optional[Tensor] = None,
        norm: Optional[RMSNorm] = None,
    ) -> Tensor:
        n = x.shape[1]
        q, k, v = rearrange(norm_linear(x, norm, self.to_qkv), "b n (three h d) -> three b h n d",
                            three=3, h=self.heads)
        q, k = apply_rotary(q, rot), apply_rotary(k, rot)
        if torch.is_grad_enabled():  # attention saves v for backward: a copy, not a view that
            v = v.contiguous()       # would keep the whole (tokens, 3 * inner) projection alive
        dropout_p = self.dropout if self.training else 0.0
        attn_mask, is_causal = key_mask, self.causal
        if kv_cache is not None:
            cache_k, cache_v = kv_cache
            end = start + n
            cache_k[:, :, start:end] = k
            cache_v[:, :, start:end] = v
            k, v = cache_k[:, :, :end].to(q.dtype), cache_v[:, :, :end].to(q.dtype)
            if start > 0:
                is_causal = False
                if n > 1:  # queries at start..end-1 see keys 0..their own position
                    qpos = torch.arange(start, end, device=x.device)[:, None]
                    attn_mask = torch.arange(end, device=x.device)[None, :] <= qpos
        out = kernels.attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal and n > 1)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    """Multi-head cross-attention, split in two so that keys/values can be cached.

    ``keys_values(context (B, L, context_dim), rot=None)`` -> (k, v), each (B, h, L [+1], dim_head),
    with a learned null key/value prepended when ``null_kv``.
    ``attend(x (B, n, dim), k, v, q_rot=None, attn_mask=None, norm=None)`` -> (B, n, dim).
    ``forward(x, context, norm=None)`` is the two in a row (no positions, no mask).
    """

    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int, dropout: float,
                 null_kv: bool = False):
        super().__init__()
        self.heads, self.dim_head, self.dropout = heads, dim_head, dropout
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        if null_kv:
            self.null_k = nn.Parameter(torch.randn(heads, 1, dim_head) * dim_head ** -0.5)
            self.null_v = nn.Parameter(torch.zeros(heads, 1, dim_head))
        else:
            self.null_k = self.null_v = None

    def keys_values(self, context: Tensor, rot: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        k, v = rearrange(self.to_kv(context), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        if rot is not None:
            k = apply_rotary(k, rot)
        if self.null_k is not None:
            batch = context.shape[0]
            k = torch.cat((self.null_k.to(k.dtype).expand(batch, -1, -1, -1), k), dim=2)
            v = torch.cat((self.null_v.to(v.dtype).expand(batch, -1, -1, -1), v), dim=2)
        return k, v

    def attend(self, x: Tensor, k: Tensor, v: Tensor, q_rot: Optional[tuple[Tensor, Tensor]] = None,
               attn_mask: Optional[Tensor] = None, norm: Optional[RMSNorm] = None) -> Tensor:
        q = rearrange(norm_linear(x, norm, self.to_q), "b n (h d) -> b h n d", h=self.heads)
        if q_rot is not None:
            q = apply_rotary(q, q_rot)
        dropout_p = self.dropout if self.training else 0.0
        out = kernels.attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask, dropout_p=dropout_p)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def forward(self, x: Tensor, context: Tensor, norm: Optional[RMSNorm] = None) -> Tensor:
        k, v = self.keys_values(context)
        return self.attend(x, k, v, norm=norm)
