"""Chunked cross-attention (CCA; Borgeaud et al. 2022, section 2.4 and Algorithm 1).

A sequence of n tokens is split into chunks of C. Each completed chunk u has K retrieved
neighbours of 2C tokens (a chunk and its continuation), encoded by the neighbour encoder with the
decoder hidden states of chunk u as context. CCA window u is positions ``[(u+1)C - 1, (u+2)C - 1)``
(the last token of chunk u and the first C-1 of chunk u+1): its queries attend, in one softmax, to
the K*2C encoded neighbour tokens of chunk u plus a learned null key/value. Positions before C-1
see no neighbour, so the neighbours of chunk u reach only positions ``>= (u+1)C - 1`` and
causality holds.

:class:`ChunkedCrossAttention` is one CCA layer: its neighbour keys/values (computed once per
chunk, cached across decoding calls) and its windowed attention. :class:`CCAMemory` is what the
layers share for a call: the keys/values of every chunk so far; :func:`completed_chunks`,
:func:`neighbour_mask` and :func:`remember` keep it in a :class:`~diablogpt_pytorch.model.DecodeCache`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from diablogpt_pytorch.model.attention import CrossAttention
from diablogpt_pytorch.model.cache import DecodeCache
from diablogpt_pytorch.model.norm import RMSNorm
from diablogpt_pytorch.model.rotary import Rotary


class CCAMemory(NamedTuple):
    """The encoded neighbours of every completed chunk so far, as CCA attends to them.

    keys, values: per CCA layer, (b, chunks, heads, 1 + K*2C, dim_head) (null key/value first);
    mask: (b, chunks, 1 + K*2C) bool, False where a neighbour token is padding; None before the
    first chunk completes (then keys and values are empty lists)."""

    keys: list
    values: list
    mask: Optional[Tensor]


def completed_chunks(h: Tensor, new_chunks: int, chunk_size: int,
                     cache: Optional[DecodeCache]) -> Optional[Tensor]:
    """The hidden states (b, new_chunks, C, d) of the chunks that complete in this call (the
    encoder's context), or None if none does. ``h`` (b, n, d) covers this call's positions; with a
    cache, the states of the chunk in progress are carried over to the next call."""
    C = chunk_size
    if cache is not None:
        prefix = cache.partial_hidden if cache.partial_hidden is not None else h[:, :0]
        h_all = torch.cat((prefix, h), dim=1)  # positions (start // C) * C .. end - 1
        cache.partial_hidden = h_all[:, new_chunks * C:]
    else:
        h_all = h
    if new_chunks == 0:
        return None
    return rearrange(h_all[:, : new_chunks * C], "b (m c) d -> b m c d", c=C)


def neighbour_mask(pad_mask: Tensor) -> Tensor:
    """(b, m, 1 + K*2C) keys CCA may attend to (the null key always) from the neighbours' padding
    mask (b, m, K, 2C)."""
    b, m = pad_mask.shape[:2]
    return torch.cat((torch.ones(b, m, 1, dtype=torch.bool, device=pad_mask.device),
                      ~rearrange(pad_mask, "b m k l -> b m (k l)")), dim=-1)


def recall(cache: Optional[DecodeCache]) -> CCAMemory:
    """The memory of the chunks completed before this call (empty without a cache)."""
    if cache is None:
        return CCAMemory([], [], None)
    return CCAMemory(cache.cca_k, cache.cca_v, cache.cca_mask)


def remember(cache: Optional[DecodeCache], keys: list, values: list, mask: Tensor) -> CCAMemory:
    """The memory of all chunks so far: this call's new chunks (``keys``/``values`` per CCA layer,
    ``mask``), appended to the cache's when there is one."""
    if cache is None:
        return CCAMemory(keys, values, mask)
    if cache.cca_mask is None:
        cache.cca_k, cache.cca_v, cache.cca_mask = keys, values, mask
    else:
        cache.cca_k = [torch.cat((old, new), dim=1) for old, new in zip(cache.cca_k, keys)]
        cache.cca_v = [torch.cat((old, new), dim=1) for old, new in zip(cache.cca_v, values)]
        cache.cca_mask = torch.cat((cache.cca_mask, mask), dim=1)
    return recall(cache)


