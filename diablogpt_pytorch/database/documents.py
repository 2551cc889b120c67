"""Documents: which files of a folder are documents, reading them, and batching them for the
tokenizer (used by :func:`~diablogpt_pytorch.database.chunks.text_folder_to_chunks_` and by the
incremental update, :mod:`diablogpt_pytorch.database.update`).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from diablogpt_pytorch.database.provenance import PathLike

logger = logging.getLogger(__name__)


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
