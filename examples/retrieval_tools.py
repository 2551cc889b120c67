"""The README's "Retrieval related tools" snippets, runnable on CPU.

    python examples/retrieval_tools.py [--workdir DIR]

Embeds two sentences (masked mean and [CLS]), then chunks a folder of text. When
``<workdir>/text_folder`` does not exist it is filled with a few pages of Python's own
documentation (pydoc topics), so the example runs anywhere, offline.
"""

import argparse
import logging
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from diablogpt_pytorch.retrieval import bert_embed, text_folder_to_chunks_, tokenize  # noqa: E402


def ensure_text_folder(folder: Path, num_docs: int = 40) -> None:
    if folder.exists():
        return
    from pydoc_data.topics import topics

    folder.mkdir(parents=True)
    for name in sorted(topics)[:num_docs]:
        (folder / f"{name}.txt").write_text(topics[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=".", help="where text_folder and the memmaps live")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = Path(args.workdir)

    # masked mean pooled representation
    ids = tokenize(["hello world", "foo bar"])
    embeds = bert_embed(ids)  # (2, 384): 384 is the hidden dimension of the default embedder
    print("mean pooled:", tuple(embeds.shape))

    # CLS token representation
    embeds = bert_embed(ids, return_cls_repr=True)  # (2, 384)
    print("CLS:", tuple(embeds.shape))

    # chunks, sequence starts and document ids of a folder of text
    ensure_text_folder(work / "text_folder")
    stats = text_folder_to_chunks_(
        folder=work / "text_folder",
        glob="**/*.txt",
        chunks_memmap_path=work / "train.chunks.dat",
        seqs_memmap_path=work / "train.seq.dat",
        doc_ids_memmap_path=work / "train.doc_ids.dat",  # used to keep neighbours out of a chunk's own document
        chunk_size=64,
        seq_len=2048,
        max_chunks=1_000_000,
        max_seqs=100_000,
    )
    print(stats)  # {'chunks': ..., 'docs': ..., 'seqs': ..., 'truncated': False, ...}


if __name__ == "__main__":
    main()
