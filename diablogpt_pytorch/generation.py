"""Sampling from DIABLOGPT with retrieval at chunk boundaries, by cached incremental decoding.

The prompt is processed in one forward pass (its complete chunks retrieved in one batch); then
each new token costs one cached decoder step (:meth:`DIABLOGPT.decode`). When a chunk completes,
its neighbours are retrieved (formatted exactly as at index time by the retriever), encoded once,
and their chunked cross-attention keys/values cached; old neighbours are never re-encoded. The
logits equal a full forward over the same prefix with the same neighbours. Prompts of different
lengths share the forward pass over the shortest one; each longer row is then fed its own prompt
tokens one step at a time while the others sample, so every row keeps its own chunk boundaries.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence, Union

import torch
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
    probs = _probabilities(logits, temperature, filter_fn, filter_thres)
    if generator is not None and generator.device.type != probs.device.type:
        uniform = torch.rand(probs.shape[0], generator=generator, device=generator.device)
        return inverse_cdf_sample(probs, uniform.to(probs.device))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _probabilities(logits: Tensor, temperature: float, filter_fn: Optional[Callable],
                   filter_thres: float) -> Tensor:
    """softmax(filter_fn(logits, filter_thres) / temperature) in float32, row by row."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    logits = logits.float()
    if filter_fn is not None:
        logits = filter_fn(logits, filter_thres)
    return (logits / temperature).softmax(dim=-1)


