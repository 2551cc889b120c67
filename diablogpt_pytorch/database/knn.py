"""The neighbour search: embeddings + index -> ``<stem>.knn<suffix>``, int32 (num_chunks, K), -1 = none.

- :func:`chunks_to_precalculated_knn_`: every database chunk's neighbours in the database.
- :func:`query_chunks_to_knn_`: neighbours in the database for chunks of other documents.
- The stages, shared with the ``torchrun`` build (:mod:`.sharded`) and the update
  (:mod:`.update`): :func:`knn_inputs`, :func:`tune_neighbour_search` (the knobs for the
  neighbour search's own recall, with its exclusions), :func:`search_neighbours` (one batch of
  queries: search, exclusions, ranking) and its loop :func:`search_neighbours_range_`,
  :func:`record_knn_` (the knn file's sidecar); :func:`index_settings`, :func:`query_embedder`,
  :func:`query_tokenizer` (how queries must be embedded to match an index).
"""
from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from diablogpt_pytorch.database import embedder as emb
from diablogpt_pytorch.database import index as idx
from diablogpt_pytorch._io import atomic_path, meta_path, read_meta, trusted_meta, write_meta
from diablogpt_pytorch.database.chunks import open_chunks, open_doc_ids
from diablogpt_pytorch.database.embed import chunks_to_index_and_embed
from diablogpt_pytorch.database.provenance import (FORMAT_VERSION, PathLike, cached_meta, check_tokenizer,
                                                   fingerprint, index_path_for, knn_path_for, lm_tokenizer)
from diablogpt_pytorch.database.sequences import sequence_documents_window, sequence_starts

logger = logging.getLogger(__name__)


def knn_inputs(index_path: PathLike, doc_ids_memmap_path: PathLike, num_chunks: int,
               num_nearest_neighbors: int, num_extra_neighbors: int, max_search_k: int, *,
               seqs_memmap_path: Optional[PathLike] = None,
               seq_len: Optional[int] = None,
               search_params: Union[None, str, dict] = None) -> dict[str, Any]:
    """What a knn file is made from (its sidecar's ``inputs``), the same for every build path."""
    inputs = {"kind": "knn", "version": FORMAT_VERSION, "index": fingerprint(index_path),
              "doc_ids": fingerprint(doc_ids_memmap_path), "num_chunks": num_chunks,
              "num_nearest_neighbors": num_nearest_neighbors,
              "num_extra_neighbors": num_extra_neighbors, "max_search_k": max_search_k,
              "sequences": None if seqs_memmap_path is None else {
                  "seqs": fingerprint(seqs_memmap_path), "seq_len": seq_len}}
    if search_params is not None:
        inputs["search_params"] = idx.parse_search_params(search_params)
    else:  # the search knobs are tuned for the neighbour file's recall (tune_neighbour_search)
        inputs["neighbour_recall_target"] = idx.RECALL_TARGET
    return inputs


def search_neighbours(index, queries: np.ndarray, start: int, doc_ids: np.ndarray, k: int, *,
                      num_extra_neighbors: int = 10, max_search_k: int = 4096,
                      seq_starts: Optional[np.ndarray] = None,
                      chunks_per_seq: Optional[int] = None) -> np.ndarray:
    """Neighbours of database chunks ``start .. start + len(queries) - 1`` (one search batch).

    ``queries`` are those chunks' embeddings. The chunk itself, its document and, with
    ``seq_starts`` (:func:`sequence_starts`) and ``chunks_per_seq``, every document of its
    training sequences (:func:`sequence_documents_window`) are excluded; the candidates left are
    ranked by score (:func:`diablogpt_pytorch.database.index.search_excluding`).

    Returns:
        int64 (len(queries), k) chunk ids, nearest first, -1 where none is left.
    """
    stop = start + len(queries)
    exclude = None
    if seq_starts is not None:
        if not chunks_per_seq:
            raise ValueError("seq_starts needs chunks_per_seq (seq_len // chunk_size)")
        exclude = sequence_documents_window(seq_starts, doc_ids, chunks_per_seq, start, stop)
    ids, _ = idx.search_excluding(
        index, queries, k, num_extra=num_extra_neighbors, self_ids=np.arange(start, stop),
        query_doc_ids=np.asarray(doc_ids[start:stop]), doc_ids=doc_ids, max_k=max_search_k,
        exclude_doc_ids=exclude)
    return ids