class ChunkedCrossAttention(CrossAttention):
    """One CCA layer: multi-head cross-attention from decoder windows to encoded neighbours, with
    a learned null key/value and rotary positions on both sides.

    Rotary offsets: query offset i in window u sits C-1+i tokens after chunk u's first token;
    neighbour token j sits j tokens after its neighbour's first token.

    - ``neighbour_keys_values(encoded (b, m, K*2C, context_dim), neighbour_len=2C)`` -> keys,
      values (b, m, heads, 1 + K*2C, dim_head): once per completed chunk.
    - ``forward(x (b, n, dim), start, memory, index, norm=None)`` -> (b, n, dim): the CCA output
      for positions start..start+n-1 from layer ``index``'s keys/values in ``memory``; zero where
      no window has neighbours yet (before position C-1).
    """

    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int, dropout: float, chunk_size: int):
        super().__init__(dim, context_dim, heads, dim_head, dropout, null_kv=True)
        self.chunk_size = chunk_size
        self.rotary = Rotary(dim_head)

    def neighbour_keys_values(self, encoded: Tensor, neighbour_len: int) -> tuple[Tensor, Tensor]:
        b, _, length, _ = encoded.shape
        positions = torch.arange(neighbour_len, device=encoded.device).repeat(length // neighbour_len)
        flat = rearrange(encoded, "b m l d -> (b m) l d")
        k, v = self.keys_values(flat, self.rotary(positions))  # (b m, h, 1 + K*2C, dh)
        return (rearrange(k, "(b m) h l d -> b m h l d", b=b), rearrange(v, "(b m) h l d -> b m h l d", b=b))

    def forward(self, x: Tensor, start: int, memory: CCAMemory, index: int,
                norm: Optional[RMSNorm] = None) -> Tensor:
        C = self.chunk_size
        b, n, dim = x.shape
        end = start + n
        first = max(start, C - 1)  # first position that cross-attends
        if first >= end or memory.mask is None:
            return torch.zeros_like(x)
        keys, values, mask = memory.keys[index], memory.values[index], memory.mask
        offset = (first - (C - 1)) % C  # of the first query in its window
        w0 = (first - (C - 1)) // C  # its window
        count = end - first
        q_in = (x if norm is None else norm(x))[:, first - start:]
        if offset + count <= C:  # all queries in one window (e.g. a decoding step): no padding
            q_rot = self.rotary(torch.arange(C - 1 + offset, C - 1 + offset + count, device=x.device))
            out = self.attend(q_in, keys[:, w0], values[:, w0], q_rot=q_rot, attn_mask=mask[:, w0, None, None, :])
            return F.pad(out, (0, 0, first - start, 0))
        windows = math.ceil((offset + count) / C)
        q_in = F.pad(q_in, (0, 0, offset, windows * C - offset - count))
        q_in = rearrange(q_in, "b (w c) d -> (b w) c d", c=C)
        k = rearrange(keys[:, w0:w0 + windows], "b w h l d -> (b w) h l d")
        v = rearrange(values[:, w0:w0 + windows], "b w h l d -> (b w) h l d")
        window_mask = rearrange(mask[:, w0:w0 + windows], "b w l -> (b w) 1 1 l")
        q_rot = self.rotary(torch.arange(C - 1, 2 * C - 1, device=x.device))
        out = self.attend(q_in, k, v, q_rot=q_rot, attn_mask=window_mask)
        out = rearrange(out, "(b w) c d -> b (w c) d", b=b)[:, offset:offset + count]
        return F.pad(out, (0, 0, first - start, 0))
