"""File helpers shared by the pipeline: atomic writes, provenance sidecars, REPROCESS.

Every derived file is written under a temporary name beside its final path and renamed when
complete, so an interrupted run never leaves a half-written file that a later run trusts. Each
derived file ``X`` has a sidecar ``X.meta.json`` recording what it was made from.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np


def reprocess_requested() -> bool:
    """True when the ``REPROCESS`` environment variable asks for a forced rebuild."""
    return os.environ.get("REPROCESS", "").strip().lower() not in ("", "0", "false", "no")


def meta_path(path: os.PathLike | str) -> Path:
    """The provenance sidecar of ``path``: ``<path>.meta.json``."""
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def tmp_path(path: os.PathLike | str) -> Path:
    """A temporary name beside ``path`` (same directory, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto ``path`` only if the block succeeds.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_meta(path: os.PathLike | str, meta: dict[str, Any]) -> None:
    """Atomically write the provenance sidecar of ``path``."""
    with atomic_path(meta_path(path)) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(path: os.PathLike | str) -> Optional[dict[str, Any]]:
    """The provenance recorded for ``path``, or None when there is none (or it is unreadable)."""
    mp = meta_path(path)
    if not mp.exists():
        return None
    try:
        return json.loads(mp.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_fresh(path: os.PathLike | str, meta: dict[str, Any]) -> bool:
    """True when ``path`` exists, REPROCESS is not set, and its recorded provenance equals ``meta``."""
    if reprocess_requested() or not Path(path).exists():
        return False
    return read_meta(path) == json.loads(json.dumps(meta, sort_keys=True))


def open_int32_memmap(path: os.PathLike | str, shape: tuple[int, ...], what: str, *,
                      missing_fix: str, mismatch_fix: str) -> np.memmap:
    """Open an int32 memmap of ``shape`` read-only after checking that the file exists and that
    its size matches ``shape``; the errors name the file, the problem and the fix given."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist: {missing_fix}")
    itemsize = np.dtype(np.int32).itemsize
    expected = int(np.prod(shape)) * itemsize
    actual = path.stat().st_size
    if actual != expected:
        width = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        holds = (f"{actual / (width * itemsize):g} rows of {width}" if len(shape) > 1
                 else f"{actual / itemsize:g} values")
        raise ValueError(
            f"{what} {str(path)!r} holds {actual} bytes ({holds}) but int32 shape {tuple(shape)} "
            f"needs {expected}: {mismatch_fix}"
        )
    return np.memmap(path, dtype=np.int32, mode="r", shape=tuple(shape))
