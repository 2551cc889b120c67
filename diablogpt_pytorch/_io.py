"""File helpers shared by the pipeline: atomic writes, provenance sidecars, REPROCESS.

Every derived file is written under a temporary name beside its final path and renamed when
complete, so an interrupted run never leaves a half-written file that a later run trusts. Each
derived file ``X`` has a sidecar ``X.meta.json`` recording what it was made from and the size and
modification time of ``X`` itself, so that a file replaced at the same path is not reused.
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


def file_identity(path: os.PathLike | str) -> dict[str, int]:
    """What a sidecar records about its own file: size and modification time (ns). A file
    replaced at the same path (even by one of the same size) gets a new modification time."""
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_meta(path: os.PathLike | str, meta: dict[str, Any]) -> None:
    """Atomically write the provenance sidecar of ``path`` (which must be complete, in place):
    ``meta`` plus ``"file"``, the file's own :func:`file_identity`, which :func:`trusted_meta`
    checks before the file is reused."""
    meta = dict(meta, file=file_identity(path))
    with atomic_path(meta_path(path)) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(path: os.PathLike | str) -> Optional[dict[str, Any]]:
    """The provenance recorded for ``path``, or None when there is none (or it is unreadable).
    Does not check that it still describes the file: :func:`trusted_meta` does."""
    mp = meta_path(path)
    if not mp.exists():
        return None
    try:
        return json.loads(mp.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def trusted_meta(path: os.PathLike | str) -> tuple[Optional[dict[str, Any]], str]:
    """(meta, "") when ``path`` exists and its sidecar was written for this very file (same size
    and modification time as recorded); else (None, why not). Every reuse of a derived file goes
    through here, so a file overwritten after its sidecar was written is never trusted."""
    path = Path(path)
    if not path.exists():
        return None, f"{path} does not exist"
    meta = read_meta(path)
    if meta is None:
        return None, f"{path} has no readable provenance sidecar {meta_path(path)}"
    recorded, actual = meta.get("file"), file_identity(path)
    if recorded is None:
        return None, f"the sidecar of {path} does not record the file's size and time (older format)"
    if recorded != actual:
        return None, (f"{path} was replaced after its sidecar was written (size {recorded.get('size')}"
                      f" -> {actual['size']}, mtime_ns {recorded.get('mtime_ns')} -> "
                      f"{actual['mtime_ns']})")
    return meta, ""


def is_fresh(path: os.PathLike | str, meta: dict[str, Any]) -> bool:
    """True when REPROCESS is not set, ``path`` is trusted (:func:`trusted_meta`) and its recorded
    provenance, apart from the file identity, equals ``meta``."""
    if reprocess_requested():
        return False
    recorded, _ = trusted_meta(path)
    if recorded is None:
        return False
    recorded = {k: v for k, v in recorded.items() if k != "file"}
    return recorded == json.loads(json.dumps(meta, sort_keys=True))


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
