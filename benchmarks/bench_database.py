"""Benchmark: build the retrieval database from a few MB of real text, on this machine's CPU.

Reports, separately:
  - chunking   chunks/s (read + tokenize + write memmaps),
  - embedding  chunks/s in float32 and bfloat16 (bf16 weights), and the embedding FLOP/s against this
               machine's measured matmul FLOP/s in the same dtype (a large square matmul),
  - indexing   seconds for the exact index,
  - search     chunks/s of chunks_to_precalculated_knn_ (embeddings and index already built),
  - agreement  bf16 vs fp32: fraction of chunks whose top-K other-document neighbour SET is the
               same (exact search over the same subset).

The corpus is Python's own documentation: pydoc topics, then the docstrings of standard-library
modules (one document per topic / module), written to a temporary folder.

    python benchmarks/bench_database.py                # ~2 MB of text, full database
    python benchmarks/bench_database.py --mb 1 --subset 1024 --threads 2
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diablogpt_pytorch import embedder as emb  # noqa: E402
from diablogpt_pytorch import index as idx  # noqa: E402
from diablogpt_pytorch import retrieval  # noqa: E402

from _report import write_atomically  # noqa: E402  (benchmarks/ is this script's directory)


def write_corpus(folder: Path, megabytes: float) -> tuple[int, int]:
    """pydoc topics + stdlib docstrings, one document per file, until ``megabytes`` of text."""
    from pydoc_data.topics import topics

    budget = int(megabytes * 2**20)
    written = docs = 0
    for name in sorted(topics):
        text = topics[name]
        (folder / f"topic_{name}.txt").write_text(text)
        written += len(text.encode())
        docs += 1
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if written >= budget:
            break
        rel = path.relative_to(stdlib)
        if any(part in ("test", "tests", "idle_test", "site-packages") for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc)
        if parts:
            text = "\n\n".join(parts)
            (folder / f"module_{'.'.join(rel.with_suffix('').parts)}.txt").write_text(text)
            written += len(text.encode())
            docs += 1
    return docs, written


def bert_flops(model, batch: int, length: int) -> float:
    """Forward FLOPs of BertModel on (batch, length): matmuls 2*m*n*k (embeddings/norms ignored)."""
    cfg = model.config
    d, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    tokens = batch * length
    per_layer = 2 * tokens * d * (4 * d + 2 * ff) + 2 * 2 * batch * length * length * d
    pooler = 2 * batch * d * d
    return layers * per_layer + pooler


def matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def time_embedding(tokens: torch.Tensor, dtype: str, batch_size: int | None) -> tuple[np.ndarray, float, float]:
    """Embed ``tokens`` (N, C); returns (normalised vectors, seconds, FLOPs actually computed).
    ``batch_size`` None: the library's default rows per forward (``embedder.forward_batch_size``)."""
    batch_size = batch_size or emb.forward_batch_size("cpu")
    info = emb.tokenizer_info()
    model = emb.get_bert()
    emb.embed_chunks(tokens[:batch_size], dtype=dtype, batch_size=batch_size)  # warm-up
    flops = 0.0
    for start in range(0, len(tokens), batch_size):
        ids, _ = emb.format_chunks(tokens[start:start + batch_size], pad_id=info.pad_id,
                                   eos_id=info.eos_id, cls_id=info.cls_id, sep_id=info.sep_id)
        flops += bert_flops(model, *ids.shape)
    start = time.perf_counter()
    out = emb.embed_chunks(tokens, dtype=dtype, batch_size=batch_size, normalize=True)
    return out.numpy(), time.perf_counter() - start, flops


