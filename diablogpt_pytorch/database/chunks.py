"""Documents -> chunks: the chunk, document-id and sequence memmaps, and reading them back.

File formats: for ``train.chunks.dat`` with chunk size C,

- ``train.chunks.dat``   int32 (num_chunks, C+1) raw memmap: a chunk's C tokens + the first token
  of the next chunk in the global token stream (pad for the last chunk);
- ``train.doc_ids.dat``  int32 (num_chunks,), ``train.seq.dat`` int32 (num_seqs,);
- ``train.chunks.tokenizer.json`` the LM tokenizer, when one was trained for the database
  (``tokenizer="train"``; see :mod:`diablogpt_pytorch.tokenizer`);
- each with a provenance sidecar ``<file>.meta.json`` (see :mod:`.provenance`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
from tqdm.auto import tqdm

from diablogpt_pytorch.database import embedder as emb
from diablogpt_pytorch._io import atomic_path, meta_path, open_int32_memmap, write_meta
from diablogpt_pytorch.database.documents import document_batches, document_files, files_digest, read_text
from diablogpt_pytorch.database.provenance import (FORMAT_VERSION, PathLike, cached_meta, lm_tokenizer,
                                                   tokenizer_path_for)

logger = logging.getLogger(__name__)


_MISMATCH_FIX = ("num_chunks / chunk_size do not match the file; pass the values "
                 "text_folder_to_chunks_ returned and used")


def open_chunks(chunk_memmap_path: PathLike, num_chunks: int, chunk_size: int) -> np.memmap:
    """The chunks memmap, read-only, int32 (num_chunks, chunk_size + 1), size-checked."""
    return open_int32_memmap(chunk_memmap_path, (num_chunks, chunk_size + 1), "chunks memmap",
                             missing_fix="build it with text_folder_to_chunks_", mismatch_fix=_MISMATCH_FIX)


def open_doc_ids(doc_ids_memmap_path: PathLike, num_chunks: int) -> np.memmap:
    """The doc_ids memmap, read-only, int32 (num_chunks,), size-checked."""
    return open_int32_memmap(doc_ids_memmap_path, (num_chunks,), "doc_ids memmap",
                             missing_fix="build it with text_folder_to_chunks_", mismatch_fix=_MISMATCH_FIX)


def text_folder_to_chunks_(folder: Optional[PathLike] = None, glob: str = "**/*.txt",
                           chunks_memmap_path: Optional[PathLike] = None,
                           seqs_memmap_path: Optional[PathLike] = None,
                           doc_ids_memmap_path: Optional[PathLike] = None,
                           chunk_size: int = 64, seq_len: int = 2048,
                           max_chunks: int = 1_000_000, max_seqs: int = 100_000, *,
                           paths: Optional[Iterable[PathLike]] = None,
                           embedder: Optional[str] = None, truncate: bool = True,
                           docs_per_batch: int = 64, force_reprocess: bool = False,
                           tokenizer=None, documents=None) -> dict[str, Any]:
    """Tokenize one document per file and write the chunk, sequence and document-id memmaps.

    ``tokenizer`` is the LM tokenizer (:func:`diablogpt_pytorch.tokenizer.load_tokenizer` spec or
    instance; None: the WordPiece of ``embedder``; ``"train"``: a byte-level BPE trained on these
    files and stored at ``<chunks dir>/<chunks stem>.tokenizer.json``). Its identity (content
    fingerprint) is recorded in the sidecars, so changing it rebuilds the chunks.

    Each document becomes ``tokenizer.encode(text) + [eos]`` (special-token strings written in
    the text, like a literal "[SEP]" or "<eos>", are tokenized as text),
    right-padded with the pad id to a multiple of ``chunk_size``; chunks never cross documents.
    Documents are packed: sequence i starts at chunk ``i * (seq_len // chunk_size)``, so short
    documents share sequences instead of becoming mostly padding.

    Files are taken in sorted order (``folder.glob(glob)``, or ``paths`` in the order given),
    tokenized in batches and streamed to the output files: memory stays bounded by one batch.
    Files that are not UTF-8 are decoded with replacement characters (a warning names them);
    files without any token are skipped (warning).

    Limits: at most ``min(max_chunks, max_seqs * seq_len // chunk_size)`` chunks are written. With
    ``truncate=True`` (default) the database stops there, the last document may be cut, the
    files left unread are counted, and a warning and ``stats['truncated']`` report it; with
    ``truncate=False`` it is an error.

    ``documents``: instead of files, a source of ``(label, text)`` documents from
    :mod:`diablogpt_pytorch.inputs` (JSON Lines, Parquet, a saved ``datasets`` dataset), streamed;
    a document with the same text as a file gives the same chunks.

    Returns:
        ``{'chunks', 'docs', 'seqs'}`` counts, plus ``'truncated'``, ``'files_not_read'``,
        ``'empty_docs'``.
    """
    if chunks_memmap_path is None or seqs_memmap_path is None or doc_ids_memmap_path is None:
        raise ValueError("chunks_memmap_path, seqs_memmap_path and doc_ids_memmap_path are required")
    if chunk_size <= 0 or seq_len <= 0 or seq_len % chunk_size:
        raise ValueError(f"seq_len ({seq_len}) must be a positive multiple of chunk_size ({chunk_size})")
    if max_chunks <= 0 or max_seqs <= 0:
        raise ValueError(f"max_chunks ({max_chunks}) and max_seqs ({max_seqs}) must be positive")
    if documents is not None:
        if folder is not None or paths is not None:
            raise ValueError("pass documents= or folder=/paths=, not both")
        num_files, root, source = len(documents), None, documents.identity()
        digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()
        items = iter(documents)
        # a tokenizer trained here reads the texts once more (held in memory for the training)
        train_on = ([text for _, text in documents]
                    if isinstance(tokenizer, str) and tokenizer == "train" else None)
    else:
        files, root = document_files(folder, glob, paths)
        num_files, source, digest = len(files), None, files_digest(files, root)
        items = ((p, read_text(p)) for p in files)
        train_on = files
    if num_files == 0:
        raise ValueError(f"the document source {source} holds no documents")
    info = lm_tokenizer(tokenizer, embedder, documents=train_on,
                         path=tokenizer_path_for(chunks_memmap_path))
    chunks_per_seq = seq_len // chunk_size
    cap = min(max_chunks, max_seqs * chunks_per_seq)
    outputs = [Path(chunks_memmap_path), Path(seqs_memmap_path), Path(doc_ids_memmap_path)]
    if len(set(p.resolve() for p in outputs)) != 3:
        raise ValueError(f"chunks, seqs and doc_ids paths must differ: {[str(p) for p in outputs]}")
    inputs = {
        "kind": "chunks", "version": FORMAT_VERSION,
        "folder": None if root is None else str(root.resolve()),
        "glob": None if root is None else glob,
        "num_files": num_files, "files_digest": digest,
        # the embedder matters to the chunks only when its WordPiece is the LM tokenizer
        "embedder": emb.embedder_identity(embedder) if info.kind == "bert" else None,
        "tokenizer": info.identity(), "vocab_size": info.vocab_size,
        "pad_id": info.pad_id, "eos_id": info.eos_id,
        "chunk_size": chunk_size, "seq_len": seq_len,
    }
    if source is not None:
        inputs["source"] = source
    # the limits matter only where they cut the database: a build that was not truncated stays
    # valid under any cap it fits; a truncated one only under the same cap
    limits = {"max_chunks": max_chunks, "max_seqs": max_seqs, "truncate": truncate, "cap": cap}
    cached = cached_meta(outputs, inputs, "chunks", force_reprocess)
    if cached is not None:
        old_stats, old_cap = cached["stats"], cached.get("limits", {}).get("cap")
        if (not old_stats["truncated"] and old_stats["chunks"] <= cap) or (
                old_stats["truncated"] and old_cap == cap and truncate):
            return dict(old_stats)
        logger.info("rebuilding chunks: max_chunks/max_seqs changed from a cap of %s chunks "
                    "(%s) to %d", old_cap, "truncated" if old_stats["truncated"] else
                    f"{old_stats['chunks']} chunks, not truncated", cap)

    for p in outputs:  # a file without a matching sidecar is never trusted
        meta_path(p).unlink(missing_ok=True)
    C, pad = chunk_size, info.pad_id
    num_chunks = num_docs = empty = 0
    truncated = False
    files_read = 0
    pending: Optional[np.ndarray] = None  # last chunk row, waiting for the next chunk's first token

    with contextlib.ExitStack() as stack:
        tmp_chunks, tmp_seqs, tmp_docs = (stack.enter_context(atomic_path(p)) for p in outputs)
        f_chunks = stack.enter_context(open(tmp_chunks, "wb"))
        f_docs = stack.enter_context(open(tmp_docs, "wb"))
        bar = stack.enter_context(tqdm(total=num_files, desc="chunking", unit="doc"))
        for batch in document_batches(items, docs_per_batch, 8 << 20):
            # special-token strings in a document must not become the eos or pad id (that would
            # end the document or hide tokens from the loss): every LMTokenizer encodes them as text
            ids_batch = info.encode_batch([t for _, t in batch])
            rows, row_docs = [], []
            for (path, _), ids in zip(batch, ids_batch):
                if not ids:
                    files_read += 1
                    empty += 1
                    logger.warning("%s has no tokens (empty or whitespace only): skipped", path)
                    continue
                n_rows = math.ceil((len(ids) + 1) / C)
                doc = np.full(n_rows * C, pad, dtype=np.int32)
                doc[: len(ids)] = ids
                doc[len(ids)] = info.eos_id
                doc = doc.reshape(n_rows, C)
                if num_chunks + sum(len(r) for r in rows) + n_rows > cap:
                    if not truncate:
                        raise ValueError(
                            f"{path} takes the database past {cap} chunks (max_chunks={max_chunks}, "
                            f"max_seqs={max_seqs} x {chunks_per_seq} chunks per sequence): raise "
                            "max_chunks/max_seqs, pass fewer files, or pass truncate=True")
                    doc = doc[: cap - num_chunks - sum(len(r) for r in rows)]
                    truncated = True
                if len(doc):
                    files_read += 1
                    rows.append(doc)
                    row_docs.append(np.full(len(doc), num_docs, dtype=np.int32))
                    num_docs += 1
                if truncated:
                    break
            bar.update(len(batch))
            if rows:
                block = np.concatenate(rows)
                if pending is not None:
                    f_chunks.write(np.append(pending, block[0, 0]).astype(np.int32).tobytes())
                nxt = np.append(block[1:, 0], pad).astype(np.int32)
                out = np.concatenate([block, nxt[:, None]], axis=1)
                f_chunks.write(out[:-1].tobytes())
                pending = block[-1]
                f_docs.write(np.concatenate(row_docs).tobytes())
                num_chunks += len(block)
            if truncated:
                break
        if pending is not None:
            f_chunks.write(np.append(pending, pad).astype(np.int32).tobytes())
        if num_chunks == 0:
            raise ValueError(
                f"none of the {num_files} documents ({source or files[0]} ...) has any text: "
                "nothing to chunk")
        starts = np.arange(0, num_chunks, chunks_per_seq, dtype=np.int32)
        Path(tmp_seqs).write_bytes(starts.tobytes())
        # leaving the block closes the files, then renames all three into place

    stats = {"chunks": int(num_chunks), "docs": int(num_docs), "seqs": int(len(starts)),
             "truncated": truncated, "files_not_read": num_files - files_read,
             "empty_docs": empty}
    if truncated:
        logger.warning(
            "stopped at %d chunks (max_chunks=%d, max_seqs=%d): the last document was cut and %d "
            "files were not read; raise the limits to include them", num_chunks, max_chunks,
            max_seqs, stats["files_not_read"])
    build = uuid.uuid4().hex
    for p in outputs:
        write_meta(p, {"inputs": inputs, "limits": limits, "stats": stats, "build": build})
    logger.info("chunked %d documents into %d chunks, %d sequences", num_docs, num_chunks,
                stats["seqs"])
    return stats
