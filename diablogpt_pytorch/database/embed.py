"""Chunks -> embeddings (and the faiss index over them).

- :func:`tokenize`, :func:`bert_embed`: free text -> BERT ids -> pooled embeddings.
- :func:`embed_chunks_file_`: chunks (any range) -> a ``.npy`` of L2-normalised float32
  embeddings, ``<stem>.emb.npy``; the ``torchrun`` build (:mod:`.sharded`) runs it on each rank's
  range, the update (:mod:`.update`) on the new chunks. Chunks hold LM token ids; the embedder
  embeds each chunk's decoded text (``embedder.embed_chunks``, at build and at query time alike).
- :func:`chunks_to_index_and_embed`: chunks -> ``<stem>.emb.npy`` + ``<stem>.index`` (faiss, inner
  product = cosine similarity; built by :func:`~diablogpt_pytorch.database.index.build_index`).
"""
from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from diablogpt_pytorch.database import embedder as emb
from diablogpt_pytorch.database import index as idx
from diablogpt_pytorch._io import atomic_path, meta_path, trusted_meta, write_meta
from diablogpt_pytorch.database.chunks import open_chunks
from diablogpt_pytorch.database.provenance import (FORMAT_VERSION, PathLike, cached_meta, check_tokenizer,
                                                   embeddings_path_for, fingerprint, index_path_for,
                                                   lm_tokenizer, tokenizer_path_for)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- text -> ids


def tokenize(texts: Union[str, Sequence[str]], add_special_tokens: bool = True,
             embedder: Optional[str] = None) -> torch.Tensor:
    """Texts -> int64 (b, L) BERT ids, right-padded with the pad id ([CLS] ... [SEP] by default)."""
    if isinstance(texts, str):
        texts = [texts]
    tok = emb.get_tokenizer(embedder)
    # split_special_tokens: a literal "[PAD]" or "[SEP]" in the text is text, not a special id
    return tok(list(texts), add_special_tokens=add_special_tokens, padding=True,
               return_attention_mask=False, return_token_type_ids=False,
               return_tensors="pt", verbose=False, split_special_tokens=True)["input_ids"]


def bert_embed(token_ids: torch.Tensor, return_cls_repr: bool = False, pad_id: Optional[int] = None, embedder: Optional[str] = None,
               device: Union[str, torch.device] = "cpu", dtype=None) -> torch.Tensor:
    """BERT ids (b, L) (from :func:`tokenize`) -> float32 (b, hidden): masked mean of the last
    hidden states over the non-pad tokens, or the [CLS] vector with ``return_cls_repr``."""
    token_ids = torch.as_tensor(token_ids).long()
    if token_ids.ndim == 1:
        token_ids = token_ids.unsqueeze(0)
    if pad_id is None:
        pad_id = emb.tokenizer_info(embedder).pad_id
    mask = token_ids != pad_id
    mask[:, 0] |= ~mask.any(dim=1)  # an all-pad row still attends to its first token
    return emb.bert_forward(token_ids, mask, name=embedder, device=device,
                            return_cls_repr=return_cls_repr, dtype=dtype)


# ----------------------------------------------------------------------------- embeddings, index


def embedding_settings(embedder: Optional[str], use_cls_repr: bool, dtype, device, lm) -> dict[str, Any]:
    """How chunks are embedded (embedder identity and name, LM tokenizer, pooling, precision), as
    the embeddings' and the index's sidecars record it and queries must repeat it."""
    settings = {"embedder": emb.embedder_identity(embedder), "embedder_name": emb.resolve_embedder(embedder),
                # how chunk ids become the embedder's input: the LM tokenizer decodes them
                "tokenizer": lm.identity(),
                "pooling": "cls" if use_cls_repr else "mean",
                "dtype": str(emb.resolve_dtype(dtype, device)).replace("torch.", ""), "normalized": True}
    if settings["dtype"] == "bfloat16":
        # how bf16 is computed (bf16 weights since this key exists; autocast before): embeddings
        # made the old way do not count as up to date
        settings["bf16_mode"] = "weights"
    return settings


def check_embedder_matches_chunks(chunk_memmap_path: PathLike, embedder: Optional[str], lm) -> None:
    """Raise when the chunks were made with another LM tokenizer than ``lm`` or (for the
    embedder's own WordPiece) another embedder than ``embedder``."""
    meta, _ = trusted_meta(chunk_memmap_path)
    recorded = (meta or {}).get("inputs", {}).get("tokenizer")
    if lm.kind != "bert" or (recorded is not None and recorded.get("kind") != "bert"):
        # the chunks hold another LM tokenizer's ids: any embedder embeds their decoded text
        check_tokenizer(recorded, lm, chunk_memmap_path)
        return
    made_with = (meta or {}).get("inputs", {}).get("embedder")
    if made_with is not None and made_with != emb.embedder_identity(embedder):
        raise ValueError(
            f"{chunk_memmap_path} was tokenized with embedder {made_with!r} but embedder "
            f"{emb.embedder_identity(embedder)!r} was asked to embed it: pass embedder= the one the "
            f"chunks were made with (or set {emb.ENV_VAR}), or rebuild the chunks")


