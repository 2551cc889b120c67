"""faiss index over chunk embeddings, and neighbour search with exclusions.

Vectors are L2-normalised float32 chunk embeddings, so the metric is the inner product (= cosine
similarity): larger scores are closer. :func:`build_index` builds every index of the library (the
single-process and the sharded database alike) from one array or a list of shard arrays:

- ``index="auto"`` (default) picks by the number of vectors N and ``max_index_memory_usage``
  (:func:`choose_index`): exact ``Flat`` when it fits and N <= ``exact_max_vectors``, else the
  first that fits of ``HNSW32``, ``IVF{n}_HNSW32,Flat``, ``IVF{n}_HNSW32,SQ8``,
  ``IVF{n}_HNSW32,SQ4`` and ``IVF{n}_HNSW32,PQ{m}np`` (n about 4 sqrt(N) lists, m the largest
  divisor of the dimension up to 64 whose codes fit), else ``Flat`` if it fits;
- ``"exact"``; ``"autofaiss"`` (the optional autofaiss package picks under the budget); or any
  faiss index factory string (``"HNSW32"``, ``"IVF1024_HNSW32,PQ48np"``...).

Approximate indexes are trained on a seeded random sample, then their search knobs (``nprobe``,
``efSearch``, the IVF quantizer's ``efSearch``) are doubled until recall@2 against exact search on
a seeded sample of the vectors reaches :data:`RECALL_TARGET` (:func:`tune_search`). The factory
string, the knobs and the recall are logged and recorded under ``"index"`` in the index's sidecar,
and :func:`read_index` applies the recorded knobs when it loads the index.

A compressed index (SQ / PQ codes: what ``"auto"`` picks under a tight budget) ranks by
approximate scores, which caps its recall whatever the knobs. Such an index is searched through
:class:`RescoredIndex` (rescoring): it fetches ``rescore`` x k candidates and re-ranks them by the
exact inner product with the float32 embeddings, read from their ``.npy`` file on disk (memory
mapped: no index memory). The factor (default :data:`DEFAULT_RESCORE` for a compressed index, 0 =
off, else ``rescore=``) is tuned with, recorded in the sidecar with the embeddings' file names and
re-applied by :func:`read_index`.

faiss and autofaiss are imported inside the functions.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from diablogpt_pytorch._io import atomic_path, read_meta, write_meta

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}

#: an exact index above this many vectors makes every neighbour search scan the whole database
#: (the knn build is quadratic in N): ``index="auto"`` prefers an approximate one beyond it
EXACT_MAX_VECTORS = 1 << 18
#: recall@2 the build tunes the search knobs for (and warns below)
RECALL_TARGET = 0.9
#: queries (database vectors, seeded sample) the recall is measured on
RECALL_QUERIES = 1000
HNSW_M = 32
#: vectors added to an index per call (storage is reserved first, so no buffer doubling)
ADD_BATCH = 16384
#: search knob caps: doubling stops here
MAX_EF_SEARCH = 4096
#: candidates per wanted neighbour a compressed (PQ / SQ) index is searched for and re-ranked by
#: exact inner products (:class:`RescoredIndex`)
DEFAULT_RESCORE = 8
#: ``index="auto"``'s PQ (when no scalar quantizer fits the budget) has at most this many
#: sub-quantizers: with rescoring more buy no recall, and each costs k-means training time
AUTO_PQ_MAX_M = 64
#: embedding rows gathered per rescoring step (bounds its memory: rows x dim x 4 bytes)
RESCORE_ROWS = 1 << 12
#: the rescoring factor tuning raises up to
MAX_RESCORE = 64
PathLike = Union[str, Path]
Vectors = Union[np.ndarray, Sequence[np.ndarray]]


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


# ----------------------------------------------------------------------------- choosing


def _hnsw_vector_bytes(dim: int, m: int = HNSW_M) -> float:
    # float32 vector + level-0 links (2M int32) + upper-level links (M int32 on 1/(M-1) of a level
    # on average) + level (int32) + offset (int64)
    return 4 * dim + 8 * m + 4 * m / (m - 1) + 12


def ivf_nlist(num_vectors: int) -> int:
    """Inverted lists for N vectors: the power of 2 nearest 4 sqrt(N), at most N / 39 (k-means
    wants 39 training points per centroid), at least 1."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(num_vectors))))
    while nlist > 1 and nlist * 39 > num_vectors:
        nlist //= 2
    return nlist


