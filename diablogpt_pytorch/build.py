"""A folder of text documents -> the retrieval database of a training run (what ``TrainingWrapper``
builds).

The documents matching a glob are split deterministically into a training part and a held-out part
(:func:`split_documents`, by a hash of each document's path relative to the folder, so the split
does not depend on listing order). :func:`build_split_files` turns a split into its
chunks/seqs/doc_ids memmaps and knn file: the training split through the embeddings, index and
neighbour search of :mod:`diablogpt_pytorch.database` (under ``torchrun``, every rank its share:
:mod:`diablogpt_pytorch.database.sharded`); the held-out
split's neighbours are searched in the *training* index (a held-out chunk never retrieves itself
or its own document, which is not in the index). Held-out files carry ``.valid`` before the suffix
(:func:`held_out_path`). :func:`open_split` opens a built split as a
:class:`~diablogpt_pytorch.data.DIABLOGPTDataset`.

Every file records what it was made from in a ``.meta.json`` sidecar and is reused only while that
still matches; ``REPROCESS=1`` rebuilds. faiss and transformers are imported only when a split is
built.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from diablogpt_pytorch import distributed as D
from diablogpt_pytorch._io import read_meta
from diablogpt_pytorch.data import DIABLOGPTDataset

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def split_documents(
    paths: list[Path], root: Path, valid_fraction: float
) -> tuple[list[Path], list[Path]]:
    """Deterministic (train, valid) split of document ``paths``.

    Documents are ranked by the SHA-1 of their path relative to ``root``; the first
    ``round(valid_fraction * n)`` (at least 1 when ``valid_fraction > 0``, at most n - 1) are held
    out. Both lists come back in sorted path order. With fewer than 2 documents nothing is held
    out.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must lie in [0, 1); got {valid_fraction}")
    n = len(paths)
    if valid_fraction == 0.0 or n < 2:
        return sorted(paths), []
    n_valid = min(n - 1, max(1, round(valid_fraction * n)))
    ranked = sorted(
        paths, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest()
    )
    return sorted(ranked[n_valid:]), sorted(ranked[:n_valid])


def held_out_path(path: PathLike, tag: str = "valid") -> Path:
    """``train.chunks.dat`` -> ``train.chunks.valid.dat`` (the held-out split's file)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def list_documents(folder: PathLike, glob: str) -> list[Path]:
    """The files under ``folder`` matching ``glob``, sorted.

    Raises:
        FileNotFoundError: ``folder`` is not a folder, or no file matches.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"documents_path {str(folder)!r} is not a folder: point it at a folder of text "
            "files (diablogpt_pytorch.corpus.write_default_corpus writes a default one)"
        )
    paths = sorted(p for p in folder.glob(glob) if p.is_file())
    if not paths:
        raise FileNotFoundError(
            f"no files in {str(folder)!r} match glob {glob!r}: add documents or fix the glob"
        )
    return paths


@dataclass(frozen=True)
class BuildSettings:
    """How a training run's database is built (``TrainingWrapper``'s arguments of the same names).

    ``tokenizer`` is the loaded LM tokenizer; ``embed_device`` the embedder's device;
    ``embed_batch_size`` chunks embedded per step; ``index_batch_size`` queries per faiss search;
    ``index`` the faiss index (``index.build_index``'s ``index=``); ``rescore`` its float32
    rescoring factor (``None``: on for compressed indexes, 0: off; ``index.build_index``'s
    ``rescore=``).
    """

    chunk_size: int
    seq_len: int
    knn: int
    embedder: str
    tokenizer: Any
    max_chunks: int = 1_000_000
    max_seqs: int = 100_000
    knn_extra_neighbors: int = 100
    max_index_memory_usage: Union[str, int] = "100m"
    current_memory_available: Union[str, int] = "1G"
    embed_device: Union[str, torch.device] = "cpu"
    embed_batch_size: int = 128
    index_batch_size: int = 4096
    embed_dtype: Optional[str] = None
    index: str = "auto"
    rescore: Optional[int] = None