def search_neighbours_range_(index, embeddings: np.ndarray, out: np.ndarray, start: int,
                             stop: int, doc_ids: np.ndarray, k: int, *, batch_size: int = 4096,
                             num_extra_neighbors: int = 10, max_search_k: int = 4096,
                             seq_starts: Optional[np.ndarray] = None,
                             chunks_per_seq: Optional[int] = None, desc: str = "searching",
                             progress: bool = True) -> int:
    """The neighbour-search stage: :func:`search_neighbours` for chunks ``[start, stop)`` in
    batches of ``batch_size`` starting at ``start``, into ``out``.

    ``embeddings`` and ``out`` hold row ``i - start`` for chunk ``i`` (the whole database from 0
    in the single-process build, one rank's range in the sharded one). Search batches hold the
    same chunks in both builds when ``start`` is a multiple of ``batch_size``.

    Returns:
        how many rows have fewer than ``k`` neighbours (-1 slots).
    """
    incomplete = 0
    for a in tqdm(range(start, stop, batch_size), desc=desc, unit="batch", disable=not progress):
        b = min(stop, a + batch_size)
        ids = search_neighbours(index, embeddings[a - start:b - start], a, doc_ids, k,
                                num_extra_neighbors=num_extra_neighbors, max_search_k=max_search_k,
                                seq_starts=seq_starts, chunks_per_seq=chunks_per_seq)
        out[a - start:b - start] = ids
        incomplete += int((ids < 0).any(axis=1).sum())
    return incomplete


def _sample_exclusions(query_ids: np.ndarray, doc_ids: np.ndarray,
                       seq_starts: Optional[np.ndarray], chunks_per_seq: Optional[int]):
    """The documents each sampled chunk must not retrieve besides its own: int (b, D) padded with
    -1 (its training sequences' documents, as :func:`search_neighbours` excludes them), or None."""
    if seq_starts is None:
        return None
    rows = [sequence_documents_window(seq_starts, doc_ids, chunks_per_seq, int(i), int(i) + 1)[0]
            for i in query_ids]
    width = max([len(r) for r in rows] + [1])
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for j, r in enumerate(rows):
        out[j, :len(r)] = r
    return out


def neighbour_recall(index, embeddings, doc_ids: np.ndarray, k: int, *,
                     num_extra_neighbors: int = 10, max_search_k: int = 4096,
                     seq_starts: Optional[np.ndarray] = None, chunks_per_seq: Optional[int] = None,
                     num_queries: int = idx.RECALL_QUERIES, seed: int = 0, batch: int = 1024):
    """A function ``index -> recall`` of the neighbour search itself: on ``num_queries`` chunks
    drawn (seeded) from the database, the share of the exact neighbours (the ``k`` nearest chunks
    left after the exclusions of :func:`search_neighbours`: the chunk, its document, its training
    sequences' documents) that :func:`search_neighbours`'s search returns (at least as close as
    the exact k-th; ties count as found). The exact side is computed once, by brute force over
    ``embeddings`` (one (N, d) array or a list of shard arrays) in blocks of ``batch`` rows
    (memory: a few ``num_queries`` x ``batch`` arrays, whatever N)."""
    rows = embeddings if isinstance(embeddings, idx._Rows) else idx._Rows(embeddings)
    rng = np.random.default_rng(seed)
    qids = np.sort(rng.choice(rows.num, min(num_queries, rows.num), replace=False))
    queries = rows.take(qids)
    qdocs = np.asarray(doc_ids[qids], dtype=np.int64)
    excl = _sample_exclusions(qids, doc_ids, seq_starts, chunks_per_seq)
    best = np.full((len(qids), k), -np.inf, dtype=np.float32)
    for a, block in zip(range(0, rows.num, batch), rows.batches(batch)):
        scores = queries @ block.T
        block_docs = np.asarray(doc_ids[a:a + len(block)], dtype=np.int64)[None, :]
        banned = block_docs == qdocs[:, None]
        for j in range(0 if excl is None else excl.shape[1]):
            banned |= block_docs == excl[:, j:j + 1]
        scores[banned] = -np.inf
        local = qids - a
        inside = np.flatnonzero((local >= 0) & (local < len(block)))
        scores[inside, local[inside]] = -np.inf
        both = np.concatenate([best, scores], axis=1)
        best = -np.partition(-both, k - 1, axis=1)[:, :k]
    best = -np.sort(-best, axis=1)
    wanted = np.isfinite(best).sum(axis=1)  # fewer than k when too few chunks are allowed
    kth = best[:, -1]

    def recall(ix) -> float:
        ids, _ = idx.search_excluding(ix, queries, k, num_extra=num_extra_neighbors, self_ids=qids,
                                      query_doc_ids=qdocs, doc_ids=doc_ids, exclude_doc_ids=excl,
                                      max_k=max_search_k)
        valid = ids >= 0
        true = np.einsum("qd,qkd->qk", queries, rows.take(np.where(valid, ids, 0).reshape(-1))
                         .reshape(len(ids), k, -1))
        hits = (valid & (true >= kth[:, None] - 1e-5)).sum(axis=1)
        return float(np.minimum(hits, wanted).sum() / max(1, wanted.sum()))

    return recall