def index_bytes(factory: str, num_vectors: int, dim: int) -> int:
    """Estimated size of a ``Flat``, ``HNSW{M}``, ``IVF{n}_HNSW{M},Flat``,
    ``IVF{n}_HNSW{M},SQ{8,4,fp16}`` or ``IVF{n}_HNSW{M},PQ{m}[np]`` index of ``num_vectors`` x
    ``dim`` (faiss's serialized size; tests check the estimate against it)."""
    n = num_vectors
    if factory == "Flat":
        return flat_index_bytes(n, dim)
    hnsw = re.fullmatch(r"HNSW(\d+)(,Flat)?", factory)
    if hnsw:
        return int(n * _hnsw_vector_bytes(dim, int(hnsw.group(1))))
    ivf = re.fullmatch(r"IVF(\d+)(?:_HNSW(\d+))?,(Flat|PQ(\d+)(?:x8)?(?:np)?|SQ(8|4|fp16))", factory)
    if not ivf:
        raise ValueError(f"no size estimate for index {factory!r}")
    nlist = int(ivf.group(1))
    quantizer = nlist * (_hnsw_vector_bytes(dim, int(ivf.group(2))) if ivf.group(2) else 4 * dim)
    if ivf.group(3) == "Flat":
        return int(n * (4 * dim + 8) + quantizer)
    if ivf.group(5):  # scalar quantizer: bits per dimension, a minimum and a range per dimension
        code = {"8": dim, "4": math.ceil(dim / 2), "fp16": 2 * dim}[ivf.group(5)]
        return int(n * (code + 8) + quantizer + 2 * dim * 4)
    m = int(ivf.group(4))
    return int(n * (m + 8) + quantizer + 256 * dim * 4)


def choose_index(num_vectors: int, dim: int, max_index_memory_usage: Union[str, int] = "100m", *,
                 exact_max_vectors: int = EXACT_MAX_VECTORS) -> str:
    """The faiss factory string ``index="auto"`` builds for ``num_vectors`` x ``dim``.

    ``Flat`` (exact) when it fits ``max_index_memory_usage`` and N <= ``exact_max_vectors``; else
    the first that fits of ``HNSW32``, ``IVF{n}_HNSW32,Flat``, ``IVF{n}_HNSW32,SQ8``,
    ``IVF{n}_HNSW32,SQ4`` and ``IVF{n}_HNSW32,PQ{m}np`` (n = :func:`ivf_nlist`, m the largest
    divisor of ``dim`` up to :data:`AUTO_PQ_MAX_M` whose index fits); else ``Flat`` if it fits.
    An HNSW or IVF-Flat index is larger than the flat one (it holds the vectors too), so under a
    budget the flat index exceeds, the choice is a compressed (SQ / PQ) index, searched with
    rescoring.
    """
    budget = parse_memory(max_index_memory_usage)
    n = int(num_vectors)
    flat_fits = flat_index_bytes(n, dim) <= budget
    if flat_fits and n <= exact_max_vectors:
        return "Flat"
    nlist = ivf_nlist(n)
    candidates = [f"HNSW{HNSW_M}", f"IVF{nlist}_HNSW{HNSW_M},Flat"]
    # Compressed codes are searched with rescoring (RescoredIndex: candidates re-ranked by exact
    # inner products), so they only need to rank candidates roughly: on the scale benchmark
    # (BENCHMARKS.md) SQ8, SQ4, PQ48, PQ96 and PQ384 all reach the same rescored recall@2. What
    # differs is the build: a scalar quantizer trains in one pass (a range per dimension) while
    # PQ runs k-means per sub-quantizer, slower the more there are (PQ384 at 80k vectors: 74% of
    # a 44 s build). So the cheapest to build that fits: SQ8 (d bytes a vector), SQ4 (d / 2), then
    # a PQ of at most AUTO_PQ_MAX_M sub-quantizers (what a tighter budget leaves).
    candidates += [f"IVF{nlist}_HNSW{HNSW_M},SQ8", f"IVF{nlist}_HNSW{HNSW_M},SQ4"]
    if n >= 256:  # a PQ codebook has 256 centroids per sub-vector
        candidates += [f"IVF{nlist}_HNSW{HNSW_M},PQ{m}np"
                       for m in sorted((m for m in range(1, min(dim, AUTO_PQ_MAX_M) + 1)
                                        if dim % m == 0), reverse=True)]
    for factory in candidates:
        if index_bytes(factory, n, dim) <= budget:
            return factory
    if flat_fits:
        return "Flat"
    smallest = min(candidates + ["Flat"], key=lambda f: index_bytes(f, n, dim))
    raise ValueError(
        f"no index of {n} x {dim} vectors fits max_index_memory_usage={max_index_memory_usage!r} "
        f"({budget} bytes): the smallest, {smallest}, needs "
        f"{math.ceil(index_bytes(smallest, n, dim) / 2**20)}m. Fix: raise max_index_memory_usage "
        f"(an exact index needs {math.ceil(flat_index_bytes(n, dim) / 2**20)}m), or pass index= "
        "a faiss factory string or 'exact'")


