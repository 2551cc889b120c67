"""faiss index over chunk embeddings, and neighbour search with exclusions.

Vectors are L2-normalised float32 chunk embeddings, so the metric is the inner product (= cosine
similarity): larger scores are closer. A database whose flat index fits ``max_index_memory_usage``
gets an exact ``faiss.IndexFlatIP``; a larger one gets an approximate index from autofaiss built
under ``max_index_memory_usage`` / ``current_memory_available``.

faiss and autofaiss are imported inside the functions.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from diablogpt_pytorch._io import atomic_path

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(size: Union[str, int, float]) -> int:
    """'100m', '1G', '16GB', 1024 -> bytes (binary units, as autofaiss reads them)."""
    if isinstance(size, (int, float)):
        return int(size)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtb]?)b?\s*", str(size).lower())
    if not match:
        raise ValueError(f"memory size {size!r} is not like '100m', '1G' or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def flat_index_bytes(num_vectors: int, dim: int) -> int:
    """Memory an exact flat float32 index of ``num_vectors`` x ``dim`` needs."""
    return num_vectors * dim * 4


def build_index(embeddings: np.ndarray, embeddings_path: Union[str, Path], index_path: Union[str, Path],
                *, max_index_memory_usage: Union[str, int] = "100m",
                current_memory_available: Union[str, int] = "1G",
                exact: Optional[bool] = None):
    """Build the index of ``embeddings`` and save it atomically at ``index_path``.

    Args:
        embeddings: float32 (N, d) normalised vectors (a read-only memmap of ``embeddings_path``).
        embeddings_path: the ``.npy`` file holding them (autofaiss reads it in pieces).
        index_path: where the index is written (faiss.write_index format).
        max_index_memory_usage: memory budget of the index. An exact IndexFlatIP is used when
            N*d*4 bytes fit it; otherwise autofaiss picks a compressed index under this budget.
        current_memory_available: memory autofaiss may use while building.
        exact: force (True) or forbid (False) the exact index; None chooses by the budget.

    Returns:
        the faiss index (CPU).
    """
    import faiss

    num, dim = embeddings.shape
    budget = parse_memory(max_index_memory_usage)
    need = flat_index_bytes(num, dim)
    use_exact = need <= budget if exact is None else exact
    index_path = Path(index_path)
    if use_exact:
        logger.info("building exact IndexFlatIP over %d x %d vectors (%.1f MB, budget %.1f MB)",
                    num, dim, need / 2**20, budget / 2**20)
        index = faiss.IndexFlatIP(dim)
        # one add, read straight from the memmap: adding in batches grows the index's buffer by
        # reallocation, which holds the old and the new buffer at once (up to twice the index)
        index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    else:
        index = _autofaiss_index(embeddings_path, index_path, num, dim, max_index_memory_usage,
                                 current_memory_available)
    with atomic_path(index_path) as tmp:
        faiss.write_index(index, str(tmp))
    return index


def _autofaiss_index(embeddings_path, index_path: Path, num: int, dim: int,
                     max_index_memory_usage, current_memory_available):
    from autofaiss import build_index as autofaiss_build_index

    logger.info(
        "flat index of %d x %d vectors (%.1f MB) exceeds max_index_memory_usage=%s: building an "
        "approximate index with autofaiss (current_memory_available=%s)",
        num, dim, flat_index_bytes(num, dim) / 2**20, max_index_memory_usage, current_memory_available)
    # autofaiss reads a folder of .npy files: give it one holding a link to ours, beside the index
    work = index_path.with_name(f".{index_path.name}.autofaiss")
    shutil.rmtree(work, ignore_errors=True)
    (work / "emb").mkdir(parents=True)
    infeasible = (
        f"autofaiss could not build an index of {num} x {dim} vectors under "
        f"max_index_memory_usage={max_index_memory_usage!r} and current_memory_available="
        f"{current_memory_available!r}. Fix: raise max_index_memory_usage (an exact index needs "
        f"{math.ceil(flat_index_bytes(num, dim) / 2**20)}m) or current_memory_available")
    try:
        (work / "emb" / "0.npy").symlink_to(Path(embeddings_path).resolve())
        with tqdm(total=1, desc="indexing (autofaiss)", unit="index") as bar:
            try:
                index, _ = autofaiss_build_index(
                    embeddings=str(work / "emb"),
                    index_path=str(work / "knn.index"),
                    index_infos_path=str(work / "infos.json"),
                    max_index_memory_usage=str(max_index_memory_usage),
                    current_memory_available=str(current_memory_available),
                    metric_type="ip",
                    save_on_disk=False,
                    verbose=logging.WARNING,
                )
            except Exception as err:  # autofaiss fails in several ways on infeasible budgets
                raise RuntimeError(f"{infeasible} ({type(err).__name__}: {err})") from err
            bar.update(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if index is None:  # autofaiss's documented answer to an infeasible budget
        raise RuntimeError(infeasible)
    import faiss

    size = len(faiss.serialize_index(index))
    if size > parse_memory(max_index_memory_usage):
        logger.warning(
            "autofaiss built a %s index of %.2f MB, above max_index_memory_usage=%s (autofaiss "
            "does not compress small databases: under 10,000 vectors it builds flat or HNSW "
            "indices)", type(index).__name__, size / 2**20, max_index_memory_usage)
    return index


def read_index(index_path: Union[str, Path], faiss_gpu: bool = False):
    """Load a saved index; with ``faiss_gpu`` move it to all visible GPUs (faiss-gpu needed)."""
    import faiss

    index = faiss.read_index(str(index_path))
    if faiss_gpu:
        index = to_gpu(index)
    return index


def to_gpu(index):
    """Copy ``index`` to the GPUs; only ever called when the user asked for GPU faiss."""
    import faiss

    if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
        raise RuntimeError(
            "faiss_gpu=True but this faiss has no GPU support or sees no GPU: install faiss-gpu "
            "or pass faiss_gpu=False")
    return faiss.index_cpu_to_all_gpus(index)


def rank_candidates(cand_ids: np.ndarray, cand_scores: np.ndarray, k: int, *,
                    excluded: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the best ``k`` candidates that are not excluded.

    Excluded candidates (and faiss's -1 fillers) get score -inf, so they rank after every real
    candidate; the order among real ones is by score, ties kept in search order.

    Args:
        cand_ids: int (b, m) candidate ids from index.search (-1 = none).
        cand_scores: float (b, m) similarity, larger is closer.
        k: neighbours wanted.
        excluded: bool (b, m), True where a candidate must not be returned.

    Returns:
        ids int64 (b, k) with -1 where fewer than k remain, scores float32 (b, k) (-inf there),
        and the number of valid candidates per row int64 (b,).
    """
    cand_ids = np.asarray(cand_ids, dtype=np.int64)
    bad = cand_ids < 0
    if excluded is not None:
        bad = bad | excluded
    scores = np.where(bad, -np.inf, np.asarray(cand_scores, dtype=np.float32))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(cand_ids, order, axis=1)
    top = np.take_along_axis(scores, order, axis=1)
    valid = np.isfinite(top)
    ids = np.where(valid, ids, -1)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        top = np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf)
    return ids, top.astype(np.float32), (~bad).sum(axis=1)