def tune_neighbour_search(index, embeddings, doc_ids: np.ndarray, k: int, *,
                          num_extra_neighbors: int = 10, max_search_k: int = 4096,
                          seq_starts: Optional[np.ndarray] = None,
                          chunks_per_seq: Optional[int] = None, tune_rescore: bool = True,
                          target: float = idx.RECALL_TARGET,
                          num_queries: int = idx.RECALL_QUERIES, seed: int = 0) -> dict[str, Any]:
    """Raise an approximate index's search knobs (and rescoring factor, with ``tune_rescore``)
    from those it has until the neighbour search reaches ``target`` recall against exact search
    with the same exclusions (:func:`neighbour_recall`, :func:`~diablogpt_pytorch.database.index.
    tune_search`). The index's own tuning targets each chunk's nearest vectors, mostly from its
    own document; the neighbour file wants the nearest from other documents, which lie farther
    and, in an IVF index, in lists a few probes miss. Leaves the knobs set on ``index``.

    Returns:
        ``{}`` for an exact index, else ``search_params``, ``rescore``, ``recall_at_k`` (the
        neighbour search's, measured on ``queries`` sampled chunks) and ``seconds``.
    """
    if not idx.search_knobs(index) and not isinstance(index, idx.RescoredIndex):
        return {}
    start = time.perf_counter()
    measure = neighbour_recall(index, embeddings, doc_ids, k,
                               num_extra_neighbors=num_extra_neighbors, max_search_k=max_search_k,
                               seq_starts=seq_starts, chunks_per_seq=chunks_per_seq,
                               num_queries=num_queries, seed=seed)
    before = idx.search_knobs(index)
    knobs, recall = idx.tune_search(index, embeddings, k=k, target=target, recall=measure,
                                    from_current=True, tune_rescore=tune_rescore)
    out = {"search_params": knobs, "rescore": int(getattr(index, "factor", 0)),
           "recall_at_k": round(recall, 4), "queries": min(num_queries, len(doc_ids)),
           "seconds": round(time.perf_counter() - start, 3)}
    level = logging.WARNING if recall < target else logging.INFO
    logger.log(level, "neighbour search (other documents, after exclusions): recall@%d %.3f on %d "
               "sampled chunks at %s (the index's own: %s), rescoring %d%s", k, recall,
               out["queries"], knobs or "its defaults", before or "-", out["rescore"],
               "" if recall >= target else f", below {target}")
    return out


def apply_neighbour_search(index, tuned: dict[str, Any]) -> None:
    """Set what :func:`tune_neighbour_search` chose on ``index`` (read again elsewhere)."""
    if not tuned:
        return
    idx.apply_search_params(index, tuned["search_params"])
    if isinstance(index, idx.RescoredIndex) and tuned.get("rescore"):
        index.factor = int(tuned["rescore"])


