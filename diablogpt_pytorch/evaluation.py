"""Held-out evaluation: loss, perplexity and bits per byte, with and without retrieval.

For a dataset of sequences ``seq`` (seq_len + 1 tokens) the evaluated tokens are the labels
``seq[:, 1:]`` that are not ``pad_id`` — the same tokens the training loss averages over.

- ``loss``: total nats over those label tokens / their number (token-weighted over the whole
  split, not a mean of batch means).
- ``perplexity``: ``exp(loss)``.
- ``bits_per_byte``: total nats / (ln 2 * ``num_bytes``). ``TrainingWrapper`` passes as
  ``num_bytes`` the UTF-8 bytes of the text the held-out token ids decode to, document by
  document, with the LM tokenizer (for a lossless tokenizer: exactly the documents' UTF-8 text;
  for the uncased WordPiece: the lower-cased, whitespace-normalised text it keeps). Because documents are packed and each sequence's first token is the
  previous sequence's last label, every non-pad token of the held-out token stream except its
  very first is a label exactly once; those tokens include one end-of-document token per document,
  which has no bytes of its own. So the figure is "nats spent predicting the whole held-out text
  (plus its document ends), per byte of that text", comparable across tokenizers.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


def autocast_context(device: Union[str, torch.device], bf16: bool):
    """``torch.autocast`` to bfloat16 on ``device``'s type when ``bf16``, else a no-op."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    use_retrieval: bool = True,
    batch_size: int = 4,
    device: Optional[Union[str, torch.device]] = None,
    bf16: bool = False,
    num_bytes: Optional[int] = None,
    max_batches: Optional[int] = None,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Token-weighted loss of ``model`` on every sequence of ``dataset`` (in order).

    Args:
        model: a DIABLOGPT; put in eval mode for the call and restored afterwards.
        dataset: yields (seq (n+1,), retrieved (n/C, K, 2C)), e.g. DIABLOGPTDataset.
        use_retrieval: False passes ``retrieved=None`` (the same weights without retrieval).
        num_bytes: bytes of text the label tokens cover; gives ``bits_per_byte`` (else None).
        max_batches: evaluate only the first batches (then ``bits_per_byte`` is None, since the
            byte count covers the whole split).

    Returns:
        dict(loss, perplexity, bits_per_byte, nats, tokens, sequences, retrieval).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pad_id = model.pad_id
    was_training = model.training
    model.eval()
    total_nats, total_tokens, sequences, batches = 0.0, 0, 0, 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    desc = "eval " + ("with retrieval" if use_retrieval else "without retrieval")
    try:
        for seq, retrieved in tqdm(loader, desc=desc, disable=not progress, leave=False):
            if max_batches is not None and batches >= max_batches:
                break
            seq = seq.to(device)
            retrieved = retrieved.to(device) if use_retrieval else None
            inputs, labels = seq[:, :-1], seq[:, 1:]
            with autocast_context(device, bf16):
                logits = model(inputs, retrieved)
            nats = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=pad_id,
                reduction="sum",
            )
            total_nats += nats.item()
            total_tokens += int((labels != pad_id).sum())
            sequences += seq.shape[0]
            batches += 1
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("the evaluation set has no non-padding label tokens")
    loss = total_nats / total_tokens
    complete = max_batches is None or sequences == len(dataset)
    bpb = total_nats / (math.log(2) * num_bytes) if (num_bytes and complete) else None
    return dict(
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_byte=bpb,
        nats=total_nats,
        tokens=total_tokens,
        sequences=sequences,
        retrieval=use_retrieval,
    )
