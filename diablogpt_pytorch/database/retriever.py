"""Generation-time lookup: :class:`Retriever`, built from the database files on disk alone."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from diablogpt_pytorch.database import embedder as emb
from diablogpt_pytorch.database import index as idx
from diablogpt_pytorch.database.chunks import open_chunks, open_doc_ids
from diablogpt_pytorch.database.knn import index_settings, query_embedder, query_tokenizer
from diablogpt_pytorch.database.provenance import PathLike, index_path_for
from diablogpt_pytorch.neighbours import neighbour_tokens


class Retriever:
    """Nearest-neighbour chunks for generation, built from the database files on disk alone.

    Args:
        chunk_memmap_path: the database chunks (``text_folder_to_chunks_`` output).
        doc_ids_memmap_path: their document ids; needed for ``exclude_doc_ids`` and so that a
            neighbour's continuation never crosses into the next document.
        index_file: the faiss index (default ``<dir>/<stem>.index``); its sidecar tells how to
            embed queries (embedder, pooling, precision) and the chunk count and size.
        device: where the query embedder runs. faiss_gpu: search on GPU (opt-in).
        num_extra_neighbors, max_search_k: candidate counts when documents are excluded (see
            :func:`chunks_to_precalculated_knn_`).
        tokenizer: the LM tokenizer of the database (an LMTokenizer or a load_tokenizer spec;
            None: the embedder's WordPiece); must match the one recorded in the index's sidecar.
            Query chunks are embedded from their decoded text exactly as the database was.
        search_params: ``nprobe`` / ``efSearch`` of an approximate index (``"efSearch=128"`` or a
            dict); default: the ones its build tuned and recorded in the index's sidecar.
        rescore: candidates per wanted neighbour re-ranked by exact inner products with the
            database's embeddings file (0: off); default: the factor its build recorded (on for a
            compressed PQ / SQ index).
    """

    def __init__(self, chunk_memmap_path: PathLike, doc_ids_memmap_path: Optional[PathLike] = None,
                 index_file: Optional[PathLike] = None, *, embedder: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu", faiss_gpu: bool = False,
                 num_extra_neighbors: int = 10, max_search_k: int = 4096, tokenizer=None,
                 search_params: Union[None, str, dict] = None, rescore: Optional[int] = None):
        self.index_path = Path(index_file) if index_file else index_path_for(chunk_memmap_path)
        settings = index_settings(self.index_path)
        self.embedder = query_embedder(settings, embedder, self.index_path)
        self.tokenizer = query_tokenizer(settings, tokenizer, self.embedder, self.index_path)
        self.chunk_size = int(settings["chunk_size"])
        self.num_chunks = int(settings["num_chunks"])
        self.return_cls_repr = settings["pooling"] == "cls"
        self.dtype = settings["dtype"]
        self.device = device
        self.num_extra_neighbors = num_extra_neighbors
        self.max_search_k = max_search_k
        self.chunks = open_chunks(chunk_memmap_path, self.num_chunks, self.chunk_size)
        self.doc_ids = (None if doc_ids_memmap_path is None
                        else open_doc_ids(doc_ids_memmap_path, self.num_chunks))
        self.pad_id, self.eos_id = self.tokenizer.pad_id, self.tokenizer.eos_id
        self.index = idx.read_index(self.index_path, faiss_gpu=faiss_gpu, search_params=search_params,
                                    rescore=rescore)
        if self.index.ntotal != self.num_chunks:
            raise ValueError(f"{self.index_path} holds {self.index.ntotal} vectors but "
                             f"{chunk_memmap_path} has {self.num_chunks} chunks: rebuild the index")

    def search(self, chunk_tokens: torch.Tensor, k: int, exclude_doc_ids=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """chunk_tokens int (..., C) -> neighbour ids int64 (..., k) (-1 = none), scores (..., k).

        ``exclude_doc_ids``: None, one document id for all queries, or one entry per row of the
        leading dimension (an int or a collection of ints) whose documents are skipped.
        """
        tokens = torch.as_tensor(chunk_tokens)
        if tokens.shape[-1] != self.chunk_size:
            raise ValueError(f"query chunks have {tokens.shape[-1]} tokens, the database "
                             f"{self.chunk_size}")
        lead = tokens.shape[:-1]
        flat = tokens.reshape(-1, self.chunk_size)
        excl = None
        if exclude_doc_ids is not None:
            if self.doc_ids is None:
                raise ValueError("exclude_doc_ids needs the Retriever's doc_ids_memmap_path")
            if isinstance(exclude_doc_ids, torch.Tensor):
                exclude_doc_ids = exclude_doc_ids.tolist()
            if np.isscalar(exclude_doc_ids):
                excl = [[int(exclude_doc_ids)]] * flat.shape[0]
            else:
                if len(exclude_doc_ids) != lead[0]:
                    raise ValueError(f"exclude_doc_ids has {len(exclude_doc_ids)} entries for a "
                                     f"batch of {lead[0]}")
                per = [d if not np.isscalar(d) else [d] for d in exclude_doc_ids]
                reps = flat.shape[0] // lead[0]
                excl = [per[i // reps] for i in range(flat.shape[0])]
        q = emb.embed_chunks(flat, self.embedder, self.device, return_cls_repr=self.return_cls_repr,
                             dtype=self.dtype, normalize=True, tokenizer=self.tokenizer).numpy()
        ids, scores = idx.search_excluding(
            self.index, q, k, num_extra=self.num_extra_neighbors if excl is not None else 0,
            doc_ids=self.doc_ids, exclude_doc_ids=excl, max_k=self.max_search_k)
        return (torch.from_numpy(ids).reshape(*lead, k),
                torch.from_numpy(scores).reshape(*lead, k))

    def retrieve(self, chunk_tokens: torch.Tensor, k: int, exclude_doc_ids=None) -> torch.Tensor:
        """chunk_tokens int (..., C) -> LongTensor (..., k, 2C): each neighbour chunk plus its
        continuation (next chunk of the same document, else pad), as the training data has them."""
        ids, _ = self.search(chunk_tokens, k, exclude_doc_ids)
        tokens = neighbour_tokens(self.chunks, ids.numpy(), doc_ids=self.doc_ids,
                                  eos_id=self.eos_id, pad_id=self.pad_id)
        return torch.from_numpy(tokens)