def record_knn_(knn_path: Path, inputs: dict[str, Any], incomplete: int, num_chunks: int,
                k: int, **stats: Any) -> None:
    """Write a finished knn file's sidecar (its inputs, ``incomplete_rows`` and ``stats``) and log
    the result."""
    if incomplete:
        logger.warning("%d of %d chunks have fewer than %d neighbours from other documents "
                       "(missing ones are -1)", incomplete, num_chunks, k)
    write_meta(knn_path, {"inputs": inputs, "stats": {"incomplete_rows": incomplete, **stats},
                          "build": uuid.uuid4().hex})
    logger.info("wrote %d x %d neighbours to %s", num_chunks, k, knn_path)


def chunks_to_precalculated_knn_(num_nearest_neighbors: int, num_chunks: int, chunk_size: int,
                                 chunk_memmap_path: PathLike, doc_ids_memmap_path: PathLike, *,
                                 num_extra_neighbors: int = 10, use_cls_repr: bool = False,
                                 chunks_to_embeddings_batch_size: int = 256,
                                 embed_dim: Optional[int] = None,
                                 index_file: Optional[PathLike] = None,
                                 max_index_memory_usage: Union[str, int] = "100m",
                                 current_memory_available: Union[str, int] = "1G",
                                 knn_batch_size: int = 4096, max_search_k: int = 4096,
                                 embedder: Optional[str] = None,
                                 device: Union[str, torch.device] = "cpu", dtype=None,
                                 faiss_gpu: bool = False, force_reprocess: bool = False,
                                 seqs_memmap_path: Optional[PathLike] = None,
                                 num_seqs: Optional[int] = None, seq_len: Optional[int] = None,
                                 tokenizer=None, index: str = "auto",
                                 search_params: Union[None, str, dict] = None,
                                 rescore: Optional[int] = None):
    """Precompute each chunk's K nearest neighbours from OTHER documents.

    Builds (or reuses) embeddings and index with :func:`chunks_to_index_and_embed`, then searches
    in batches of ``knn_batch_size`` straight from the embeddings memmap. Each query fetches
    ``K + num_extra_neighbors + 1`` candidates; the chunk itself (by id) and every chunk of its
    document (by ``doc_ids``) are excluded and rank last. A row left with fewer than K is
    searched again with twice the candidates, up to ``max_search_k``; slots still empty after
    that (the corpus has too few other-document chunks) hold -1.

    With ``seqs_memmap_path`` (and ``num_seqs``, ``seq_len``: the training sequences), every
    document packed into the same training sequence as the chunk is excluded too (see
    :func:`sequence_documents`): the paper's rule, so that no neighbour shows a sequence its own
    text. ``TrainingWrapper`` always passes them.

    ``index`` / ``search_params`` / ``rescore``: which faiss index, its search knobs and its
    rescoring factor (see :func:`chunks_to_index_and_embed`); with an approximate index the
    neighbours are approximate (recall@2 against exact search is recorded in the index's
    sidecar); exclusions apply to the rescored candidates. Without ``search_params`` (and on
    the CPU), the knobs (and a default rescoring factor) are first raised until this search
    reaches recall@K 0.9 against exact search with the same exclusions
    (:func:`tune_neighbour_search`; recorded under ``stats.neighbour_search`` in the knn file's
    sidecar).

    Writes ``<dir>/<stem>.knn<suffix>`` (``train.chunks.dat`` -> ``train.chunks.knn.dat``),
    int32 (num_chunks, num_nearest_neighbors), nearest first.

    Returns:
        (knn_path, faiss index)
    """
    if num_nearest_neighbors <= 0:
        raise ValueError(f"num_nearest_neighbors must be positive, got {num_nearest_neighbors}")
    if num_extra_neighbors < 0:
        raise ValueError(f"num_extra_neighbors must be >= 0, got {num_extra_neighbors}")
    doc_ids = open_doc_ids(doc_ids_memmap_path, num_chunks)
    seq_starts = sequence_starts(seqs_memmap_path, num_seqs, seq_len, chunk_size)
    faiss_index, embeddings = chunks_to_index_and_embed(
        num_chunks, chunk_size, chunk_memmap_path, use_cls_repr=use_cls_repr,
        chunks_to_embeddings_batch_size=chunks_to_embeddings_batch_size, embed_dim=embed_dim,
        index_file=index_file, max_index_memory_usage=max_index_memory_usage,
        current_memory_available=current_memory_available, embedder=embedder, device=device,
        dtype=dtype, faiss_gpu=faiss_gpu, force_reprocess=force_reprocess, tokenizer=tokenizer,
        index=index, search_params=search_params, rescore=rescore)
    index_path = Path(index_file) if index_file is not None else index_path_for(chunk_memmap_path)
    knn_path = knn_path_for(chunk_memmap_path)
    inputs = knn_inputs(index_path, doc_ids_memmap_path, num_chunks, num_nearest_neighbors,
                        num_extra_neighbors, max_search_k, seqs_memmap_path=seqs_memmap_path,
                        seq_len=seq_len, search_params=search_params)
    if cached_meta([knn_path], inputs, "knn", force_reprocess) is not None:
        return knn_path, faiss_index

    meta_path(knn_path).unlink(missing_ok=True)
    chunks_per_seq = None if seq_len is None else seq_len // chunk_size
    tuned = {}
    if search_params is None and not faiss_gpu:
        tuned = tune_neighbour_search(
            faiss_index, embeddings, doc_ids, num_nearest_neighbors,
            num_extra_neighbors=num_extra_neighbors, max_search_k=max_search_k,
            seq_starts=seq_starts, chunks_per_seq=chunks_per_seq, tune_rescore=rescore is None)
    with atomic_path(knn_path) as tmp:
        knn = np.memmap(tmp, dtype=np.int32, mode="w+", shape=(num_chunks, num_nearest_neighbors))
        incomplete = search_neighbours_range_(
            faiss_index, embeddings, knn, 0, num_chunks, doc_ids, num_nearest_neighbors,
            batch_size=knn_batch_size, num_extra_neighbors=num_extra_neighbors,
            max_search_k=max_search_k, seq_starts=seq_starts, chunks_per_seq=chunks_per_seq)
        knn.flush()
        del knn
    record_knn_(knn_path, inputs, incomplete, num_chunks, num_nearest_neighbors,
                **({"neighbour_search": tuned} if tuned else {}))
    return knn_path, faiss_index


