"""Sampling from DIABLOGPT with retrieval at chunk boundaries, by cached incremental decoding.

The prompt is processed in one forward pass (its complete chunks retrieved in one batch); then
each new token costs one cached decoder step (:meth:`DIABLOGPT.decode`). When a chunk completes,
its neighbours are retrieved (formatted exactly as at index time by the retriever), encoded once,
and their chunked cross-attention keys/values cached; old neighbours are never re-encoded. The
logits equal a full forward over the same prefix with the same neighbours.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

__all__ = ["top_k", "top_p", "sample_next", "inverse_cdf_sample", "generate", "ids_to_text"]


def top_k(logits: Tensor, thres: float = 0.9, k: Optional[int] = None) -> Tensor:
    """Keep the k highest logits (default k = ceil((1 - thres) * vocab), so thres=0.9 keeps the top
    10%), set the rest to -inf. logits (..., vocab)."""
    if k is None:
        k = max(1, math.ceil((1.0 - thres) * logits.shape[-1]))
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Nucleus filtering: keep the smallest set of highest-probability tokens whose total
    probability reaches ``thres`` (always at least one token); the rest become -inf."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
    drop_sorted = mass_before >= thres
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: Tensor, temperature: float = 1.0, filter_fn: Optional[Callable] = top_k,
                filter_thres: float = 0.9, generator: Optional[torch.Generator] = None) -> Tensor:
    """Next token ids (b,) from logits (b, vocab): greedy when ``temperature == 0``, otherwise a
    sample from softmax(filter_fn(logits, filter_thres) / temperature).

    ``generator`` may live on another device than ``logits`` (a CPU generator with a model on
    CUDA): the sample is then drawn by inverting the distribution's CDF at one uniform per row
    taken from the generator, so only those b numbers cross devices."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    logits = logits.float()
    if filter_fn is not None:
        logits = filter_fn(logits, filter_thres)
    probs = (logits / temperature).softmax(dim=-1)
    if generator is not None and generator.device.type != probs.device.type:
        uniform = torch.rand(probs.shape[0], generator=generator, device=generator.device)
        return inverse_cdf_sample(probs, uniform.to(probs.device))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def inverse_cdf_sample(probs: Tensor, uniform: Tensor) -> Tensor:
    """Token ids (b,) with P(i) = probs[:, i] (rows summing to about 1) for ``uniform`` (b,) drawn
    from U[0, 1): the first index whose cumulative probability exceeds ``uniform`` times the
    row's total. A token of probability 0 is never returned (rounding at the top end falls back
    to the last token of positive probability)."""
    cdf = probs.cumsum(dim=-1)
    target = uniform.to(cdf.dtype).unsqueeze(-1) * cdf[..., -1:]
    index = (cdf <= target).sum(dim=-1)
    last_positive = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(dim=-1)
    return torch.minimum(index, last_positive)


def _retrieve(retriever, chunks: Tensor, num_neighbors: int, active: Tensor, pad_id: int,
              exclude_doc_ids=None) -> Tensor:
    """Neighbours (b, c, K, 2C) for chunk tokens (b, c, C); rows that are finished get padding."""
    b, c, chunk_size = chunks.shape
    out = torch.full((b, c, num_neighbors, 2 * chunk_size), pad_id, dtype=torch.long)
    rows = active.nonzero().flatten().tolist()
    if rows:
        excl = None if exclude_doc_ids is None else [exclude_doc_ids[r] for r in rows]
        out[rows] = retriever.retrieve(chunks[rows].cpu(), num_neighbors, exclude_doc_ids=excl).long()
    return out