def _sample_rows(logits: Tensor, temperature: float, filter_fn: Optional[Callable], filter_thres: float,
                 generators: Sequence[torch.Generator], rows: Tensor) -> Tensor:
    """Next token ids (b,) with one generator per row: each row in ``rows`` (bool (b,)) draws one
    uniform from its own generator and samples by inverse CDF, so its sample does not depend on
    the other rows; the other rows draw nothing (their result is a placeholder)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = _probabilities(logits, temperature, filter_fn, filter_thres)
    uniform = torch.zeros(probs.shape[0])
    for r in rows.nonzero().flatten().tolist():
        g = generators[r]
        uniform[r] = torch.rand(1, generator=g, device=g.device).item()
    return inverse_cdf_sample(probs, uniform.to(probs.device))


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
    start: Union[Tensor, Sequence, None] = None,
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
    generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    show_progress: bool = False,
    on_retrieve: Optional[Callable[[int, Tensor, Tensor], None]] = None,
) -> Tensor:
    """Sample continuations with retrieval at every chunk boundary.

    Args:
        model: a :class:`~diablogpt_pytorch.DIABLOGPT` (put in eval mode for the call).
        retriever: object with ``retrieve(chunk_tokens (n, C), k, exclude_doc_ids=None) ->
            (n, k, 2C)`` (e.g. :class:`diablogpt_pytorch.database.retriever.Retriever`); needed when
            ``use_retrieval`` unless every completed chunk's neighbours are in ``retrieved``.
        start: prompt ids (t,) or (b, t), or a list of b prompts of different lengths (each a
            list of ids or a 1-D tensor); None starts ``batch_size`` rows from ``eos_id`` (the
            document separator, i.e. "start of a document"). Every row starts at position 0, so
            its chunk boundaries, and its retrievals, are those of generating it alone: the rows
            share one forward pass over the shortest prompt's length, then a row still inside its
            prompt is fed its own prompt tokens, one per step, while the others sample.
        retrieved: neighbours (b, n, K, 2C) of chunks 0..n-1 of every row, n at least the longest
            prompt's complete chunks; chunks past n are retrieved. None retrieves them all (the
            shared prefix's in one batch).
        filter_fn, filter_thres: logit filter (``top_k`` keeps ceil((1-thres) * vocab) tokens;
            ``top_p`` keeps the smallest set with probability >= thres); None samples the full
            distribution.
        temperature: 0 is greedy.
        max_new_tokens: at most this many new tokens per row after its own prompt (default: up
            to ``model.max_seq_len``); 0 returns the prompts (right-padded with ``pad_id``).
        eos_id: each row stops at its own first generated ``eos_id`` and is padded after it.
        pad_id: padding id (default ``model.pad_id``).
        num_neighbors: K, neighbours per chunk (as in training).
        use_retrieval: False decodes the same weights without retrieval.
        exclude_doc_ids: per row, document ids whose chunks must not be retrieved.
        generator: a ``torch.Generator`` for the whole batch, or a list of one per row: each row
            then draws one uniform from its own generator per sampled token (inverse CDF), so a
            row's sample is the one generating it alone with that generator gives.
        on_retrieve: called as ``on_retrieve(chunk_index, chunk_tokens (b, C), neighbours
            (b, K, 2C))`` for every retrieval (for inspection and tests).

    Returns:
        LongTensor (b, L) with L <= model.max_seq_len: each row's prompt followed by its generated
        tokens, padded with ``pad_id`` after its end; generation ends when every row has emitted
        ``eos_id`` or reached its length limit. Row i equals generating prompt i alone, up to the
        float rounding of a different batch and prompt split (greedy tokens are equal in the tests).
    """
    C = model.chunk_size
    pad_id = model.pad_id if pad_id is None else pad_id
    device = next(model.parameters()).device
    if start is None:
        if eos_id is None:
            raise ValueError("generate needs a prompt (start) or eos_id to start from")
        start = torch.full((batch_size, 1), eos_id, dtype=torch.long)
    start, lengths = _prompts(start, pad_id)
    b, t = start.shape  # t: the longest prompt
    t0 = int(lengths.min())  # every row has at least t0 prompt tokens
    if t >= model.max_seq_len:
        row = int(lengths.argmax())
        which = "the prompt" if t0 == t else f"prompt {row}"
        raise ValueError(f"{which} has {t} tokens; max_seq_len={model.max_seq_len} leaves no room to "
                         f"generate: pass at most {model.max_seq_len - 1} tokens per prompt")
    if max_new_tokens is not None and max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    if max_new_tokens == 0:  # nothing to generate
        return start.clone()
    if isinstance(generator, (list, tuple)) and len(generator) != b:
        raise ValueError(f"generator: got a list of {len(generator)} generators for {b} prompts; pass "
                         "one per row (or one torch.Generator)")
    if retrieved is not None:
        retrieved = torch.as_tensor(retrieved)
        if retrieved.ndim != 4 or retrieved.shape[0] != b or retrieved.shape[1] < t // C:
            raise ValueError(f"retrieved must be (b={b}, n >= {t // C}, K, 2C) neighbours of every "
                             f"prompt's complete chunks; got shape {tuple(retrieved.shape)}")
    # each row's own length limit: its prompt plus max_new_tokens, at most max_seq_len
    limits = (torch.full_like(lengths, model.max_seq_len) if max_new_tokens is None
              else (lengths + max_new_tokens).clamp(max=model.max_seq_len))
    limit = int(limits.max())
    # the chunks whose neighbours are fed: the prompts' complete ones, and each one completed
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
        # the shared prompt length t0 (all of every prompt when they have one length): neighbours
        # of its complete chunks in one batch, then one forward pass
        prompt_neighbours = None
        if use_retrieval and t0 // C > 0:
            if retrieved is not None:
                prompt_neighbours = retrieved[:, : t0 // C].long()
            else:
                chunks = start[:, : (t0 // C) * C].reshape(b, t0 // C, C)
                prompt_neighbours = _retrieve(retriever, chunks, num_neighbors, active, pad_id, exclude_doc_ids)
            if on_retrieve is not None:
                for u in range(t0 // C):
                    on_retrieve(u, start[:, u * C:(u + 1) * C], prompt_neighbours[:, u])
        with autocast:
            logits = model.decode(start[:, :t0].to(device), cache, _to(prompt_neighbours, device))[:, -1]

        progress = tqdm(total=limit - t0, desc="generate", disable=not show_progress, leave=False)
        length = t0
        while True:
            in_prompt = lengths > length  # rows fed their own next prompt token, not a sample
            if isinstance(generator, (list, tuple)):
                token = _sample_rows(logits, temperature, filter_fn, filter_thres, generator,
                                     active & ~in_prompt)
            else:
                token = sample_next(logits, temperature, filter_fn, filter_thres, generator)
            token = token.cpu()
            if length < t:
                token = torch.where(in_prompt, start[:, length], token)
            token = torch.where(active, token, torch.full_like(token, pad_id))
            out[:, length] = token
            length += 1
            progress.update(1)
            if eos_id is not None:
                active &= (token != eos_id) | in_prompt
            active &= limits > length
            if length >= limit or not active.any():
                break
            neighbours = None
            if use_retrieval and length % C == 0:  # the token just placed completes every row's chunk u
                u = length // C - 1
                if retrieved is not None and retrieved.shape[1] > u:
                    neighbours = retrieved[:, u:u + 1].long()
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


def _prompts(start, pad_id: int) -> tuple[Tensor, Tensor]:
    """(prompts (b, t) right-padded with ``pad_id``, lengths (b,)) from a (t,) or (b, t) tensor (or
    nested list of one length) or a list of b prompts of any lengths."""
    if isinstance(start, (list, tuple)):
        if not start:
            raise ValueError("start is an empty list: pass at least one prompt (or start=None)")
        is_row = [isinstance(row, (list, tuple)) or getattr(row, "ndim", 0) >= 1 for row in start]
        if all(is_row):
            rows = [torch.as_tensor(row, dtype=torch.long) for row in start]
            for i, row in enumerate(rows):
                if row.ndim != 1:
                    raise ValueError(f"prompt {i} has shape {tuple(row.shape)}: each prompt in the "
                                     "list must be a flat sequence of token ids")
                if len(row) == 0:
                    raise ValueError(f"prompt {i} is empty: pass at least one token per prompt")
            lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
            prompts = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
            for i, row in enumerate(rows):
                prompts[i, : len(row)] = row
            return prompts, lengths
        if any(is_row):
            raise ValueError("start mixes prompts (sequences) and single token ids: pass one prompt "
                             "as a flat list of ids, or a list of prompts")
    prompts = torch.as_tensor(start, dtype=torch.long)
    if prompts.ndim == 1:
        prompts = prompts[None]
    if prompts.ndim != 2:
        raise ValueError(f"start must be (t,), (b, t) or a list of prompts; got shape "
                         f"{tuple(prompts.shape)}")
    if prompts.shape[1] == 0:
        raise ValueError("the prompt is empty: pass at least one token (or start=None)")
    return prompts, torch.full((prompts.shape[0],), prompts.shape[1], dtype=torch.long)


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