def build_split_files(settings: BuildSettings, documents: list[Path], paths: dict[str, Path], *,
                      train: bool, db_paths: Optional[dict[str, Path]] = None
                      ) -> tuple[dict[str, Any], Path]:
    """Build (or reuse) a split's chunks/seqs/doc_ids memmaps and knn file.

    Under ``torchrun`` (world size > 1) the training split is a collective: every rank calls it;
    rank 0 chunks the documents, then every rank embeds and searches its share
    (:func:`~diablogpt_pytorch.database.sharded.sharded_chunks_to_precalculated_knn_`); the files equal the
    single-process ones. A held-out split is built by the one process that calls it. A database
    built by one process is reused by the ranks and the reverse, while it is current
    (:func:`~diablogpt_pytorch.database.sharded.reusable_knn`).

    Args:
        documents: the split's documents; paths: its files (keys ``chunks``, ``seqs``,
            ``doc_ids``).
        train: the training split (embeddings, index and neighbours over itself, capped at
            ``max_chunks``/``max_seqs``), else a held-out split (every document chunked whole,
            neighbours searched in the index of the training files ``db_paths``).

    Returns:
        (stats, knn_path): ``stats`` as ``text_folder_to_chunks_`` returns them (``chunks``,
        ``seqs``, ``docs``, ...).
    """
    from diablogpt_pytorch.database.chunks import text_folder_to_chunks_
    from diablogpt_pytorch.database.knn import chunks_to_precalculated_knn_, query_chunks_to_knn_
    from diablogpt_pytorch.database.provenance import knn_path_for

    s = settings
    what = "training" if train else "held-out"

    def chunk():
        logger.info("%s split: %d documents", what, len(documents))
        return text_folder_to_chunks_(
            chunks_memmap_path=paths["chunks"],
            seqs_memmap_path=paths["seqs"],
            doc_ids_memmap_path=paths["doc_ids"],
            chunk_size=s.chunk_size,
            seq_len=s.seq_len,
            max_chunks=s.max_chunks if train else 2**31 - 1,
            max_seqs=s.max_seqs if train else 2**31 - 1,
            paths=documents,
            embedder=s.embedder,
            tokenizer=s.tokenizer,
        )

    ranks = D.get_world_size() if train else 1
    if ranks > 1:  # rank 0 chunks; then every rank takes its share of the embedding and search
        stats = None
        with D.main_process_first("chunking the training documents") as main:
            if main:
                stats = chunk()
        stats = D.broadcast_object(stats, what="sharing the chunk counts")
    else:
        stats = chunk()
    num_chunks = stats["chunks"]
    if train:
        from diablogpt_pytorch.database import sharded

        args = dict(
            num_nearest_neighbors=s.knn,
            num_chunks=num_chunks,
            chunk_size=s.chunk_size,
            chunk_memmap_path=paths["chunks"],
            doc_ids_memmap_path=paths["doc_ids"],
            num_extra_neighbors=s.knn_extra_neighbors,
            chunks_to_embeddings_batch_size=s.embed_batch_size,
            max_index_memory_usage=s.max_index_memory_usage,
            current_memory_available=s.current_memory_available,
            index=s.index,
            rescore=s.rescore,
            knn_batch_size=s.index_batch_size,
            embedder=s.embedder,
            device=s.embed_device,
            dtype=s.embed_dtype,
            # no neighbour from any document packed into the chunk's training sequence
            seqs_memmap_path=paths["seqs"],
            num_seqs=stats["seqs"],
            seq_len=s.seq_len,
            tokenizer=s.tokenizer,
        )
        if ranks > 1:
            knn_path, _ = sharded.sharded_chunks_to_precalculated_knn_(**args)
        elif ((read_meta(knn_path_for(paths["chunks"])) or {}).get("stats", {})
              .get("world_size", 1) > 1 and sharded.reusable_knn(**args)):
            knn_path = knn_path_for(paths["chunks"])  # built by ranks, still current
        else:
            knn_path, _ = chunks_to_precalculated_knn_(**args)
    else:
        if db_paths is None:
            raise ValueError("a held-out split needs db_paths, the training split's files")
        if stats["docs"] + stats.get("empty_docs", 0) != len(documents) or stats.get("truncated"):
            raise ValueError(
                f"the held-out split has {len(documents)} documents but only {stats['docs']} "
                "were chunked whole; its bits per byte would be wrong"
            )
        knn_path = query_chunks_to_knn_(
            num_nearest_neighbors=s.knn,
            num_chunks=num_chunks,
            chunk_size=s.chunk_size,
            chunk_memmap_path=paths["chunks"],
            db_chunk_memmap_path=db_paths["chunks"],
            batch_size=s.embed_batch_size,
            device=s.embed_device,
            embedder=s.embedder,
            tokenizer=s.tokenizer,
        )
    return stats, knn_path


