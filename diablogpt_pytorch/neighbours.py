"""Turning neighbour chunk ids into the tokens the model attends to.

Shared by training (``DIABLOGPTDataset``) and generation (the retriever), so that a neighbour is
formatted identically in both. numpy only: no torch, faiss or transformers import.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def neighbour_tokens(
    chunks: np.ndarray,
    knn_ids: np.ndarray,
    doc_ids: Optional[np.ndarray] = None,
    eos_id: Optional[int] = None,
    pad_id: int = 0,
) -> np.ndarray:
    """Gather each neighbour chunk plus its continuation.

    Args:
        chunks: int (num_chunks, C+1) chunk rows (a read-only memmap is fine: only the needed
            rows are read).
        knn_ids: int (..., K) neighbour chunk ids, -1 where there is none.
        doc_ids: int (num_chunks,) document of each chunk. The continuation of neighbour j is
            chunk j+1 only when it belongs to the same document; otherwise padding.
        eos_id: used only when ``doc_ids`` is None: chunk j ends its document when it contains
            ``eos_id``. With neither, chunk j+1 is always the continuation (when it exists).
        pad_id: token used for missing neighbours and missing continuations.

    Returns:
        int64 (..., K, 2C): for each neighbour, C chunk tokens then C continuation tokens;
        all ``pad_id`` for id -1.
    """
    knn_ids = np.asarray(knn_ids, dtype=np.int64)
    num_chunks, width = chunks.shape
    chunk_size = width - 1
    flat = knn_ids.reshape(-1)
    if flat.size and (flat.max(initial=-1) >= num_chunks or flat.min(initial=0) < -1):
        raise ValueError(
            f"neighbour ids must lie in [-1, {num_chunks}); got range "
            f"[{flat.min()}, {flat.max()}]: the knn file does not belong to this chunks file "
            "(rebuild it with chunks_to_precalculated_knn_)"
        )
    out = np.full((flat.size, 2 * chunk_size), pad_id, dtype=np.int64)
    valid = flat >= 0
    ids = flat[valid]
    if ids.size:
        # fancy indexing wants sorted unique rows for memmap efficiency
        uniq, inverse = np.unique(ids, return_inverse=True)
        rows = np.asarray(chunks[uniq, :chunk_size], dtype=np.int64)
        out[valid, :chunk_size] = rows[inverse]

        has_next = ids + 1 < num_chunks
        if doc_ids is not None:
            nxt = np.minimum(ids + 1, num_chunks - 1)
            has_next &= np.asarray(doc_ids[ids]) == np.asarray(doc_ids[nxt])
        elif eos_id is not None:
            has_next &= ~(rows[inverse] == eos_id).any(axis=-1)
        cont_ids = ids[has_next] + 1
        if cont_ids.size:
            cuniq, cinv = np.unique(cont_ids, return_inverse=True)
            crows = np.asarray(chunks[cuniq, :chunk_size], dtype=np.int64)
            target = np.flatnonzero(valid)[has_next]
            out[target, chunk_size:] = crows[cinv]
    return out.reshape(*knn_ids.shape, 2 * chunk_size)
