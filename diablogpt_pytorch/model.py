"""DIABLOGPT: the RETRO decoder with chunked cross-attention (Borgeaud et al. 2022, arXiv 2112.04426).

Shapes (C = chunk_size, K = neighbours per chunk, m = number of chunks):

- tokens ``seq``: int64 (b, n); with ``return_loss`` (b, n+1), split into input [:, :-1] and
  labels [:, 1:].
- ``retrieved``: int64 (b, m, K, 2C): for each chunk u of the input, K neighbours, each a chunk
  plus its continuation; ``pad_id`` marks padding. Only the first n // C chunks matter: the
  neighbours of chunk u influence positions >= (u+1)C - 1 only.

The decoder is a stack of pre-norm (or DeepNet post-norm) layers: causal self-attention with
rotary positions, chunked cross-attention (CCA) at ``dec_cross_attn_layers`` (1-based), and a
feed-forward block. At the first CCA layer the neighbour encoder runs (paper Algorithm 1): each
neighbour gets bidirectional self-attention and cross-attends to the decoder hidden states of the
chunk it was retrieved for. CCA window u holds the last token of chunk u and the first C-1 tokens of
chunk u+1 and attends, in one softmax, to all K*2C encoded neighbour tokens of chunk u plus a
learned null key/value. Attention runs through ``F.scaled_dot_product_attention``, except the
short non-causal windows in bf16 CPU training (see :func:`_attention`).

The same code path serves training (no cache) and incremental decoding (:class:`DecodeCache`):
self-attention keys/values are cached per layer, and the CCA keys/values of each completed chunk's
encoded neighbours are computed once and cached (see :meth:`DIABLOGPT.decode`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diablogpt_pytorch.hub import PretrainedMixin

__all__ = ["DIABLOGPT", "DecodeCache", "deepnet_constants"]


# ---------------------------------------------------------------------------------------------
# building blocks


# torch's RMSNorm forward op (it also returns the per-row scale); a composite of four passes on CPU
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
    (``python benchmarks/bench_weight_grad.py``)."""
    lhs = grad_flat.t()
    if lhs.device.type == "cpu" and lhs.dtype == torch.bfloat16 and 2 * lhs.shape[0] <= inp.shape[1]:
        lhs = lhs.contiguous()
    return lhs @ inp


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


def norm_linear(x: Tensor, norm: Optional["RMSNorm"], linear: nn.Linear) -> Tensor:
    """``linear(norm(x))`` (just ``linear(x)`` when ``norm`` is None), fused for a plain RMSNorm so
    that only the normalised input is kept for backward (:class:`_RMSNormLinear`)."""
    if norm is None:
        return linear(x)
    if norm.gate is not None or not torch.is_grad_enabled():
        return linear(norm(x))
    device_type = x.device.type
    dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
             else torch.promote_types(x.dtype, linear.weight.dtype))
    return _RMSNormLinear.apply(x, norm.gamma, norm.eps, linear.weight, linear.bias, dtype)


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


_LM_HEAD_GROUP_ROWS = 2048  # see _LMHeadLoss.forward


