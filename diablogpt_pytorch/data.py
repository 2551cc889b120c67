"""Training sequences and their retrieved neighbours, read from the memmapped database.

Files, all int32 and opened read-only:

    chunks   (num_chunks, C+1)  chunk j's C tokens + the first token of chunk j+1
    knn      (num_chunks, K)    neighbour chunk ids, -1 where there is none
    seqs     (num_sequences,)   first chunk of each training sequence
    doc_ids  (num_chunks,)      document of each chunk (optional)

Sequence i starting at chunk ``s`` covers the m = seq_len // C chunk rows ``s .. s+m-1``; its
seq_len + 1 tokens are those rows' C tokens followed by the extra (+1) token of row ``s+m-1``, so
the model's labels ``seq[1:]`` run one token into the next chunk. Rows past ``num_chunks`` (the
last, partial sequence) are padding, and so are their neighbours.

:class:`StepBatchSampler` orders the training batches as a function of the step alone, so that a
resumed run sees the batches the uninterrupted run saw.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from diablogpt_pytorch import distributed
from diablogpt_pytorch._io import open_int32_memmap
from diablogpt_pytorch.neighbours import neighbour_tokens

def open_memmap_readonly(path: os.PathLike | str, shape: tuple[int, ...], what: str) -> np.memmap:
    """Open an int32 memmap of ``shape`` read-only, checking the file's size first.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: its size does not match ``shape`` (names the file, both sizes and the fix).
    """
    return open_int32_memmap(
        path, shape, f"{what} file",
        missing_fix="build it first (TrainingWrapper or diablogpt_pytorch.database) or pass the right path",
        mismatch_fix="the counts/sizes passed to DIABLOGPTDataset do not match the file (pass the "
                     "numbers it was built with, or rebuild it)",
    )


class DIABLOGPTDataset(Dataset):
    """Sequences for autoregressive training plus the neighbours of each of their chunks.

    Args:
        num_sequences: rows of the seqs memmap.
        num_chunks: rows of the chunks (and knn, doc_ids) memmaps.
        num_neighbors: K, columns of the knn memmap.
        chunk_size: C; the chunks memmap has C + 1 columns.
        seq_len: n, a multiple of C (the model's max_seq_len).
        chunk_memmap_path, chunk_nn_memmap_path, seq_memmap_path: the memmaps above.
        doc_ids_memmap_path: document of each chunk; a neighbour's continuation is the next
            chunk only within the same document. Without it, ``eos_id`` marks document ends
            (a chunk holding ``eos_id`` has no continuation); with neither, the next chunk is
            always the continuation.
        eos_id: see ``doc_ids_memmap_path``.
        pad_id: token for everything missing (rows past the end, -1 neighbours, continuations).
        db_chunk_memmap_path, db_num_chunks, db_doc_ids_memmap_path: the database the knn ids
            point into, when it is not these chunks (a held-out split whose neighbours were
            searched in the training database). Default: the chunks (and doc_ids) above.

    Item ``i``: ``(seq, retrieved)`` with seq int64 (seq_len + 1,) and retrieved int64
    (seq_len // C, K, 2C).

    Files are only ever read: opened with ``mode='r'`` on first access in each process (DataLoader
    workers open their own; no open handle is pickled).
    """

    def __init__(
        self,
        num_sequences: int,
        num_chunks: int,
        num_neighbors: int,
        chunk_size: int,
        seq_len: int,
        chunk_memmap_path: os.PathLike | str,
        chunk_nn_memmap_path: os.PathLike | str,
        seq_memmap_path: os.PathLike | str,
        doc_ids_memmap_path: Optional[os.PathLike | str] = None,
        eos_id: Optional[int] = None,
        pad_id: int = 0,
        db_chunk_memmap_path: Optional[os.PathLike | str] = None,
        db_num_chunks: Optional[int] = None,
        db_doc_ids_memmap_path: Optional[os.PathLike | str] = None,
    ):
        super().__init__()
        if chunk_size <= 0 or seq_len <= 0 or seq_len % chunk_size:
            raise ValueError(
                f"seq_len ({seq_len}) must be a positive multiple of chunk_size ({chunk_size})"
            )
        if num_sequences <= 0 or num_chunks <= 0 or num_neighbors <= 0:
            raise ValueError(
                "num_sequences, num_chunks and num_neighbors must be positive; got "
                f"{num_sequences}, {num_chunks}, {num_neighbors}"
            )
        self.num_sequences = int(num_sequences)
        self.num_chunks = int(num_chunks)
        self.num_neighbors = int(num_neighbors)
        self.chunk_size = int(chunk_size)
        self.seq_len = int(seq_len)
        self.chunks_per_seq = self.seq_len // self.chunk_size
        self.eos_id = eos_id
        self.pad_id = int(pad_id)
        self.paths = {
            "chunks": Path(chunk_memmap_path),
            "knn": Path(chunk_nn_memmap_path),
            "seqs": Path(seq_memmap_path),
        }
        if doc_ids_memmap_path is not None:
            self.paths["doc_ids"] = Path(doc_ids_memmap_path)
        if (db_chunk_memmap_path is None) != (db_num_chunks is None):
            raise ValueError("pass db_chunk_memmap_path and db_num_chunks together")
        self.db_num_chunks = int(db_num_chunks) if db_num_chunks is not None else self.num_chunks
        if db_chunk_memmap_path is not None:
            self.paths["db_chunks"] = Path(db_chunk_memmap_path)
            if db_doc_ids_memmap_path is not None:
                self.paths["db_doc_ids"] = Path(db_doc_ids_memmap_path)
        elif db_doc_ids_memmap_path is not None:
            raise ValueError("db_doc_ids_memmap_path needs db_chunk_memmap_path")
        self._maps: Optional[dict[str, np.memmap]] = None

        # validate every file now (sizes, and that sequence starts are chunk ids), so a mismatch
        # fails at construction rather than inside a DataLoader worker
        maps = self._open()
        seqs = np.asarray(maps["seqs"])
        if seqs.size and (seqs.min() < 0 or seqs.max() >= self.num_chunks):
            raise ValueError(
                f"seqs file {str(self.paths['seqs'])!r} holds sequence starts in "
                f"[{seqs.min()}, {seqs.max()}], outside the {self.num_chunks} chunks: it does not "
                "belong to this chunks file (rebuild both together)"
            )
        self._maps = None  # reopened lazily in whichever process reads items

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "chunks": (self.num_chunks, self.chunk_size + 1),
            "knn": (self.num_chunks, self.num_neighbors),
            "seqs": (self.num_sequences,),
            "doc_ids": (self.num_chunks,),
            "db_chunks": (self.db_num_chunks, self.chunk_size + 1),
            "db_doc_ids": (self.db_num_chunks,),
        }

    def _open(self) -> dict[str, np.memmap]:
        if self._maps is None:
            shapes = self._shapes()
            self._maps = {
                name: open_memmap_readonly(path, shapes[name], f"{name} memmap")
                for name, path in self.paths.items()
            }
        return self._maps

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = None  # never pickle open handles; each worker opens its own
        return state

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.num_sequences <= index < self.num_sequences:
            raise IndexError(f"sequence {index} out of range for {self.num_sequences} sequences")
        maps = self._open()
        C, m = self.chunk_size, self.chunks_per_seq
        start = int(maps["seqs"][index])
        stop = min(start + m, self.num_chunks)
        present = stop - start

        rows = np.full((m, C + 1), self.pad_id, dtype=np.int64)
        rows[:present] = maps["chunks"][start:stop]
        seq = np.concatenate([rows[:, :C].reshape(-1), rows[-1:, C]])

        knn_ids = np.full((m, self.num_neighbors), -1, dtype=np.int64)
        knn_ids[:present] = maps["knn"][start:stop]
        if "db_chunks" in maps:
            db_chunks, db_doc_ids = maps["db_chunks"], maps.get("db_doc_ids")
        else:
            db_chunks, db_doc_ids = maps["chunks"], maps.get("doc_ids")
        retrieved = neighbour_tokens(
            db_chunks,
            knn_ids,
            doc_ids=db_doc_ids,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
        )
        return torch.from_numpy(seq), torch.from_numpy(retrieved)


class StepBatchSampler(torch.utils.data.Sampler):
    """Endless shuffled batches whose order is a function of the step alone, for exact resume.

    Epoch e is ``torch.randperm(num_items)`` under seed ``seed + e``, cut into ``batch_size``
    batches (the last, smaller batch of an epoch is dropped unless it is the only one). Iterating
    from ``start_step`` yields the batches of steps ``start_step, start_step + 1, ...``, so a run
    resumed at step s sees exactly the batches the uninterrupted run saw. Use as
    ``wrapper.get_dataloader(batch_sampler=StepBatchSampler(len(wrapper.train_ds), b, seed, s))``.

    Under torchrun (``world_size`` > 1; by default the current rank and world size) each step's
    global batch of ``batch_size * world_size`` items is cut the same way on every rank (the
    epoch's permutation depends on the epoch alone, as ``DistributedSampler.set_epoch`` makes it)
    and rank r takes its r-th ``batch_size`` slice.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, start_step: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        if num_items <= 0 or batch_size <= 0:
            raise ValueError(f"need num_items > 0 and batch_size > 0; got {num_items}, {batch_size}")
        self.rank = distributed.get_rank() if rank is None else int(rank)
        self.world_size = distributed.get_world_size() if world_size is None else int(world_size)
        if self.world_size > 1 and num_items < batch_size * self.world_size:
            raise ValueError(
                f"{num_items} training sequences cannot fill a global batch of {batch_size} per "
                f"rank x {self.world_size} ranks: use a smaller batch size, fewer ranks or more text")
        self.num_items, self.batch_size = int(num_items), int(batch_size)
        self.seed, self.start_step = int(seed), int(start_step)
        self.batches_per_epoch = max(1, self.num_items // (self.batch_size * self.world_size))

    def __iter__(self):
        step = self.start_step
        while True:
            epoch, position = divmod(step, self.batches_per_epoch)
            order = torch.randperm(self.num_items,
                                   generator=torch.Generator().manual_seed(self.seed + epoch))
            for pos in range(position, self.batches_per_epoch):
                first = (pos * self.world_size + self.rank) * self.batch_size
                yield order[first:first + self.batch_size].tolist()
                step += 1
