"""Benchmark: the retrieval database build with the embedder's WordPiece as the LM tokenizer
(before issue 14: chunk ids are BERT ids) and with a corpus-trained byte-level BPE (after: every
chunk is decoded and its text re-tokenized for BERT), on the same text.

Reports, per tokenizer: tokenizer training seconds, chunking / embedding / index+search seconds
and chunks/s of the whole build, bytes per token, and the re-tokenisation share: the seconds the
embedding step spends decoding chunks and running BERT's tokenizer on the text, measured by
running exactly that formatting (``embedder.format_texts`` of ``tokenizer.decode_batch``) over
every chunk, divided by the build's seconds.

    python -m benchmarks.micro.bench_tokenizer                 # the default corpus (~465 KB)
    python -m benchmarks.micro.bench_tokenizer --vocab-size 2048
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diablogpt_pytorch import embedder as emb  # noqa: E402
from diablogpt_pytorch import retrieval  # noqa: E402
from diablogpt_pytorch.corpus import write_default_corpus  # noqa: E402
from diablogpt_pytorch.tokenizer import load_tokenizer, train_bpe_tokenizer  # noqa: E402

C = 64


def build(folder: Path, out: Path, tokenizer, dtype: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(chunks_memmap_path=out / "c.dat", seqs_memmap_path=out / "s.dat",
                 doc_ids_memmap_path=out / "d.dat")
    t0 = time.perf_counter()
    stats = retrieval.text_folder_to_chunks_(folder, "*.txt", **paths, chunk_size=C, seq_len=4 * C,
                                             tokenizer=tokenizer)
    t1 = time.perf_counter()
    n = stats["chunks"]
    retrieval.chunks_to_index_and_embed(n, C, out / "c.dat", tokenizer=tokenizer, dtype=dtype)
    t2 = time.perf_counter()
    retrieval.chunks_to_precalculated_knn_(2, n, C, out / "c.dat", out / "d.dat",
                                           tokenizer=tokenizer, dtype=dtype)
    t3 = time.perf_counter()
    chunks = np.asarray(retrieval.open_chunks(out / "c.dat", n, C)[:, :C])
    tokens = int(((chunks != tokenizer.pad_id) & (chunks != tokenizer.eos_id)).sum())
    # the new work: decode each chunk, tokenize its text for BERT (what embed_chunks runs)
    retok = 0.0
    if tokenizer.kind != "bert":
        t = time.perf_counter()
        for start in range(0, n, emb.forward_batch_size("cpu")):
            emb.format_texts(tokenizer.decode_batch(chunks[start:start + 64].tolist()))
        retok = time.perf_counter() - t
    total = t3 - t0
    return dict(tokenizer=tokenizer.kind, vocab_size=tokenizer.vocab_size, chunks=n,
                tokens=tokens, chunk_s=t1 - t0, embed_s=t2 - t1, knn_s=t3 - t2, build_s=total,
                chunks_per_s=n / total, retokenize_s=retok, retokenize_share=retok / total)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_default_corpus(tmp / "docs")
        files = sorted((tmp / "docs").glob("*.txt"))
        num_bytes = sum(p.stat().st_size for p in files)
        bert = load_tokenizer("bert")
        emb.get_tokenizer()  # loading is not part of the figures
        emb.embed_chunks(torch.tensor([[1000, 1001]]), dtype=args.dtype)  # nor is the model's
        t = time.perf_counter()
        bpe = train_bpe_tokenizer(files, tmp / "bpe.json", args.vocab_size)
        train_s = time.perf_counter() - t
        rows = [build(tmp / "docs", tmp / "bert", bert, args.dtype),
                build(tmp / "docs", tmp / "bpe", bpe, args.dtype)]
        rows[1]["tokenizer_train_s"] = train_s
    for r in rows:
        r["bytes_per_token"] = num_bytes / r["tokens"]
    print(f"corpus {len(files)} documents, {num_bytes} bytes; {args.threads} thread(s), {args.dtype}")
    print(f"{'LM tokenizer':<16}{'vocab':>7}{'chunks':>8}{'B/tok':>7}{'chunk s':>9}{'embed s':>9}"
          f"{'knn s':>8}{'build s':>9}{'chunks/s':>10}{'retok s':>9}{'share':>7}")
    for r in rows:
        print(f"{r['tokenizer']:<16}{r['vocab_size']:>7}{r['chunks']:>8}{r['bytes_per_token']:>7.2f}"
              f"{r['chunk_s']:>9.2f}{r['embed_s']:>9.2f}{r['knn_s']:>8.2f}{r['build_s']:>9.2f}"
              f"{r['chunks_per_s']:>10.1f}{r['retokenize_s']:>9.2f}{r['retokenize_share']:>7.1%}")
    print(f"BPE training: {rows[1]['tokenizer_train_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
