"""The retrieval database built by many processes (``torchrun``): embeddings, index, neighbours.

:func:`sharded_chunks_to_precalculated_knn_` is the many-process form of
:func:`diablogpt_pytorch.database.knn.chunks_to_precalculated_knn_`: same arguments, same knn file,
same index sidecar (so :class:`~diablogpt_pytorch.database.retriever.Retriever` and
``query_chunks_to_knn_`` use its index unchanged). Every rank calls it (it is a collective; in a
single process it simply runs all the steps itself). The chunk memmaps come first, from
``text_folder_to_chunks_`` on one rank (it is a sequential pass over the text, cheap next to
embedding).

What each rank does, for chunks ``train.chunks.dat`` and ``W`` ranks:

1. Embed its contiguous range ``[start, stop)`` of chunks into its own shard
   ``train.chunks.emb.shards/emb-<rank>-of-<W>.npy`` (float32 (stop - start, hidden), with a
   provenance sidecar recording the range), through the same embedding stage as the single
   process (:func:`~diablogpt_pytorch.database.embed.embed_chunks_file_`). Range boundaries fall on
   multiples of ``chunks_to_embeddings_batch_size``, so every embedding batch holds exactly the
   chunks it holds in the single-process build: the shards concatenated are bit-identical to the
   single-process ``.emb.npy``.
2. Rank 0 builds the index from the shards, read in rank order as one array, with
   :func:`diablogpt_pytorch.database.index.build_index` (``index=``: the same choice, training sample,
   search knobs and recall record as the single-process build; autofaiss reads the folder of
   shards, whose zero-padded names sort in rank order). For an approximate index it then tunes
   the search knobs for the neighbour file's own recall
   (:func:`~diablogpt_pytorch.database.knn.tune_neighbour_search`, over the shards, as the single
   process does over its ``.emb.npy``) and shares them. The others wait.
3. Every rank loads the index read-only, sets those knobs and searches the neighbours of its
   own range (boundaries on multiples of ``knn_batch_size``; the query embeddings are read from the shards that cover
   it) into its own part file ``train.chunks.knn.parts/knn-<rank>-of-<W>.dat``, with the
   single-process search stage
   (:func:`~diablogpt_pytorch.database.knn.search_neighbours_range_`): the same batches, the same
   exclusions (the chunk, its document and, given the training sequences, every document of its
   sequences), the same ranking, so the knn file is byte-identical to the single-process one (not
   merely "equal up to ties"), and its sidecar records its inputs as the single-process one does
   (:func:`~diablogpt_pytorch.database.knn.knn_inputs`).
4. Rank 0 concatenates the parts, in rank order, into ``train.chunks.knn.dat`` under a temporary
   name, renames it into place, writes its sidecar and removes the parts.

No two processes ever write the same file: every shard and part has one writer, and the final knn
file is assembled by rank 0 alone. Part files cost one extra sequential write of
``num_chunks * K * 4`` bytes (8 bytes a chunk for K = 2, against 1,536 for its embedding), and buy
what a shared preallocated file cannot give: the final file appears atomically, complete, with its
sidecar, or not at all; a rank that dies leaves only its own temporary file; and a shard or part is
reused only when its sidecar matches.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from diablogpt_pytorch import distributed as D
from diablogpt_pytorch.database import index as idx
from diablogpt_pytorch.database import embedder as emb
from diablogpt_pytorch.database.chunks import open_doc_ids, text_folder_to_chunks_
from diablogpt_pytorch.database.embed import embed_chunks_file_, embedding_settings
from diablogpt_pytorch.database.knn import (apply_neighbour_search, knn_inputs, record_knn_,
                                            search_neighbours_range_, tune_neighbour_search)
from diablogpt_pytorch.database.provenance import (FORMAT_VERSION, cached_meta, embeddings_path_for,
                                                   fingerprint, index_path_for, knn_path_for, lm_tokenizer,
                                                   tokenizer_path_for)
from diablogpt_pytorch.database.sequences import sequence_starts
from diablogpt_pytorch._io import atomic_path, meta_path, reprocess_requested, trusted_meta

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def shards_dir_for(chunk_memmap_path: PathLike) -> Path:
    """``train.chunks.dat`` -> ``train.chunks.emb.shards/`` (one embedding shard per rank)."""
    p = Path(chunk_memmap_path)
    return p.with_name(f"{p.stem}.emb.shards")


def knn_parts_dir_for(chunk_memmap_path: PathLike) -> Path:
    """``train.chunks.dat`` -> ``train.chunks.knn.parts/`` (one knn row range per rank)."""
    p = Path(chunk_memmap_path)
    return p.with_name(f"{p.stem}.knn.parts")


def _shard_name(rank: int, world_size: int, prefix: str, suffix: str) -> str:
    return f"{prefix}-{rank:05d}-of-{world_size:05d}{suffix}"


def _remove_other_layouts(folder: Path, world_size: int, prefix: str, suffix: str) -> None:
    """Delete shards of another world size (autofaiss would read every .npy in the folder)."""
    if not folder.is_dir():
        return
    mine = re.compile(rf"{prefix}-\d{{5}}-of-{world_size:05d}{re.escape(suffix)}(\.meta\.json)?")
    for p in folder.iterdir():
        if p.is_file() and not mine.fullmatch(p.name) and not p.name.startswith("."):
            logger.info("removing %s (a shard of another number of ranks)", p)
            p.unlink()


def _nonempty_ranges(num_chunks: int, world: int, align: int) -> list[tuple[int, int, int]]:
    """(rank, start, stop) of every rank whose range of ``num_chunks`` is not empty."""
    ranges = [(r, *D.shard_range(num_chunks, r, world, align)) for r in range(world)]
    return [(r, a, b) for r, a, b in ranges if b > a]


class _ShardRows:
    """The embedding shards read as one array of rows ``offset ..`` (slices only, read lazily):
    a search range need not coincide with an embedding range."""

    def __init__(self, shards: list[tuple[Path, int, int]], offset: int, dim: int):
        self.parts = []
        for path, a, b in shards:
            rows = np.load(path, mmap_mode="r")
            if rows.shape != (b - a, dim):
                raise ValueError(f"{path} holds {rows.shape} embeddings, expected {(b - a, dim)}: "
                                 "rebuild it (REPROCESS=1)")
            self.parts.append((rows, a, b))
        self.offset = offset

    def __getitem__(self, rows: slice) -> np.ndarray:
        lo, hi = rows.start + self.offset, rows.stop + self.offset
        return np.concatenate([part[max(lo, a) - a:min(hi, b) - a]
                               for part, a, b in self.parts if a < hi and lo < b])


def _same(recorded: Any, wanted: Any) -> bool:
    return recorded == json.loads(json.dumps(wanted, sort_keys=True))


def reusable_knn(
        num_nearest_neighbors: int, num_chunks: int, chunk_size: int,
        chunk_memmap_path: PathLike, doc_ids_memmap_path: PathLike, *,
        num_extra_neighbors: int = 10, use_cls_repr: bool = False,
        index_file: Optional[PathLike] = None, max_index_memory_usage: Union[str, int] = "100m",
        current_memory_available: Union[str, int] = "1G", max_search_k: int = 4096,
        embedder: Optional[str] = None, device: Union[str, torch.device] = "cpu", dtype=None,
        force_reprocess: bool = False, seqs_memmap_path: Optional[PathLike] = None,
        num_seqs: Optional[int] = None, seq_len: Optional[int] = None, tokenizer=None,
        chunks_to_embeddings_batch_size: int = 256, knn_batch_size: int = 4096,
        embed_dim: Optional[int] = None, index: str = "auto",
        rescore: Optional[int] = None) -> Optional[tuple[Path, Path]]:
    """(knn_path, index_path) when the knn file, its index and the embeddings the index was built
    from are on disk and current for these chunks and arguments, whichever build made them (one
    process: ``<stem>.emb.npy``; ranks: the shards); else None. Builds nothing: it lets a
    database built by one process serve ``torchrun`` ranks and the reverse. Arguments as
    :func:`sharded_chunks_to_precalculated_knn_` (the batch sizes and ``embed_dim`` do not change
    the result and are not compared)."""
    if force_reprocess or reprocess_requested():
        return None
    chunk_memmap_path = Path(chunk_memmap_path)
    index_path = Path(index_file) if index_file is not None else index_path_for(chunk_memmap_path)
    knn_path = knn_path_for(chunk_memmap_path)
    try:
        knn_meta, _ = trusted_meta(knn_path)
        index_meta, _ = trusted_meta(index_path)
        if knn_meta is None or index_meta is None or not _same(knn_meta.get("inputs"), knn_inputs(
                index_path, doc_ids_memmap_path, num_chunks, num_nearest_neighbors,
                num_extra_neighbors, max_search_k, seqs_memmap_path=seqs_memmap_path,
                seq_len=seq_len)):
            return None
        built = index_meta.get("inputs") or {}
        lm = lm_tokenizer(tokenizer, embedder, path=tokenizer_path_for(chunk_memmap_path))
        wanted = {"num_chunks": num_chunks, "chunk_size": chunk_size,
                  **embedding_settings(embedder, use_cls_repr, dtype, device, lm),
                  **idx.build_inputs(index, num_chunks, emb.hidden_size(embedder),
                                     max_index_memory_usage, current_memory_available,
                                     rescore=rescore)}
        if any(not _same(built.get(k), v) for k, v in wanted.items()):
            return None
        if "embeddings" in built:
            sources = [embeddings_path_for(chunk_memmap_path)]
            if not _same(built["embeddings"], fingerprint(sources[0])):
                return None
        else:
            sources = sorted(shards_dir_for(chunk_memmap_path).glob("emb-*-of-*.npy"))
            if not sources or not _same(built.get("embedding_shards"),
                                        [fingerprint(p) for p in sources]):
                return None
        chunks = fingerprint(chunk_memmap_path)
        for p in sources:
            meta, _ = trusted_meta(p)
            if meta is None or not _same(meta["inputs"].get("chunks"), chunks):
                return None
    except (OSError, KeyError, ValueError):
        return None
    logger.info("reusing knn %s and index %s (current for these chunks, built by %s)", knn_path,
                index_path, "one process" if "embeddings" in built else "several ranks")
    return knn_path, index_path


def sharded_chunks_to_precalculated_knn_(
        num_nearest_neighbors: int, num_chunks: int, chunk_size: int,
        chunk_memmap_path: PathLike, doc_ids_memmap_path: PathLike, *,
        num_extra_neighbors: int = 10, use_cls_repr: bool = False,
        chunks_to_embeddings_batch_size: int = 256, embed_dim: Optional[int] = None,
        index_file: Optional[PathLike] = None, max_index_memory_usage: Union[str, int] = "100m",
        current_memory_available: Union[str, int] = "1G", knn_batch_size: int = 4096,
        max_search_k: int = 4096, embedder: Optional[str] = None,
        device: Union[str, torch.device] = "cpu", dtype=None, force_reprocess: bool = False,
        seqs_memmap_path: Optional[PathLike] = None, num_seqs: Optional[int] = None,
        seq_len: Optional[int] = None, tokenizer=None, index: str = "auto",
        rescore: Optional[int] = None) -> tuple[Path, Path]:
    """Embeddings, index and the knn file of a chunk database, split across all ranks.

    Arguments as :func:`~diablogpt_pytorch.database.knn.chunks_to_precalculated_knn_` (``device`` is
    this rank's embedder device, e.g. its own ``cuda:LOCAL_RANK``), including the training
    sequences (``seqs_memmap_path``, ``num_seqs``, ``seq_len``) whose documents a chunk must not
    retrieve. Call it on every rank after :func:`~diablogpt_pytorch.distributed.init_distributed`;
    the chunk, doc_ids (and seqs) memmaps must exist (built by one rank before). Outputs are
    reused while their sidecars match; ``REPROCESS=1`` / ``force_reprocess`` rebuild. If any rank
    fails, every rank raises.

    Returns:
        (knn_path, index_path), the same on every rank, both complete when it returns.
    """
    if num_nearest_neighbors <= 0:
        raise ValueError(f"num_nearest_neighbors must be positive, got {num_nearest_neighbors}")
    if num_extra_neighbors < 0:
        raise ValueError(f"num_extra_neighbors must be >= 0, got {num_extra_neighbors}")
    rank, world = D.get_rank(), D.get_world_size()
    chunk_memmap_path = Path(chunk_memmap_path)
    index_path = Path(index_file) if index_file is not None else index_path_for(chunk_memmap_path)
    knn_path = knn_path_for(chunk_memmap_path)
    K = num_nearest_neighbors
    shard_dir = shards_dir_for(chunk_memmap_path)
    parts_dir = knn_parts_dir_for(chunk_memmap_path)
    # embedding ranges on multiples of the embedding batch, search ranges on multiples of the
    # search batch: every batch holds exactly the chunks it holds in the single-process build
    embed_ranges = _nonempty_ranges(num_chunks, world, chunks_to_embeddings_batch_size)
    search_ranges = _nonempty_ranges(num_chunks, world, knn_batch_size)
    shards = [(shard_dir / _shard_name(r, world, "emb", ".npy"), a, b) for r, a, b in embed_ranges]
    start, stop = D.shard_range(num_chunks, rank, world, chunks_to_embeddings_batch_size)

    # 0. a database on disk already current (whichever build made it) is reused as it is
    reused = None
    with D.main_process_first("checking the database on disk") as main:
        if main:
            reused = reusable_knn(
                num_nearest_neighbors, num_chunks, chunk_size, chunk_memmap_path,
                doc_ids_memmap_path, num_extra_neighbors=num_extra_neighbors,
                use_cls_repr=use_cls_repr, index_file=index_file,
                max_index_memory_usage=max_index_memory_usage,
                current_memory_available=current_memory_available, max_search_k=max_search_k,
                embedder=embedder, device=device, dtype=dtype, force_reprocess=force_reprocess,
                seqs_memmap_path=seqs_memmap_path, num_seqs=num_seqs, seq_len=seq_len,
                tokenizer=tokenizer, index=index, rescore=rescore)
    if D.broadcast_object(reused is not None, what="sharing the reuse decision"):
        return knn_path, index_path

    # 1. every rank embeds its own range into its own shard
    with D.all_ranks("embedding shards"):
        open_doc_ids(doc_ids_memmap_path, num_chunks)
        sequence_starts(seqs_memmap_path, num_seqs, seq_len, chunk_size)  # checked up front
        dim = emb.hidden_size(embedder)
        settings = embed_chunks_file_(
            chunk_memmap_path, num_chunks, chunk_size,
            shard_dir / _shard_name(rank, world, "emb", ".npy"), start=start, stop=stop,
            use_cls_repr=use_cls_repr, batch_size=chunks_to_embeddings_batch_size,
            embed_dim=embed_dim, embedder=embedder, device=device, dtype=dtype,
            force_reprocess=force_reprocess, tokenizer=tokenizer,
            record={"kind": "embedding_shard", "start": start, "stop": stop, "world_size": world,
                    "batch_size": chunks_to_embeddings_batch_size},
            desc=f"embedding (rank {rank})")

    main_settings = D.broadcast_object(settings, what="comparing embedding settings")
    if main_settings != settings:
        raise ValueError(f"rank {rank} would embed with {settings} but rank 0 with {main_settings}: "
                         "every rank must embed the same way (pass the same embedder and dtype)")

    # 2. rank 0 builds the index from the shards; the others wait
    shard_paths = [p for p, _, _ in shards]
    with D.main_process_first("building the index from the embedding shards") as main:
        if main:
            _remove_other_layouts(shard_dir, world, "emb", ".npy")
            for p in shard_dir.glob(f"emb-*-of-{world:05d}.npy"):
                if p not in shard_paths:  # a rank whose range is empty now: stale
                    p.unlink()
                    meta_path(p).unlink(missing_ok=True)
            index_inputs = {"kind": "index", "version": FORMAT_VERSION,
                            "embedding_shards": [fingerprint(p) for p in shard_paths],
                            **idx.build_inputs(index, num_chunks, dim, max_index_memory_usage,
                                               current_memory_available, rescore=rescore),
                            "chunk_memmap_path": str(chunk_memmap_path.resolve()),
                            "num_chunks": num_chunks, "chunk_size": chunk_size, **settings}
            if cached_meta([index_path], index_inputs, "faiss index", force_reprocess) is None:
                meta_path(index_path).unlink(missing_ok=True)
                _build_index_from_shards(shard_paths, shard_dir, index_path, num_chunks, dim,
                                         index=index, max_index_memory_usage=max_index_memory_usage,
                                         current_memory_available=current_memory_available,
                                         rescore=rescore, meta={"inputs": index_inputs, "build": uuid.uuid4().hex})
            knn_plan = knn_inputs(index_path, doc_ids_memmap_path, num_chunks, K,
                                      num_extra_neighbors, max_search_k,
                                      seqs_memmap_path=seqs_memmap_path, seq_len=seq_len)
            reuse_knn = cached_meta([knn_path], knn_plan, "knn", force_reprocess) is not None
            tuned = {}
            if not reuse_knn:  # the knobs for the neighbour file's recall, as the one-process build
                tuned = tune_neighbour_search(
                    idx.read_index(index_path), [np.load(p, mmap_mode="r") for p in shard_paths],
                    open_doc_ids(doc_ids_memmap_path, num_chunks), K,
                    num_extra_neighbors=num_extra_neighbors, max_search_k=max_search_k,
                    seq_starts=sequence_starts(seqs_memmap_path, num_seqs, seq_len, chunk_size),
                    chunks_per_seq=None if seq_len is None else seq_len // chunk_size,
                    tune_rescore=rescore is None)
    reuse_knn, knn_plan, tuned = D.broadcast_object(
        (reuse_knn, knn_plan, tuned) if D.is_main() else None, what="sharing the knn plan")
    if reuse_knn:
        return knn_path, index_path

    # 3. every rank searches the neighbours of its own range into its own part file
    start, stop = D.shard_range(num_chunks, rank, world, knn_batch_size)
    part_path = parts_dir / _shard_name(rank, world, "knn", ".dat")
    incomplete = 0
    with D.all_ranks("searching neighbours"):
        if stop > start:
            doc_ids = open_doc_ids(doc_ids_memmap_path, num_chunks)
            seq_starts = sequence_starts(seqs_memmap_path, num_seqs, seq_len, chunk_size)
            index = idx.read_index(index_path)
            apply_neighbour_search(index, tuned)
            embeddings = _ShardRows([s for s in shards if s[1] < stop and start < s[2]], start,
                                    dim)
            with atomic_path(part_path) as tmp:
                part = np.memmap(tmp, dtype=np.int32, mode="w+", shape=(stop - start, K))
                incomplete = search_neighbours_range_(
                    index, embeddings, part, start, stop, doc_ids, K, batch_size=knn_batch_size,
                    num_extra_neighbors=num_extra_neighbors, max_search_k=max_search_k,
                    seq_starts=seq_starts,
                    chunks_per_seq=None if seq_len is None else seq_len // chunk_size,
                    desc=f"searching (rank {rank})", progress=D.is_main())
                part.flush()
                del part
    incomplete = int(D.all_reduce_sum([incomplete], what="counting incomplete rows")[0])

    # 4. rank 0 assembles the parts into the knn file, atomically
    with D.main_process_first("assembling the knn file") as main:
        if main:
            parts = [parts_dir / _shard_name(r, world, "knn", ".dat") for r, _, _ in search_ranges]
            meta_path(knn_path).unlink(missing_ok=True)
            with atomic_path(knn_path) as tmp, open(tmp, "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        shutil.copyfileobj(f, out, 16 << 20)
            if knn_path.stat().st_size != num_chunks * K * 4:
                raise RuntimeError(f"assembled {knn_path} has {knn_path.stat().st_size} bytes, "
                                   f"expected {num_chunks * K * 4}: a part file is incomplete")
            record_knn_(knn_path, knn_plan, incomplete, num_chunks, K, world_size=world,
                        **({"neighbour_search": tuned} if tuned else {}))
            shutil.rmtree(parts_dir, ignore_errors=True)
    return knn_path, index_path


def _build_index_from_shards(shard_paths: list[Path], shard_dir: Path, index_path: Path,
                             num_chunks: int, dim: int, *, index: str = "auto",
                             max_index_memory_usage="100m", current_memory_available="1G",
                             meta: Optional[dict] = None, rescore: Optional[int] = None):
    """The index over the shards in rank order: :func:`diablogpt_pytorch.database.index.build_index` reads
    them as one array (the same index, knobs and record as a single-process build of the same
    vectors, byte-identical with one faiss thread; autofaiss reads the folder of shards)."""
    shards = [np.load(p, mmap_mode="r") for p in shard_paths]
    if sum(len(s) for s in shards) != num_chunks or any(s.shape[1] != dim for s in shards):
        raise RuntimeError(f"the shards in {shard_dir} hold {sum(len(s) for s in shards)} vectors "
                           f"of shapes {[s.shape for s in shards]}, expected {num_chunks} x {dim}: "
                           "a shard is missing or stale; rebuild (REPROCESS=1)")
    logger.info("building the index of %d x %d vectors from %d shards in %s", num_chunks, dim,
                len(shard_paths), shard_dir)
    return idx.build_index(shards, shard_dir, index_path, index=index,
                           max_index_memory_usage=max_index_memory_usage,
                           current_memory_available=current_memory_available, meta=meta,
                           rescore=rescore, embedding_files=shard_paths)


def main(argv: Optional[list[str]] = None) -> None:
    """``torchrun --nproc_per_node N -m diablogpt_pytorch.database.sharded --docs FOLDER --out DIR``:
    rank 0 chunks the documents, then all ranks build embeddings, index and neighbours (no
    neighbour from the documents of a chunk's training sequence, as ``TrainingWrapper`` builds)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m diablogpt_pytorch.database.sharded",
        description="Build the retrieval database with every torchrun rank (see module docs).")
    parser.add_argument("--docs", required=True, help="folder of text documents")
    parser.add_argument("--glob", default="**/*.txt")
    parser.add_argument("--out", required=True, help="folder for <stem>.chunks.dat and the rest")
    parser.add_argument("--stem", default="train")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-chunks", type=int, default=1_000_000)
    parser.add_argument("--max-seqs", type=int, default=100_000)
    parser.add_argument("--knn", type=int, default=2)
    parser.add_argument("--extra-neighbors", type=int, default=10)
    parser.add_argument("--embed-batch-size", type=int, default=256)
    parser.add_argument("--knn-batch-size", type=int, default=4096)
    parser.add_argument("--max-index-memory-usage", default="100m")
    parser.add_argument("--current-memory-available", default="1G")
    parser.add_argument("--index", default="auto", help="'auto', 'exact', 'autofaiss' or a faiss "
                        "index factory string (e.g. HNSW32, IVF1024_HNSW32,PQ48np)")
    parser.add_argument("--rescore", type=int, default=None, help="candidates per neighbour "
                        "re-ranked by exact scores (default: 8 for a PQ/SQ index, else 0 = off)")
    parser.add_argument("--embedder", default=None)
    parser.add_argument("--tokenizer", default=None, help="LM tokenizer spec (default: the "
                        "embedder's WordPiece; 'train': a BPE trained on the documents)")
    parser.add_argument("--device", default=None, help="embedder device (default: this rank's)")
    args = parser.parse_args(argv)

    info = D.init_distributed()
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format=f"%(levelname)s [rank {info.rank}] %(name)s: %(message)s")
    out = Path(args.out)
    paths = {k: out / f"{args.stem}.{k}.dat" for k in ("chunks", "seq", "doc_ids")}
    stats = None
    with D.main_process_first("chunking the documents") as is_main:
        if is_main:
            stats = text_folder_to_chunks_(
                args.docs, args.glob, paths["chunks"], paths["seq"], paths["doc_ids"],
                chunk_size=args.chunk_size, seq_len=args.seq_len, max_chunks=args.max_chunks,
                max_seqs=args.max_seqs, embedder=args.embedder, tokenizer=args.tokenizer)
    stats = D.broadcast_object(stats, what="sharing the chunk counts")
    knn_path, index_path = sharded_chunks_to_precalculated_knn_(
        args.knn, stats["chunks"], args.chunk_size, paths["chunks"], paths["doc_ids"],
        num_extra_neighbors=args.extra_neighbors,
        chunks_to_embeddings_batch_size=args.embed_batch_size, knn_batch_size=args.knn_batch_size,
        max_index_memory_usage=args.max_index_memory_usage,
        current_memory_available=args.current_memory_available, embedder=args.embedder,
        device=args.device or info.device, seqs_memmap_path=paths["seq"],
        num_seqs=stats["seqs"], seq_len=args.seq_len, tokenizer=args.tokenizer, index=args.index,
        rescore=args.rescore)
    if info.is_main:
        logger.info("%d chunks from %d documents on %d rank(s): index %s, neighbours %s",
                    stats["chunks"], stats["docs"], info.world_size, index_path, knn_path)
    D.cleanup()


if __name__ == "__main__":
    main()
