"""Old import path of the retrieval database's functions, which live in :mod:`diablogpt_pytorch.database`,
one module per stage; every public name this module had is re-exported here.

- :func:`tokenize`, :func:`bert_embed`: free text -> BERT ids -> pooled embeddings (``database.embed``).
- :func:`text_folder_to_chunks_`: one document per file -> chunks / seqs / doc_ids memmaps
  (``database.chunks``; the document readers in ``database.documents``).
- :func:`chunks_to_index_and_embed`: chunks -> ``<stem>.emb.npy`` + ``<stem>.index`` (``database.embed``).
- :func:`chunks_to_precalculated_knn_`, :func:`query_chunks_to_knn_`: the neighbour search
  (``database.knn``; the sequence exclusion in ``database.sequences``).
- :class:`Retriever`: generation-time lookup (``database.retriever``).
- File names and provenance: ``database.provenance``.

Code that patches a function patches it in its own module (``database.<stage>``), where it is called.
"""
from diablogpt_pytorch.database.chunks import open_chunks, open_doc_ids, text_folder_to_chunks_
from diablogpt_pytorch.database.documents import document_batches, document_files, files_digest, read_text
from diablogpt_pytorch.database.embed import (bert_embed, check_embedder_matches_chunks, chunks_to_index_and_embed,
                                              embed_chunks_file_, embed_memmap, embedding_settings, tokenize)
from diablogpt_pytorch.database.knn import (chunks_to_precalculated_knn_, knn_inputs, query_chunks_to_knn_,
                                            query_embedder, record_knn_, search_neighbours, search_neighbours_range_,
                                            tune_neighbour_search)
from diablogpt_pytorch.database.provenance import (FORMAT_VERSION, PathLike, cached_meta, check_tokenizer,
                                                   embeddings_path_for, fingerprint, index_path_for, knn_path_for,
                                                   lm_tokenizer, tokenizer_path_for)
from diablogpt_pytorch.database.retriever import Retriever
from diablogpt_pytorch.database.sequences import sequence_documents, sequence_documents_window, sequence_starts

__all__ = [
    "FORMAT_VERSION", "PathLike", "Retriever", "bert_embed", "cached_meta", "check_embedder_matches_chunks",
    "check_tokenizer", "chunks_to_index_and_embed", "chunks_to_precalculated_knn_", "document_batches",
    "document_files", "embed_chunks_file_", "embed_memmap", "embedding_settings", "embeddings_path_for",
    "files_digest", "fingerprint", "index_path_for", "knn_inputs", "knn_path_for", "lm_tokenizer", "open_chunks",
    "open_doc_ids", "query_chunks_to_knn_", "query_embedder", "read_text", "record_knn_", "search_neighbours",
    "search_neighbours_range_", "sequence_documents", "sequence_documents_window", "sequence_starts",
    "text_folder_to_chunks_", "tokenize", "tokenizer_path_for", "tune_neighbour_search",
]
