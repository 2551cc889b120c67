"""The README's "Fetching Nearest Neighbors" snippets, runnable on CPU.

    python examples/nearest_neighbours.py [--workdir DIR]

Chunks ``<workdir>/text_folder`` (reusing the files examples/retrieval_tools.py made, or making
them), embeds the chunks into a faiss index, precomputes each chunk's two nearest neighbours from
other documents, and looks neighbours up for new text with a Retriever built from the files.
"""

import argparse
import logging
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diablogpt_pytorch.embedder import get_tokenizer  # noqa: E402

from diablogpt_pytorch.retrieval import (  # noqa: E402
    Retriever,
    chunks_to_index_and_embed,
    chunks_to_precalculated_knn_,
    text_folder_to_chunks_,
    tokenize,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=".", help="where text_folder and the memmaps live")
    parser.add_argument("--max-chunks", type=int, default=1000, help="keep the CPU run short")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = Path(args.workdir)

    folder = work / "text_folder"
    if not folder.exists():
        from pydoc_data.topics import topics

        folder.mkdir(parents=True)
        for name in sorted(topics)[:40]:
            (folder / f"{name}.txt").write_text(topics[name])
    stats = text_folder_to_chunks_(
        folder=folder, glob="**/*.txt", chunks_memmap_path=work / "train.chunks.dat",
        seqs_memmap_path=work / "train.seq.dat", doc_ids_memmap_path=work / "train.doc_ids.dat",
        chunk_size=64, seq_len=2048, max_chunks=args.max_chunks)
    num_chunks = stats["chunks"]

    # memmapped chunks -> embeddings (train.chunks.emb.npy) and a faiss index (train.chunks.index)
    index, embeddings = chunks_to_index_and_embed(
        num_chunks=num_chunks,
        chunk_size=64,
        chunk_memmap_path=work / "train.chunks.dat",
    )
    query_vector = embeddings[:1]                   # use the first embedding as query
    _, indices = index.search(query_vector, k=2)    # fetch 2 neighbours; the first is the chunk itself
    neighbor_embeddings = embeddings[indices]       # (1, 2, 384)
    print("self first:", indices[0, 0] == 0, "neighbour embeddings:", neighbor_embeddings.shape)

    # the nearest-neighbour file training needs
    knn_path, index = chunks_to_precalculated_knn_(
        num_chunks=num_chunks,
        chunk_size=64,
        chunk_memmap_path=work / "train.chunks.dat",    # main chunks dataset
        doc_ids_memmap_path=work / "train.doc_ids.dat",  # neighbours never come from a chunk's own document
        num_nearest_neighbors=2,                         # nearest neighbours per chunk
        num_extra_neighbors=10,                          # extra candidates, in case many come from the same document
    )
    knn = np.memmap(knn_path, dtype=np.int32, mode="r", shape=(num_chunks, 2))
    print(f"nearest neighbours saved to {knn_path}; chunk 0 -> {knn[0].tolist()}")

    # generation-time lookup from the files alone: neighbours + continuations, (b, k, 2 * 64)
    retriever = Retriever(work / "train.chunks.dat", work / "train.doc_ids.dat")
    query = tokenize(["How does a for loop iterate over a sequence?"], add_special_tokens=False)
    query = torch.nn.functional.pad(query[:, :64], (0, 64 - min(64, query.shape[1])))  # one chunk, pad id 0
    retrieved = retriever.retrieve(query, k=2)      # LongTensor (1, 2, 128): chunk + continuation
    print("retrieved:", tuple(retrieved.shape))
    text = get_tokenizer().decode([i for i in retrieved[0, 0, :64].tolist() if i != 0])
    print("first neighbour:", text[:200])


if __name__ == "__main__":
    main()
