"""The retrieval database: text folder -> chunk memmaps -> embeddings -> faiss index -> neighbours.

Public functions (the seed's names; extra keyword arguments are ours):

- :func:`tokenize`, :func:`bert_embed`: free text -> BERT ids -> pooled embeddings.
- :func:`text_folder_to_chunks_`: one document per file -> chunks / seqs / doc_ids memmaps.
- :func:`chunks_to_index_and_embed`: chunks -> ``<stem>.emb.npy`` + ``<stem>.index`` (faiss).
- :func:`chunks_to_precalculated_knn_`: -> ``<stem>.knn<suffix>``, int32 (num_chunks, K), -1 = none.
- :func:`query_chunks_to_knn_`: neighbours in the database for chunks of other documents.
- :class:`Retriever`: generation-time lookup, built from the files on disk alone.

The stages those functions run, public so that the ``torchrun`` build
(:mod:`diablogpt_pytorch.sharded`) runs the same code on each rank's range, and the incremental
update (:mod:`diablogpt_pytorch.update`) on the new documents:
:func:`embed_chunks_file_` (chunks -> a ``.npy`` of embeddings, any range), :func:`search_neighbours`
(one batch of queries: search, exclusions, ranking) and its loop :func:`search_neighbours_range_`,
:func:`sequence_starts`, :func:`knn_inputs` and :func:`record_knn_` (the knn file's sidecar), and
the provenance helpers :func:`fingerprint`, :func:`cached_meta`, :func:`lm_tokenizer`,
:func:`embedding_settings`, :func:`check_embedder_matches_chunks`, :func:`embed_memmap`,
:func:`check_tokenizer`, :func:`query_embedder`, and the document readers :func:`document_files`,
:func:`files_digest`, :func:`read_text`, :func:`document_batches`.

File formats: for ``train.chunks.dat`` with chunk size C,

- ``train.chunks.dat``   int32 (num_chunks, C+1) raw memmap: a chunk's C tokens + the first token
  of the next chunk in the global token stream (pad for the last chunk);
- ``train.doc_ids.dat``  int32 (num_chunks,), ``train.seq.dat`` int32 (num_seqs,);
- ``train.chunks.emb.npy`` float32 (num_chunks, hidden) L2-normalised embeddings (``.npy``);
- ``train.chunks.index`` faiss index over them, inner product (= cosine similarity);
- ``train.chunks.knn.dat`` int32 (num_chunks, K);
- ``train.chunks.tokenizer.json`` the LM tokenizer, when one was trained for the database
  (``tokenizer="train"``; see :mod:`diablogpt_pytorch.tokenizer`). Chunks hold LM token ids;
  the embedder embeds each chunk's decoded text (``embedder.embed_chunks``, at build and at
  query time alike);
- each with a provenance sidecar ``<file>.meta.json`` (see :mod:`diablogpt_pytorch._io`).

Every function reuses its outputs when their sidecar records the same inputs (logged), rebuilds
them otherwise (the log says why), and always rebuilds under ``REPROCESS=1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from diablogpt_pytorch.database import embedder as emb
from diablogpt_pytorch.database import index as idx
from diablogpt_pytorch._io import (atomic_path, meta_path, open_int32_memmap, read_meta, reprocess_requested,
                                   trusted_meta, write_meta)
from diablogpt_pytorch.neighbours import neighbour_tokens

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
FORMAT_VERSION = 2  # 2: special-token strings in documents are tokenized as text


# ----------------------------------------------------------------------------- file names


def knn_path_for(chunk_memmap_path: PathLike) -> Path:
    """``<dir>/<stem>.knn<suffix>``: ``train.chunks.dat`` -> ``train.chunks.knn.dat``."""
    p = Path(chunk_memmap_path)
    return p.with_name(f"{p.stem}.knn{p.suffix}")


def embeddings_path_for(chunk_memmap_path: PathLike) -> Path:
    """``<dir>/<stem>.emb.npy``: float32 (num_chunks, hidden) normalised embeddings."""
    p = Path(chunk_memmap_path)
    return p.with_name(f"{p.stem}.emb.npy")


def index_path_for(chunk_memmap_path: PathLike) -> Path:
    """``<dir>/<stem>.index``: the faiss index over the embeddings."""
    p = Path(chunk_memmap_path)
    return p.with_name(f"{p.stem}.index")


def tokenizer_path_for(chunk_memmap_path: PathLike) -> Path:
    """``<dir>/<stem>.tokenizer.json``: where a tokenizer trained for these chunks is stored."""
    p = Path(chunk_memmap_path)
    return p.with_name(f"{p.stem}.tokenizer.json")


def lm_tokenizer(tokenizer, embedder: Optional[str], documents=None, path=None):
    """The LM tokenizer for ``tokenizer`` (a spec or an LMTokenizer; None: embedder's WordPiece)."""
    from diablogpt_pytorch.tokenizer import TokenizersLMTokenizer, load_tokenizer

    if isinstance(tokenizer, str) and tokenizer == "train" and documents is None:
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(
                f'tokenizer="train": no trained tokenizer at {path}; build the chunks with '
                'text_folder_to_chunks_(tokenizer="train") first, or pass the tokenizer itself')
        return TokenizersLMTokenizer(path)
    return load_tokenizer(tokenizer, embedder=embedder, documents=documents, path=path)


def check_tokenizer(recorded: Optional[dict[str, Any]], lm, where: PathLike) -> None:
    """Raise when ``where`` records an LM tokenizer other than ``lm``."""
    if recorded is not None and recorded.get("fingerprint") != lm.fingerprint():
        raise ValueError(
            f"{where} was made with LM tokenizer {recorded.get('name')!r} ({recorded.get('kind')}, "
            f"{recorded.get('vocab_size')} ids) but tokenizer {lm.name!r} ({lm.kind}, "
            f"{lm.vocab_size} ids) was given: pass tokenizer= the one the chunks were made with, "
            "or rebuild the database")


# ----------------------------------------------------------------------------- provenance


def fingerprint(path: PathLike) -> dict[str, Any]:
    """Identity of an input file: size, mtime and a digest of its own provenance sidecar (which
    holds a unique build id). Not its path, so a database directory can be moved as a whole."""
    path = Path(path)
    st = path.stat()
    meta = read_meta(path)
    digest = None if meta is None else hashlib.sha256(
        json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "meta": digest}


def _normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def cached_meta(paths: Sequence[PathLike], inputs: dict[str, Any], what: str,
            force: bool = False) -> Optional[dict[str, Any]]:
    """The recorded meta when every path exists with a sidecar written for that very file
    (:func:`diablogpt_pytorch._io.trusted_meta`: same size and modification time) recording
    ``inputs``, all sidecars from one build; else None, after logging why a rebuild is needed."""
    if force or reprocess_requested():
        logger.info("rebuilding %s: %s", what, "force_reprocess=True" if force else "REPROCESS is set")
        return None
    want = _normalised(inputs)
    metas = []
    for p in paths:
        if not Path(p).exists():
            logger.info("building %s: %s does not exist", what, p)
            return None
        meta, why_not = trusted_meta(p)
        if meta is None:
            logger.info("rebuilding %s: %s", what, why_not)
            return None
        if meta.get("inputs") != want:
            old = meta.get("inputs") or {}
            changed = sorted(k for k in set(old) | set(want) if old.get(k) != want.get(k))
            logger.info("rebuilding %s: %s was made from different inputs (changed: %s)",
                        what, p, ", ".join(changed))
            return None
        metas.append(meta)
    if len({m.get("build") for m in metas}) != 1:
        logger.info("rebuilding %s: its files come from different builds", what)
        return None
    logger.info("reusing %s: %s (inputs unchanged; REPROCESS=1 forces a rebuild)", what,
                ", ".join(str(p) for p in paths))
    return metas[0]


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


# ----------------------------------------------------------------------------- folder -> chunks


def document_files(folder: Optional[PathLike], glob: str, paths: Optional[Iterable[PathLike]]
                    ) -> tuple[list[Path], Optional[Path]]:
    if paths is not None:
        files = [Path(p) for p in paths]
        if not files:
            raise ValueError("paths= is an empty list: pass at least one text file")
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"paths= names files that do not exist: {missing[:5]}")
        return files, None
    if folder is None:
        raise ValueError("pass folder= (with glob=) or paths=")
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"documents folder {root} does not exist or is not a directory")
    files = sorted((p for p in root.glob(glob) if p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        anything = any(root.iterdir())
        raise FileNotFoundError(
            f"no files in {root} match glob {glob!r}"
            + ("" if anything else " (the folder is empty)")
            + ": put one text document per file there, or fix folder=/glob=")
    return files, root


def files_digest(files: list[Path], root: Optional[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        name = p.relative_to(root).as_posix() if root is not None else str(p.resolve())
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        logger.warning("%s is not valid UTF-8 (%s): decoded with replacement characters; "
                       "re-encode it as UTF-8 to keep those characters", path, err.reason)
        return data.decode("utf-8", errors="replace")


def document_batches(documents: Iterable[tuple[Any, str]], docs_per_batch: int,
                      bytes_per_batch: int) -> Iterator[list[tuple[Any, str]]]:
    batch, size = [], 0
    for path, text in documents:
        batch.append((path, text))
        size += len(text)
        if len(batch) >= docs_per_batch or size >= bytes_per_batch:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


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


def sequence_documents(seq_starts: np.ndarray, doc_ids: np.ndarray, chunks_per_seq: int
                       ) -> np.ndarray:
    """For every chunk, the documents of the training sequence(s) it belongs to.

    Sequence ``s`` holds chunks ``seq_starts[s] .. seq_starts[s] + chunks_per_seq - 1`` (packing
    puts several documents into one sequence). A neighbour from any of these documents would let
    the model read the sequence's own text through cross-attention (for a later document of the
    sequence: tokens it has not seen yet), so the paper excludes them all.

    Returns:
        int64 (num_chunks, D), each row its chunk's sequence documents padded with -1 (D is the
        most documents any chunk's sequences hold; chunks in no sequence have none).
    """
    num_chunks = len(doc_ids)
    per_seq = []
    for start in np.asarray(seq_starts, dtype=np.int64):
        stop = min(int(start) + chunks_per_seq, num_chunks)
        per_seq.append((int(start), stop, np.unique(np.asarray(doc_ids[start:stop], dtype=np.int64))))
    width = max((len(d) for _, _, d in per_seq), default=0)
    out = np.full((num_chunks, max(width, 1)), -1, dtype=np.int64)
    filled = np.zeros(num_chunks, dtype=bool)
    for start, stop, docs in per_seq:
        overlap = np.flatnonzero(filled[start:stop]) + start
        earlier = [out[c][out[c] >= 0] for c in overlap]
        out[start:stop, : len(docs)] = docs
        for c, prev in zip(overlap, earlier):  # in several (hand-made) sequences: the union
            merged = np.union1d(prev, docs)
            if len(merged) > out.shape[1]:
                out = np.pad(out, ((0, 0), (0, len(merged) - out.shape[1])), constant_values=-1)
            out[c] = -1
            out[c, : len(merged)] = merged
        filled[start:stop] = True
    return out


def sequence_documents_window(sorted_seq_starts: np.ndarray, doc_ids: np.ndarray,
                              chunks_per_seq: int, start: int, stop: int) -> np.ndarray:
    """:func:`sequence_documents` rows of chunks ``start .. stop - 1`` only, from the sequences
    that overlap them (``sorted_seq_starts``: the starts, sorted): memory and time bounded by the
    window, not the database."""
    lo = np.searchsorted(sorted_seq_starts, start - chunks_per_seq + 1, side="left")
    hi = np.searchsorted(sorted_seq_starts, stop, side="left")
    starts = sorted_seq_starts[lo:hi]
    base = int(starts[0]) if len(starts) else start
    base = min(base, start)
    end = min(len(doc_ids), max(stop, int(starts[-1]) + chunks_per_seq if len(starts) else stop))
    rows = sequence_documents(starts - base, np.asarray(doc_ids[base:end]), chunks_per_seq)
    return rows[start - base: stop - base]


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
    (:mod:`diablogpt_pytorch.sharded`) for one rank's range.

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
                              search_params: Union[None, str, dict] = None):
    """Embed every chunk and index the embeddings.

    Embeddings (float32, L2-normalised, (num_chunks, hidden)) are streamed to
    ``<dir>/<stem>.emb.npy`` beside the chunks; the index is saved to ``index_file`` (default
    ``<dir>/<stem>.index``) by :func:`diablogpt_pytorch.index.build_index`: with ``index="auto"``
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
        tokenizer: the LM tokenizer the chunks were made with (an LMTokenizer or a
            :func:`~diablogpt_pytorch.tokenizer.load_tokenizer` spec; None: the embedder's
            WordPiece). Each chunk's decoded text is embedded (``embedder.embed_chunks``).

    Returns:
        (faiss index, embeddings: read-only float32 memmap (num_chunks, hidden)).
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
                                       current_memory_available),
                    "num_chunks": num_chunks, "chunk_size": chunk_size, **settings}
    if cached_meta([index_path], index_inputs, "faiss index", force_reprocess) is not None:
        built = idx.read_index(index_path, search_params=search_params)
    else:
        meta_path(index_path).unlink(missing_ok=True)
        built = idx.build_index(embeddings, emb_path, index_path, index=index,
                                max_index_memory_usage=max_index_memory_usage,
                                current_memory_available=current_memory_available,
                                search_params=search_params,
                                meta={"inputs": index_inputs, "build": uuid.uuid4().hex})
    if faiss_gpu:
        built = idx.to_gpu(built)
    return built, embeddings


# ----------------------------------------------------------------------------- neighbours


def sequence_starts(seqs_memmap_path: Optional[PathLike], num_seqs: Optional[int],
                    seq_len: Optional[int], chunk_size: int) -> Optional[np.ndarray]:
    """The training sequences' first chunks, sorted (int64), for the sequence exclusion of
    :func:`search_neighbours`; None without ``seqs_memmap_path``."""
    if seqs_memmap_path is None:
        return None
    if num_seqs is None or seq_len is None or seq_len % chunk_size:
        raise ValueError(
            f"seqs_memmap_path={str(seqs_memmap_path)!r} needs num_seqs and seq_len (a "
            f"multiple of chunk_size={chunk_size}); got num_seqs={num_seqs}, seq_len={seq_len}")
    seqs = open_int32_memmap(seqs_memmap_path, (num_seqs,), "seqs memmap",
                             missing_fix="build it with text_folder_to_chunks_",
                             mismatch_fix="pass the num_seqs text_folder_to_chunks_ returned")
    # the starts only: each search batch derives its own rows (sequence_documents_window), since
    # all chunks' rows at once would hold num_chunks x (most documents in a sequence) int64 ids
    return np.sort(np.asarray(seqs, dtype=np.int64))


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
    return inputs


def search_neighbours(index, queries: np.ndarray, start: int, doc_ids: np.ndarray, k: int, *,
                      num_extra_neighbors: int = 10, max_search_k: int = 4096,
                      seq_starts: Optional[np.ndarray] = None,
                      chunks_per_seq: Optional[int] = None) -> np.ndarray:
    """Neighbours of database chunks ``start .. start + len(queries) - 1`` (one search batch).

    ``queries`` are those chunks' embeddings. The chunk itself, its document and, with
    ``seq_starts`` (:func:`sequence_starts`) and ``chunks_per_seq``, every document of its
    training sequences (:func:`sequence_documents_window`) are excluded; the candidates left are
    ranked by score (:func:`diablogpt_pytorch.index.search_excluding`).

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
                                 search_params: Union[None, str, dict] = None):
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

    ``index`` / ``search_params``: which faiss index, and its search knobs (see
    :func:`chunks_to_index_and_embed`); with an approximate index the neighbours are approximate
    (recall@2 against exact search is recorded in the index's sidecar).

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
        index=index, search_params=search_params)
    index_path = Path(index_file) if index_file is not None else index_path_for(chunk_memmap_path)
    knn_path = knn_path_for(chunk_memmap_path)
    inputs = knn_inputs(index_path, doc_ids_memmap_path, num_chunks, num_nearest_neighbors,
                        num_extra_neighbors, max_search_k, seqs_memmap_path=seqs_memmap_path,
                        seq_len=seq_len, search_params=search_params)
    if cached_meta([knn_path], inputs, "knn", force_reprocess) is not None:
        return knn_path, faiss_index

    meta_path(knn_path).unlink(missing_ok=True)
    with atomic_path(knn_path) as tmp:
        knn = np.memmap(tmp, dtype=np.int32, mode="w+", shape=(num_chunks, num_nearest_neighbors))
        incomplete = search_neighbours_range_(
            faiss_index, embeddings, knn, 0, num_chunks, doc_ids, num_nearest_neighbors,
            batch_size=knn_batch_size, num_extra_neighbors=num_extra_neighbors,
            max_search_k=max_search_k, seq_starts=seq_starts,
            chunks_per_seq=None if seq_len is None else seq_len // chunk_size)
        knn.flush()
        del knn
    record_knn_(knn_path, inputs, incomplete, num_chunks, num_nearest_neighbors)
    return knn_path, faiss_index


def _index_settings(index_path: Path) -> dict[str, Any]:
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


def _query_tokenizer(settings: dict[str, Any], tokenizer, embedder_name: str, index_path: Path):
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
                         search_params: Union[None, str, dict] = None) -> Path:
    """Neighbours in an existing database for chunks of OTHER documents (e.g. a held-out split).

    The query chunks (``chunk_memmap_path``, same layout as the database's) are embedded in
    batches exactly as the database was (embedder, pooling and precision are read from the
    index's sidecar; ``tokenizer``, the LM tokenizer of both, must be the one recorded there) and
    searched (with the search knobs recorded at the index's build, or ``search_params``); no
    exclusion is applied. Writes ``knn_path`` (default
    ``<dir>/<stem>.knn<suffix>`` of the query chunks), int32 (num_chunks, K), ids into the
    database chunks.

    Returns:
        knn_path
    """
    index_path = Path(db_index_file) if db_index_file else index_path_for(db_chunk_memmap_path)
    settings = _index_settings(index_path)
    if settings["chunk_size"] != chunk_size:
        raise ValueError(f"database {index_path} has chunk_size {settings['chunk_size']}, queries "
                         f"{chunk_size}: they must be equal")
    name = query_embedder(settings, embedder, index_path)
    lm = _query_tokenizer(settings, tokenizer, name, index_path)
    check_tokenizer((read_meta(chunk_memmap_path) or {}).get("inputs", {}).get("tokenizer"), lm,
                     chunk_memmap_path)
    chunks = open_chunks(chunk_memmap_path, num_chunks, chunk_size)
    knn_path = Path(knn_path) if knn_path is not None else knn_path_for(chunk_memmap_path)
    inputs = {"kind": "query_knn", "version": FORMAT_VERSION, "queries": fingerprint(chunk_memmap_path),
              "index": fingerprint(index_path), "num_chunks": num_chunks,
              "num_nearest_neighbors": num_nearest_neighbors}
    if search_params is not None:
        inputs["search_params"] = idx.parse_search_params(search_params)
    if cached_meta([knn_path], inputs, "query knn", force_reprocess) is not None:
        return knn_path
    meta_path(knn_path).unlink(missing_ok=True)
    index = idx.read_index(index_path, faiss_gpu=faiss_gpu, search_params=search_params)
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


# ----------------------------------------------------------------------------- generation


class Retriever:
    """Nearest-neighbour chunks for generation, built from the database files on disk alone.

    Args:
        chunk_memmap_path: the database chunks (``text_folder_to_chunks_`` output).
        doc_ids_memmap_path: their document ids; needed for ``exclude_doc_ids`` and so that a
            neighbour's continuation never crosses into the next document.
        index_file: the faiss index (default ``<dir>/<stem>.index``); its sidecar tells how to
            embed queries (embedder, pooling, precision) and the chunk count and size.
        device: where the query embedder runs. faiss_gpu: search on GPU (opt-in).
        num_extra_neighbors, max_search_k: candidate counts when documents are excluded (see
            :func:`chunks_to_precalculated_knn_`).
        tokenizer: the LM tokenizer of the database (an LMTokenizer or a load_tokenizer spec;
            None: the embedder's WordPiece); must match the one recorded in the index's sidecar.
            Query chunks are embedded from their decoded text exactly as the database was.
        search_params: ``nprobe`` / ``efSearch`` of an approximate index (``"efSearch=128"`` or a
            dict); default: the ones its build tuned and recorded in the index's sidecar.
    """

    def __init__(self, chunk_memmap_path: PathLike, doc_ids_memmap_path: Optional[PathLike] = None,
                 index_file: Optional[PathLike] = None, *, embedder: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu", faiss_gpu: bool = False,
                 num_extra_neighbors: int = 10, max_search_k: int = 4096, tokenizer=None,
                 search_params: Union[None, str, dict] = None):
        self.index_path = Path(index_file) if index_file else index_path_for(chunk_memmap_path)
        settings = _index_settings(self.index_path)
        self.embedder = query_embedder(settings, embedder, self.index_path)
        self.tokenizer = _query_tokenizer(settings, tokenizer, self.embedder, self.index_path)
        self.chunk_size = int(settings["chunk_size"])
        self.num_chunks = int(settings["num_chunks"])
        self.return_cls_repr = settings["pooling"] == "cls"
        self.dtype = settings["dtype"]
        self.device = device
        self.num_extra_neighbors = num_extra_neighbors
        self.max_search_k = max_search_k
        self.chunks = open_chunks(chunk_memmap_path, self.num_chunks, self.chunk_size)
        self.doc_ids = (None if doc_ids_memmap_path is None
                        else open_doc_ids(doc_ids_memmap_path, self.num_chunks))
        self.pad_id, self.eos_id = self.tokenizer.pad_id, self.tokenizer.eos_id
        self.index = idx.read_index(self.index_path, faiss_gpu=faiss_gpu, search_params=search_params)
        if self.index.ntotal != self.num_chunks:
            raise ValueError(f"{self.index_path} holds {self.index.ntotal} vectors but "
                             f"{chunk_memmap_path} has {self.num_chunks} chunks: rebuild the index")

    def search(self, chunk_tokens: torch.Tensor, k: int, exclude_doc_ids=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """chunk_tokens int (..., C) -> neighbour ids int64 (..., k) (-1 = none), scores (..., k).

        ``exclude_doc_ids``: None, one document id for all queries, or one entry per row of the
        leading dimension (an int or a collection of ints) whose documents are skipped.
        """
        tokens = torch.as_tensor(chunk_tokens)
        if tokens.shape[-1] != self.chunk_size:
            raise ValueError(f"query chunks have {tokens.shape[-1]} tokens, the database "
                             f"{self.chunk_size}")
        lead = tokens.shape[:-1]
        flat = tokens.reshape(-1, self.chunk_size)
        excl = None
        if exclude_doc_ids is not None:
            if self.doc_ids is None:
                raise ValueError("exclude_doc_ids needs the Retriever's doc_ids_memmap_path")
            if isinstance(exclude_doc_ids, torch.Tensor):
                exclude_doc_ids = exclude_doc_ids.tolist()
            if np.isscalar(exclude_doc_ids):
                excl = [[int(exclude_doc_ids)]] * flat.shape[0]
            else:
                if len(exclude_doc_ids) != lead[0]:
                    raise ValueError(f"exclude_doc_ids has {len(exclude_doc_ids)} entries for a "
                                     f"batch of {lead[0]}")
                per = [d if not np.isscalar(d) else [d] for d in exclude_doc_ids]
                reps = flat.shape[0] // lead[0]
                excl = [per[i // reps] for i in range(flat.shape[0])]
        q = emb.embed_chunks(flat, self.embedder, self.device, return_cls_repr=self.return_cls_repr,
                             dtype=self.dtype, normalize=True, tokenizer=self.tokenizer).numpy()
        ids, scores = idx.search_excluding(
            self.index, q, k, num_extra=self.num_extra_neighbors if excl is not None else 0,
            doc_ids=self.doc_ids, exclude_doc_ids=excl, max_k=self.max_search_k)
        return (torch.from_numpy(ids).reshape(*lead, k),
                torch.from_numpy(scores).reshape(*lead, k))

    def retrieve(self, chunk_tokens: torch.Tensor, k: int, exclude_doc_ids=None) -> torch.Tensor:
        """chunk_tokens int (..., C) -> LongTensor (..., k, 2C): each neighbour chunk plus its
        continuation (next chunk of the same document, else pad), as the training data has them."""
        ids, _ = self.search(chunk_tokens, k, exclude_doc_ids)
        tokens = neighbour_tokens(self.chunks, ids.numpy(), doc_ids=self.doc_ids,
                                  eos_id=self.eos_id, pad_id=self.pad_id)
        return torch.from_numpy(tokens)