def embed_memmap(chunks: np.memmap, out_path: Path, *, embedder, device, use_cls_repr, dtype,
                 batch_size: int, desc: str = "embedding", tokenizer=None) -> None:
    """Embed the rows of ``chunks`` (int (n, C+1)) into ``out_path``, a float32 (n, hidden)
    ``.npy`` of normalised embeddings, ``batch_size`` rows per step, written atomically."""
    num_chunks, width = chunks.shape
    dim = emb.hidden_size(embedder)
    with atomic_path(out_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(num_chunks, dim))
        for start in tqdm(range(0, num_chunks, batch_size), desc=desc, unit="batch"):
            block = torch.from_numpy(np.array(chunks[start:start + batch_size, : width - 1]))
            out[start:start + len(block)] = emb.embed_chunks(
                block, embedder, device, return_cls_repr=use_cls_repr, dtype=dtype,
                normalize=True, tokenizer=tokenizer).numpy()
        out.flush()
        del out


def embed_chunks_file_(chunk_memmap_path: PathLike, num_chunks: int, chunk_size: int,
                       out_path: PathLike, *, start: int = 0, stop: Optional[int] = None,
                       use_cls_repr: bool = False, batch_size: int = 256,
                       embed_dim: Optional[int] = None, embedder: Optional[str] = None,
                       device: Union[str, torch.device] = "cpu", dtype=None,
                       force_reprocess: bool = False, tokenizer=None,
                       record: Optional[dict[str, Any]] = None,
                       desc: str = "embedding") -> dict[str, Any]:
    """The embedding stage: chunks ``[start, stop)`` (default all) -> ``out_path``.

    Checks that ``embedder`` and ``tokenizer`` match what the chunks were made with, embeds
    ``batch_size`` chunks per step (:func:`embed_memmap`) and writes the sidecar; reuses
    ``out_path`` while its sidecar records the same inputs. The sidecar records
    ``{"kind": "embeddings", chunks, num_chunks, chunk_size, **settings}`` updated with
    ``record`` (a shard records its range there). Nothing is written for an empty range.
    :func:`chunks_to_index_and_embed` calls it for the whole database, the sharded build
    (:mod:`diablogpt_pytorch.database.sharded`) for one rank's range.

    Returns:
        the embedding settings (:func:`embedding_settings`) the chunks were embedded with.
    """
    stop = num_chunks if stop is None else stop
    if not 0 <= start <= stop <= num_chunks:
        raise ValueError(f"chunk range [{start}, {stop}) does not lie in [0, {num_chunks})")
    chunks = open_chunks(chunk_memmap_path, num_chunks, chunk_size)
    lm = lm_tokenizer(tokenizer, embedder, path=tokenizer_path_for(chunk_memmap_path))
    check_embedder_matches_chunks(chunk_memmap_path, embedder, lm)
    dim = emb.hidden_size(embedder)
    if embed_dim is not None and embed_dim != dim:
        raise ValueError(f"embed_dim={embed_dim} but embedder {emb.resolve_embedder(embedder)!r} "
                         f"gives {dim}-dimensional embeddings: drop embed_dim or pass {dim}")
    settings = embedding_settings(embedder, use_cls_repr, dtype, device, lm)
    if stop == start:
        return settings
    out_path = Path(out_path)
    inputs = {"kind": "embeddings", "version": FORMAT_VERSION,
              "chunks": fingerprint(chunk_memmap_path), "num_chunks": num_chunks,
              "chunk_size": chunk_size, **settings, **(record or {})}
    what = "embeddings" if (start, stop) == (0, num_chunks) else f"embeddings [{start}, {stop})"
    if cached_meta([out_path], inputs, what, force_reprocess) is None:
        meta_path(out_path).unlink(missing_ok=True)
        logger.info("embedding chunks [%d, %d) into %s", start, stop, out_path)
        embed_memmap(chunks[start:stop], out_path, embedder=embedder, device=device,
                     use_cls_repr=use_cls_repr, dtype=settings["dtype"], batch_size=batch_size,
                     desc=desc, tokenizer=lm)
        write_meta(out_path, {"inputs": inputs, "build": uuid.uuid4().hex})
    return settings