def exclusion_mask(cand_ids: np.ndarray, *, self_ids: Optional[np.ndarray] = None,
                   query_doc_ids: Optional[np.ndarray] = None, doc_ids: Optional[np.ndarray] = None,
                   exclude_doc_ids: Optional[Sequence[Iterable[int]]] = None) -> np.ndarray:
    """bool (b, m): candidate is the query itself, or from the query's document, or from a
    document listed for that row in ``exclude_doc_ids``. ``doc_ids`` maps chunk id -> document.

    ``exclude_doc_ids`` is one iterable of document ids per row, or an int array (b, D) of them
    padded with -1 (compared in one vectorised pass)."""
    cand_ids = np.asarray(cand_ids, dtype=np.int64)
    mask = np.zeros(cand_ids.shape, dtype=bool)
    if self_ids is not None:
        mask |= cand_ids == np.asarray(self_ids, dtype=np.int64)[:, None]
    if doc_ids is None:
        if query_doc_ids is not None or exclude_doc_ids is not None:
            raise ValueError("excluding documents needs the chunks' doc_ids")
        return mask
    safe = np.where(cand_ids >= 0, cand_ids, 0)
    flat = safe.reshape(-1)
    uniq, inverse = np.unique(flat, return_inverse=True)
    cand_docs = np.asarray(doc_ids[uniq], dtype=np.int64)[inverse].reshape(cand_ids.shape)
    if query_doc_ids is not None:
        mask |= cand_docs == np.asarray(query_doc_ids, dtype=np.int64)[:, None]
    if isinstance(exclude_doc_ids, np.ndarray) and exclude_doc_ids.ndim == 2:
        excl = exclude_doc_ids.astype(np.int64, copy=False)
        mask |= ((cand_docs[:, :, None] == excl[:, None, :]) & (excl[:, None, :] >= 0)).any(-1)
    elif exclude_doc_ids is not None:
        for row, docs in enumerate(exclude_doc_ids):
            docs = np.atleast_1d(np.asarray(list(docs) if not np.isscalar(docs) else docs,
                                            dtype=np.int64))
            if docs.size:
                mask[row] |= np.isin(cand_docs[row], docs)
    return mask


