"""The database manifest: one JSON file that says what a retrieval database folder holds.

``TrainingWrapper`` writes ``database.json`` beside its training chunks memmap once the database
is built (rewritten only when its content changes). It records the embedder and the LM tokenizer
(its kind, fingerprint, ids and file: a trained one lies in the folder), chunk
size, sequence length and K, the counts of each split, and every file: its path (relative to the
manifest's folder when inside it, so the folder can be moved), what it is and its size, and the
build id of its provenance sidecar. With it, a model folder (``DIABLOGPT.save_pretrained``) plus a
database folder is all generation needs:

    from diablogpt_pytorch import DIABLOGPT
    from diablogpt_pytorch.database import Database
    from diablogpt_pytorch.generation import generate

    db = Database.open('runs/main/db')
    model = DIABLOGPT.from_pretrained('runs/main/model')
    db.check_model(model)
    sampled = generate(model, db.retriever(), prompt, **db.generation_kwargs())
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Union

from diablogpt_pytorch._io import atomic_path, read_meta

logger = logging.getLogger(__name__)

MANIFEST_NAME = "database.json"
FORMAT = "diablogpt-database"
VERSION = 1

PathLike = Union[str, os.PathLike]

#: what each file of a split is (the manifest's "what" field)
DESCRIPTIONS = {
    "chunks": "int32 (num_chunks, chunk_size + 1) memmap: each chunk's tokens + the next chunk's "
              "first token",
    "seqs": "int32 (num_seqs,) memmap: first chunk of each training sequence",
    "doc_ids": "int32 (num_chunks,) memmap: the document of each chunk",
    "knn": "int32 (num_chunks, knn) memmap: neighbour chunk ids in the training chunks, -1 = none",
    "embeddings": "float32 (num_chunks, hidden) .npy: L2-normalised chunk embeddings",
    "index": "faiss index over the embeddings (inner product)",
    "embedding_shards": "folder of float32 .npy shards of the embeddings, one per rank, in rank "
                        "order (built under torchrun)",
}


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (so the folder can be moved), else absolute."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _entry(path: Path, root: Path, what: str) -> dict[str, Any]:
    path = Path(path)
    shown = _relative(path, root)
    meta = read_meta(path) or {}
    entry = {"path": shown, "what": DESCRIPTIONS[what], "bytes": path.stat().st_size,
             "build": meta.get("build")}
    if what == "index" and meta.get("index"):
        # the faiss factory string, search knobs, rescoring factor and measured recall@2
        # (index.build_index)
        entry["faiss"] = {k: meta["index"].get(k) for k in
                          ("factory", "search_params", "rescore", "recall_at_2", "recall_queries")}
    return entry


def _embeddings_entry(chunks_path: Path, root: Path) -> dict[str, Any]:
    """The embeddings' entry: the ``.npy`` of a single-process build, or the folder of shards
    when the index was built from shards by ranks (:mod:`diablogpt_pytorch.database.sharded`)."""
    from diablogpt_pytorch.database.provenance import embeddings_path_for, index_path_for
    from diablogpt_pytorch.database import sharded

    index_inputs = (read_meta(index_path_for(chunks_path)) or {}).get("inputs") or {}
    if "embedding_shards" not in index_inputs:
        return _entry(embeddings_path_for(chunks_path), root, "embeddings")
    folder = sharded.shards_dir_for(chunks_path)
    return {"path": _relative(folder, root), "what": DESCRIPTIONS["embedding_shards"],
            "bytes": sum(p.stat().st_size for p in folder.glob("*.npy")), "build": None}


def write_manifest(wrapper, built: dict[str, Any]) -> Path:
    """Write (or leave as it is, when unchanged) the manifest of ``wrapper``'s database.

    ``built``: ``{'train': (stats, knn_path), 'valid': (stats, knn_path)}`` as the wrapper's
    build returns them. Returns the manifest path (beside the training chunks memmap).
    """
    from diablogpt_pytorch.database import embedder as emb
    from diablogpt_pytorch.database.provenance import index_path_for

    root = wrapper.paths["chunks"].parent
    splits = {}
    for split, paths in (("train", wrapper.paths), ("valid", wrapper.valid_paths)):
        if split not in built:
            continue
        stats, knn_path = built[split]
        files = {name: _entry(paths[name], root, name) for name in ("chunks", "seqs", "doc_ids")}
        files["knn"] = _entry(knn_path, root, "knn")
        if split == "train":
            files["embeddings"] = _embeddings_entry(paths["chunks"], root)
            files["index"] = _entry(index_path_for(paths["chunks"]), root, "index")
        splits[split] = {"counts": {k: stats[k] for k in ("chunks", "docs", "seqs")},
                         "files": files}
    tok = wrapper.tokenizer
    tok_file = getattr(tok, "path", None)  # the tokenizer's file or folder (none for 'bert')
    valid_bytes = (wrapper._decoded_num_bytes(wrapper.valid_paths, built["valid"][0])
                   if "valid" in built else None)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "embedder": wrapper.embedder, "embedder_identity": emb.embedder_identity(wrapper.embedder),
        "tokenizer": {"vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "eos_id": tok.eos_id,
                      "kind": tok.kind, "fingerprint": tok.fingerprint(),
                      "path": None if tok_file is None else _relative(Path(tok_file), root)},
        "chunk_size": wrapper.chunk_size, "seq_len": wrapper.seq_len, "knn": wrapper.knn,
        "documents": {"source": str(wrapper.documents_path.resolve()), "glob": wrapper.glob,
                      "train": len(wrapper.train_documents),
                      "valid": len(wrapper.valid_documents),
                      # UTF-8 bytes the held-out tokens decode to (for bits per byte)
                      "valid_bytes": valid_bytes},
        "splits": splits,
    }
    path = root / MANIFEST_NAME
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    if not (path.is_file() and path.read_text() == text):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        logger.info("wrote the database manifest %s", path)
    return path


class Database:
    """A retrieval database folder opened from its manifest (see the module docstring).

    Attributes: ``folder``, ``manifest`` (the JSON), ``embedder``, ``chunk_size``, ``seq_len``,
    ``knn``, ``pad_id``, ``eos_id``, ``vocab_size``, ``num_chunks`` (training chunks); the LM
    tokenizer is :meth:`tokenizer`.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder, self.manifest = folder, manifest
        self.embedder = manifest["embedder"]
        self.chunk_size, self.seq_len, self.knn = (int(manifest[k]) for k in
                                                   ("chunk_size", "seq_len", "knn"))
        tok = manifest["tokenizer"]
        self.vocab_size, self.pad_id, self.eos_id = (int(tok[k]) for k in
                                                     ("vocab_size", "pad_id", "eos_id"))
        self.num_chunks = int(manifest["splits"]["train"]["counts"]["chunks"])

    @classmethod
    def open(cls, folder: PathLike) -> "Database":
        """Read ``<folder>/database.json`` (or a manifest path) and check that every file it lists
        exists with the recorded size; errors name the file and the fix."""
        folder = Path(folder)
        path = folder if folder.is_file() else folder / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no retrieval database at {str(folder)!r}: {MANIFEST_NAME} is missing (build the "
                "database with `diablogpt build-db` or TrainingWrapper, then pass its folder)")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{str(path)!r} is not readable JSON ({err}): rebuild the "
                             "database") from err
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a diablogpt database manifest")
        if manifest.get("version") != VERSION:
            raise ValueError(f"{str(path)!r} has manifest version {manifest.get('version')}, this "
                             f"library reads version {VERSION}: rebuild the database")
        if manifest.get("update_in_progress"):  # diablogpt_pytorch.database.update's commit mark
            raise ValueError(f"{str(path)!r}: an update of the database (add_documents / "
                             "remove_documents) was interrupted while its files were being "
                             "replaced: rebuild the database")
        db = cls(path.parent, manifest)
        for split in manifest["splits"]:
            for name in manifest["splits"][split]["files"]:
                db.path(name, split)  # checks existence and size
        return db

    def path(self, name: str, split: str = "train") -> Path:
        """The path of file ``name`` ('chunks', 'seqs', 'doc_ids', 'knn', 'embeddings', 'index')
        of ``split``, checked to exist with its recorded size."""
        splits = self.manifest["splits"]
        if split not in splits or name not in splits[split]["files"]:
            raise KeyError(f"the database {str(self.folder)!r} has no {split} {name} file")
        entry = splits[split]["files"][name]
        path = Path(entry["path"])
        path = path if path.is_absolute() else self.folder / path
        if not path.is_file():
            raise FileNotFoundError(f"database file {str(path)!r} ({entry['what']}) listed in "
                                    f"{MANIFEST_NAME} is missing: rebuild the database")
        if path.stat().st_size != entry["bytes"]:
            raise ValueError(f"database file {str(path)!r} holds {path.stat().st_size} bytes but "
                             f"{MANIFEST_NAME} recorded {entry['bytes']}: it was changed after "
                             "the build; rebuild the database")
        return path

    def counts(self, split: str = "train") -> dict[str, int]:
        """``{'chunks', 'docs', 'seqs'}`` of ``split``."""
        return dict(self.manifest["splits"][split]["counts"])

    def dataset(self, split: str = "valid"):
        """A :class:`~diablogpt_pytorch.data.DIABLOGPTDataset` over ``split`` ('train' or
        'valid'; held-out neighbours are ids into the training chunks)."""
        from diablogpt_pytorch.data import DIABLOGPTDataset

        if split not in self.manifest["splits"]:
            raise ValueError(f"the database {str(self.folder)!r} has no {split} split (it has "
                             f"{sorted(self.manifest['splits'])}): build it with valid_fraction > 0")
        counts, train = self.counts(split), split == "train"
        return DIABLOGPTDataset(
            num_sequences=counts["seqs"], num_chunks=counts["chunks"], num_neighbors=self.knn,
            chunk_size=self.chunk_size, seq_len=self.seq_len,
            chunk_memmap_path=self.path("chunks", split), chunk_nn_memmap_path=self.path("knn", split),
            seq_memmap_path=self.path("seqs", split), doc_ids_memmap_path=self.path("doc_ids", split),
            eos_id=self.eos_id, pad_id=self.pad_id,
            db_chunk_memmap_path=None if train else self.path("chunks"),
            db_num_chunks=None if train else self.num_chunks,
            db_doc_ids_memmap_path=None if train else self.path("doc_ids"))

    def check_model(self, model, what: str = "the model") -> None:
        """Raise a clear ValueError when ``model`` cannot read this database's tokens."""
        problems = []
        if model.chunk_size != self.chunk_size:
            problems.append(f"chunk_size {model.chunk_size} != the database's {self.chunk_size}")
        if model.num_tokens < self.vocab_size:
            problems.append(f"num_tokens {model.num_tokens} < the tokenizer's vocabulary "
                            f"{self.vocab_size}")
        if model.pad_id != self.pad_id:
            problems.append(f"pad_id {model.pad_id} != the tokenizer's {self.pad_id}")
        if problems:
            raise ValueError(f"{what} does not match the database {str(self.folder)!r}: "
                             + "; ".join(problems) + " (use the model trained on this database, "
                             "or build a database with its chunk size and embedder)")

    def tokenizer(self):
        """The LM tokenizer the database's chunks were made with (an
        :class:`~diablogpt_pytorch.tokenizer.LMTokenizer`), checked against its recorded
        fingerprint."""
        if getattr(self, "_tokenizer", None) is not None:
            return self._tokenizer
        from diablogpt_pytorch.tokenizer import load_tokenizer

        rec = self.manifest["tokenizer"]
        spec = "bert"
        if rec.get("path"):
            spec = Path(rec["path"])
            spec = spec if spec.is_absolute() else self.folder / spec
            if not spec.exists():
                raise FileNotFoundError(
                    f"the database's LM tokenizer {str(spec)!r} listed in {MANIFEST_NAME} is "
                    "missing: copy it back (a trained one lives in the database folder) or "
                    "rebuild the database")
        tok = load_tokenizer(spec, embedder=self.embedder)
        if rec.get("fingerprint") not in (None, tok.fingerprint()):
            raise ValueError(f"the LM tokenizer {str(spec)!r} differs from the one the database "
                             f"{str(self.folder)!r} was built with (its content changed): restore "
                             "it or rebuild the database")
        self._tokenizer = tok
        return tok

    def retriever(self, device="cpu", faiss_gpu: bool = False):
        """A :class:`~diablogpt_pytorch.database.retriever.Retriever` over the training chunks (queries
        read with :meth:`tokenizer`)."""
        from diablogpt_pytorch.database.retriever import Retriever

        return Retriever(self.path("chunks"), self.path("doc_ids"), self.path("index"),
                         embedder=self.embedder, device=device, faiss_gpu=faiss_gpu,
                         tokenizer=self.tokenizer())

    def generation_kwargs(self) -> dict[str, Any]:
        """``num_neighbors``, ``eos_id`` and ``pad_id`` for ``generation.generate``."""
        return {"num_neighbors": self.knn, "eos_id": self.eos_id, "pad_id": self.pad_id}

