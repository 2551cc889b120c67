"""Softmax attention: torch's ``scaled_dot_product_attention``, or a matmul kernel for short windows.

- :func:`attention` ``(q, k, v, attn_mask, dropout_p, is_causal)``: SDPA, except for the short
  non-causal windows in bf16 on CPU when gradients are needed, which take
  :class:`_WindowAttention` (the rule: :func:`_window_rule`).

Reference implementation: ``F.scaled_dot_product_attention`` for every call (within
:func:`~diablogpt_pytorch.kernels.use_reference`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from diablogpt_pytorch.kernels._switch import reference_enabled

_WINDOW_MAX_KEYS = 512  # see attention


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
               dropout_p: float = 0.0, is_causal: bool = False) -> Tensor:
    """Softmax attention of q (B, h, Lq, d) over k, v (B, h, Lk, d); ``attn_mask`` is a bool mask
    (True: attend) broadcastable to (B, h, Lq, Lk). ``F.scaled_dot_product_attention`` (the reference), except
    for the short non-causal windows in bf16 on CPU when gradients are needed (the neighbour
    self-attention, the encoder's cross-attention and CCA: at most ``_WINDOW_MAX_KEYS`` keys),
    which take :class:`_WindowAttention`: torch's CPU flash-attention backward is slow in bf16
    at those shapes (``python -m benchmarks.micro.bench_attention``). The long causal decoder attention,
    float32 (where the window way is the slower one: ``--inputs fp32``), CUDA and inference stay
    on SDPA."""
    if not reference_enabled() and _window_rule(q, k, v, is_causal):
        return _WindowAttention.apply(q, k, v, attn_mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal)


def _window_rule(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> bool:
    """When :class:`_WindowAttention` replaces SDPA (see :func:`attention`)."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and not is_causal
            and k.shape[-2] <= _WINDOW_MAX_KEYS and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad))


class _WindowAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) masked) v with the (Lq, Lk) probabilities formed by matmuls in the
    inputs' dtype and kept for backward (small windows: the probabilities of a window are no larger
    than its q, k and v). The softmax and its backward are single fused kernels that accumulate in
    float32 (one pass each over the probabilities), and masked positions get no gradient without a
    pass of their own (their probability is 0). Dropout (on the probabilities, as SDPA's) keeps a
    bool mask for backward. q, k, v and the incoming gradient are made contiguous once (each feeds
    two matmuls, which would otherwise each copy a strided view)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float) -> Tensor:
        scale = q.shape[-1] ** -0.5
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        with torch.autocast(q.device.type, enabled=False):
            scores = torch.matmul(q * scale, k.transpose(-1, -2))
            if attn_mask is not None:
                scores.masked_fill_(~attn_mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            keep = None
            if dropout_p > 0:
                keep = torch.empty_like(probs, dtype=torch.bool).bernoulli_(1 - dropout_p)
                out = torch.matmul(probs * keep / (1 - dropout_p), v)
            else:
                out = torch.matmul(probs, v)
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, probs, keep = ctx.saved_tensors
        grad_out = grad_out.to(q.dtype).contiguous()
        grad_probs = torch.matmul(grad_out, v.transpose(-1, -2))
        if keep is None:
            grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
        else:
            dropped = probs * keep / (1 - ctx.dropout_p)
            grad_v = torch.matmul(dropped.transpose(-1, -2), grad_out)
            grad_probs = grad_probs * keep / (1 - ctx.dropout_p)
        # softmax backward: probs * (grad_probs - sum(grad_probs * probs)), one fused pass
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None, None