def chunks_to_index_and_embed(num_chunks: int, chunk_size: int, chunk_memmap_path: PathLike, *,
                              use_cls_repr: bool = False, chunks_to_embeddings_batch_size: int = 256,
                              embed_dim: Optional[int] = None, index_file: Optional[PathLike] = None,
                              max_index_memory_usage: Union[str, int] = "100m",
                              current_memory_available: Union[str, int] = "1G",
                              embedder: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                              dtype=None, faiss_gpu: bool = False, force_reprocess: bool = False,
                              tokenizer=None, index: str = "auto",
                              search_params: Union[None, str, dict] = None,
                              rescore: Optional[int] = None):
    """Embed every chunk and index the embeddings.

    Embeddings (float32, L2-normalised, (num_chunks, hidden)) are streamed to
    ``<dir>/<stem>.emb.npy`` beside the chunks; the index is saved to ``index_file`` (default
    ``<dir>/<stem>.index``) by :func:`diablogpt_pytorch.database.index.build_index`: with ``index="auto"``
    an exact ``IndexFlatIP`` when it fits ``max_index_memory_usage``, else an approximate faiss
    index chosen under that budget, its search knobs tuned for recall@2 >= 0.9 (recorded in the
    index's sidecar and applied whenever the index is loaded).

    Args:
        chunks_to_embeddings_batch_size: chunks read, embedded and written per step (the embedder
            runs them ``embedder.forward_batch_size(device)`` rows per forward).
        embed_dim: if given, checked against the embedder's hidden size.
        embedder, device, dtype, use_cls_repr: how chunks are embedded (recorded in the sidecars,
            reused at query time by :class:`Retriever` and :func:`query_chunks_to_knn_`).
        faiss_gpu: return the index copied to the GPUs (the saved index is the CPU one).
        index: ``"auto"``, ``"exact"``, ``"autofaiss"`` (``current_memory_available`` is its build
            memory) or a faiss index factory string such as ``"HNSW32"`` or
            ``"IVF1024_HNSW32,PQ48np"``. The index is rebuilt when what it resolves to changes.
        search_params: ``nprobe`` / ``efSearch`` (``"nprobe=64"`` or a dict) instead of the
            tuned ones: used for the build's recall record and for the returned index.
        rescore: candidates per wanted neighbour that a search fetches and re-ranks by exact
            inner products with the embeddings file (None: 8 for a compressed PQ / SQ index, else
            off; 0: off). Recorded in the index's sidecar and re-applied when it is loaded.
        tokenizer: the LM tokenizer the chunks were made with (an LMTokenizer or a
            :func:`~diablogpt_pytorch.tokenizer.load_tokenizer` spec; None: the embedder's
            WordPiece). Each chunk's decoded text is embedded (``embedder.embed_chunks``).

    Returns:
        (faiss index (a :class:`~diablogpt_pytorch.database.index.RescoredIndex` when rescoring),
        embeddings: read-only float32 memmap (num_chunks, hidden)).
    """
    emb_path = embeddings_path_for(chunk_memmap_path)
    index_path = Path(index_file) if index_file is not None else index_path_for(chunk_memmap_path)
    settings = embed_chunks_file_(
        chunk_memmap_path, num_chunks, chunk_size, emb_path, use_cls_repr=use_cls_repr,
        batch_size=chunks_to_embeddings_batch_size, embed_dim=embed_dim, embedder=embedder,
        device=device, dtype=dtype, force_reprocess=force_reprocess, tokenizer=tokenizer)
    dim = emb.hidden_size(embedder)
    embeddings = np.load(emb_path, mmap_mode="r")

    index_inputs = {"kind": "index", "version": FORMAT_VERSION, "embeddings": fingerprint(emb_path),
                    **idx.build_inputs(index, num_chunks, dim, max_index_memory_usage,
                                       current_memory_available, rescore=rescore),
                    "num_chunks": num_chunks, "chunk_size": chunk_size, **settings}
    if cached_meta([index_path], index_inputs, "faiss index", force_reprocess) is not None:
        built = idx.read_index(index_path, search_params=search_params, embeddings=embeddings)
    else:
        meta_path(index_path).unlink(missing_ok=True)
        built = idx.build_index(embeddings, emb_path, index_path, index=index,
                                max_index_memory_usage=max_index_memory_usage,
                                current_memory_available=current_memory_available,
                                search_params=search_params, rescore=rescore,
                                meta={"inputs": index_inputs, "build": uuid.uuid4().hex})
    if faiss_gpu:
        built = idx.to_gpu(built)
    return built, embeddings