def topk_sets(vectors: np.ndarray, doc_ids: np.ndarray, k: int) -> np.ndarray:
    sims = vectors @ vectors.T
    sims[doc_ids[:, None] == doc_ids[None, :]] = -np.inf  # other documents only (self included)
    return np.sort(np.argsort(-sims, axis=1, kind="stable")[:, :k], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--mb", type=float, default=2.0, help="megabytes of text")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--knn", type=int, default=2)
    parser.add_argument("--subset", type=int, default=2048,
                        help="chunks embedded in both dtypes for speed and agreement")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per BERT forward in the dtype comparison (default: the library's)")
    parser.add_argument("--db-dtype", default="auto", help="dtype used to embed the database")
    parser.add_argument("--max-chunks", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--workdir", default=None, help="where to build (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    results: dict = {"threads": torch.get_num_threads(), "cpu": _cpu_name(),
                     "native_bf16": emb.native_bf16("cpu"), "load_average_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        (tmp / "docs").mkdir()
        docs, nbytes = write_corpus(tmp / "docs", args.mb)
        results["corpus"] = {"documents": docs, "bytes": nbytes}
        chunks_path, seqs_path, doc_path = tmp / "db.chunks.dat", tmp / "db.seq.dat", tmp / "db.doc_ids.dat"
        emb.get_tokenizer()  # model loading is not part of the figures
        emb.get_bert()

        start = time.perf_counter()
        stats = retrieval.text_folder_to_chunks_(tmp / "docs", "*.txt", chunks_path, seqs_path, doc_path,
                                                 chunk_size=args.chunk_size, seq_len=args.chunk_size * 32,
                                                 max_chunks=args.max_chunks)
        seconds = time.perf_counter() - start
        n = stats["chunks"]
        results["chunking"] = {"chunks": n, "seconds": seconds, "chunks_per_s": n / seconds,
                               "MB_per_s": nbytes / 2**20 / seconds}

        chunks = retrieval.open_chunks(chunks_path, n, args.chunk_size)
        doc_ids = np.asarray(retrieval.open_doc_ids(doc_path, n))
        # an evenly spaced subset, so that it spans many documents
        rows = np.linspace(0, n - 1, min(args.subset, n)).astype(np.int64)
        subset = torch.from_numpy(np.array(chunks[rows, : args.chunk_size])).long()
        vecs = {}
        for dtype, tdtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            # the machine may be shared: measure the matmul right before and right after
            before = matmul_flops(tdtype)
            vecs[dtype], secs, flops = time_embedding(subset, dtype, args.batch_size)
            after = matmul_flops(tdtype)
            peak = max(before, after)
            results[f"embedding_{dtype}"] = {
                "chunks": len(subset), "seconds": secs, "chunks_per_s": len(subset) / secs,
                "GFLOP_per_s": flops / secs / 1e9,
                "matmul_GFLOP_per_s_before_after": [before / 1e9, after / 1e9],
                "fraction_of_matmul": flops / secs / peak, "load_average": os.getloadavg()[0]}
        agreement = {}
        for k in (args.knn, 10):
            a = topk_sets(vecs["float32"], doc_ids[rows], k)
            b = topk_sets(vecs["bfloat16"], doc_ids[rows], k)
            agreement[f"top{k}_sets_equal"] = float((a == b).all(axis=1).mean())
            # how far apart (fp32 cosine) the swapped neighbours are: near-ties or real changes
            sims = vecs["float32"] @ vecs["float32"].T
            differ = ~(a == b).all(axis=1)
            if differ.any():
                gap = np.abs(np.take_along_axis(sims, a, 1).sum(1) - np.take_along_axis(sims, b, 1).sum(1))
                agreement[f"top{k}_differing_score_gap_mean"] = float(gap[differ].mean() / k)
        cos = (vecs["float32"] * vecs["bfloat16"]).sum(1)
        agreement["min_cosine"] = float(cos.min())
        agreement["mean_cosine"] = float(cos.mean())
        results["bf16_vs_fp32"] = agreement

        start = time.perf_counter()
        _, embeddings = retrieval.chunks_to_index_and_embed(
            n, args.chunk_size, chunks_path, chunks_to_embeddings_batch_size=256,
            dtype=args.db_dtype, max_index_memory_usage="4G")
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        idx.build_index(embeddings, retrieval.embeddings_path_for(chunks_path), tmp / "scratch.index",
                        max_index_memory_usage="4G")
        index_seconds = time.perf_counter() - start
        results["database_embedding"] = {"dtype": str(emb.resolve_dtype(args.db_dtype)).replace("torch.", ""),
                                         "chunks": n,
                                         "seconds": seconds - index_seconds,
                                         "chunks_per_s": n / (seconds - index_seconds)}
        results["indexing"] = {"kind": "IndexFlatIP", "seconds": index_seconds}

        start = time.perf_counter()
        knn_path, _ = retrieval.chunks_to_precalculated_knn_(
            args.knn, n, args.chunk_size, chunks_path, doc_path, num_extra_neighbors=10,
            chunks_to_embeddings_batch_size=256, dtype=args.db_dtype,
            max_index_memory_usage="4G")
        seconds = time.perf_counter() - start
        knn = np.fromfile(knn_path, dtype=np.int32).reshape(n, args.knn)
        results["search"] = {"chunks": n, "k": args.knn, "seconds": seconds, "chunks_per_s": n / seconds,
                             "rows_with_missing": int((knn < 0).any(1).sum())}

    print(json.dumps(results, indent=2))
    if args.json:
        write_atomically(Path(args.json), lambda tmp: tmp.write_text(json.dumps(results, indent=2)))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