@torch.no_grad()
def generate(
    model,
    retriever=None,
    start: Optional[Tensor] = None,
    retrieved: Optional[Tensor] = None,
    filter_fn: Optional[Callable] = top_k,
    filter_thres: float = 0.9,
    temperature: float = 1.0,
    max_new_tokens: Optional[int] = None,
    eos_id: Optional[int] = None,
    pad_id: Optional[int] = None,
    num_neighbors: int = 2,
    batch_size: int = 1,
    use_retrieval: bool = True,
    exclude_doc_ids: Optional[Sequence] = None,
    generator: Optional[torch.Generator] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    show_progress: bool = False,
    on_retrieve: Optional[Callable[[int, Tensor, Tensor], None]] = None,
) -> Tensor:
    """Sample continuations with retrieval at every chunk boundary.

    Args:
        model: a :class:`~diablogpt_pytorch.DIABLOGPT` (put in eval mode for the call).
        retriever: object with ``retrieve(chunk_tokens (n, C), k, exclude_doc_ids=None) ->
            (n, k, 2C)`` (e.g. :class:`diablogpt_pytorch.retrieval.Retriever`); needed when
            ``use_retrieval`` unless every completed chunk's neighbours are in ``retrieved``.
        start: prompt ids (b, t); None starts ``batch_size`` rows from ``eos_id`` (the document
            separator, i.e. "start of a document"). All rows of a batch share the prompt length.
        retrieved: neighbours (b, t // C, K, 2C) for the prompt's complete chunks; None retrieves
            them in one batch.
        filter_fn, filter_thres: logit filter (``top_k`` keeps ceil((1-thres) * vocab) tokens;
            ``top_p`` keeps the smallest set with probability >= thres); None samples the full
            distribution.
        temperature: 0 is greedy.
        max_new_tokens: at most this many new tokens (default: up to ``model.max_seq_len``); 0
            returns the prompt.
        eos_id: each row stops at its own first generated ``eos_id`` and is padded after it.
        pad_id: padding id (default ``model.pad_id``).
        num_neighbors: K, neighbours per chunk (as in training).
        use_retrieval: False decodes the same weights without retrieval.
        exclude_doc_ids: per row, document ids whose chunks must not be retrieved.
        on_retrieve: called as ``on_retrieve(chunk_index, chunk_tokens (b, C), neighbours
            (b, K, 2C))`` for every retrieval (for inspection and tests).

    Returns:
        LongTensor (b, L) with L <= model.max_seq_len: the prompt followed by the generated
        tokens; generation ends when every row has emitted ``eos_id`` or L reaches the limit.
    """
    C = model.chunk_size
    pad_id = model.pad_id if pad_id is None else pad_id
    device = next(model.parameters()).device
    if start is None:
        if eos_id is None:
            raise ValueError("generate needs a prompt (start) or eos_id to start from")
        start = torch.full((batch_size, 1), eos_id, dtype=torch.long)
    start = torch.as_tensor(start, dtype=torch.long)
    if start.ndim == 1:
        start = start[None]
    b, t = start.shape
    if t == 0:
        raise ValueError("the prompt is empty: pass at least one token (or start=None)")
    if t >= model.max_seq_len:
        raise ValueError(f"the prompt has {t} tokens; max_seq_len={model.max_seq_len} leaves no room to generate")
    if max_new_tokens is not None and max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    limit = model.max_seq_len if max_new_tokens is None else min(model.max_seq_len, t + max_new_tokens)
    if limit == t:  # nothing to generate
        return start.clone()
    # the chunks whose neighbours are fed: the prompt's complete ones, and each one completed
    # before the last position (a chunk completing at the limit is never fed to the model)
    fed_chunks = max(t // C, (limit - 1) // C)
    if use_retrieval and retriever is None and (retrieved is None or fed_chunks > retrieved.shape[1]):
        raise ValueError(
            f"retrieval needs a retriever, or neighbours in `retrieved` for every chunk fed to the "
            f"model ({fed_chunks} chunks; got "
            f"{None if retrieved is None else retrieved.shape[1]}): pass retriever= or "
            "use_retrieval=False")

    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    out = torch.full((b, limit), pad_id, dtype=torch.long)
    out[:, :t] = start
    active = torch.ones(b, dtype=torch.bool)
    cache = model.init_cache(b, retrieval=use_retrieval, device=device, dtype=autocast_dtype)
    try:
        # prompt: neighbours of its complete chunks in one batch, then one forward pass
        prompt_neighbours = None
        if use_retrieval and t // C > 0:
            if retrieved is not None:
                prompt_neighbours = torch.as_tensor(retrieved)[:, : t // C].long()
            else:
                chunks = start[:, : (t // C) * C].reshape(b, t // C, C)
                prompt_neighbours = _retrieve(retriever, chunks, num_neighbors, active, pad_id, exclude_doc_ids)
            if on_retrieve is not None:
                for u in range(t // C):
                    on_retrieve(u, start[:, u * C:(u + 1) * C], prompt_neighbours[:, u])
        with autocast:
            logits = model.decode(start.to(device), cache, _to(prompt_neighbours, device))[:, -1]

        progress = tqdm(total=limit - t, desc="generate", disable=not show_progress, leave=False)
        length = t
        while True:
            token = sample_next(logits, temperature, filter_fn, filter_thres, generator).cpu()
            token = torch.where(active, token, torch.full_like(token, pad_id))
            out[:, length] = token
            length += 1
            progress.update(1)
            if eos_id is not None:
                active &= token != eos_id
            if length >= limit or not active.any():
                break
            neighbours = None
            if use_retrieval and length % C == 0:  # the token just placed completes chunk u
                u = length // C - 1
                if retrieved is not None and retrieved.shape[1] > u:
                    neighbours = torch.as_tensor(retrieved)[:, u:u + 1].long()
                else:
                    chunk = out[:, u * C:(u + 1) * C]
                    neighbours = _retrieve(retriever, chunk[:, None], num_neighbors, active, pad_id,
                                           exclude_doc_ids)
                if on_retrieve is not None:
                    on_retrieve(u, out[:, u * C:(u + 1) * C], neighbours[:, 0])
            with autocast:
                logits = model.decode(token[:, None].to(device), cache, _to(neighbours, device))[:, -1]
        progress.close()
    finally:
        model.train(was_training)
    return out[:, :length]


def _to(x: Optional[Tensor], device) -> Optional[Tensor]:
    return None if x is None else x.to(device)


def ids_to_text(ids: Union[Tensor, Sequence[int], Sequence[Sequence[int]]], embedder: Optional[str] = None,
                stop_at_eos: bool = False, tokenizer=None) -> Union[str, list[str]]:
    """Token ids back to text with the LM ``tokenizer`` (an ``LMTokenizer`` or a
    ``diablogpt_pytorch.tokenizer.load_tokenizer`` spec, e.g. ``wrapper.tokenizer``; default: the
    WordPiece of ``embedder``, the default embedder's when None).

    ids (L,) -> str, or (b, L) -> list of str. Padding is dropped; document separators (eos)
    become blank lines, or end the text with ``stop_at_eos``.
    """
    from diablogpt_pytorch.tokenizer import load_tokenizer

    info = load_tokenizer(tokenizer, embedder=embedder)
    ids = torch.as_tensor(ids)
    if ids.ndim == 2:
        return [ids_to_text(row, embedder, stop_at_eos, tokenizer=info) for row in ids]
    tokens = ids.tolist()
    if tokens and tokens[0] == info.eos_id:  # a generation started from the document separator
        tokens = tokens[1:]
    pieces, current = [], []
    for token in tokens:
        if token == info.pad_id:
            continue
        if token == info.eos_id:
            pieces.append(current)
            current = []
            if stop_at_eos:
                break
            continue
        current.append(token)
    pieces.append(current)
    texts = info.decode_batch(pieces)
    return "\n\n".join(text for text in texts if text) if not stop_at_eos else texts[0]
