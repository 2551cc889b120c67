"""The default corpus: real English text that ships with Python itself, so nothing is downloaded.

``pydoc_data.topics`` is the text of the Python language reference topics that ``help()`` shows
(79 documents, about 465 KB in CPython 3.11). ``write_default_corpus`` writes one document per
``.txt`` file into a folder, atomically and idempotently: a file whose content is already right is
left untouched (its mtime too), so a database built from the folder stays fresh.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from diablogpt_pytorch._io import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_CORPUS_NAME = "pydoc_topics"


def default_corpus_documents() -> dict[str, str]:
    """The default corpus as ``{file name: text}``, in sorted name order.

    Each of ``pydoc_data.topics.topics`` becomes ``<topic>.txt`` (characters other than letters,
    digits, ``-`` and ``_`` in the topic name become ``_``).
    """
    from pydoc_data.topics import topics

    documents = {}
    for topic in sorted(topics):
        name = re.sub(r"[^A-Za-z0-9_-]", "_", topic) + ".txt"
        text = topics[topic].strip() + "\n"
        documents[name] = text
    return documents


def default_corpus_source() -> str:
    """Where the default corpus comes from (the Python version decides its exact text)."""
    return f"pydoc_data.topics (CPython {sys.version_info.major}.{sys.version_info.minor})"


def write_default_corpus(folder: os.PathLike | str) -> list[Path]:
    """Write the default corpus into ``folder``, one UTF-8 ``.txt`` file per document.

    Idempotent: files that already hold the right text are not rewritten. Each file is written to
    a temporary name beside it and renamed, so an interrupted call leaves no partial document.
    Other files in ``folder`` are left alone.

    Returns:
        The document paths, sorted.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, written = [], 0
    for name, text in default_corpus_documents().items():
        path = folder / name
        data = text.encode("utf-8")
        if not (path.is_file() and path.read_bytes() == data):
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            written += 1
        paths.append(path)
    logger.info(
        "default corpus (%s): %d documents in %s, %d written", default_corpus_source(),
        len(paths), folder, written,
    )
    return paths
