"""The database's file names and provenance: what each derived file was built from.

- ``knn_path_for``, ``embeddings_path_for``, ``index_path_for``, ``tokenizer_path_for``: the
  files derived from ``<stem>.dat`` (``<stem>.knn.dat``, ``<stem>.emb.npy``, ``<stem>.index``,
  ``<stem>.tokenizer.json``).
- ``lm_tokenizer``, ``check_tokenizer``: the LM tokenizer the chunks were tokenized with.
- ``fingerprint``, ``cached_meta``: an input file's identity, and the reuse check every stage
  runs on its outputs' sidecars (``<file>.meta.json``, see :mod:`diablogpt_pytorch._io`):
  reuse when they record the same inputs (logged), rebuild otherwise (the log says why), always
  rebuild under ``REPROCESS=1``. ``FORMAT_VERSION`` is part of every stage's recorded inputs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from diablogpt_pytorch._io import read_meta, reprocess_requested, trusted_meta

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
