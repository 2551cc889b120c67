"""Training sequences and the documents they hold: the paper's exclusion rule, under which no
chunk's neighbours come from a document of the training sequence(s) the chunk belongs to.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from diablogpt_pytorch._io import open_int32_memmap
from diablogpt_pytorch.database.provenance import PathLike


def sequence_documents(seq_starts: np.ndarray, doc_ids: np.ndarray, chunks_per_seq: int
                       ) -> np.ndarray:
    """For every chunk, the documents of the training sequence(s) it belongs to.

    Sequence ``s`` holds chunks ``seq_starts[s] .. seq_starts[s] + chunks_per_seq - 1`` (packing
    puts several documents into one sequence). A neighbour from any of these documents would let
    the model read the sequence's own text through cross-attention (for a later document of the
    sequence: tokens it has not seen yet), so the paper excludes them all.

    Returns:
        int64 (num_chunks, D), each row its chunk's sequence documents padded with -1 (D is the
        most documents any chunk's sequences hold; chunks in no sequence have none).
    """
    num_chunks = len(doc_ids)
    per_seq = []
    for start in np.asarray(seq_starts, dtype=np.int64):
        stop = min(int(start) + chunks_per_seq, num_chunks)
        per_seq.append((int(start), stop, np.unique(np.asarray(doc_ids[start:stop], dtype=np.int64))))
    width = max((len(d) for _, _, d in per_seq), default=0)
    out = np.full((num_chunks, max(width, 1)), -1, dtype=np.int64)
    filled = np.zeros(num_chunks, dtype=bool)
    for start, stop, docs in per_seq:
        overlap = np.flatnonzero(filled[start:stop]) + start
        earlier = [out[c][out[c] >= 0] for c in overlap]
        out[start:stop, : len(docs)] = docs
        for c, prev in zip(overlap, earlier):  # in several (hand-made) sequences: the union
            merged = np.union1d(prev, docs)
            if len(merged) > out.shape[1]:
                out = np.pad(out, ((0, 0), (0, len(merged) - out.shape[1])), constant_values=-1)
            out[c] = -1
            out[c, : len(merged)] = merged
        filled[start:stop] = True
    return out


def sequence_documents_window(sorted_seq_starts: np.ndarray, doc_ids: np.ndarray,
                              chunks_per_seq: int, start: int, stop: int) -> np.ndarray:
    """:func:`sequence_documents` rows of chunks ``start .. stop - 1`` only, from the sequences
    that overlap them (``sorted_seq_starts``: the starts, sorted): memory and time bounded by the
    window, not the database."""
    lo = np.searchsorted(sorted_seq_starts, start - chunks_per_seq + 1, side="left")
    hi = np.searchsorted(sorted_seq_starts, stop, side="left")
    starts = sorted_seq_starts[lo:hi]
    base = int(starts[0]) if len(starts) else start
    base = min(base, start)
    end = min(len(doc_ids), max(stop, int(starts[-1]) + chunks_per_seq if len(starts) else stop))
    rows = sequence_documents(starts - base, np.asarray(doc_ids[base:end]), chunks_per_seq)
    return rows[start - base: stop - base]
def sequence_starts(seqs_memmap_path: Optional[PathLike], num_seqs: Optional[int],
                    seq_len: Optional[int], chunk_size: int) -> Optional[np.ndarray]:
    """The training sequences' first chunks, sorted (int64), for the sequence exclusion of
    :func:`search_neighbours`; None without ``seqs_memmap_path``."""
    if seqs_memmap_path is None:
        return None
    if num_seqs is None or seq_len is None or seq_len % chunk_size:
        raise ValueError(
            f"seqs_memmap_path={str(seqs_memmap_path)!r} needs num_seqs and seq_len (a "
            f"multiple of chunk_size={chunk_size}); got num_seqs={num_seqs}, seq_len={seq_len}")
    seqs = open_int32_memmap(seqs_memmap_path, (num_seqs,), "seqs memmap",
                             missing_fix="build it with text_folder_to_chunks_",
                             mismatch_fix="pass the num_seqs text_folder_to_chunks_ returned")
    # the starts only: each search batch derives its own rows (sequence_documents_window), since
    # all chunks' rows at once would hold num_chunks x (most documents in a sequence) int64 ids
    return np.sort(np.asarray(seqs, dtype=np.int64))