def index_settings(index_path: Path) -> dict[str, Any]:
    meta, why_not = trusted_meta(index_path)
    if meta is None or "inputs" not in meta:
        raise FileNotFoundError(
            f"{why_not or f'{index_path} has no build record'}: the index was not built (or was "
            "replaced since it was built) by chunks_to_index_and_embed, so how to embed queries "
            "for it is unknown; rebuild it (REPROCESS=1)")
    return meta["inputs"]


def query_embedder(settings: dict[str, Any], embedder: Optional[str], index_path: Path) -> str:
    recorded = settings["embedder_name"]
    if embedder is not None and emb.embedder_identity(embedder) != settings["embedder"]:
        raise ValueError(f"{index_path} was built with embedder {settings['embedder']!r}, not "
                         f"{emb.embedder_identity(embedder)!r}: queries must be embedded the same "
                         "way; drop embedder= or rebuild the index")
    if emb.embedder_identity(recorded) != settings["embedder"]:
        raise ValueError(f"{index_path} was built with embedder {settings['embedder']!r} but "
                         f"{recorded!r} now resolves to {emb.embedder_identity(recorded)!r}: rebuild")
    return recorded


def query_tokenizer(settings: dict[str, Any], tokenizer, embedder_name: str, index_path: Path):
    """The LM tokenizer for queries against ``index_path``: ``tokenizer`` (None: the embedder's
    WordPiece), checked against the one recorded in the index's sidecar."""
    lm = lm_tokenizer(tokenizer, embedder_name)
    recorded = settings.get("tokenizer")
    if recorded is not None and recorded.get("fingerprint") != lm.fingerprint():
        raise ValueError(
            f"{index_path} indexes chunks of LM tokenizer {recorded.get('name')!r} "
            f"({recorded.get('kind')}, {recorded.get('vocab_size')} ids) but queries would use "
            f"{lm.name!r} ({lm.kind}): pass tokenizer= the database's tokenizer (a trained one is "
            f"stored beside the chunks as <stem>.tokenizer.json)")
    return lm


