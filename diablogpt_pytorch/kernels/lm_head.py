"""The language-model head and its cross-entropy, without the full logits.

- :func:`lm_head_loss` ``(hidden, weight, labels, pad_id, chunk)``: the mean cross-entropy of
  ``labels`` under ``hidden @ weight.T``. Fused (:class:`_LMHeadLoss`: logits ``chunk`` rows at a
  time, gradients taken in the forward pass): always, outside
  :func:`~diablogpt_pytorch.kernels.use_reference`.

Reference implementation: :func:`lm_head_loss_reference`, the full logits and
``F.cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diablogpt_pytorch.kernels._switch import reference_enabled

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
    them. Matmuls run in the autocast dtype when autocast is on, else in the weight's dtype.
    ``chunk`` does not change the result beyond rounding."""
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else weight.dtype)
    if reference_enabled():
        return lm_head_loss_reference(hidden, weight, labels, pad_id)
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = _LMHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                              pad_id, chunk, compute_dtype, with_grads)
    return total / (labels != pad_id).sum().clamp(min=1)


def lm_head_loss_reference(hidden: Tensor, weight: Tensor, labels: Tensor, pad_id: int) -> Tensor:
    """The full (b, n, vocab) logits (``F.linear``, so in the autocast dtype under autocast), then
    ``F.cross_entropy`` in float32 over the labels that are not ``pad_id``."""
    logits = F.linear(hidden, weight)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                            ignore_index=pad_id, reduction="sum")
    return total / (labels != pad_id).sum().clamp(min=1)