def _log_picked(probs: Tensor, logits: Tensor, target: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(log(probs[i, target[i]]) in ``acc``, lost) per row, with no host synchronisation:
    ``lost`` marks rows whose probability is below the smallest normal number of probs' dtype (too
    few bits left, or 0), whose log is wrong; the caller recomputes those (:func:`_exact_log_picked`).

    In a dtype whose range is narrower than float32's (float16: its smallest normal, 6e-5, is
    above a uniform probability over a vocabulary of 30522) the rows would fall back almost always,
    so every row's log-probability is taken at once from the logits (label logit minus a float32
    logsumexp of the row) and nothing is lost."""
    if torch.finfo(probs.dtype).tiny > torch.finfo(torch.float32).tiny:
        exact = (logits.gather(1, target[:, None]).squeeze(1).to(acc)
                 - torch.logsumexp(logits.to(acc), dim=-1))
        return exact, torch.zeros_like(target, dtype=torch.bool)
    picked = probs.gather(1, target[:, None]).squeeze(1).to(acc)
    return picked.log(), picked < torch.finfo(probs.dtype).tiny


def _exact_log_picked(hidden: Tensor, w: Tensor, target: Tensor, acc: torch.dtype) -> Tensor:
    """log softmax(hidden @ w.T)[i, target[i]] per row, from a float32 (``acc``) log_softmax."""
    logits = hidden.to(w.dtype) @ w.t()
    return torch.log_softmax(logits.to(acc), dim=-1).gather(1, target[:, None]).squeeze(1)


class _LMHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of ``labels`` (N,) under logits ``hidden (N, d) @ weight.T`` without
    ever holding the (N, vocab) logits: they are made ``chunk`` rows at a time. Rows whose label is
    ``ignore_index`` count for nothing. Matmuls run in ``compute_dtype`` (bf16 under autocast).
    One fused softmax pass (float32 inside) writes the probabilities in that dtype (in a lower one
    straight into the kept gradient logits), and each row's loss is minus the log of its label's
    probability: one rounding of the probability, an absolute error of at most 2^-8 in that row's
    loss in bf16 and 2^-24 in float32. A probability below the dtype's smallest normal number is
    recomputed from a float32 ``log_softmax`` of its row, after all blocks (one host
    synchronisation per call, none per block); in float16 every row's log-probability comes from
    a float32 logsumexp of its logits instead (see :func:`_log_picked`). Rows with the ignored
    label are masked arithmetically (their hidden rows and gradient rows multiplied by 0), so no
    block waits on the host either.

    With ``with_grads`` the gradients are computed in the forward pass, from the same logits
    (softmax - one-hot): the loss is a sum, so its gradient is the one computed here times the
    incoming scalar, and the backward pass only scales. This saves remaking the logits (a third of
    the head's matmuls) and their float32 round trip; only the two gradients are kept (the size of
    ``hidden`` and of ``weight``), which the backward pass would allocate anyway."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, chunk: int,
                compute_dtype: torch.dtype, with_grads: bool) -> Tensor:
        w = weight.to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)
        n = hidden.shape[0]
        keep_all = labels != ignore_index
        safe_labels = labels.clamp(min=0)
        log_picked = hidden.new_empty((n,), dtype=acc)
        lost = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grads else None
        grad_weight = None  # made by the first product, then accumulated into
        # In a lower-precision compute dtype, the weight gradient is one matmul per group of rows
        # (the gradient logits of up to _LM_HEAD_GROUP_ROWS rows are kept in that dtype): one
        # rounding and one accumulation per group instead of one per chunk. In float32 each chunk
        # accumulates straight into the gradient (addmm_, no temporary).
        grouped = with_grads and compute_dtype != acc
        group = max(chunk, _LM_HEAD_GROUP_ROWS) if grouped else n
        for group_begin in range(0, n, group):
            group_end = min(n, group_begin + group)
            if grouped:
                grad_logits = torch.empty(group_end - group_begin, w.shape[0], dtype=compute_dtype,
                                          device=hidden.device)
            for begin in range(group_begin, group_end, chunk):
                rows = slice(begin, min(begin + chunk, group_end))
                h = hidden[rows].to(compute_dtype)
                logits = h @ w.t()
                safe_target = safe_labels[rows]
                out = grad_logits[begin - group_begin: rows.stop - group_begin] if grouped else None
                probs = torch.softmax(logits, dim=-1, out=out)
                log_picked[rows], lost[rows] = _log_picked(probs, logits, safe_target, acc)
                if not with_grads:
                    continue
                probs[torch.arange(probs.shape[0], device=probs.device), safe_target] -= 1
                # an ignored row's gradient is 0: zero its gradient row and its hidden row in the
                # weight gradient's product (both (rows, d), far smaller than the probabilities)
                keep = keep_all[rows].to(compute_dtype)[:, None]
                grad_hidden[rows] = ((probs @ w) * keep).to(hidden.dtype)
                if not grouped:
                    h = h * keep
                    grad_weight = probs.t() @ h if grad_weight is None else grad_weight.addmm_(probs.t(), h)
            if grouped:
                part = grad_logits.t() @ (hidden[group_begin:group_end].to(compute_dtype)
                                          * keep_all[group_begin:group_end].to(compute_dtype)[:, None])
                grad_weight = part.to(acc) if grad_weight is None else grad_weight.add_(part)
        lost &= keep_all
        narrow = torch.finfo(compute_dtype).tiny > torch.finfo(torch.float32).tiny  # none lost
        rows = lost.nonzero().squeeze(1) if n and not narrow else None  # the one host sync
        if rows is not None and rows.numel():
            log_picked[rows] = _exact_log_picked(hidden[rows], w, safe_labels[rows], acc)
        # where, not a product: an ignored row's log may be -inf (and -inf * 0 is nan)
        total = -torch.where(keep_all, log_picked, 0).sum(dtype=acc)
        if with_grads:
            if grad_weight is None:  # no rows
                grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        if not ctx.saved_tensors:
            raise RuntimeError("the LM-head loss was computed with with_grads=False: it has no backward")
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_total.to(grad_hidden.dtype), (grad_weight * grad_total).to(ctx.weight_dtype),
                None, None, None, None, None)


def lm_head_loss(hidden: Tensor, weight: Tensor, labels: Tensor, pad_id: int, chunk: int) -> Tensor:
    """Mean cross-entropy of ``labels`` (b, n) under logits ``hidden (b, n, d) @ weight.T`` over
    the labels that are not ``pad_id``.

    The (b, n, vocab) logits never exist all at once: :class:`_LMHeadLoss` makes them ``chunk``
    rows at a time, through one fused softmax that accumulates in float32, and (when gradients
    are wanted) takes its gradients from them right away, so the backward pass does not remake
    them. Matmuls run in the autocast dtype when autocast is on, else in the weight's dtype."""
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else weight.dtype)
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = _LMHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                              pad_id, chunk, compute_dtype, with_grads)
    return total / (labels != pad_id).sum().clamp(min=1)


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
        out = _RMSNormFunction.apply(x, self.gamma, self.eps)
        if self.gate is not None:
            out = out * torch.sigmoid(x * self.gate)
        return out


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021). ``forward(positions)`` -> (cos, signed_sin),
    each (len, dim_head), float32; ``signed_sin`` is sin with its first half negated, so that
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
    return _Rotation.apply(x, cos.to(x.dtype), sin.to(x.dtype))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + (x2, x1) * sin, with (x1, x2) the halves of x's last dim: one product pass and
    one in-place pass per half, with no swapped copy of x."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half])
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


