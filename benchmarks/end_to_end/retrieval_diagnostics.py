"""Where does retrieval's information go? Diagnostics of a DIABLOGPT on held-out sequences.

Used by ``retrieval_gain.py --diagnose`` at every evaluation; importable on its own:

    from retrieval_diagnostics import diagnose
    report = diagnose(model, wrapper.valid_ds, batches=4, autocast=wrapper.autocast)

For each chunked cross-attention (CCA) layer it measures, over the held-out windows, the share of
attention on the learned null key, on neighbour tokens, and on the *aligned* continuation token
(the neighbour token at the same offset in the continuation as the token being predicted, the one
a copy would read when the neighbour is a near-duplicate); per position in the chunk, the loss
with retrieval minus the loss without (same weights); and, with ``grads=True``, the gradient norm
reaching the encoder, the CCA layers and the rest of the decoder on one training batch.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from diablogpt_pytorch import kernels


@contextmanager
def _capture_cca(model) -> list:
    """Record every decoder CCA layer's attention probabilities (b*w, h, C, 1 + K*2C) while active."""
    captured: list = []
    original_attention = kernels.attention  # the layers look it up on the package at each call
    inside = {"cca": False}

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        if inside["cca"]:
            scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            captured.append(scores.softmax(-1).detach())
        return original_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                  is_causal=is_causal)

    def enter(*_):
        inside["cca"] = True

    def leave(*_):
        inside["cca"] = False

    handles = []
    for layer_id in model.cca_layer_ids:  # the ChunkedCrossAttention modules
        cca = model._cca(layer_id).fn
        handles += [cca.register_forward_pre_hook(enter), cca.register_forward_hook(leave)]
    kernels.attention = attention
    try:
        yield captured
    finally:
        kernels.attention = original_attention
        inside["cca"] = False
        for handle in handles:
            handle.remove()


@torch.no_grad()
def diagnose(model, dataset, *, batches: int = 4, batch_size: int = 8,
             autocast: Optional[Callable] = None) -> dict:
    """Attention shares per CCA layer and the per-offset loss gain on held-out sequences."""
    C = model.chunk_size
    was_training = model.training
    model.eval()
    ctx = autocast or nullcontext
    layers = len(model.cca_layer_ids)
    null = [0.0] * layers
    aligned = [0.0] * layers
    real = [0.0] * layers
    count = [0] * layers
    gain_sum = torch.zeros(C)
    gain_count = torch.zeros(C)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    try:
        for i, (seq, retrieved) in enumerate(loader):
            if i >= batches:
                break
            inputs, labels = seq[:, :-1], seq[:, 1:]
            b, n = inputs.shape
            with _capture_cca(model) as captured, ctx():
                logits = model(inputs, retrieved)
            with ctx():
                plain = model(inputs, None)
            nll = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none",
                                  ignore_index=model.pad_id)
            nll0 = F.cross_entropy(plain.float().transpose(1, 2), labels, reduction="none",
                                   ignore_index=model.pad_id)
            valid = labels != model.pad_id
            # offset in the CCA window: position p = (u+1)C - 1 + i has offset i (0 = the last
            # token of the chunk that retrieved)
            positions = torch.arange(n)
            offset = (positions - (C - 1)) % C
            seen = (positions >= C - 1)[None, :] & valid
            diff = (nll0 - nll)[seen]
            gain_sum.index_add_(0, offset.expand(b, n)[seen], diff)
            gain_count.index_add_(0, offset.expand(b, n)[seen], torch.ones_like(diff))

            k = retrieved.shape[2]
            windows = (n - (C - 1)) // C  # windows whose C queries are all real positions
            for layer, probs in enumerate(captured):  # (b * w, h, C, 1 + K*2C)
                probs = probs.reshape(b, -1, *probs.shape[1:])[:, :windows]
                null[layer] += probs[..., 0].mean().item()
                real[layer] += probs[..., 1:].sum(-1).mean().item()
                # the aligned continuation token of each neighbour: key 1 + j*2C + C + i for query i
                idx = torch.arange(C)
                keys = torch.stack([1 + j * 2 * C + C + idx for j in range(k)], dim=-1)  # (C, K)
                picked = probs.gather(-1, keys.expand(*probs.shape[:-1], k))
                aligned[layer] += picked.sum(-1).mean().item()
                count[layer] += 1
    finally:
        model.train(was_training)
    return dict(
        null_share=[x / max(c, 1) for x, c in zip(null, count)],
        neighbour_share=[x / max(c, 1) for x, c in zip(real, count)],
        aligned_share=[x / max(c, 1) for x, c in zip(aligned, count)],
        gain_by_offset=(gain_sum / gain_count.clamp(min=1)).tolist(),
    )


def gradient_norms(model, seq: torch.Tensor, retrieved: torch.Tensor,
                   autocast: Optional[Callable] = None) -> dict:
    """Gradient norm of the loss on one batch, by part: encoder (with to_enc), CCA layers, rest."""
    ctx = autocast or nullcontext
    model.zero_grad(set_to_none=True)
    with ctx():
        loss = model(seq, retrieved, return_loss=True)
    loss.backward()
    parts = {"encoder": 0.0, "cca": 0.0, "decoder": 0.0}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        part = ("encoder" if name.startswith(("encoder.", "to_enc.")) else
                "cca" if any(name.startswith(f"layers.{i}.1.") for i in model.cca_layer_ids)
                else "decoder")
        parts[part] += p.grad.float().pow(2).sum().item()
    model.zero_grad(set_to_none=True)
    return {k: v ** 0.5 for k, v in parts.items()}


@torch.no_grad()
def branch_scales(model, seq: torch.Tensor, retrieved: torch.Tensor,
                  autocast: Optional[Callable] = None) -> dict:
    """Root-mean-square size of what each part adds to the decoder's residual stream on one
    batch (eval mode): the token embedding, and per decoder layer its self-attention, chunked
    cross-attention and feed-forward branches (``out - in`` of each residual sub-layer).

    At initialisation this shows how loud retrieval is next to the tokens: a CCA branch much
    larger than the embedding means the stream the LM head reads is mostly neighbour noise until
    the model learns to quiet it."""
    ctx = autocast or nullcontext
    sizes: dict = {}
    handles = []

    def rms(t: torch.Tensor) -> float:
        return t.float().pow(2).mean().sqrt().item()

    def record(name):
        def hook(_module, inputs, output):
            sizes[name] = rms(output - inputs[0])
        return hook

    sizes["embedding"] = rms(model.token_emb(seq[:, :-1]))
    for i, block in enumerate(model.layers):
        for part in ("attn", "cca", "ff"):
            sub = getattr(block, part)
            if sub is not None:
                handles.append(sub.register_forward_hook(record(f"layer{i + 1}.{part}")))
    was_training = model.training
    model.eval()
    try:
        with ctx():
            model(seq[:, :-1], retrieved)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sizes