def search_excluding(index, queries: np.ndarray, k: int, *, num_extra: int = 10,
                     self_ids: Optional[np.ndarray] = None, query_doc_ids: Optional[np.ndarray] = None,
                     doc_ids: Optional[np.ndarray] = None,
                     exclude_doc_ids: Optional[Sequence[Iterable[int]]] = None,
                     max_k: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest allowed neighbours of each query.

    Fetches ``k + num_extra (+1 when self_ids is given)`` candidates; rows left with fewer than
    ``k`` allowed candidates after exclusion are searched again with a doubled candidate count,
    up to ``min(max_k, index.ntotal)``. What still is missing is -1 (score -inf).

    Args:
        index: faiss index over normalised vectors (inner product).
        queries: float32 (b, d) normalised query vectors.
        self_ids: int (b,) the queries' own chunk ids (excluded by id).
        query_doc_ids: int (b,) the queries' documents (their chunks are excluded).
        doc_ids: int (N,) document of every indexed chunk.
        exclude_doc_ids: per query, more documents to exclude (iterables, or an int array
            (b, D) padded with -1).

    Returns:
        ids int64 (b, k) (-1 where none), scores float32 (b, k).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    total = int(index.ntotal)
    fetch = min(total, k + num_extra + (1 if self_ids is not None else 0))
    rows = np.arange(queries.shape[0])
    out_ids = np.full((queries.shape[0], k), -1, dtype=np.int64)
    out_scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
    while rows.size and fetch > 0:
        scores, ids = index.search(queries[rows], fetch)
        sub = lambda a: None if a is None else np.asarray(a)[rows]  # noqa: E731
        excl = exclusion_mask(
            ids, self_ids=sub(self_ids), query_doc_ids=sub(query_doc_ids), doc_ids=doc_ids,
            exclude_doc_ids=None if exclude_doc_ids is None else (
                exclude_doc_ids[rows] if isinstance(exclude_doc_ids, np.ndarray)
                else [exclude_doc_ids[r] for r in rows]))
        got_ids, got_scores, num_valid = rank_candidates(ids, scores, k, excluded=excl)
        out_ids[rows] = got_ids
        out_scores[rows] = got_scores
        short = num_valid < k
        limit = min(total, max_k)
        if not short.any() or fetch >= limit:
            break
        rows = rows[short]
        fetch = min(limit, fetch * 2)
    return out_ids, out_scores