def resolve_index(index: str, num_vectors: int, dim: int,
                  max_index_memory_usage: Union[str, int] = "100m", *,
                  exact_max_vectors: int = EXACT_MAX_VECTORS) -> str:
    """``index=`` -> what :func:`build_index` builds: a faiss factory string, or ``"autofaiss"``.

    Raises ValueError naming the string and faiss's message when faiss cannot build it."""
    if not isinstance(index, str) or not index.strip():
        raise ValueError(f"index={index!r}: pass 'auto', 'exact', 'autofaiss' or a faiss index "
                         "factory string such as 'HNSW32' or 'IVF1024_HNSW32,PQ48np'")
    if index == "auto":
        return choose_index(num_vectors, dim, max_index_memory_usage,
                            exact_max_vectors=exact_max_vectors)
    if index == "exact":
        return "Flat"
    if index == "autofaiss":
        return index
    import faiss

    try:
        faiss.index_factory(dim, index, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"index={index!r} is not a faiss index factory string faiss can build for {dim}-"
            f"dimensional vectors (faiss: {reason}). Fix: pass 'auto', 'exact', 'autofaiss' or a "
            f"factory string such as 'HNSW32', 'IVF1024_HNSW32,Flat' or "
            f"'IVF1024_HNSW32,PQ{_largest_divisor_at_most(dim, 48)}np' (PQ m must divide {dim})"
        ) from None
    if re.search(r"PQ\d+(x\d+)?(?!\d|x|np)", index) and re.match(r"(OPQ\d+[^,]*,)?IVF", index):
        logger.warning("index=%r: faiss trains polysemous codes for an IVF PQ without 'np' (about "
                       "100x slower to build, unused by the search here); write PQ...np", index)
    return index


def _largest_divisor_at_most(dim: int, limit: int) -> int:
    return max(m for m in range(1, min(dim, limit) + 1) if dim % m == 0)


def build_inputs(index: str, num_vectors: int, dim: int,
                 max_index_memory_usage: Union[str, int] = "100m",
                 current_memory_available: Union[str, int] = "1G", *,
                 exact_max_vectors: int = EXACT_MAX_VECTORS,
                 rescore: Optional[int] = None) -> dict[str, Any]:
    """What decides the index :func:`build_index` makes (for a cache record): the resolved
    factory string, for autofaiss the budgets it chooses under, and ``rescore`` when given."""
    factory = resolve_index(index, num_vectors, dim, max_index_memory_usage,
                            exact_max_vectors=exact_max_vectors)
    out: dict[str, Any] = {"index": factory}
    if rescore is not None:
        out["rescore"] = check_rescore(rescore)
    if factory == "autofaiss":
        out.update(max_index_memory_usage=str(max_index_memory_usage),
                   current_memory_available=str(current_memory_available))
    return out


# ----------------------------------------------------------------------------- vectors


