"""Incremental updates of a built retrieval database: add documents, remove documents.

A database folder (the one its ``database.json`` manifest describes, see
:mod:`diablogpt_pytorch.database`) changes without a rebuild:

- :func:`add_documents` tokenizes and chunks only the new documents (with the database's LM
  tokenizer and chunk size), appends their chunks and document ids (new ids after the existing
  ones), embeds only the new chunks (with the recorded embedder, pooling and precision), adds them
  to the faiss index (an exact ``IndexFlatIP`` grows exactly; a trained approximate index takes
  them with its trained quantizer), searches the neighbours of the new chunks and, with
  ``refresh_neighbours=True``, of every old chunk too (a new document can be closer than an old
  neighbour). The held-out split's neighbours (ids into the training chunks) are searched again.
- :func:`remove_documents` drops documents' chunks and renumbers the rest; embeddings and index
  keep the remaining vectors (an approximate index keeps its training); a neighbour list that
  pointed at a removed chunk, or whose training-sequence exclusions changed, is searched again,
  every other one is renumbered.

With the exact index the result equals a full rebuild over the same documents in the same order
(tests/test_update.py), so a model trained on the database reads new knowledge with the same
weights: the README's "new knowledge without retraining".

Crash safety: every new file is first written under a temporary name beside its final one; the
old database stays untouched until all of them are complete. Then the manifest is marked
"update in progress", each file is renamed into place and its provenance sidecar rewritten, and
the manifest is rewritten without the mark. An update interrupted before that phase leaves the
old database as it was; one interrupted inside it leaves files whose sidecars no longer describe
them (every cache check rebuilds them) and a manifest that :meth:`Database.open` refuses.

The sidecars are rewritten exactly as the build functions would write them for the updated files,
so ``chunks_to_index_and_embed``, ``chunks_to_precalculated_knn_``, ``query_chunks_to_knn_``,
:class:`~diablogpt_pytorch.database.retriever.Retriever` and :class:`Database` trust and reuse them. The
chunk sidecars' record of the source files cannot be extended to a file list it does not hold: a
later ``text_folder_to_chunks_`` over files (``TrainingWrapper`` on its documents folder) sees
other inputs and rebuilds the database from those files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np
import torch

from diablogpt_pytorch.database import embedder as emb
from diablogpt_pytorch.database import index as idx
from diablogpt_pytorch.database.chunks import open_chunks, open_doc_ids
from diablogpt_pytorch.database.documents import document_batches, document_files, files_digest, read_text
from diablogpt_pytorch.database.knn import apply_neighbour_search, query_embedder
from diablogpt_pytorch.database.provenance import FORMAT_VERSION, check_tokenizer, fingerprint
from diablogpt_pytorch.database.sequences import sequence_documents_window
from diablogpt_pytorch._io import atomic_path, tmp_path, trusted_meta, write_meta
from diablogpt_pytorch.database.manifest import MANIFEST_NAME, Database, _entry

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: the manifest key that marks an update whose files are being renamed into place
IN_PROGRESS = "update_in_progress"


# ----------------------------------------------------------------------------- the database


class _State:
    """The files of a database and their sidecars, checked to be one consistent build."""

    def __init__(self, database: Union[PathLike, Database]):
        folder = database.folder if isinstance(database, Database) else Path(database)
        self.db = Database.open(folder)  # re-read: the manifest on disk, not a stale object
        self.manifest_path = self.db.folder / MANIFEST_NAME
        splits = self.db.manifest["splits"]
        self.paths = {name: self.db.path(name) for name in
                      ("chunks", "seqs", "doc_ids", "knn", "embeddings", "index")}
        self.valid = None
        if "valid" in splits:
            self.valid = {name: self.db.path(name, "valid") for name in ("chunks", "knn")}
            self.num_valid = int(splits["valid"]["counts"]["chunks"])
        self.C, self.N = self.db.chunk_size, self.db.num_chunks
        self.meta = {}
        for name, path in self.paths.items():
            meta, why_not = trusted_meta(path)
            if meta is None or "inputs" not in meta:
                raise ValueError(f"the database {str(self.db.folder)!r} is not a consistent build "
                                 f"({why_not or f'{path} has no build record'}): rebuild it "
                                 "(`diablogpt build-db` or TrainingWrapper) before updating it")
            self.meta[name] = meta
        builds = {self.meta[n].get("build") for n in ("chunks", "seqs", "doc_ids")}
        fp = fingerprint
        chain = [("embeddings", "chunks", "chunks"), ("index", "embeddings", "embeddings"),
                 ("knn", "index", "index"), ("knn", "doc_ids", "doc_ids")]
        stale = [f"{self.paths[a]} was made from another {b} file" for a, key, b in chain
                 if self.meta[a]["inputs"].get(key) != fp(self.paths[b])]
        if len(builds) != 1:
            stale.append("its chunks, seqs and doc_ids come from different builds")
        if self.meta["chunks"]["stats"]["chunks"] != self.N:
            stale.append(f"{self.paths['chunks']} holds another chunk count than {MANIFEST_NAME}")
        if stale:
            raise ValueError(f"the database {str(self.db.folder)!r} is not a consistent build ("
                             + "; ".join(stale) + "): rebuild it before updating it")
        self.tokenizer = self.db.tokenizer()
        check_tokenizer(self.meta["chunks"]["inputs"].get("tokenizer"), self.tokenizer,
                                   self.paths["chunks"])
        self.settings = self.meta["index"]["inputs"]
        self.embedder = query_embedder(self.settings, None, self.paths["index"])
        self.knn_inputs = self.meta["knn"]["inputs"]
        self.K = int(self.knn_inputs["num_nearest_neighbors"])
        # the knobs the neighbour file was searched with (knn.tune_neighbour_search), kept
        self.neighbour_search = dict((self.meta["knn"].get("stats") or {}).get("neighbour_search")
                                     or {})
        seqs = self.knn_inputs.get("sequences")
        self.seq_len = None if seqs is None else int(seqs["seq_len"])

    def chunks(self) -> np.memmap:
        return open_chunks(self.paths["chunks"], self.N, self.C)

    def doc_ids(self) -> np.ndarray:
        return np.asarray(open_doc_ids(self.paths["doc_ids"], self.N), dtype=np.int64)


def _document_hashes(chunks: np.ndarray, doc_ids: np.ndarray, C: int) -> dict[str, list[int]]:
    """{digest of a document's chunk tokens: its document ids}: what identifies a document's
    contents as the LM tokenizer reads them (a new document with the same tokens is the same
    document; a lossy tokenizer maps texts differing in case or spacing to the same tokens)."""
    out: dict[str, list[int]] = {}
    bounds = np.flatnonzero(np.diff(doc_ids)) + 1
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    stops = np.concatenate([bounds, [len(doc_ids)]]).astype(np.int64)
    for a, b in zip(starts, stops):
        out.setdefault(_rows_digest(np.asarray(chunks[a:b, :C])), []).append(int(doc_ids[a]))
    return out


def _rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int32).tobytes()).hexdigest()


def _document_rows(ids: list[int], C: int, pad: int, eos: int) -> np.ndarray:
    """A document's chunk rows exactly as ``text_folder_to_chunks_`` makes them: ids + [eos],
    right-padded to a multiple of C."""
    n_rows = -(-(len(ids) + 1) // C)
    doc = np.full(n_rows * C, pad, dtype=np.int32)
    doc[: len(ids)] = ids
    doc[len(ids)] = eos
    return doc.reshape(n_rows, C)


def _iter_documents(documents, glob: str) -> tuple[Iterator[tuple[Any, str]], int, str]:
    """(label, text) pairs, how many, and a digest of the source (files: names, sizes, times)."""
    if hasattr(documents, "identity") and hasattr(documents, "__iter__"):  # inputs.DocumentSource
        digest = hashlib.sha256(json.dumps(documents.identity(), sort_keys=True).encode())
        return iter(documents), len(documents), digest.hexdigest()
    if isinstance(documents, (str, os.PathLike)) and Path(documents).is_file():
        documents = [documents]
    if isinstance(documents, (str, os.PathLike)):
        files, root = document_files(documents, glob, None)
    else:
        files, root = document_files(None, glob, list(documents))
    return (((p, read_text(p)) for p in files), len(files),
            files_digest(files, root))


# ----------------------------------------------------------------------------- shared steps


def _embed_rows(state: _State, rows: np.ndarray, out: np.ndarray, batch_size: int, device) -> None:
    """Embed chunk token rows (n, C) into ``out`` (n, hidden) as the database was embedded."""
    for start in range(0, len(rows), batch_size):
        block = torch.from_numpy(np.array(rows[start:start + batch_size, : state.C]))
        out[start:start + len(block)] = emb.embed_chunks(
            block, state.embedder, device, return_cls_repr=state.settings["pooling"] == "cls",
            dtype=state.settings["dtype"], normalize=True, tokenizer=state.tokenizer).numpy()


def _search(state: _State, index, embeddings: np.ndarray, doc_ids: np.ndarray,
            seq_starts: Optional[np.ndarray], rows: np.ndarray, knn: np.ndarray,
            batch_size: int) -> None:
    """Neighbours of chunks ``rows`` (sorted ids) into ``knn[rows]``, exactly as
    ``chunks_to_precalculated_knn_`` searches them (same exclusions, same candidate counts, the
    search knobs it tuned for the neighbour file: applied here, the index's own restored after)."""
    own = (idx.search_knobs(index), getattr(index, "factor", 0))
    apply_neighbour_search(index, state.neighbour_search)
    try:
        _search_rows(state, index, embeddings, doc_ids, seq_starts, rows, knn, batch_size)
    finally:
        idx.apply_search_params(index, own[0])
        if isinstance(index, idx.RescoredIndex):
            index.factor = own[1]


def _search_rows(state: _State, index, embeddings: np.ndarray, doc_ids: np.ndarray,
                 seq_starts: Optional[np.ndarray], rows: np.ndarray, knn: np.ndarray,
                 batch_size: int) -> None:
    inputs = state.knn_inputs
    cps = None if state.seq_len is None else state.seq_len // state.C
    n = len(doc_ids)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        lo, hi = np.searchsorted(rows, [start, stop])
        sel = rows[lo:hi]
        if not len(sel):
            continue
        excl = None
        if seq_starts is not None:
            excl = sequence_documents_window(seq_starts, doc_ids, cps, start, stop)
            excl = excl[sel - start]
        ids, _ = idx.search_excluding(
            index, np.asarray(embeddings[sel]), state.K,
            num_extra=int(inputs["num_extra_neighbors"]),
            self_ids=sel, query_doc_ids=doc_ids[sel], doc_ids=doc_ids,
            max_k=int(inputs["max_search_k"]), exclude_doc_ids=excl)
        knn[sel] = ids


def _search_valid(state: _State, index, rows: np.ndarray, knn: np.ndarray, batch_size: int,
                  device) -> None:
    """Held-out chunks ``rows`` searched in the (updated) index as ``query_chunks_to_knn_`` does."""
    chunks = open_chunks(state.valid["chunks"], state.num_valid, state.C)
    K = knn.shape[1]
    for start in range(0, len(rows), batch_size):
        sel = rows[start:start + batch_size]
        q = np.empty((len(sel), index.d), dtype=np.float32)
        _embed_rows(state, np.asarray(chunks[sel]), q, batch_size, device)
        knn[sel], _ = idx.search_excluding(index, q, K, num_extra=0)


def _install(tmp: Path, final: Path) -> None:
    """Rename a completed temporary file into place (one step of the commit phase)."""
    os.replace(tmp, final)


class _Update:
    """Temporary files of an update; :meth:`commit` renames them into place with their sidecars."""

    def __init__(self, state: _State):
        self.state = state
        self.files: dict[str, Path] = {}

    def tmp(self, name: str, final: Path) -> Path:
        path = tmp_path(final)
        path.unlink(missing_ok=True)
        self.files[name] = path
        return path

    def discard(self) -> None:
        for path in self.files.values():
            path.unlink(missing_ok=True)

    def commit(self, stats: dict[str, Any], record: dict[str, Any]) -> None:
        """Mark the manifest, install chunks/seqs/doc_ids, embeddings, index, neighbours, held-out
        neighbours (each file, then its sidecar, whose inputs fingerprint the files installed
        before it), then write the manifest without the mark."""
        s, fp = self.state, fingerprint
        manifest = json.loads(s.manifest_path.read_text())
        manifest[IN_PROGRESS] = record
        _write_json(s.manifest_path, manifest)

        chunk_meta = dict(s.meta["chunks"])
        chunk_inputs = dict(chunk_meta["inputs"])
        chunk_inputs["num_files"] = int(chunk_inputs["num_files"]) + record.get("files", 0)
        chunk_inputs["files_digest"] = hashlib.sha256(
            f"{chunk_inputs['files_digest']}\0{json.dumps(record, sort_keys=True)}".encode()
        ).hexdigest()
        build = uuid.uuid4().hex
        chunk_meta.update(inputs=chunk_inputs, stats=stats, build=build,
                          updates=chunk_meta.get("updates", []) + [record])
        chunk_meta.pop("file", None)
        for name in ("chunks", "seqs", "doc_ids"):
            _install(self.files[name], s.paths[name])
        for name in ("chunks", "seqs", "doc_ids"):
            write_meta(s.paths[name], chunk_meta)

        def derived(name: str, changes: dict[str, Any], extra: Optional[dict] = None) -> None:
            meta = {k: v for k, v in s.meta[name].items() if k != "file"}
            meta.update(inputs=dict(meta["inputs"], **changes), build=uuid.uuid4().hex,
                        **(extra or {}))
            _install(self.files[name], s.paths[name])
            write_meta(s.paths[name], meta)

        n = stats["chunks"]
        derived("embeddings", {"chunks": fp(s.paths["chunks"]), "num_chunks": n})
        record_index = dict(s.meta["index"].get("index") or {})
        if record_index.get("rescore"):  # rescored against the embeddings installed above
            record_index["embedding_files"] = [os.path.relpath(
                s.paths["embeddings"].resolve(), s.paths["index"].parent.resolve())]
        derived("index", {"embeddings": fp(s.paths["embeddings"]), "num_chunks": n},
                {"index": record_index} if record_index else None)
        sequences = s.knn_inputs.get("sequences")
        if sequences is not None:
            sequences = dict(sequences, seqs=fp(s.paths["seqs"]))
        derived("knn", {"index": fp(s.paths["index"]), "doc_ids": fp(s.paths["doc_ids"]),
                        "num_chunks": n, "sequences": sequences},
                {"stats": {"incomplete_rows": record["incomplete_rows"],
                           **({"neighbour_search": s.neighbour_search} if s.neighbour_search
                              else {})}})
        if s.valid is not None:
            valid_knn = s.valid["knn"]
            old = trusted_meta(valid_knn)[0] or {}
            K = int((old.get("inputs") or {}).get("num_nearest_neighbors", s.K))
            _install(self.files["valid_knn"], valid_knn)
            write_meta(valid_knn, {"inputs": {
                "kind": "query_knn", "version": FORMAT_VERSION,
                "queries": fp(s.valid["chunks"]), "index": fp(s.paths["index"]),
                "num_chunks": s.num_valid, "num_nearest_neighbors": K}, "build": uuid.uuid4().hex})

        manifest.pop(IN_PROGRESS)
        train = manifest["splits"]["train"]
        train["counts"] = {k: int(stats[k]) for k in ("chunks", "docs", "seqs")}
        for name, entry in train["files"].items():
            train["files"][name] = _entry(s.paths[name], s.db.folder, name)
        if s.valid is not None:
            manifest["splits"]["valid"]["files"]["knn"] = _entry(s.valid["knn"], s.db.folder, "knn")
        manifest["documents"]["train"] = int(stats["docs"])
        manifest["updates"] = manifest.get("updates", []) + [record]
        _write_json(s.manifest_path, manifest)
        self.files.clear()


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_rows(path: Path, rows: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(np.ascontiguousarray(rows, dtype=np.int32).tobytes())


def _next_token_column(chunks: np.ndarray, pad: int) -> None:
    """Column C of every row := the first token of the next row (pad for the last), in place."""
    C = chunks.shape[1] - 1
    chunks[:-1, C] = chunks[1:, 0]
    chunks[-1, C] = pad


def _index_for(index_path: Path, index, vectors: np.ndarray, *, reset: bool):
    """``index`` with ``vectors`` added (after emptying it when ``reset``); clear errors for an
    index that cannot take them."""
    import faiss

    if not index.is_trained:
        raise ValueError(f"{index_path} is not trained: rebuild the database")
    if reset:
        index = faiss.clone_index(index)
        try:
            index.reset()
        except RuntimeError as err:
            raise ValueError(f"the {type(index).__name__} index {index_path} cannot be "
                             f"emptied to drop vectors ({err}): rebuild the database without the "
                             "documents instead") from err
    try:
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    except RuntimeError as err:
        raise ValueError(f"the {type(index).__name__} index {index_path} cannot be added "
                         f"to ({err}): rebuild the database with the new documents "
                         "instead") from err
    return index


# ----------------------------------------------------------------------------- add


def add_documents(database: Union[PathLike, Database], documents, *, glob: str = "**/*.txt",
                  refresh_neighbours: bool = False, duplicates: str = "error",
                  device: Union[str, torch.device] = "cpu", embed_batch_size: int = 256,
                  knn_batch_size: int = 4096, docs_per_batch: int = 64) -> dict[str, Any]:
    """Add documents to the training chunks of a built database, without rebuilding it.

    Args:
        database: the database folder (holding ``database.json``), its manifest, or a
            :class:`~diablogpt_pytorch.database.Database`.
        documents: a folder (its files matching ``glob``, sorted), a list of text files (in that
            order), or a :mod:`diablogpt_pytorch.inputs` document source.
        refresh_neighbours: also search every old chunk's neighbours again (a new document can
            be closer than an old neighbour); otherwise old chunks keep theirs, still valid.
        duplicates: a document whose tokens equal an existing (or an earlier new) document's:
            ``'error'`` (default) raises naming the file and the document id; ``'skip'`` leaves it
            out (logged).
        device, embed_batch_size: where and how many chunks at a time the new chunks are embedded.

    Returns:
        ``{'documents_added', 'duplicates_skipped', 'empty_docs', 'chunks_added', 'chunks',
        'docs', 'seqs', 'neighbours_searched', 'seconds'}``.
    """
    if duplicates not in ("error", "skip"):
        raise ValueError(f"duplicates={duplicates!r}: pass 'error' or 'skip'")
    started = time.perf_counter()
    s = _State(database)
    tok, C, N = s.tokenizer, s.C, s.N
    pad, eos = tok.pad_id, tok.eos_id
    items, num_files, source_digest = _iter_documents(documents, glob)
    old_chunks, old_doc_ids = s.chunks(), s.doc_ids()
    num_docs = int(s.meta["chunks"]["stats"]["docs"])
    known = _document_hashes(old_chunks, old_doc_ids, C)

    update = _Update(s)
    try:
        # --- chunks and doc_ids: the old rows, then the new documents' rows
        new_rows, new_docs, skipped, empty = [], [], [], 0
        for batch in document_batches(items, docs_per_batch, 8 << 20):
            for (label, _), ids in zip(batch, tok.encode_batch([t for _, t in batch])):
                if not ids:
                    empty += 1
                    logger.warning("%s has no tokens (empty or whitespace only): skipped", label)
                    continue
                rows = _document_rows(ids, C, pad, eos)
                digest = _rows_digest(rows)
                if digest in known:
                    if duplicates == "error":
                        raise ValueError(
                            f"{label} is already in the database {str(s.db.folder)!r} (document "
                            f"{known[digest][0]} has the same tokens): leave it out, or pass "
                            "duplicates='skip'")
                    logger.info("%s: already in the database as document %d, skipped", label,
                                known[digest][0])
                    skipped.append(str(label))
                    continue
                known[digest] = [num_docs + len(new_docs)]
                new_rows.append(rows)
                new_docs.append(np.full(len(rows), num_docs + len(new_docs), dtype=np.int32))
        if not new_rows:
            logger.info("no new document to add to %s", s.db.folder)
            return {"documents_added": 0, "duplicates_skipped": len(skipped), "empty_docs": empty,
                    "chunks_added": 0, **{k: s.db.counts()[k] for k in ("chunks", "docs", "seqs")},
                    "neighbours_searched": 0, "seconds": time.perf_counter() - started}
        added = np.concatenate(new_rows)
        M = len(added)
        total = N + M
        chunks = np.memmap(update.tmp("chunks", s.paths["chunks"]), dtype=np.int32, mode="w+",
                           shape=(total, C + 1))
        chunks[:N] = old_chunks
        chunks[N:, :C] = added
        _next_token_column(chunks, pad)
        chunks.flush()
        del chunks
        doc_ids = np.concatenate([old_doc_ids.astype(np.int32), *new_docs])
        _write_rows(update.tmp("doc_ids", s.paths["doc_ids"]), doc_ids)
        cps = s.db.seq_len // C
        seq_starts = np.arange(0, total, cps, dtype=np.int32)
        _write_rows(update.tmp("seqs", s.paths["seqs"]), seq_starts)
        logger.info("adding %d documents (%d chunks) to %d chunks", len(new_docs), M, N)

        # --- embeddings: the old ones copied, only the new chunks embedded
        old_emb = np.load(s.paths["embeddings"], mmap_mode="r")
        embeddings = np.lib.format.open_memmap(update.tmp("embeddings", s.paths["embeddings"]),
                                               mode="w+", dtype=np.float32,
                                               shape=(total, old_emb.shape[1]))
        embeddings[:N] = old_emb
        _embed_rows(s, added, embeddings[N:], embed_batch_size, device)
        embeddings.flush()

        # --- index: the new vectors added
        index = _index_for(s.paths["index"], idx.read_index(s.paths["index"], rescore=0),
                           embeddings[N:], reset=False)
        _write_index(index, update.tmp("index", s.paths["index"]))
        index = _rescored(s, index, embeddings)

        # --- neighbours: the new chunks' (every chunk's with refresh_neighbours)
        knn = np.memmap(update.tmp("knn", s.paths["knn"]), dtype=np.int32, mode="w+",
                        shape=(total, s.K))
        knn[:N] = np.memmap(s.paths["knn"], dtype=np.int32, mode="r", shape=(N, s.K))
        rows = np.arange(0 if refresh_neighbours else N, total)
        _search(s, index, embeddings, doc_ids.astype(np.int64),
                None if s.seq_len is None else seq_starts.astype(np.int64), rows, knn,
                knn_batch_size)
        knn.flush()
        incomplete = int((knn < 0).any(axis=1).sum())
        del knn
        if s.valid is not None:
            valid_knn = np.empty((s.num_valid, _valid_k(s)), dtype=np.int32)
            _search_valid(s, index, np.arange(s.num_valid), valid_knn, embed_batch_size, device)
            _write_rows(update.tmp("valid_knn", s.valid["knn"]), valid_knn)
        del embeddings

        stats = dict(s.meta["chunks"]["stats"], chunks=int(total), docs=num_docs + len(new_docs),
                     seqs=int(len(seq_starts)))
        record = {"added": len(new_docs), "files": num_files, "source": source_digest,
                  "chunks_added": int(M), "refresh_neighbours": bool(refresh_neighbours),
                  "incomplete_rows": incomplete, "id": uuid.uuid4().hex}
        update.commit(stats, record)
    finally:
        update.discard()
    seconds = time.perf_counter() - started
    logger.info("added %d documents (%d chunks) to %s in %.1fs", len(new_docs), M, s.db.folder,
                seconds)
    return {"documents_added": len(new_docs), "duplicates_skipped": len(skipped),
            "empty_docs": empty, "chunks_added": int(M), "chunks": int(total),
            "docs": stats["docs"], "seqs": stats["seqs"], "neighbours_searched": int(len(rows)),
            "seconds": seconds}


def _valid_k(s: _State) -> int:
    meta = trusted_meta(s.valid["knn"])[0] or {}
    k = (meta.get("inputs") or {}).get("num_nearest_neighbors")
    if k is None:
        k = s.valid["knn"].stat().st_size // (4 * max(s.num_valid, 1))
    return int(k)


def _rescored(s: _State, index, embeddings: np.ndarray):
    """The updated index searched as its build recorded: with rescoring against the updated
    embeddings when the record has a factor."""
    return idx.rescored(index, embeddings, int(idx.index_record(s.paths["index"]).get("rescore", 0)))


def _write_index(index, path: Path) -> None:
    import faiss

    faiss.write_index(index, str(path))


# ----------------------------------------------------------------------------- remove


def remove_documents(database: Union[PathLike, Database], documents: Iterable[Union[int, PathLike]],
                     *, device: Union[str, torch.device] = "cpu", embed_batch_size: int = 256,
                     knn_batch_size: int = 4096) -> dict[str, Any]:
    """Remove documents from the training chunks of a built database, without rebuilding it.

    Args:
        database: the database folder, its manifest, or a :class:`Database`.
        documents: document ids (ints, as in the doc_ids file) and/or text files; a file
            identifies every document with its tokens (an error names a file matching none).

    Chunk and document ids are renumbered in order (as a build without those documents numbers
    them). A chunk whose neighbours included a removed chunk, or whose training sequence now
    packs other documents, is searched again; every other neighbour list is renumbered. Held-out
    neighbours that pointed at a removed chunk are searched again (their chunks re-embedded).

    Returns:
        ``{'documents_removed', 'chunks_removed', 'chunks', 'docs', 'seqs',
        'neighbours_searched', 'seconds'}``.
    """
    started = time.perf_counter()
    s = _State(database)
    C, N = s.C, s.N
    old_chunks, old_doc_ids = s.chunks(), s.doc_ids()
    num_docs = int(s.meta["chunks"]["stats"]["docs"])
    targets, hashes = set(), None
    for item in documents:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 0 <= int(item) < num_docs:
                raise ValueError(f"document id {item} is not in the database "
                                 f"{str(s.db.folder)!r} (it has ids 0..{num_docs - 1})")
            targets.add(int(item))
            continue
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: pass document ids or the text "
                                    "files of the documents to remove")
        if hashes is None:
            hashes = _document_hashes(old_chunks, old_doc_ids, C)
        ids = s.tokenizer.encode_batch([read_text(path)])[0]
        digest = _rows_digest(_document_rows(ids, C, s.tokenizer.pad_id, s.tokenizer.eos_id))
        if not ids or digest not in hashes:
            raise ValueError(f"{path} matches no document of the database {str(s.db.folder)!r} "
                             "(no document has its tokens): pass the file that was added, or "
                             "the document id")
        targets.update(hashes[digest])
    if not targets:
        raise ValueError("no document to remove: pass document ids or files")
    if len(targets) >= num_docs:
        raise ValueError(f"removing all {num_docs} documents would leave the database "
                         f"{str(s.db.folder)!r} empty: rebuild it from other documents instead")

    update = _Update(s)
    try:
        removed_doc = np.zeros(num_docs, dtype=bool)
        removed_doc[sorted(targets)] = True
        keep = ~removed_doc[old_doc_ids]
        kept = np.flatnonzero(keep)
        total = len(kept)
        new_of_old = np.full(N, -1, dtype=np.int64)
        new_of_old[kept] = np.arange(total)
        doc_map = np.cumsum(~removed_doc) - 1  # old document id -> new (for kept documents)
        doc_map[removed_doc] = -1

        chunks = np.array(old_chunks[kept])
        _next_token_column(chunks, s.tokenizer.pad_id)
        doc_ids = doc_map[old_doc_ids[kept]]
        _write_rows(update.tmp("chunks", s.paths["chunks"]), chunks)
        _write_rows(update.tmp("doc_ids", s.paths["doc_ids"]), doc_ids)
        cps = s.db.seq_len // C
        seq_starts = np.arange(0, total, cps, dtype=np.int64)
        _write_rows(update.tmp("seqs", s.paths["seqs"]), seq_starts)

        old_emb = np.load(s.paths["embeddings"], mmap_mode="r")
        embeddings = np.lib.format.open_memmap(update.tmp("embeddings", s.paths["embeddings"]),
                                               mode="w+", dtype=np.float32,
                                               shape=(total, old_emb.shape[1]))
        for start in range(0, total, 65536):
            embeddings[start:start + 65536] = old_emb[kept[start:start + 65536]]
        embeddings.flush()
        index = _index_for(s.paths["index"], idx.read_index(s.paths["index"], rescore=0),
                           embeddings, reset=True)
        _write_index(index, update.tmp("index", s.paths["index"]))
        index = _rescored(s, index, embeddings)

        # neighbours: renumber, and search again where a neighbour is gone or the exclusions moved
        old_knn = np.fromfile(s.paths["knn"], dtype=np.int32).reshape(N, s.K)[kept].astype(np.int64)
        lost = (old_knn >= 0) & (new_of_old[np.maximum(old_knn, 0)] < 0)
        redo = lost.any(axis=1)
        knn = np.where(old_knn >= 0, new_of_old[np.maximum(old_knn, 0)], -1)
        if s.seq_len is not None:
            redo |= _exclusions_changed(old_doc_ids, doc_map, kept, doc_ids, cps, knn_batch_size)
        rows = np.flatnonzero(redo)
        _search(s, index, embeddings, doc_ids, None if s.seq_len is None else seq_starts, rows,
                knn, knn_batch_size)
        knn = knn.astype(np.int32)
        _write_rows(update.tmp("knn", s.paths["knn"]), knn)
        if s.valid is not None:
            K = _valid_k(s)
            vknn = np.fromfile(s.valid["knn"], dtype=np.int32).reshape(s.num_valid, K)
            vknn = vknn.astype(np.int64)
            vlost = ((vknn >= 0) & (new_of_old[np.maximum(vknn, 0)] < 0)).any(axis=1)
            vknn = np.where(vknn >= 0, new_of_old[np.maximum(vknn, 0)], -1)
            _search_valid(s, index, np.flatnonzero(vlost), vknn, embed_batch_size, device)
            _write_rows(update.tmp("valid_knn", s.valid["knn"]), vknn.astype(np.int32))
        del embeddings

        stats = dict(s.meta["chunks"]["stats"], chunks=int(total),
                     docs=num_docs - len(targets), seqs=int(len(seq_starts)))
        record = {"removed": sorted(targets), "chunks_removed": int(N - total),
                  "incomplete_rows": int((knn < 0).any(axis=1).sum()), "id": uuid.uuid4().hex}
        update.commit(stats, record)
    finally:
        update.discard()
    seconds = time.perf_counter() - started
    logger.info("removed %d documents (%d chunks) from %s in %.1fs", len(targets), N - total,
                s.db.folder, seconds)
    return {"documents_removed": len(targets), "chunks_removed": int(N - total),
            "chunks": int(total), "docs": stats["docs"], "seqs": stats["seqs"],
            "neighbours_searched": int(len(rows)), "seconds": seconds}


def _exclusions_changed(old_doc_ids: np.ndarray, doc_map: np.ndarray, kept: np.ndarray,
                        doc_ids: np.ndarray, cps: int, batch_size: int) -> np.ndarray:
    """bool (kept,): the chunk's training-sequence documents (kept ones, renumbered) differ from
    before the removal, so its allowed candidates changed."""
    N = len(old_doc_ids)
    old_starts = np.arange(0, N, cps, dtype=np.int64)
    new_starts = np.arange(0, len(kept), cps, dtype=np.int64)
    out = np.zeros(len(kept), dtype=bool)
    for start in range(0, len(kept), batch_size):
        stop = min(len(kept), start + batch_size)
        new = sequence_documents_window(new_starts, doc_ids, cps, start, stop)
        rows = kept[start:stop]
        a, b = int(rows[0]), int(rows[-1]) + 1
        old = sequence_documents_window(old_starts, old_doc_ids, cps, a, b)[rows - a]
        old = np.where(old >= 0, doc_map[np.maximum(old, 0)], -1)
        width = max(old.shape[1], new.shape[1])
        old = np.sort(np.pad(old, ((0, 0), (0, width - old.shape[1])), constant_values=-1), axis=1)
        new = np.sort(np.pad(new, ((0, 0), (0, width - new.shape[1])), constant_values=-1), axis=1)
        out[start:stop] = (old != new).any(axis=1)
    return out
