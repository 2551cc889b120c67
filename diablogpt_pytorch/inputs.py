"""Document sources beyond a folder of text files: JSON Lines, Parquet, a saved ``datasets`` dataset.

Each source yields ``(label, text)`` pairs, one per document, in a fixed order, streaming: JSON
Lines are read line by line, Parquet in record batches of one column, a dataset saved with
``Dataset.save_to_disk`` through its memory-mapped Arrow files, so memory does not grow with the
corpus. Pass one to ``retrieval.text_folder_to_chunks_(documents=...)``: a record whose text field
equals a file's content gives exactly the chunks that file gives, so a JSON Lines file with the
texts of a folder's files in sorted file order gives the same database as the folder.

    from diablogpt_pytorch.inputs import open_documents
    from diablogpt_pytorch.database.chunks import text_folder_to_chunks_

    docs = open_documents('corpus.jsonl', text_field='text')   # or .parquet, or a dataset folder
    stats = text_folder_to_chunks_(documents=docs, chunks_memmap_path='train.chunks.dat', ...)

A missing or non-text field is an error naming the file, the record and the fix; a null text is an
empty document (skipped by the chunker, with a warning).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]


def _files_identity(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _as_files(paths: Union[PathLike, Sequence[PathLike]], kind: str) -> list[Path]:
    files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not files:
        raise ValueError(f"no {kind} files given")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{kind} files do not exist: {missing[:5]}")
    return files


def _text(value: Any, where: str, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} holds a {type(value).__name__}, not text: "
                         "point text_field at a string field")
    return value


class DocumentSource:
    """Documents as ``(label, text)`` pairs; ``len()`` counts them, ``identity()`` says what they
    were read from (recorded in the chunks' provenance sidecars, so a change triggers a rebuild)."""

    kind = "documents"

    def __iter__(self) -> Iterator[tuple[str, str]]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError


class JsonlDocuments(DocumentSource):
    """One JSON object per line (``.jsonl``, or gzip-compressed ``.jsonl.gz``); blank lines are
    skipped. Each object's ``text_field`` is a document."""

    kind = "jsonl"

    def __init__(self, paths: Union[PathLike, Sequence[PathLike]], text_field: str = "text"):
        self.files = _as_files(paths, "JSON Lines")
        self.text_field = text_field
        self._len: Optional[int] = None

    def _lines(self, path: Path) -> Iterator[tuple[int, str]]:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield number, line

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for path in self.files:
            for number, line in self._lines(path):
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where} is not valid JSON ({err.msg}): each line of a JSON "
                                     "Lines file must be one JSON object") from err
                if not isinstance(record, dict) or self.text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(f"{where} has no field {self.text_field!r} (it has {keys}): "
                                     "pass text_field= the name of the text field")
                yield where, _text(record[self.text_field], where, self.text_field)

    def __len__(self) -> int:
        if self._len is None:  # one streaming pass, no parsing
            self._len = sum(1 for path in self.files for _ in self._lines(path))
        return self._len

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "files": _files_identity(self.files),
                "text_field": self.text_field}


class ParquetDocuments(DocumentSource):
    """Parquet files, read ``batch_size`` rows of the ``text_field`` column at a time."""

    kind = "parquet"

    def __init__(self, paths: Union[PathLike, Sequence[PathLike]], text_field: str = "text",
                 batch_size: int = 1024):
        import pyarrow.parquet as pq

        self.files = _as_files(paths, "Parquet")
        self.text_field, self.batch_size = text_field, int(batch_size)
        self._rows = 0
        for path in self.files:
            try:
                meta = pq.ParquetFile(path)
            except Exception as err:  # pyarrow raises ArrowInvalid and friends
                raise ValueError(f"{path} is not a readable Parquet file: {err}") from err
            names = meta.schema_arrow.names
            if text_field not in names:
                raise ValueError(f"{path} has no column {text_field!r} (it has {names}): pass "
                                 "text_field= the name of the text column")
            self._rows += meta.metadata.num_rows

    def __iter__(self) -> Iterator[tuple[str, str]]:
        import pyarrow.parquet as pq

        for path in self.files:
            row = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=self.batch_size,
                                                            columns=[self.text_field]):
                for value in batch.column(0).to_pylist():
                    where = f"{path}[row {row}]"
                    yield where, _text(value, where, self.text_field)
                    row += 1

    def __len__(self) -> int:
        return self._rows

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "files": _files_identity(self.files),
                "text_field": self.text_field}


class SavedDataset(DocumentSource):
    """A Hugging Face ``datasets`` dataset written with ``save_to_disk`` (a ``DatasetDict`` needs
    ``split``). Read through its memory-mapped Arrow files, ``batch_size`` rows at a time."""

    kind = "datasets"

    def __init__(self, path: PathLike, text_field: str = "text", split: Optional[str] = None,
                 batch_size: int = 1024):
        try:
            import datasets
        except ImportError as err:
            raise ImportError(f"{path} is a saved `datasets` dataset: pip install datasets to "
                              "read it") from err
        self.path, self.text_field, self.split = Path(path), text_field, split
        self.batch_size = int(batch_size)
        ds = datasets.load_from_disk(str(self.path), keep_in_memory=False)
        if isinstance(ds, datasets.DatasetDict):
            if split is None or split not in ds:
                raise ValueError(f"{self.path} holds the splits {sorted(ds)}: pass split= one of "
                                 "them" + ("" if split is None else f" (not {split!r})"))
            ds = ds[split]
        elif split is not None:
            raise ValueError(f"{self.path} is a single dataset without splits: drop split=")
        if text_field not in ds.column_names:
            raise ValueError(f"{self.path} has no column {text_field!r} (it has "
                             f"{ds.column_names}): pass text_field= the name of the text column")
        self.dataset = ds.select_columns([text_field])

    def __iter__(self) -> Iterator[tuple[str, str]]:
        row = 0
        for batch in self.dataset.iter(batch_size=self.batch_size):
            for value in batch[self.text_field]:
                where = f"{self.path}[row {row}]"
                yield where, _text(value, where, self.text_field)
                row += 1

    def __len__(self) -> int:
        return self.dataset.num_rows

    def identity(self) -> dict[str, Any]:
        files = sorted(Path(f["filename"]) for f in self.dataset.cache_files)
        return {"kind": self.kind, "files": _files_identity(files), "split": self.split,
                "text_field": self.text_field}


def open_documents(path: PathLike, text_field: str = "text", split: Optional[str] = None
                   ) -> DocumentSource:
    """The source for ``path`` by its form: a ``.jsonl``/``.jsonl.gz`` file, a ``.parquet`` file,
    or a folder written by ``datasets``' ``save_to_disk``. A plain folder of text files is not a
    source: pass it as ``folder=``."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
            return SavedDataset(p, text_field=text_field, split=split)
        raise ValueError(f"{p} is a folder but not a saved `datasets` dataset (no "
                         "dataset_info.json or dataset_dict.json): pass a folder of text files as "
                         "folder=, not as a document source")
    if split is not None:
        raise ValueError(f"split= applies to a saved `datasets` dataset, not to {p}")
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return JsonlDocuments(p, text_field=text_field)
    if name.endswith(".parquet"):
        return ParquetDocuments(p, text_field=text_field)
    if not p.exists():
        raise FileNotFoundError(f"document source {p} does not exist")
    raise ValueError(f"{p}: unknown document source (expected .jsonl, .jsonl.gz, .parquet or a "
                     "folder written by datasets' save_to_disk)")