class _Rows:
    """One (N, d) array or memmap, or a list of shard arrays read as their concatenation."""

    def __init__(self, vectors: Vectors):
        parts = [vectors] if isinstance(vectors, np.ndarray) else list(vectors)
        if not parts or any(p.ndim != 2 or p.shape[1] != parts[0].shape[1] for p in parts):
            raise ValueError(f"embeddings must be one (N, d) array or a list of (n_i, d) shard "
                             f"arrays, got shapes {[getattr(p, 'shape', None) for p in parts]}")
        self.parts = [p for p in parts if len(p)]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.num, self.dim = int(self.offsets[-1]), int(parts[0].shape[1])

    def batches(self, size: int) -> Iterator[np.ndarray]:
        """Contiguous float32 rows [a, a + size) for a = 0, size, 2 size... (the same batches for
        any split into shards); one part read whole is returned without a copy."""
        if len(self.parts) == 1 and size >= self.num:
            yield np.ascontiguousarray(self.parts[0], dtype=np.float32)
            return
        for a in range(0, self.num, size):
            yield self.slice(a, min(self.num, a + size))

    def slice(self, a: int, b: int) -> np.ndarray:
        pieces = []
        for i, p in enumerate(self.parts):
            lo, hi = max(a, self.offsets[i]), min(b, self.offsets[i + 1])
            if lo < hi:
                pieces.append(p[lo - self.offsets[i]:hi - self.offsets[i]])
        return np.ascontiguousarray(pieces[0] if len(pieces) == 1 else np.concatenate(pieces),
                                    dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 rows (any order) gathered from the parts."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        for i in np.unique(part):
            sel = np.flatnonzero(part == i)
            local = rows[sel] - self.offsets[i]
            order = np.argsort(local, kind="stable")  # sorted reads from a memmap
            out[sel[order]] = self.parts[i][local[order]]
        return out


# ----------------------------------------------------------------------------- rescoring


class RescoredIndex:
    """A faiss index searched with rescoring: ``search(queries, k)`` fetches ``factor * k``
    candidates from ``index`` and re-ranks them by their exact inner product with ``vectors``
    (the float32 rows the index holds, usually a read-only memmap of the embeddings file), read in
    sorted-id batches of at most :data:`RESCORE_ROWS` rows. Returns (scores, ids) as faiss does,
    the scores exact. Other attributes are the wrapped index's."""

    def __init__(self, index, vectors: Vectors, factor: int):
        self.index = index
        self.rows = vectors if isinstance(vectors, _Rows) else _Rows(vectors)
        self.factor = check_rescore(factor)
        if self.factor < 1:
            raise ValueError("RescoredIndex needs a rescoring factor >= 1")
        if self.rows.num != index.ntotal or self.rows.dim != index.d:
            raise ValueError(f"rescoring vectors are {self.rows.num} x {self.rows.dim} but the "
                             f"index holds {index.ntotal} x {index.d}: pass the embeddings the "
                             "index was built from (or rebuild it)")

    def __getattr__(self, name):
        if "index" not in self.__dict__:  # not built yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.__dict__["index"], name)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        b = len(queries)
        out_scores = np.full((b, k), -np.inf, dtype=np.float32)
        out_ids = np.full((b, k), -1, dtype=np.int64)
        fetch = min(int(self.index.ntotal), k * self.factor)
        if fetch <= 0 or b == 0:
            return out_scores, out_ids
        _, cand = self.index.search(queries, fetch)
        keep = min(k, fetch)
        step = max(1, RESCORE_ROWS // fetch)
        for a in range(0, b, step):
            ids = np.asarray(cand[a:a + step], dtype=np.int64)
            valid = ids >= 0
            uniq, inverse = np.unique(np.where(valid, ids, 0).reshape(-1), return_inverse=True)
            vecs = self.rows.take(uniq)[inverse.reshape(-1)].reshape(*ids.shape, self.rows.dim)
            exact = np.einsum("qd,qmd->qm", queries[a:a + step], vecs)
            exact = np.where(valid, exact, -np.inf).astype(np.float32)
            order = np.argsort(-exact, axis=1, kind="stable")[:, :keep]
            top = np.take_along_axis(exact, order, axis=1)
            out_scores[a:a + step, :keep] = top
            out_ids[a:a + step, :keep] = np.where(np.isfinite(top),
                                                  np.take_along_axis(ids, order, axis=1), -1)
        return out_scores, out_ids


def unwrap(index):
    """The faiss index itself (``index`` unless it is a :class:`RescoredIndex`)."""
    return index.index if isinstance(index, RescoredIndex) else index


def check_rescore(rescore) -> int:
    """``rescore=`` -> int >= 0, or a ValueError saying what to pass."""
    if isinstance(rescore, bool) or not isinstance(rescore, (int, np.integer)) or rescore < 0:
        raise ValueError(f"rescore={rescore!r}: pass a whole number of candidates per wanted "
                         f"neighbour to re-rank by exact scores (e.g. {DEFAULT_RESCORE}), or 0 "
                         "for the index's own ranking")
    return int(rescore)


def is_compressed(index) -> bool:
    """Whether ``index`` stores codes smaller than the float32 vectors (PQ, SQ...): its ranking is
    approximate even when the search visits every vector."""
    import faiss

    index = unwrap(index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return int(ivf.code_size) < 4 * int(ivf.d)
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    size = getattr(inner, "code_size", None)
    return size is not None and int(size) < 4 * int(index.d)


def rescore_factor(index, rescore: Optional[int] = None) -> int:
    """The rescoring factor for ``index``: ``rescore`` when given, else :data:`DEFAULT_RESCORE`
    for a compressed index and 0 for one that holds the float32 vectors."""
    if rescore is not None:
        return check_rescore(rescore)
    return DEFAULT_RESCORE if is_compressed(index) else 0


def rescored(index, vectors: Optional[Vectors], factor: int):
    """``index`` searched with rescoring by ``factor`` against ``vectors`` (``index`` itself when
    ``factor`` is 0)."""
    index = unwrap(index)
    return RescoredIndex(index, vectors, factor) if factor else index


def _reserve(vector, nbytes_or_items: int) -> None:
    """Grow a faiss vector's capacity without keeping the size: later adds fill it in place
    instead of reallocating (which holds the old and the doubled buffer at once)."""
    vector.resize(int(nbytes_or_items))
    vector.resize(0)


# ----------------------------------------------------------------------------- search knobs


def parse_search_params(params: Union[None, str, dict]) -> dict[str, float]:
    """``"nprobe=32,efSearch=64"`` or ``{"nprobe": 32}`` -> dict (names as faiss's ParameterSpace:
    ``nprobe``, ``efSearch``, ``quantizer_efSearch``)."""
    if params is None:
        return {}
    if isinstance(params, str):
        out = {}
        for item in filter(None, (x.strip() for x in params.split(","))):
            name, sep, value = item.partition("=")
            try:
                out[name.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep:
                raise ValueError(f"search_params={params!r}: write name=value pairs separated by "
                                 "commas, e.g. 'nprobe=32,efSearch=64'") from None
        return out
    return {str(k): float(v) for k, v in dict(params).items()}


def apply_search_params(index, params: Union[None, str, dict]) -> None:
    """Set ``nprobe`` / ``efSearch`` / ``quantizer_efSearch`` on ``index`` (CPU or GPU)."""
    import faiss

    params = parse_search_params(params)
    if not params:
        return
    index = unwrap(index)
    space = faiss.GpuParameterSpace() if type(index).__name__.startswith("Gpu") and hasattr(
        faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError as err:
            raise ValueError(f"search parameter {name}={value:g} does not apply to this "
                             f"{type(index).__name__} index ({str(err).strip().splitlines()[-1]}): "
                             "pass nprobe for IVF indexes, efSearch for HNSW, "
                             "quantizer_efSearch for an IVF with an HNSW quantizer") from None


def search_knobs(index) -> dict[str, int]:
    """The search knobs ``index`` has, at their current values (empty for an exact index)."""
    import faiss

    index = unwrap(index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        knobs = {"nprobe": int(ivf.nprobe)}
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            knobs["quantizer_efSearch"] = int(quantizer.hnsw.efSearch)
        return knobs
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else \
        faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        return {"efSearch": int(inner.hnsw.efSearch)}
    return {}


def _exact_kth_scores(rows: _Rows, query_ids: np.ndarray, queries: np.ndarray, k: int,
                      batch: int = 4096) -> np.ndarray:
    """Brute force: each query's k-th largest inner product over all other vectors."""
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for a, block in zip(range(0, rows.num, batch), rows.batches(batch)):
        scores = queries @ block.T
        local = query_ids - a
        inside = np.flatnonzero((local >= 0) & (local < len(block)))
        scores[inside, local[inside]] = -np.inf
        both = np.concatenate([best, scores], axis=1)
        best = -np.partition(-both, k - 1, axis=1)[:, :k]
    return np.sort(best, axis=1)[:, 0]


def measure_recall(index, vectors: Vectors, k: int = 2, num_queries: int = RECALL_QUERIES,
                   seed: int = 0, *, _truth=None) -> float:
    """recall@k of ``index`` against exact search on ``num_queries`` vectors drawn (seeded) from
    ``vectors`` (each query's own vector excluded from both): the share of the k neighbours
    returned that are at least as close as the exact k-th (ties count as found)."""
    rows = vectors if isinstance(vectors, _Rows) else _Rows(vectors)
    query_ids, queries, kth = _truth if _truth is not None else _recall_queries(rows, k,
                                                                                num_queries, seed)
    _, ids = index.search(queries, k + 1)
    found = np.zeros((len(ids), k), dtype=np.int64)
    for i, (row, own) in enumerate(zip(ids, query_ids)):
        others = row[row != own][:k]
        found[i, :len(others)] = others
        found[i, len(others):] = -1
    valid = found >= 0
    true = np.einsum("qd,qkd->qk", queries, rows.take(np.where(valid, found, 0).reshape(-1))
                     .reshape(len(found), k, -1))
    hits = valid & (true >= kth[:, None] - 1e-5)
    return float(hits.mean())


def _recall_queries(rows: _Rows, k: int, num_queries: int, seed: int):
    rng = np.random.default_rng(seed)
    query_ids = np.sort(rng.choice(rows.num, min(num_queries, rows.num), replace=False))
    queries = rows.take(query_ids)
    return query_ids, queries, _exact_kth_scores(rows, query_ids, queries, k)


def tune_search(index, vectors: Vectors, *, k: int = 2, target: float = RECALL_TARGET,
                num_queries: int = RECALL_QUERIES, seed: int = 0,
                tune_rescore: bool = True, recall: Optional[Callable[[Any], float]] = None,
                from_current: bool = False) -> tuple[dict[str, int], float]:
    """Double ``nprobe`` (IVF, with the HNSW quantizer's ``efSearch`` at least 2 nprobe) or
    ``efSearch`` (HNSW) until recall@k (:func:`measure_recall`) reaches ``target``. When the knob
    is at its cap (nlist; :data:`MAX_EF_SEARCH`) or a doubling gains less than 0.005 (compressed
    codes limit the recall: the smaller setting is kept), a :class:`RescoredIndex` gets its
    rescoring factor doubled instead (with ``tune_rescore``, up to :data:`MAX_RESCORE`, kept while
    it gains 0.005); tuning stops when neither gains. Leaves the knobs (and factor) set on ``index``.

    ``recall``: another measure to tune for (called with ``index``, returns the recall; the
    neighbour search's, with its exclusions: ``knn.tune_neighbour_search``); ``from_current``:
    start from the knobs ``index`` has (only raise them) instead of the smallest setting.

    Returns:
        (knobs, recall)
    """
    import faiss

    rows = vectors if isinstance(vectors, _Rows) else _Rows(vectors)
    knobs = search_knobs(index)
    truth = _recall_queries(rows, k, num_queries, seed) if recall is None else None
    recall_fn = recall
    ivf = faiss.try_extract_index_ivf(unwrap(index))
    cap = int(ivf.nlist) if ivf is not None else MAX_EF_SEARCH

    def setting(value: int) -> dict[str, int]:
        if not knobs:
            return {}
        if "nprobe" in knobs:
            out = {"nprobe": value}
            if "quantizer_efSearch" in knobs:
                out["quantizer_efSearch"] = max(knobs["quantizer_efSearch"], 2 * value)
            return out
        return {"efSearch": value}

    def measure() -> float:
        got = (measure_recall(index, rows, k, _truth=truth) if recall_fn is None
               else recall_fn(index))
        logger.debug("recall@%d %.3f at %s, rescore %s", k, got, setting(value),
                     getattr(index, "factor", 0))
        return got

    value = 0 if not knobs else min(cap, 8) if ivf is not None else max(16, knobs["efSearch"])
    if from_current and knobs:
        value = knobs["nprobe" if ivf is not None else "efSearch"]
    apply_search_params(index, setting(value))
    recall = measure()
    rescoring = tune_rescore and isinstance(index, RescoredIndex)
    while recall < target:
        if knobs and value < cap:
            old, value = value, min(cap, value * 2)
            apply_search_params(index, setting(value))
            gained = measure()
            if gained >= recall + 0.005 or value >= cap and gained >= recall:
                recall = gained
                continue
            value = old  # no gain from searching more: the codes limit the recall
            apply_search_params(index, setting(value))
        if not rescoring or index.factor >= MAX_RESCORE:
            break
        old_factor, index.factor = index.factor, min(MAX_RESCORE, 2 * index.factor)
        gained = measure()
        if gained < recall + 0.005:
            index.factor = old_factor
            break
        recall = gained
    return setting(value), recall


# ----------------------------------------------------------------------------- building


def build_index(embeddings: Vectors, embeddings_path: Optional[PathLike], index_path: PathLike, *,
                index: str = "auto", max_index_memory_usage: Union[str, int] = "100m",
                current_memory_available: Union[str, int] = "1G", exact: Optional[bool] = None,
                search_params: Union[None, str, dict] = None, meta: Optional[dict] = None,
                exact_max_vectors: int = EXACT_MAX_VECTORS, recall_queries: int = RECALL_QUERIES,
                seed: int = 0, rescore: Optional[int] = None,
                embedding_files: Optional[Sequence[PathLike]] = None):
    """Build the index of ``embeddings``, save it atomically at ``index_path`` with its sidecar.

    Args:
        embeddings: float32 (N, d) normalised vectors (e.g. a read-only memmap of
            ``embeddings_path``), or a list of shard arrays whose concatenation they are.
        embeddings_path: the ``.npy`` file holding them, or the folder of ``.npy`` shards
            (read by autofaiss only, which reads a folder's files in sorted name order).
        index_path: where the index is written (faiss.write_index format).
        index: ``"auto"``, ``"exact"``, ``"autofaiss"`` or a faiss index factory string (see the
            module docs and :func:`choose_index`).
        max_index_memory_usage: memory budget of the index (``"auto"`` and autofaiss choose under it).
        current_memory_available: memory autofaiss may use while building.
        exact: the former switch: True is ``index="exact"``, False ``index="autofaiss"``.
        search_params: knobs to use (``"nprobe=64"``...) instead of tuning them for recall.
        meta: written into the index's sidecar (``write_meta``), with ``"index"`` added: the
            factory string, knobs, recall@2 and its sample size, size and timings.
        exact_max_vectors: ``"auto"`` builds an approximate index above this many vectors.
        recall_queries, seed: the recall sample; ``seed`` also draws the training sample.
        rescore: candidates per wanted neighbour re-ranked by exact inner products with the
            embeddings (:class:`RescoredIndex`); None: :data:`DEFAULT_RESCORE` for a compressed
            (PQ / SQ) index, raised by the tuning while the recall is short of the target, and 0
            (off) otherwise. The knobs are tuned and the recall measured with it.
        embedding_files: the ``.npy`` files holding ``embeddings`` in order (default
            ``embeddings_path`` when it is a file), recorded (relative to the index's folder) so
            that :func:`read_index` can rescore.

    Returns:
        the faiss index (CPU), its search knobs set; a :class:`RescoredIndex` around it when
        rescoring.
    """
    import faiss

    rows = _Rows(embeddings)
    num, dim = rows.num, rows.dim
    if exact is not None:
        index = "exact" if exact else "autofaiss"
    factory = resolve_index(index, num, dim, max_index_memory_usage,
                            exact_max_vectors=exact_max_vectors)
    index_path = Path(index_path)
    info: dict[str, Any] = {"requested": index, "factory": factory, "ntotal": num, "dim": dim,
                            "budget": str(max_index_memory_usage)}
    start = time.perf_counter()
    if factory == "autofaiss":
        built = _autofaiss_index(embeddings_path, index_path, num, dim, max_index_memory_usage,
                                 current_memory_available)
        info["autofaiss_type"] = type(faiss.downcast_index(built)).__name__
    else:
        built = _faiss_index(rows, factory, info, seed)
    if built.ntotal != num:
        raise RuntimeError(f"the index built from {embeddings_path} holds {built.ntotal} vectors, "
                           f"expected {num}: a shard is missing or stale; rebuild (REPROCESS=1)")
    info["build_seconds"] = round(time.perf_counter() - start, 3)
    factor = rescore_factor(built, rescore)
    searcher = rescored(built, rows, factor)
    info["rescore"] = factor
    if factor:
        files = list(embedding_files) if embedding_files is not None else (
            [embeddings_path] if embeddings_path is not None and Path(embeddings_path).is_file()
            else [])
        info["embedding_files"] = [os.path.relpath(Path(f).resolve(), index_path.parent.resolve())
                                   for f in files]
    if search_knobs(built) or factory == "autofaiss" or factor:
        start = time.perf_counter()
        if search_params is not None:
            apply_search_params(built, search_params)
            knobs = search_knobs(built)
            recall = measure_recall(searcher, rows, 2, recall_queries, seed)
        else:
            knobs, recall = tune_search(searcher, rows, num_queries=recall_queries, seed=seed,
                                        tune_rescore=rescore is None)
            info["rescore"] = getattr(searcher, "factor", 0)
        info.update(search_params=knobs, recall_at_2=round(recall, 4),
                    recall_queries=min(recall_queries, num),
                    tune_seconds=round(time.perf_counter() - start, 3))
        level = logging.WARNING if recall < RECALL_TARGET else logging.INFO
        logger.log(level, "index %s over %d x %d vectors: recall@2 %.3f against exact search on "
                   "%d sampled vectors at %s%s%s", factory, num, dim, recall,
                   info["recall_queries"], knobs or "its defaults",
                   f", rescoring {factor} candidates per neighbour" if factor else "",
                   "" if recall >= RECALL_TARGET else (
                       f", below {RECALL_TARGET}: raise max_index_memory_usage (more PQ bytes), "
                       "pass index='HNSW32' or a larger PQ, a higher rescore=, or search_params "
                       "with a higher nprobe/efSearch"))
    else:
        info.update(search_params={}, recall_at_2=1.0, recall_queries=0)
        logger.info("index %s (exact) over %d x %d vectors", factory, num, dim)
    with atomic_path(index_path) as tmp:
        faiss.write_index(built, str(tmp))
    info["bytes"] = index_path.stat().st_size
    write_meta(index_path, {**(meta or {}), "index": info})
    return searcher


def _faiss_index(rows: _Rows, factory: str, info: dict, seed: int):
    import faiss

    num, dim = rows.num, rows.dim
    index = faiss.IndexFlatIP(dim) if factory == "Flat" else faiss.index_factory(
        dim, factory, faiss.METRIC_INNER_PRODUCT)
    logger.info("building faiss index %s over %d x %d vectors (about %s)", factory, num, dim,
                _size_text(factory, num, dim))
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        want = max(40 * (ivf.nlist if ivf is not None else 1), 10_000)
        sample = np.sort(np.random.default_rng(seed).choice(num, min(num, want), replace=False))
        if ivf is not None and len(sample) < 39 * ivf.nlist:
            ivf.cp.min_points_per_centroid = 1  # logged here instead of printed by faiss
            logger.info("%d inverted lists of %s trained on %d vectors, fewer than the %d faiss "
                        "recommends", ivf.nlist, factory, len(sample), 39 * ivf.nlist)
        pq = getattr(faiss.downcast_index(ivf), "pq", None) if ivf is not None else None
        if pq is not None and len(sample) < 39 * pq.ksub:
            # faiss would print its own warning to stdout for every sub-quantizer: log it once
            pq.cp.min_points_per_centroid = 1
            logger.info("PQ codebooks of %s trained on %d vectors, fewer than the %d faiss "
                        "recommends (a small database): recall is measured below", factory,
                        len(sample), 39 * pq.ksub)
        start = time.perf_counter()
        index.train(rows.take(sample))
        info.update(train_vectors=int(len(sample)), train_seconds=round(time.perf_counter() - start, 3))
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexFlat):
        _reserve(inner.codes, num * inner.code_size)
    elif isinstance(inner, faiss.IndexHNSW):
        storage = faiss.downcast_index(inner.storage)
        if isinstance(storage, faiss.IndexFlatCodes):
            _reserve(storage.codes, num * storage.code_size)
        m = inner.hnsw.nb_neighbors(1)
        _reserve(inner.hnsw.neighbors, math.ceil(num * (2 * m + 1.05 * m / (m - 1))))
    with tqdm(total=num, desc=f"indexing ({factory})", unit="vec", unit_scale=True) as bar:
        for block in rows.batches(ADD_BATCH):
            index.add(block)
            bar.update(len(block))
    return index


def _size_text(factory: str, num: int, dim: int) -> str:
    try:
        return f"{index_bytes(factory, num, dim) / 2**20:.1f} MB"
    except ValueError:
        return "size not estimated"


def _autofaiss_index(embeddings_path, index_path: Path, num: int, dim: int,
                     max_index_memory_usage, current_memory_available):
    try:
        from autofaiss import build_index as autofaiss_build_index
    except ImportError as err:
        raise ImportError(
            f'index="autofaiss" needs the autofaiss package ({err}): pip install '
            '"diablogpt-pytorch[autofaiss]", or pass index="auto" to build with faiss itself'
        ) from err

    if embeddings_path is None:
        raise ValueError('index="autofaiss" reads the embeddings from disk: pass embeddings_path')
    logger.info(
        "building an index of %d x %d vectors (flat: %.1f MB) with autofaiss under "
        "max_index_memory_usage=%s (current_memory_available=%s)",
        num, dim, flat_index_bytes(num, dim) / 2**20, max_index_memory_usage, current_memory_available)
    # autofaiss reads a folder of .npy files: a folder of shards as it is, else a folder holding
    # a link to our file, beside the index
    work = index_path.with_name(f".{index_path.name}.autofaiss")
    shutil.rmtree(work, ignore_errors=True)
    (work / "emb").mkdir(parents=True)
    infeasible = (
        f"autofaiss could not build an index of {num} x {dim} vectors under "
        f"max_index_memory_usage={max_index_memory_usage!r} and current_memory_available="
        f"{current_memory_available!r}. Fix: raise max_index_memory_usage (an exact index needs "
        f"{math.ceil(flat_index_bytes(num, dim) / 2**20)}m) or current_memory_available")
    try:
        if Path(embeddings_path).is_dir():
            folder = Path(embeddings_path)
        else:
            folder = work / "emb"
            (folder / "0.npy").symlink_to(Path(embeddings_path).resolve())
        with tqdm(total=1, desc="indexing (autofaiss)", unit="index") as bar:
            try:
                index, _ = autofaiss_build_index(
                    embeddings=str(folder),
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


def index_record(index_path: PathLike) -> dict[str, Any]:
    """What the build recorded about the index at ``index_path`` (factory string, search knobs,
    recall@2, sample size...; empty for an index built before the record existed)."""
    return dict((read_meta(index_path) or {}).get("index") or {})


def read_index(index_path: PathLike, faiss_gpu: bool = False,
               search_params: Union[None, str, dict] = None, *, rescore: Optional[int] = None,
               embeddings: Optional[Vectors] = None):
    """Load a saved index with the search knobs and rescoring factor its build recorded
    (``search_params`` / ``rescore`` override them; ``rescore=0``: the plain faiss index); with
    ``faiss_gpu`` move it to all visible GPUs (faiss-gpu needed). Rescoring reads ``embeddings``
    (default: the embedding files the record names, memory-mapped) and returns a
    :class:`RescoredIndex`."""
    import faiss

    index_path = Path(index_path)
    record = index_record(index_path)
    factor = int(record.get("rescore", 0)) if rescore is None else check_rescore(rescore)
    index = faiss.read_index(str(index_path))
    params = {**record.get("search_params", {}), **parse_search_params(search_params)}
    apply_search_params(index, params)
    if faiss_gpu:
        index = to_gpu(index)
    if not factor:
        return index
    if embeddings is None:
        embeddings = recorded_embeddings(index_path, record)
    return RescoredIndex(index, embeddings, factor)


def recorded_embeddings(index_path: Path, record: Optional[dict] = None) -> list[np.ndarray]:
    """The float32 embeddings an index was built from, memory-mapped from the files its record
    names (relative to the index's folder)."""
    record = index_record(index_path) if record is None else record
    names = record.get("embedding_files")
    if not names:
        raise FileNotFoundError(
            f"{index_path} is searched with rescoring but its build record names no embeddings "
            "file: pass embeddings= (the float32 vectors it indexes) or rescore=0")
    out = []
    for name in names:
        path = Path(index_path).parent / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}, the embeddings {index_path} rescores its candidates with, is missing: "
                "restore it beside the index (or rebuild the database), or pass rescore=0 to "
                "search without rescoring")
        out.append(np.load(path, mmap_mode="r"))
    return out


def to_gpu(index):
    """Copy ``index`` to the GPUs; only ever called when the user asked for GPU faiss."""
    import faiss

    if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
        raise RuntimeError(
            "faiss_gpu=True but this faiss has no GPU support or sees no GPU: install faiss-gpu "
            "or pass faiss_gpu=False")
    knobs = search_knobs(index)
    gpu = faiss.index_cpu_to_all_gpus(unwrap(index))
    apply_search_params(gpu, knobs)  # set again on the copy
    return RescoredIndex(gpu, index.rows, index.factor) if isinstance(index, RescoredIndex) else gpu


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
        index: faiss index over normalised vectors (inner product), or a :class:`RescoredIndex`
            (the exclusions apply to its re-ranked candidates).
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