def query_chunks_to_knn_(num_nearest_neighbors: int, num_chunks: int, chunk_size: int,
                         chunk_memmap_path: PathLike, db_chunk_memmap_path: PathLike, *,
                         db_index_file: Optional[PathLike] = None, knn_path: Optional[PathLike] = None,
                         batch_size: int = 128, device: Union[str, torch.device] = "cpu",
                         embedder: Optional[str] = None, faiss_gpu: bool = False,
                         force_reprocess: bool = False, tokenizer=None,
                         search_params: Union[None, str, dict] = None,
                         rescore: Optional[int] = None) -> Path:
    """Neighbours in an existing database for chunks of OTHER documents (e.g. a held-out split).

    The query chunks (``chunk_memmap_path``, same layout as the database's) are embedded in
    batches exactly as the database was (embedder, pooling and precision are read from the
    index's sidecar; ``tokenizer``, the LM tokenizer of both, must be the one recorded there) and
    searched (with the search knobs and rescoring factor recorded at the index's build, or
    ``search_params`` / ``rescore``); no exclusion is applied. Writes ``knn_path`` (default
    ``<dir>/<stem>.knn<suffix>`` of the query chunks), int32 (num_chunks, K), ids into the
    database chunks.

    Returns:
        knn_path
    """
    index_path = Path(db_index_file) if db_index_file else index_path_for(db_chunk_memmap_path)
    settings = index_settings(index_path)
    if settings["chunk_size"] != chunk_size:
        raise ValueError(f"database {index_path} has chunk_size {settings['chunk_size']}, queries "
                         f"{chunk_size}: they must be equal")
    name = query_embedder(settings, embedder, index_path)
    lm = query_tokenizer(settings, tokenizer, name, index_path)
    check_tokenizer((read_meta(chunk_memmap_path) or {}).get("inputs", {}).get("tokenizer"), lm,
                     chunk_memmap_path)
    chunks = open_chunks(chunk_memmap_path, num_chunks, chunk_size)
    knn_path = Path(knn_path) if knn_path is not None else knn_path_for(chunk_memmap_path)
    inputs = {"kind": "query_knn", "version": FORMAT_VERSION, "queries": fingerprint(chunk_memmap_path),
              "index": fingerprint(index_path), "num_chunks": num_chunks,
              "num_nearest_neighbors": num_nearest_neighbors}
    if search_params is not None:
        inputs["search_params"] = idx.parse_search_params(search_params)
    if rescore is not None:
        inputs["rescore"] = idx.check_rescore(rescore)
    if cached_meta([knn_path], inputs, "query knn", force_reprocess) is not None:
        return knn_path
    meta_path(knn_path).unlink(missing_ok=True)
    index = idx.read_index(index_path, faiss_gpu=faiss_gpu, search_params=search_params,
                           rescore=rescore)
    with atomic_path(knn_path) as tmp:
        knn = np.memmap(tmp, dtype=np.int32, mode="w+", shape=(num_chunks, num_nearest_neighbors))
        for start in tqdm(range(0, num_chunks, batch_size), desc="query search", unit="batch"):
            block = torch.from_numpy(np.array(chunks[start:start + batch_size, :chunk_size]))
            q = emb.embed_chunks(block, name, device, return_cls_repr=settings["pooling"] == "cls",
                                 dtype=settings["dtype"], normalize=True, tokenizer=lm).numpy()
            ids, _ = idx.search_excluding(index, q, num_nearest_neighbors, num_extra=0)
            knn[start:start + len(block)] = ids
        knn.flush()
        del knn
    write_meta(knn_path, {"inputs": inputs, "build": uuid.uuid4().hex})
    return knn_path
