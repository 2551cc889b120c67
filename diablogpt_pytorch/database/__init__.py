"""The retrieval database: text folder -> chunks -> embeddings -> index -> neighbours, and the
manifest that says what a database folder holds.

One module per stage (the single-process build, the ``torchrun`` build and the incremental
update all call the same stage functions):

- :mod:`.documents`: which files are documents, reading them, batching them.
- :mod:`.chunks`: documents -> chunk, doc id and sequence memmaps (:func:`text_folder_to_chunks_`).
- :mod:`.embed`: chunks -> embeddings (+ the faiss index: :func:`chunks_to_index_and_embed`).
- :mod:`.embedder`, :mod:`._bert`: the BERT embedder (Hugging Face or the lean copy).
- :mod:`.index`: building, tuning, reading and searching faiss indexes.
- :mod:`.knn`: the neighbour search (:func:`chunks_to_precalculated_knn_`, :func:`query_chunks_to_knn_`).
- :mod:`.retriever`: :class:`Retriever`, generation-time lookup.
- :mod:`.provenance`: file names, ``FORMAT_VERSION``, fingerprints and the sidecar cache checks.
- :mod:`.sharded`: the multi-process build; :mod:`.update`: adding and removing documents.
- :mod:`.manifest`: ``database.json`` (:class:`Database`, :func:`write_manifest`), re-exported here.

Importing this package loads only the manifest (no faiss, no transformers).
"""
from diablogpt_pytorch.database.manifest import (DESCRIPTIONS, FORMAT, MANIFEST_NAME, VERSION, Database,
                                                 write_manifest)

__all__ = ["DESCRIPTIONS", "FORMAT", "MANIFEST_NAME", "VERSION", "Database", "write_manifest"]
