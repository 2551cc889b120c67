"""The retrieval database built by many processes (``torchrun``): embeddings, index, neighbours.

:func:`sharded_chunks_to_precalculated_knn_` is the many-process form of
:func:`diablogpt_pytorch.retrieval.chunks_to_precalculated_knn_`: same arguments, same knn file,
same index sidecar (so :class:`~diablogpt_pytorch.retrieval.Retriever` and
``query_chunks_to_knn_`` use its index unchanged). Every rank calls it (it is a collective; in a
single process it simply runs all the steps itself). The chunk memmaps come first, from
``text_folder_to_chunks_`` on one rank (it is a sequential pass over the text, cheap next to
embedding).

What each rank does, for chunks ``train.chunks.dat`` and ``W`` ranks:

1. Embed its contiguous range ``[start, stop)`` of chunks into its own shard
   ``train.chunks.emb.shards/emb-<rank>-of-<W>.npy`` (float32 (stop - start, hidden), with a
   provenance sidecar recording the range). Range boundaries fall on multiples of
   ``lcm(chunks_to_embeddings_batch_size, knn_batch_size)`` so that every embedding batch and
   every search batch holds exactly the chunks it holds in the single-process build: the shards
   concatenated are bit-identical to the single-process ``.emb.npy``, and the knn file is
   byte-identical to the single-process one (not merely "equal up to ties").
2. Rank 0 builds the index from the shards, read in rank order as one array, with
   :func:`diablogpt_pytorch.index.build_index` (``index=``: the same choice, training sample,
   search knobs and recall record as the single-process build; autofaiss reads the folder of
   shards, whose zero-padded names sort in rank order). The others wait.
3. Every rank loads the index read-only and searches the neighbours of its own range, excluding
   each chunk's own document exactly as the single-process search does, into its own part file
   ``train.chunks.knn.parts/knn-<rank>-of-<W>.dat``.
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

import logging
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from diablogpt_pytorch import distributed as D
from diablogpt_pytorch import index as idx
from diablogpt_pytorch import retrieval as R
from diablogpt_pytorch._io import atomic_path, meta_path, write_meta

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


def sharded_chunks_to_precalculated_knn_(
        num_nearest_neighbors: int, num_chunks: int, chunk_size: int,
        chunk_memmap_path: PathLike, doc_ids_memmap_path: PathLike, *,
        num_extra_neighbors: int = 10, use_cls_repr: bool = False,
        chunks_to_embeddings_batch_size: int = 256, embed_dim: Optional[int] = None,
        index_file: Optional[PathLike] = None, max_index_memory_usage: Union[str, int] = "100m",
        current_memory_available: Union[str, int] = "1G", knn_batch_size: int = 4096,
        max_search_k: int = 4096, embedder: Optional[str] = None,
        device: Union[str, torch.device] = "cpu", dtype=None, force_reprocess: bool = False,
        tokenizer=None, index: str = "auto") -> tuple[Path, Path]:
    """Embeddings, index and the knn file of a chunk database, split across all ranks.

    Arguments as :func:`~diablogpt_pytorch.retrieval.chunks_to_precalculated_knn_` (``device`` is
    this rank's embedder device, e.g. its own ``cuda:LOCAL_RANK``). Call it on every rank after
    :func:`~diablogpt_pytorch.distributed.init_distributed`; the chunk and doc_ids memmaps must
    exist (built by one rank before). Outputs are reused while their sidecars match;
    ``REPROCESS=1`` / ``force_reprocess`` rebuild. If any rank fails, every rank raises.

    Returns:
        (knn_path, index_path), the same on every rank, both complete when it returns.
    """
    if num_nearest_neighbors <= 0:
        raise ValueError(f"num_nearest_neighbors must be positive, got {num_nearest_neighbors}")
    if num_extra_neighbors < 0:
        raise ValueError(f"num_extra_neighbors must be >= 0, got {num_extra_neighbors}")
    rank, world = D.get_rank(), D.get_world_size()
    chunk_memmap_path = Path(chunk_memmap_path)
    index_path = Path(index_file) if index_file is not None else R.index_path_for(chunk_memmap_path)
    knn_path = R.knn_path_for(chunk_memmap_path)
    K = num_nearest_neighbors
    align = math.lcm(chunks_to_embeddings_batch_size, knn_batch_size)
    start, stop = D.shard_range(num_chunks, rank, world, align)
    shard_dir = shards_dir_for(chunk_memmap_path)
    shard_path = shard_dir / _shard_name(rank, world, "emb", ".npy")
    part_path = knn_parts_dir_for(chunk_memmap_path) / _shard_name(rank, world, "knn", ".dat")

    # 1. every rank embeds its own range into its own shard
    with D.all_ranks("embedding shards"):
        chunks = R.open_chunks(chunk_memmap_path, num_chunks, chunk_size)
        doc_ids = R.open_doc_ids(doc_ids_memmap_path, num_chunks)
        lm = R._lm_tokenizer(tokenizer, embedder, path=R.tokenizer_path_for(chunk_memmap_path))
        R._check_embedder_matches_chunks(chunk_memmap_path, embedder, lm)
        dim = R.emb.hidden_size(embedder)
        if embed_dim is not None and embed_dim != dim:
            raise ValueError(f"embed_dim={embed_dim} but embedder "
                             f"{R.emb.resolve_embedder(embedder)!r} gives {dim}-dimensional "
                             f"embeddings: drop embed_dim or pass {dim}")
        settings = R._embedding_settings(embedder, use_cls_repr, dtype, device, lm)
        chunks_fp = R._fingerprint(chunk_memmap_path)
        shard_inputs = {"kind": "embedding_shard", "version": R.FORMAT_VERSION,
                        "chunks": chunks_fp, "num_chunks": num_chunks, "chunk_size": chunk_size,
                        "start": start, "stop": stop, "world_size": world,
                        "batch_size": chunks_to_embeddings_batch_size, **settings}
        if stop > start and R._cached([shard_path], shard_inputs, f"embedding shard {rank}",
                                      force_reprocess) is None:
            meta_path(shard_path).unlink(missing_ok=True)
            logger.info("rank %d of %d: embedding chunks [%d, %d) into %s", rank, world, start,
                        stop, shard_path)
            R._embed_memmap(chunks[start:stop], shard_path, embedder=embedder, device=device,
                            use_cls_repr=use_cls_repr, dtype=dtype,
                            batch_size=chunks_to_embeddings_batch_size,
                            desc=f"embedding (rank {rank})", tokenizer=lm)
            write_meta(shard_path, {"inputs": shard_inputs, "build": uuid.uuid4().hex})

    main_settings = D.broadcast_object(settings, what="comparing embedding settings")
    if main_settings != settings:
        raise ValueError(f"rank {rank} would embed with {settings} but rank 0 with {main_settings}: "
                         "every rank must embed the same way (pass the same embedder and dtype)")

    # 2. rank 0 builds the index from the shards; the others wait
    shard_paths = [shard_dir / _shard_name(r, world, "emb", ".npy") for r in range(world)
                   if D.shard_range(num_chunks, r, world, align)[1] > D.shard_range(
                       num_chunks, r, world, align)[0]]
    with D.main_process_first("building the index from the embedding shards") as main:
        if main:
            _remove_other_layouts(shard_dir, world, "emb", ".npy")
            index_inputs = {"kind": "index", "version": R.FORMAT_VERSION,
                            "embedding_shards": [R._fingerprint(p) for p in shard_paths],
                            **idx.build_inputs(index, num_chunks, dim, max_index_memory_usage,
                                               current_memory_available),
                            "chunk_memmap_path": str(chunk_memmap_path.resolve()),
                            "num_chunks": num_chunks, "chunk_size": chunk_size, **settings}
            if R._cached([index_path], index_inputs, "faiss index", force_reprocess) is None:
                meta_path(index_path).unlink(missing_ok=True)
                _build_index_from_shards(shard_paths, shard_dir, index_path, num_chunks, dim,
                                         index=index, max_index_memory_usage=max_index_memory_usage,
                                         current_memory_available=current_memory_available,
                                         meta={"inputs": index_inputs, "build": uuid.uuid4().hex})
            knn_inputs = {"kind": "knn", "version": R.FORMAT_VERSION,
                          "index": R._fingerprint(index_path),
                          "doc_ids": R._fingerprint(doc_ids_memmap_path), "num_chunks": num_chunks,
                          "num_nearest_neighbors": K, "num_extra_neighbors": num_extra_neighbors,
                          "max_search_k": max_search_k}
            reuse_knn = R._cached([knn_path], knn_inputs, "knn", force_reprocess) is not None
    reuse_knn, knn_inputs = D.broadcast_object(
        (reuse_knn, knn_inputs) if D.is_main() else None, what="sharing the knn plan")
    if reuse_knn:
        return knn_path, index_path

    # 3. every rank searches the neighbours of its own range into its own part file
    incomplete = 0
    with D.all_ranks("searching neighbours"):
        if stop > start:
            index = idx.read_index(index_path)
            embeddings = np.load(shard_path, mmap_mode="r")
            if embeddings.shape != (stop - start, dim):
                raise ValueError(f"{shard_path} holds {embeddings.shape} embeddings, expected "
                                 f"{(stop - start, dim)}: rebuild it (REPROCESS=1)")
            with atomic_path(part_path) as tmp:
                part = np.memmap(tmp, dtype=np.int32, mode="w+", shape=(stop - start, K))
                for a in tqdm(range(start, stop, knn_batch_size), desc=f"searching (rank {rank})",
                              unit="batch", disable=not D.is_main()):
                    b = min(stop, a + knn_batch_size)
                    ids, _ = idx.search_excluding(
                        index, embeddings[a - start:b - start], K, num_extra=num_extra_neighbors,
                        self_ids=np.arange(a, b), query_doc_ids=np.asarray(doc_ids[a:b]),
                        doc_ids=doc_ids, max_k=max_search_k)
                    part[a - start:b - start] = ids
                    incomplete += int((ids < 0).any(axis=1).sum())
                part.flush()
                del part
    incomplete = int(D.all_reduce_sum([incomplete], what="counting incomplete rows")[0])

    # 4. rank 0 assembles the parts into the knn file, atomically
    with D.main_process_first("assembling the knn file") as main:
        if main:
            parts = [knn_parts_dir_for(chunk_memmap_path) / _shard_name(r, world, "knn", ".dat")
                     for r in range(world)
                     if D.shard_range(num_chunks, r, world, align)[1] > D.shard_range(
                         num_chunks, r, world, align)[0]]
            meta_path(knn_path).unlink(missing_ok=True)
            with atomic_path(knn_path) as tmp, open(tmp, "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        shutil.copyfileobj(f, out, 16 << 20)
            if knn_path.stat().st_size != num_chunks * K * 4:
                raise RuntimeError(f"assembled {knn_path} has {knn_path.stat().st_size} bytes, "
                                   f"expected {num_chunks * K * 4}: a part file is incomplete")
            write_meta(knn_path, {"inputs": knn_inputs, "build": uuid.uuid4().hex,
                                  "stats": {"incomplete_rows": incomplete, "world_size": world}})
            shutil.rmtree(knn_parts_dir_for(chunk_memmap_path), ignore_errors=True)
            if incomplete:
                logger.warning("%d of %d chunks have fewer than %d neighbours from other "
                               "documents (missing ones are -1)", incomplete, num_chunks, K)
            logger.info("wrote %d x %d neighbours to %s from %d ranks", num_chunks, K, knn_path,
                        world)
    return knn_path, index_path


def _build_index_from_shards(shard_paths: list[Path], shard_dir: Path, index_path: Path,
                             num_chunks: int, dim: int, *, index: str = "auto",
                             max_index_memory_usage="100m", current_memory_available="1G",
                             meta: Optional[dict] = None):
    """The index over the shards in rank order: :func:`diablogpt_pytorch.index.build_index` reads
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
                           current_memory_available=current_memory_available, meta=meta)


def main(argv: Optional[list[str]] = None) -> None:
    """``torchrun --nproc_per_node N -m diablogpt_pytorch.sharded --docs FOLDER --out DIR``:
    rank 0 chunks the documents, then all ranks build embeddings, index and neighbours."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m diablogpt_pytorch.sharded",
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
            stats = R.text_folder_to_chunks_(
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
        device=args.device or info.device, tokenizer=args.tokenizer, index=args.index)
    if info.is_main:
        logger.info("%d chunks from %d documents on %d rank(s): index %s, neighbours %s",
                    stats["chunks"], stats["docs"], info.world_size, index_path, knn_path)
    D.cleanup()


if __name__ == "__main__":
    main()