def open_split(settings: BuildSettings, paths: dict[str, Path],
               built: tuple[dict[str, Any], Path], *, db_paths: Optional[dict[str, Path]] = None,
               db_num_chunks: Optional[int] = None) -> DIABLOGPTDataset:
    """The dataset over a split's files; ``built`` = (stats, knn_path) from
    :func:`build_split_files`. A held-out split passes ``db_paths`` and ``db_num_chunks`` (the
    training split's files and chunk count), since its neighbour ids point into them."""
    stats, knn_path = built
    return DIABLOGPTDataset(
        num_sequences=stats["seqs"],
        num_chunks=stats["chunks"],
        num_neighbors=settings.knn,
        chunk_size=settings.chunk_size,
        seq_len=settings.seq_len,
        chunk_memmap_path=paths["chunks"],
        chunk_nn_memmap_path=knn_path,
        seq_memmap_path=paths["seqs"],
        doc_ids_memmap_path=paths["doc_ids"],
        eos_id=settings.tokenizer.eos_id,
        pad_id=settings.tokenizer.pad_id,
        db_chunk_memmap_path=None if db_paths is None else db_paths["chunks"],
        db_num_chunks=db_num_chunks,
        db_doc_ids_memmap_path=None if db_paths is None else db_paths["doc_ids"],
    )


def decoded_num_bytes(tokenizer, paths: dict[str, Path], num_chunks: int, chunk_size: int) -> int:
    """UTF-8 bytes of the text a split's token ids decode to, document by document (pad and eos
    ids have none): the denominator of bits per byte, comparable across tokenizers."""
    import numpy as np

    from diablogpt_pytorch.database.chunks import open_chunks, open_doc_ids

    n, C = num_chunks, chunk_size
    tokens = open_chunks(paths["chunks"], n, C)[:, :C]
    doc_ids = np.asarray(open_doc_ids(paths["doc_ids"], n))
    bounds = [0] + (1 + np.flatnonzero(doc_ids[1:] != doc_ids[:-1])).tolist() + [n]
    docs = [tokens[a:b].reshape(-1).tolist() for a, b in zip(bounds[:-1], bounds[1:])]
    return sum(len(text.encode("utf-8")) for text in tokenizer.decode_batch(docs))


def database_info(settings: BuildSettings, paths: dict[str, Path], num_chunks: int
                  ) -> dict[str, Any]:
    """What a checkpoint records about the database a model was trained with."""
    return {
        "embedder": settings.embedder,
        "tokenizer": settings.tokenizer.identity(),
        "knn": settings.knn,
        "chunk_size": settings.chunk_size,
        "seq_len": settings.seq_len,
        "chunks_memmap_path": str(paths["chunks"]),
        "doc_ids_memmap_path": str(paths["doc_ids"]),
        "num_chunks": int(num_chunks),
    }