class _Rotation(torch.autograd.Function):
    """:func:`_rotate` with its transpose as backward (the same kernel with the sine's halves
    swapped); it saves no activation."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_out, cos, sin.roll(sin.shape[-1] // 2, dims=-1)), None, None


_WINDOW_MAX_KEYS = 512  # see _attention


def _attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
               dropout_p: float = 0.0, is_causal: bool = False) -> Tensor:
    """Softmax attention of q (B, h, Lq, d) over k, v (B, h, Lk, d); ``attn_mask`` is a bool mask
    (True: attend) broadcastable to (B, h, Lq, Lk). ``F.scaled_dot_product_attention``, except
    for the short non-causal windows in bf16 on CPU when gradients are needed (the neighbour
    self-attention, the encoder's cross-attention and CCA: at most ``_WINDOW_MAX_KEYS`` keys),
    which take :class:`_WindowAttention`: torch's CPU flash-attention backward is slow in bf16
    at those shapes (``python benchmarks/bench_attention.py``). The long causal decoder attention,
    float32 (where the window way is the slower one: ``--inputs fp32``), CUDA and inference stay
    on SDPA."""
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and not is_causal
            and k.shape[-2] <= _WINDOW_MAX_KEYS and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _WindowAttention.apply(q, k, v, attn_mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal)


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


class _GeluDropoutLinear(torch.autograd.Function):
    """out = linear(dropout(gelu(h)), weight, bias). In float32 it saves h and the dropout mask, not
    the activated hidden layer, which backward recomputes (elementwise): one (tokens, 4 * dim)
    activation less per feed-forward block. In a lower precision (bf16 under autocast) the
    activation is half the size and the recompute a larger share of the step, so it is kept, and
    so is the weight cast to that precision (not cast again in backward). Matmuls run in h's dtype."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, p: float) -> Tensor:
        a = F.gelu(h)
        mask = None
        if p > 0:
            mask = torch.empty_like(a, dtype=torch.bool).bernoulli_(1 - p)
            a = a * mask / (1 - p)
        ctx.p = p
        low_precision = h.dtype in (torch.bfloat16, torch.float16)
        cast_weight = weight.to(a.dtype)
        # in a lower precision the activation and the cast weight are kept (see the class doc)
        ctx.save_for_backward(h, weight, bias, mask, a if low_precision else None,
                              cast_weight if cast_weight is not weight else None)
        return F.linear(a, cast_weight, bias.to(a.dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, weight, bias, mask, a, cast_weight = ctx.saved_tensors
        if a is None:  # recompute the activation (float32: it was not kept)
            a = F.gelu(h)
            if mask is not None:
                a = a * mask / (1 - ctx.p)
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = _weight_grad(grad_flat, a.reshape(-1, a.shape[-1]).to(grad_flat.dtype)).to(weight.dtype)
        grad_bias = grad_flat.sum(0).to(bias.dtype)
        grad_a = (grad_out @ (weight if cast_weight is None else cast_weight).to(grad_out.dtype)).to(h.dtype)
        if mask is not None:
            grad_a = grad_a * mask / (1 - ctx.p)
        grad_h = torch.ops.aten.gelu_backward(grad_a, h)
        return grad_h, grad_weight, grad_bias, None


class FeedForward(nn.Module):
    """Linear -> GELU -> dropout -> Linear (the activated hidden layer is recomputed in backward in
    float32; see :class:`_GeluDropoutLinear`)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult)
        self.proj_out = nn.Linear(dim * mult, dim)
        self.dropout = dropout

    def forward(self, x: Tensor, norm: Optional["RMSNorm"] = None) -> Tensor:
        """``x`` (..., dim) -> (..., dim); with ``norm``, of ``norm(x)`` (fused, see :func:`norm_linear`)."""
        h = norm_linear(x, norm, self.proj_in)
        p = self.dropout if self.training else 0.0
        return _GeluDropoutLinear.apply(h, self.proj_out.weight, self.proj_out.bias, p)


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
        norm: Optional["RMSNorm"] = None,
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
        out = _attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal and n > 1)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    """Multi-head cross-attention, split in two so that keys/values can be cached.

    ``keys_values(context (B, L, context_dim), rot=None)`` -> (k, v), each (B, h, L [+1], dim_head),
    with a learned null key/value prepended when ``null_kv``.
    ``attend(x (B, n, dim), k, v, q_rot=None, attn_mask=None, norm=None)`` -> (B, n, dim).
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
               attn_mask: Optional[Tensor] = None, norm: Optional["RMSNorm"] = None) -> Tensor:
        q = rearrange(norm_linear(x, norm, self.to_q), "b n (h d) -> b h n d", h=self.heads)
        if q_rot is not None:
            q = apply_rotary(q, q_rot)
        dropout_p = self.dropout if self.training else 0.0
        out = _attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask, dropout_p=dropout_p)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


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
    """A sub-layer with its norm: pre-norm ``x + f(norm(x))`` or, with DeepNet,
    post-norm ``norm(alpha * x + f(x))``."""

    def __init__(self, dim: int, fn: nn.Module, gated: bool, deepnet_alpha: Optional[float]):
        super().__init__()
        self.fn, self.norm, self.alpha = fn, RMSNorm(dim, gated=gated), deepnet_alpha

    def pre(self, x: Tensor) -> Tensor:
        """The input the sub-layer function sees."""
        return x if self.alpha is not None else self.norm(x)

    @property
    def in_norm(self) -> Optional["RMSNorm"]:
        """The norm a sub-layer applies to its input itself (pre-norm), fused into its first
        projection (:func:`norm_linear`): ``fn(x, norm=in_norm)`` equals ``fn(pre(x))``."""
        return None if self.alpha is not None else self.norm

    def post(self, x: Tensor, out: Optional[Tensor]) -> Tensor:
        """Combine the residual stream with the sub-layer output (None: the sub-layer is off)."""
        if self.alpha is not None:
            return self.norm(x * self.alpha if out is None else x * self.alpha + out)
        return x if out is None else x + out


# ---------------------------------------------------------------------------------------------
# cache for incremental decoding


@dataclass
class DecodeCache:
    """State of incremental decoding for a batch; created by :meth:`DIABLOGPT.init_cache`.

    Attributes:
        length: number of positions processed so far.
        self_kv: per decoder layer, (k, v) buffers (b, heads, max_seq_len, dim_head).
        cca_k, cca_v: per CCA layer, (b, chunks_done, heads, 1 + K*2C, dim_head) keys/values of the
            encoded neighbours of every completed chunk (null key/value first).
        cca_mask: (b, chunks_done, 1 + K*2C) bool, False where a neighbour token is padding.
        partial_hidden: (b, length % C, dec_dim) decoder hidden states at the first CCA layer for
            the chunk in progress (the encoder's context once it completes).
        retrieval: whether CCA runs (False decodes the same weights without retrieval).
    """

    length: int
    self_kv: list
    retrieval: bool
    cca_k: list = field(default_factory=list)
    cca_v: list = field(default_factory=list)
    cca_mask: Optional[Tensor] = None
    partial_hidden: Optional[Tensor] = None

    @property
    def chunks_done(self) -> int:
        return 0 if self.cca_mask is None else self.cca_mask.shape[1]


# ---------------------------------------------------------------------------------------------
# encoder


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
        self.layers = nn.ModuleList()
        for layer_num in range(1, depth + 1):
            attn = Residual(dim, SelfAttention(dim, heads, dim_head, attn_dropout, causal=False), gated, alpha)
            cross = None
            if layer_num in cross_attn_layers:
                cross = Residual(dim, CrossAttention(dim, context_dim, heads, dim_head, attn_dropout), gated, alpha)
            ff = Residual(dim, FeedForward(dim, dropout=ff_dropout), gated, alpha)
            self.layers.append(nn.ModuleList([attn, cross, ff]))
        self.context_norm = RMSNorm(context_dim, gated=gated)
        self.final_norm = nn.Identity() if deepnet else RMSNorm(dim, gated=gated)
        self.rotary = Rotary(dim_head)

    def forward(self, x: Tensor, pad_mask: Tensor, context: Tensor) -> Tensor:
        b, m, k, length, dim = x.shape
        x = x.reshape(b * m * k, length, dim)
        rot = self.rotary(torch.arange(length, device=x.device))
        # a real token sees the real tokens of its neighbour; a padding token sees only itself, so
        # an all-padding neighbour stays finite (its output is masked out by CCA anyway)
        real = ~pad_mask.reshape(b * m * k, 1, 1, length)
        eye = torch.eye(length, dtype=torch.bool, device=x.device)
        key_mask = real | eye
        context = self.context_norm(context.reshape(b * m, -1, context.shape[-1]))
        for attn, cross, ff in self.layers:
            x = attn.post(x, attn.fn(x, rot, key_mask=key_mask, norm=attn.in_norm))
            if cross is not None:
                x = x.reshape(b * m, k * length, dim)
                ck, cv = cross.fn.keys_values(context)
                x = cross.post(x, cross.fn.attend(x, ck, cv, norm=cross.in_norm))
                x = x.reshape(b * m * k, length, dim)
            x = ff.post(x, ff.fn(x, norm=ff.in_norm))
        return self.final_norm(x).reshape(b, m, k * length, dim)


# ---------------------------------------------------------------------------------------------
# the model


class DIABLOGPT(PretrainedMixin, nn.Module):
    """RETRO: a decoder-only language model with chunked cross-attention to retrieved neighbours.

    Args:
        num_tokens: vocabulary size (default 30522, the default tokenizer's: uncased BERT vocab).
        max_seq_len: longest input sequence (positions are rotary; this bounds caches and checks).
        enc_dim, enc_depth: neighbour encoder width and number of layers.
        dec_dim, dec_depth: decoder width and number of layers.
        dec_cross_attn_layers: 1-based decoder layers with chunked cross-attention.
        heads, dim_head: attention heads and width per head (decoder and encoder).
        chunk_size: retrieval chunk length C (64 in the paper).
        pad_id: padding token id (ignored in the loss; masked in neighbours).
        dec_attn_dropout, dec_ff_dropout, enc_attn_dropout, enc_ff_dropout: dropout rates.
        enc_cross_attn_layers: 1-based encoder layers that cross-attend to the decoder chunk
            (default: all).
        use_deepnet: DeepNet post-norm residuals with alpha scaling and beta-scaled init.
        gated_rmsnorm: gated RMSNorm everywhere.
        zero_init_residual: start the decoder's self-attention and feed-forward output
            projections at zero, so that every decoder block begins as the identity plus its
            chunked cross-attention (the zero-initialised residual branches of Fixup, Zhang et al.
            2019, and ReZero, Bachlechner et al. 2020). The cross-attention output keeps its
            random initialisation, so retrieval receives gradients from the first step. Measured
            by ``benchmarks/retrieval_gain.py``: the language model and its use of neighbours both
            learn faster. Ignored with ``use_deepnet`` (DeepNet has its own initialisation).

    ``save_pretrained(dir)`` writes ``config.json`` + ``model.safetensors``;
    ``DIABLOGPT.from_pretrained(dir_or_repo_id)`` loads them (see :mod:`diablogpt_pytorch.hub`).
    """

    def __init__(
        self,
        *,
        num_tokens: int = 30522,
        max_seq_len: int = 2048,
        enc_dim: int = 896,
        enc_depth: int = 2,
        dec_dim: int = 768,
        dec_depth: int = 12,
        dec_cross_attn_layers: Sequence[int] = (1, 3, 6, 9),
        heads: int = 8,
        dim_head: int = 64,
        chunk_size: int = 64,
        pad_id: int = 0,
        dec_attn_dropout: float = 0.0,
        dec_ff_dropout: float = 0.0,
        enc_attn_dropout: float = 0.0,
        enc_ff_dropout: float = 0.0,
        enc_cross_attn_layers: Optional[Sequence[int]] = None,
        use_deepnet: bool = False,
        gated_rmsnorm: bool = False,
        zero_init_residual: bool = True,
    ):
        super().__init__()
        dec_cross_attn_layers = tuple(int(i) for i in dec_cross_attn_layers)
        enc_cross_attn_layers = (tuple(range(1, enc_depth + 1)) if enc_cross_attn_layers is None
                                 else tuple(int(i) for i in enc_cross_attn_layers))
        for name, layers, depth in (("dec_cross_attn_layers", dec_cross_attn_layers, dec_depth),
                                    ("enc_cross_attn_layers", enc_cross_attn_layers, enc_depth)):
            bad = [i for i in layers if not 1 <= i <= depth]
            if bad:
                raise ValueError(f"{name} are 1-based layer numbers in [1, {depth}]; got {bad}")
        if not dec_cross_attn_layers:
            raise ValueError("dec_cross_attn_layers is empty: RETRO needs at least one CCA layer")
        if dim_head % 2:
            raise ValueError(f"dim_head must be even for rotary embeddings; got {dim_head}")
        if max_seq_len < chunk_size:
            raise ValueError(f"max_seq_len ({max_seq_len}) must be at least chunk_size ({chunk_size})")

        self.config = dict(
            num_tokens=num_tokens, max_seq_len=max_seq_len, enc_dim=enc_dim, enc_depth=enc_depth,
            dec_dim=dec_dim, dec_depth=dec_depth, dec_cross_attn_layers=list(dec_cross_attn_layers),
            heads=heads, dim_head=dim_head, chunk_size=chunk_size, pad_id=pad_id,
            dec_attn_dropout=dec_attn_dropout, dec_ff_dropout=dec_ff_dropout,
            enc_attn_dropout=enc_attn_dropout, enc_ff_dropout=enc_ff_dropout,
            enc_cross_attn_layers=list(enc_cross_attn_layers), use_deepnet=use_deepnet,
            gated_rmsnorm=gated_rmsnorm, zero_init_residual=zero_init_residual,
        )
        self.num_tokens, self.max_seq_len, self.chunk_size, self.pad_id = num_tokens, max_seq_len, chunk_size, pad_id
        self.heads, self.dim_head = heads, dim_head
        self.deepnet = deepnet_constants(enc_depth, dec_depth) if use_deepnet else None
        dec_alpha = self.deepnet["dec_alpha"] if self.deepnet else None

        self.token_emb = nn.Embedding(num_tokens, dec_dim)
        self.to_enc = nn.Linear(dec_dim, enc_dim, bias=False) if enc_dim != dec_dim else nn.Identity()
        self.encoder = Encoder(enc_dim, enc_depth, dec_dim, heads, dim_head, enc_attn_dropout,
                               enc_ff_dropout, enc_cross_attn_layers, gated_rmsnorm, self.deepnet)
        self.rotary = Rotary(dim_head)
        self.layers = nn.ModuleList()
        self.cca_layer_ids: list[int] = []
        for layer_num in range(1, dec_depth + 1):
            attn = Residual(dec_dim, SelfAttention(dec_dim, heads, dim_head, dec_attn_dropout, causal=True),
                            gated_rmsnorm, dec_alpha)
            cca = None
            if layer_num in dec_cross_attn_layers:
                cca = Residual(dec_dim, CrossAttention(dec_dim, enc_dim, heads, dim_head, dec_attn_dropout,
                                                       null_kv=True), gated_rmsnorm, dec_alpha)
                self.cca_layer_ids.append(layer_num - 1)
            ff = Residual(dec_dim, FeedForward(dec_dim, dropout=dec_ff_dropout), gated_rmsnorm, dec_alpha)
            self.layers.append(nn.ModuleList([attn, cca, ff]))
        self.final_norm = nn.Identity() if use_deepnet else RMSNorm(dec_dim, gated=gated_rmsnorm)
        self.to_logits = nn.Linear(dec_dim, num_tokens, bias=False)
        self.loss_chunk = 512  # rows of logits made at a time by the loss (see forward)
        self.zero_init_residual = zero_init_residual
        self._init_weights()

    # -- init ----------------------------------------------------------------------------------

    def _init_weights(self) -> None:
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.to_logits.weight, std=self.to_logits.in_features ** -0.5)
        if self.deepnet is None:
            if self.zero_init_residual:
                for attn, _cca, ff in self.layers:
                    nn.init.zeros_(attn.fn.to_out.weight)
                    nn.init.zeros_(ff.fn.proj_out.weight)
                    nn.init.zeros_(ff.fn.proj_out.bias)
            return
        # DeepNet init: xavier-normal with gain beta on feed-forward, value and output projections
        # (keys/queries gain 1), separately for encoder (enc_beta) and decoder (dec_beta)
        for part, beta in ((self.encoder, self.deepnet["enc_beta"]), (self.layers, self.deepnet["dec_beta"])):
            for module in part.modules():
                if isinstance(module, FeedForward):
                    for lin in (module.proj_in, module.proj_out):
                        nn.init.xavier_normal_(lin.weight, gain=beta)
                elif isinstance(module, SelfAttention):
                    inner = module.heads * module.dim_head
                    q, k, v = module.to_qkv.weight.data.split(inner, dim=0)
                    for w, gain in ((q, 1.0), (k, 1.0), (v, beta)):
                        nn.init.xavier_normal_(w, gain=gain)
                    nn.init.xavier_normal_(module.to_out.weight, gain=beta)
                elif isinstance(module, CrossAttention):
                    inner = module.heads * module.dim_head
                    nn.init.xavier_normal_(module.to_q.weight, gain=1.0)
                    k, v = module.to_kv.weight.data.split(inner, dim=0)
                    nn.init.xavier_normal_(k, gain=1.0)
                    nn.init.xavier_normal_(v, gain=beta)
                    nn.init.xavier_normal_(module.to_out.weight, gain=beta)

    def no_weight_decay_parameter_names(self) -> set[str]:
        """Names of parameters that take no weight decay: norm gains/gates, biases, null key/values."""
        return {name for name, p in self.named_parameters() if p.ndim < 2 or "null_" in name}

    # -- public forward ------------------------------------------------------------------------

    def forward(self, seq: Tensor, retrieved: Optional[Tensor] = None, return_loss: bool = False) -> Tensor:
        """Logits (b, n, num_tokens) for ``seq`` (b, n), or with ``return_loss`` the mean
        cross-entropy of ``seq[:, 1:]`` given ``seq[:, :-1]`` over labels that are not ``pad_id``.

        ``retrieved`` (b, >= n // C, K, 2C) enables chunked cross-attention; None runs the same
        weights without retrieval (CCA layers are skipped).
        """
        if not return_loss:
            return self.to_logits(self._run(seq, retrieved, cache=None))
        seq, labels = seq[:, :-1], seq[:, 1:]
        hidden = self._run(seq, retrieved, cache=None)
        return lm_head_loss(hidden, self.to_logits.weight, labels, self.pad_id, self.loss_chunk)

    @torch.no_grad()
    def init_cache(self, batch_size: int, retrieval: bool = True, device=None,
                   dtype: Optional[torch.dtype] = None) -> DecodeCache:
        """An empty :class:`DecodeCache` for ``batch_size`` rows (buffers of max_seq_len positions)."""
        param = next(self.parameters())
        device = device if device is not None else param.device
        dtype = dtype if dtype is not None else param.dtype
        shape = (batch_size, self.heads, self.max_seq_len, self.dim_head)
        self_kv = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                   for _ in self.layers]
        return DecodeCache(length=0, self_kv=self_kv, retrieval=retrieval)

    def decode(self, tokens: Tensor, cache: DecodeCache, retrieved: Optional[Tensor] = None) -> Tensor:
        """Incremental forward: logits (b, t, num_tokens) for ``tokens`` (b, t) at positions
        cache.length .. cache.length + t - 1; the cache advances by t.

        With ``cache.retrieval``, ``retrieved`` must hold (b, c, K, 2C) neighbours for exactly the
        c chunks that complete inside this call (chunk u completes at position (u+1)C - 1), in
        order; their encodings and CCA keys/values are computed once and cached. The logits equal
        those of a full forward over the whole prefix with the same neighbours.
        """
        with torch.no_grad():
            return self.to_logits(self._run(tokens, retrieved, cache))

    # -- the shared path -----------------------------------------------------------------------

    def _run(self, tokens: Tensor, retrieved: Optional[Tensor], cache: Optional[DecodeCache]) -> Tensor:
        """Final hidden states (b, n, dec_dim) of ``tokens`` (b, n), with or without a cache."""
        b, n = tokens.shape
        start, end, new_chunks, use_retrieval, retrieved = self._plan_call(tokens, retrieved, cache)

        neighbour_emb = None
        if use_retrieval and new_chunks > 0 and torch.is_grad_enabled() and self.token_emb.weight.requires_grad:
            # one lookup for the tokens and the neighbours: one embedding gradient (a vocabulary-
            # sized buffer) in backward instead of two and their sum
            both = self.token_emb(torch.cat((tokens.reshape(-1), retrieved.reshape(-1))))
            x, neighbour_emb = both[: tokens.numel()].view(b, n, -1), both[tokens.numel():]
            neighbour_emb = neighbour_emb.view(*retrieved.shape, -1)
        else:
            x = self.token_emb(tokens)
        rot = self.rotary(torch.arange(start, end, device=tokens.device))
        cca_state = None  # (keys, values, mask) of all chunks so far, for every CCA layer
        first_cca = self.cca_layer_ids[0]
        cca_index = 0
        for layer_id, (attn, cca, ff) in enumerate(self.layers):
            kv_cache = cache.self_kv[layer_id] if cache is not None else None
            x = attn.post(x, attn.fn(x, rot, kv_cache=kv_cache, start=start, norm=attn.in_norm))
            if cca is not None and use_retrieval:
                if layer_id == first_cca:
                    cca_state = self._encode_new_chunks(x, retrieved, new_chunks, cache, neighbour_emb)
                out = self._chunked_cross_attention(cca, cca_index, x, start, cca_state)
                x = cca.post(x, out)
                cca_index += 1
            elif cca is not None:
                x = cca.post(x, None)  # retrieval off: CCA contributes nothing
            x = ff.post(x, ff.fn(x, norm=ff.in_norm))
        if cache is not None:
            cache.length = end
        return self.final_norm(x)

    def _plan_call(self, tokens: Tensor, retrieved: Optional[Tensor], cache: Optional[DecodeCache]) -> tuple:
        """(start, end, new_chunks, use_retrieval, retrieved) of a call over ``tokens`` (b, n): the
        positions [start, end) it covers, how many chunks complete inside it, whether CCA runs,
        and the neighbours of exactly those chunks (checked against the cache and the shapes)."""
        b, n = tokens.shape
        C = self.chunk_size
        start = cache.length if cache is not None else 0
        end = start + n
        if end > self.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds max_seq_len={self.max_seq_len}")
        new_chunks = end // C - start // C
        use_retrieval = cache.retrieval if cache is not None else retrieved is not None
        if use_retrieval and new_chunks > 0:
            retrieved = self._check_retrieved(retrieved, b, new_chunks, exact=cache is not None)
        elif cache is not None and retrieved is not None and retrieved.shape[1] != 0:
            raise ValueError(
                f"retrieved was given for {retrieved.shape[1]} chunk(s) but "
                + ("this cache decodes without retrieval" if not cache.retrieval
                   else f"no chunk completes in positions [{start}, {end})")
            )
        return start, end, new_chunks, use_retrieval, retrieved

    def _cca(self, layer_id: int) -> Residual:
        """The chunked cross-attention sub-layer of decoder layer ``layer_id`` (0-based)."""
        return self.layers[layer_id][1]

    def _check_retrieved(self, retrieved: Optional[Tensor], b: int, chunks: int, exact: bool) -> Tensor:
        C = self.chunk_size
        if retrieved is None:
            raise ValueError(f"retrieved neighbours are needed for {chunks} completed chunk(s) of this call")
        if retrieved.ndim != 4 or retrieved.shape[0] != b or retrieved.shape[-1] != 2 * C:
            raise ValueError(
                f"retrieved must be (batch={b}, chunks, K, 2*chunk_size={2 * C}); got {tuple(retrieved.shape)}"
            )
        if (exact and retrieved.shape[1] != chunks) or retrieved.shape[1] < chunks:
            raise ValueError(
                f"retrieved covers {retrieved.shape[1]} chunk(s); this call needs "
                f"{'exactly ' if exact else 'at least '}{chunks} (one per completed chunk of {C} tokens)"
            )
        return retrieved[:, :chunks]

    def _encode_new_chunks(self, h: Tensor, retrieved: Optional[Tensor], new_chunks: int,
                           cache: Optional[DecodeCache], neighbour_emb: Optional[Tensor] = None) -> tuple:
        """Encode the neighbours of the chunks completing in this call (context: the decoder hidden
        states ``h`` at the first CCA layer) and compute every CCA layer's keys/values.

        Returns (keys, values, mask) for all chunks so far: per CCA layer (b, m, h, 1 + K*2C, dh)
        keys and values, and the (b, m, 1 + K*2C) mask; with a cache they are appended to it."""
        C = self.chunk_size
        if cache is not None:
            prefix = cache.partial_hidden if cache.partial_hidden is not None else h[:, :0]
            h_all = torch.cat((prefix, h), dim=1)  # positions (start // C) * C .. end - 1
            cache.partial_hidden = h_all[:, new_chunks * C:]
        else:
            h_all = h
        if new_chunks == 0:
            return (cache.cca_k, cache.cca_v, cache.cca_mask) if cache is not None else ([], [], None)
        context = rearrange(h_all[:, : new_chunks * C], "b (m c) d -> b m c d", c=C)
        b, m, k, length = retrieved.shape
        pad_mask = retrieved == self.pad_id
        if neighbour_emb is None:
            neighbour_emb = self.token_emb(retrieved)
        neighbours = self.to_enc(neighbour_emb)
        encoded = self.encoder(neighbours, pad_mask, context)  # (b, m, K*2C, enc_dim)

        rot = self.rotary(torch.arange(length, device=h.device).repeat(k))  # positions within each neighbour
        flat = rearrange(encoded, "b m l d -> (b m) l d")
        keys, values = [], []
        for layer_id in self.cca_layer_ids:
            ck, cv = self._cca(layer_id).fn.keys_values(flat, rot)  # (b m, h, 1 + K*2C, dh)
            keys.append(rearrange(ck, "(b m) h l d -> b m h l d", b=b))
            values.append(rearrange(cv, "(b m) h l d -> b m h l d", b=b))
        mask = torch.cat((torch.ones(b, m, 1, dtype=torch.bool, device=h.device),
                          ~rearrange(pad_mask, "b m k l -> b m (k l)")), dim=-1)
        if cache is None:
            return keys, values, mask
        if cache.cca_mask is None:
            cache.cca_k, cache.cca_v, cache.cca_mask = keys, values, mask
        else:
            cache.cca_k = [torch.cat((old, new), dim=1) for old, new in zip(cache.cca_k, keys)]
            cache.cca_v = [torch.cat((old, new), dim=1) for old, new in zip(cache.cca_v, values)]
            cache.cca_mask = torch.cat((cache.cca_mask, mask), dim=1)
        return cache.cca_k, cache.cca_v, cache.cca_mask

    def _chunked_cross_attention(self, cca: Residual, cca_index: int, x: Tensor, start: int,
                                 cca_state: tuple) -> Tensor:
        """CCA output (b, n, dec_dim) for positions start..start+n-1; zero before position C-1.

        Window u = positions [(u+1)C - 1, (u+2)C - 1) attends to chunk u's neighbours. Query offset
        i in a window sits C-1+i tokens after chunk u's first token; neighbour token j sits j tokens
        after its neighbour's first token: those are the rotary positions (computed once).
        """
        C = self.chunk_size
        b, n, dim = x.shape
        end = start + n
        first = max(start, C - 1)  # first position that cross-attends
        keys_all, values_all, mask_all = cca_state
        if first >= end or mask_all is None:
            return torch.zeros_like(x)
        offset = (first - (C - 1)) % C
        w0 = (first - (C - 1)) // C
        count = end - first
        q_in = cca.pre(x)[:, first - start:]
        if offset + count <= C:  # all queries in one window (e.g. a decoding step): no padding
            q_rot = self.rotary(torch.arange(C - 1 + offset, C - 1 + offset + count, device=x.device))
            out = cca.fn.attend(q_in, keys_all[cca_index][:, w0], values_all[cca_index][:, w0],
                                q_rot=q_rot, attn_mask=mask_all[:, w0, None, None, :])
            return F.pad(out, (0, 0, first - start, 0))
        windows = math.ceil((offset + count) / C)
        q_in = F.pad(q_in, (0, 0, offset, windows * C - offset - count))
        q_in = rearrange(q_in, "b (w c) d -> (b w) c d", c=C)
        k = rearrange(keys_all[cca_index][:, w0:w0 + windows], "b w h l d -> (b w) h l d")
        v = rearrange(values_all[cca_index][:, w0:w0 + windows], "b w h l d -> (b w) h l d")
        mask = rearrange(mask_all[:, w0:w0 + windows], "b w l -> (b w) 1 1 l")
        q_rot = self.rotary(torch.arange(C - 1, 2 * C - 1, device=x.device))
        out = cca.fn.attend(q_in, k, v, q_rot=q_rot, attn_mask=mask)
        out = rearrange(out, "(b w) c d -> b (w c) d", b=b)[:, offset:offset + count]
        return F.pad(out, (0, 0, first - start, 0))
