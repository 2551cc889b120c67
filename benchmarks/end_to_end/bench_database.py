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

    python -m benchmarks.end_to_end.bench_database                # ~2 MB of text, full database
    python -m benchmarks.end_to_end.bench_database --mb 1 --subset 1024 --threads 2

``--scale``: the build's growth with the corpus. Databases of 1x, 4x and 16x a base size of the
standard library's own sources (``.py`` files under ``sysconfig``'s stdlib) and the pydoc topics,
one document per file, in a seeded random order (each size holds the smaller ones). Every stage
(chunking, embedding, exact and approximate index, neighbours) runs in its own process; the
indexes (exact, ``auto`` at the default budget, HNSW32, IVF-PQ48) are built, tuned and, for PQ,
rescored by the library (``index.build_index``) and loaded as it loads them; each
reports its wall time, per-chunk cost and peak memory (``VmHWM`` and a sampled peak of anonymous
memory, from ``/proc/self/status``). The embedding stage embeds every chunk up to
``--embed-full-max`` chunks; above that it embeds a random sample of ``--embed-sample`` chunks
(the per-chunk cost is measured on it) and the index and neighbour stages use the largest fully
embedded size's real vectors tiled with small noise (said so in the output). Results go to
``benchmarks/results/bench_database_scale.json`` and a BENCHMARKS.md section.

    python -m benchmarks.end_to_end.bench_database --scale --factors 1,4,16 --workdir /tmp/dbscale
    python -m benchmarks.end_to_end.bench_database --scale --factors 16 --workdir /tmp/dbscale   # one size
    python -m benchmarks.end_to_end.bench_database --scale --factors 1,4,16 --only neighbours --workdir /tmp/dbscale

On one core of a 2-core AMD EPYC the three sizes take about 1.5, 4.5 and 3.5 minutes (the 4x
embedding is 3.5 of them); each run merges its sizes into the JSON, and 16x needs the 4x
embeddings (for the tiled vectors) in the same ``--workdir``.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import re
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diablogpt_pytorch.database import embedder as emb  # noqa: E402
from diablogpt_pytorch.database import index as idx  # noqa: E402
from diablogpt_pytorch.database import knn as knn_stage  # noqa: E402
from diablogpt_pytorch import retrieval  # noqa: E402

from benchmarks.common.report import write_atomically  # noqa: E402


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
    scale = parser.add_argument_group("--scale: growth with the corpus")
    scale.add_argument("--scale", action="store_true", help="measure 1x/4x/16x databases")
    scale.add_argument("--factors", default="1,4,16", help="corpus sizes, multiples of --base-mb")
    scale.add_argument("--base-mb", type=float, default=1.0, help="megabytes of source text at 1x")
    scale.add_argument("--embed-full-max", type=int, default=25_000,
                       help="embed every chunk up to this many chunks, a sample above")
    scale.add_argument("--embed-sample", type=int, default=3000, help="chunks embedded above that")
    scale.add_argument("--approx", default=";".join(APPROX_INDEXES),
                       help="approximate indexes, ';'-separated faiss factory strings ({nlist} is "
                            "filled in)")
    scale.add_argument("--queries", type=int, default=2000, help="queries for recall@K")
    scale.add_argument("--out", default=str(SCALE_JSON),
                       help="results JSON (merged per size); the BENCHMARKS.md section is written "
                            "only for the default")
    scale.add_argument("--only", default=None,
                       help="re-measure only these stages (comma-separated: chunking, embedding, "
                            "index, neighbours), reusing the rest from --out and --workdir")
    scale.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        return _stage_main(args.stage)
    if args.scale:
        return scale_main(args)
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


# ----------------------------------------------------------------------------- --scale

REPO = Path(__file__).resolve().parents[2]
SCALE_JSON = REPO / "benchmarks" / "results" / "bench_database_scale.json"
STAGES = ("chunking", "embedding", "index", "neighbours")
#: indexes measured besides the exact one, each built and tuned by the library (index.build_index:
#: "auto" at the default memory budget, or a faiss factory string; "{nlist}" = index.ivf_nlist(N))
APPROX_INDEXES = ("auto", "HNSW32", "IVF{nlist}_HNSW32,PQ48np")
#: how the approximate indexes are searched: as the library loads them
SEARCH_PARAMS = "the knobs and rescoring factor index.build_index tuned and recorded"
TILE_NOISE = 0.02  # per-dimension std of the noise added to tiled embeddings (then renormalised)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class _PeakAnon:
    """Samples RssAnon every 10 ms in a thread: the peak of anonymous memory (VmHWM also counts
    the file pages of memmaps the stage reads, which the kernel can drop)."""

    def __init__(self):
        import threading

        self.peak, self._stop = _status_kb("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.trace: list = []  # (seconds, RssAnon MB) every second: growth over the stage

    def _run(self):
        start = last = time.perf_counter()
        while not self._stop.wait(0.01):
            anon = _status_kb("RssAnon")
            self.peak = max(self.peak, anon)
            if time.perf_counter() - last >= 1.0:
                last = time.perf_counter()
                self.trace.append((round(last - start, 1), round(anon / 1024, 1)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kb("RssAnon"))


def _recall(truth: np.ndarray, got: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(t) & set(g)) / k for t, g in zip(truth, got)]))


def _stage(name: str, a: dict) -> dict:
    """One stage's work (in a fresh process); returns its figures (seconds = the work alone)."""
    out: dict = {}
    if name == "chunking":
        emb.get_tokenizer()
        start = time.perf_counter()
        stats = retrieval.text_folder_to_chunks_(
            a["docs"], "*", a["chunks"], a["seqs"], a["doc_ids"], chunk_size=a["chunk_size"],
            seq_len=a["seq_len"], max_chunks=10**9, max_seqs=10**9, force_reprocess=True)
        out.update(seconds=time.perf_counter() - start, **{k: stats[k] for k in ("chunks", "docs", "seqs")})
    elif name == "embedding":
        chunks = retrieval.open_chunks(a["chunks"], a["num_chunks"], a["chunk_size"])
        if a.get("rows") is not None:  # a random sample, read into memory
            chunks = np.array(chunks[np.load(a["rows"])])
        lm = retrieval.lm_tokenizer(None, None)
        dtype = str(emb.resolve_dtype(None, "cpu")).replace("torch.", "")
        emb.embed_chunks(torch.from_numpy(np.array(chunks[:64, :-1])), dtype=dtype)  # warm-up
        start = time.perf_counter()
        retrieval.embed_memmap(chunks, Path(a["out"]), embedder=None, device="cpu",
                                use_cls_repr=False, dtype=dtype, batch_size=256, tokenizer=lm)
        out.update(seconds=time.perf_counter() - start, chunks=len(chunks), dtype=dtype)
    elif name == "index":
        # the library's build: choice ("auto" at the default budget), training, adding, the
        # knob / rescoring tuning for recall@2 >= 0.9 (its time is in the stage's, also apart)
        embeddings = np.load(a["emb"], mmap_mode="r")
        start = time.perf_counter()
        index = idx.build_index(embeddings, a["emb"], a["out"],
                                index="exact" if a["spec"] == "Flat" else a["spec"])
        out.update(seconds=time.perf_counter() - start, chunks=len(embeddings),
                   index_bytes=Path(a["out"]).stat().st_size,
                   index_type=type(idx.unwrap(index)).__name__)
        record = idx.index_record(a["out"])
        out.update(factory=record["factory"], search_params=record.get("search_params", {}),
                   rescore=record.get("rescore", 0), build_recall_at_2=record.get("recall_at_2"),
                   train_s=record.get("train_seconds", 0.0), tune_s=record.get("tune_seconds", 0.0),
                   add_s=record.get("build_seconds", 0.0) - record.get("train_seconds", 0.0))
    elif name == "neighbours":
        # the library's own chunks_to_precalculated_knn_, given the index and embeddings built by
        # the earlier stages (its embed-and-index step is swapped for loading them)
        index = idx.read_index(a["index"])  # knobs and rescoring as recorded
        embeddings = np.load(a["emb"], mmap_mode="r")
        knn_stage.chunks_to_index_and_embed = lambda *_, **__: (index, embeddings)  # where knn calls it
        start = time.perf_counter()
        knn_path, _ = retrieval.chunks_to_precalculated_knn_(
            a["k"], a["num_chunks"], a["chunk_size"], a["chunks"], a["doc_ids"],
            index_file=a["index"], seqs_memmap_path=a["seqs"], num_seqs=a["num_seqs"],
            seq_len=a["seq_len"], force_reprocess=True)
        out.update(seconds=time.perf_counter() - start, chunks=a["num_chunks"],
                   index_bytes=Path(a["index"]).stat().st_size)
        # the knobs the neighbour search was tuned to (knn.tune_neighbour_search), if any
        tuned = (json.loads(Path(f"{knn_path}.meta.json").read_text()).get("stats") or {}).get(
            "neighbour_search")
        if tuned:
            out["neighbour_search"] = tuned
        os.replace(knn_path, a["out"])
        knn = np.fromfile(a["out"], dtype=np.int32).reshape(a["num_chunks"], a["k"])
        out["rows_short_of_neighbours"] = int((knn < 0).any(1).sum())
    elif name == "recall":
        embeddings = np.load(a["emb"], mmap_mode="r")
        rows = np.sort(np.random.default_rng(1).choice(len(embeddings), min(a["queries"], len(embeddings)),
                                                       replace=False))
        queries = np.ascontiguousarray(embeddings[rows], dtype=np.float32)
        k = a["k"]
        _, truth = idx.read_index(a["exact"]).search(queries, k)
        index = idx.read_index(a["index"])  # the library's search: tuned knobs, rescoring
        start = time.perf_counter()
        _, got = index.search(queries, k)
        out["query_ms"] = 1000 * (time.perf_counter() - start) / len(queries)
        out[f"recall@{k}"] = _recall(truth, got)
        out["rescore"] = getattr(index, "factor", 0)
        if out["rescore"]:  # the same index and knobs, ranked by its codes alone
            _, plain = idx.read_index(a["index"], rescore=0).search(queries, k)
            out[f"recall@{k}_without_rescoring"] = _recall(truth, plain)
        out["queries"] = len(queries)
        # the neighbour files (other-document neighbours, after exclusions): exact ids found
        exact = np.fromfile(a["knn_exact"], dtype=np.int32).reshape(-1, k)
        approx = np.fromfile(a["knn_approx"], dtype=np.int32).reshape(-1, k)
        found = (exact[:, :, None] == approx[:, None, :]).any(-1) & (exact >= 0)
        out[f"knn_file_recall@{k}"] = float(found.sum() / max(1, (exact >= 0).sum()))
    else:
        raise ValueError(f"unknown stage {name!r}")
    return out


def _stage_main(name: str) -> None:
    """Child process: read the stage's arguments (JSON) from stdin, print its figures (JSON)."""
    import sys

    logging.basicConfig(level=logging.WARNING)
    a = json.loads(sys.stdin.read())
    before = {"rss_kb": _status_kb("VmRSS"), "anon_kb": _status_kb("RssAnon")}
    with _PeakAnon() as peak:
        out = _stage(name, a)
    out.update(peak_rss_MB=_status_kb("VmHWM") / 1024, peak_anon_MB=peak.peak / 1024,
               anon_MB_trace=peak.trace[:: max(1, len(peak.trace) // 20)],
               # the process at the start of the stage (interpreter, torch, numpy, faiss)
               start_rss_MB=before["rss_kb"] / 1024, start_anon_MB=before["anon_kb"] / 1024)
    print(json.dumps(out))


def _run_stage(name: str, **a) -> dict:
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(
               [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--stage", name], input=json.dumps(a),
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"stage {name} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    logging.getLogger("bench").warning("%s %s: %s", name, a.get("spec", ""), {
        k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()})
    return out


def corpus_files(workdir: Path) -> list[Path]:
    """The scale corpus: the pydoc topics (written once into ``workdir/topics``) and the stdlib's
    ``.py`` files (site-packages excluded), in a seeded random order."""
    import random

    from pydoc_data.topics import topics

    folder = workdir / "topics"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in sorted(topics.items()):
        path = folder / f"{name}.txt"
        if not path.is_file():
            path.write_text(text)
        files.append(path)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files += sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.relative_to(stdlib).parts
                    and p.is_file())
    random.Random(0).shuffle(files)
    return files


def _corpus(workdir: Path, factor: int, base_bytes: int) -> tuple[Path, int, int]:
    """``workdir/x{factor}/docs``: links to the first files of the shuffled corpus, up to
    ``factor * base_bytes`` bytes (so each size holds the smaller ones)."""
    docs = workdir / f"x{factor}" / "docs"
    if docs.exists():
        for p in docs.iterdir():
            p.unlink()
    docs.mkdir(parents=True, exist_ok=True)
    total = n = 0
    for i, path in enumerate(corpus_files(workdir)):
        if total >= factor * base_bytes:
            break
        (docs / f"{i:06d}_{path.name}").symlink_to(path)
        total += path.stat().st_size
        n += 1
    return docs, n, total


def _tile(source: Path, out: Path, num: int, seed: int = 2) -> None:
    """``num`` rows: the real embeddings of ``source`` repeated, each copy plus Gaussian noise
    (std TILE_NOISE per dimension) and renormalised."""
    src = np.load(source, mmap_mode="r")
    rng = np.random.default_rng(seed)
    dst = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(num, src.shape[1]))
    for start in range(0, num, 16384):
        stop = min(num, start + 16384)
        block = np.asarray(src[np.arange(start, stop) % len(src)], dtype=np.float32)
        block = block + rng.normal(0, TILE_NOISE, block.shape).astype(np.float32)
        dst[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    dst.flush()
    del dst


def scale_one(workdir: Path, factor: int, args, prev: Optional[dict] = None) -> dict:
    """Every stage at ``factor`` x the base size; files under ``workdir/x{factor}``. With
    ``args.only``, the other stages' figures (and files) are ``prev``'s."""
    here = workdir / f"x{factor}"
    only = set(args.only.split(",")) if args.only else set(STAGES)
    if only - set(STAGES):
        raise ValueError(f"--only {args.only!r}: stages are {', '.join(STAGES)}")
    if only != set(STAGES) and prev is None:
        raise ValueError(f"--only needs the {factor}x results in --out from an earlier run")
    docs, num_files, nbytes = _corpus(workdir, factor, int(args.base_mb * 2**20))
    C = args.chunk_size
    seq_len = 32 * C
    p = {k: str(here / f"db.{k}.dat") for k in ("chunks", "seqs", "doc_ids")}
    res: dict = {"factor": factor, "files": num_files, "bytes": nbytes}
    if "chunking" in only:
        res["chunking"] = _run_stage("chunking", docs=str(docs), chunk_size=C, seq_len=seq_len,
                                     chunks=p["chunks"], seqs=p["seqs"], doc_ids=p["doc_ids"])
    else:
        res["chunking"] = prev["chunking"]
    # chunking tokenizes 64 documents (or 8 MB) at a time: its memory follows the largest batch
    sizes = [f.stat().st_size for f in sorted(docs.iterdir())]
    res["chunking"]["largest_batch_MB"] = max(sum(sizes[i:i + 64]) for i in range(0, len(sizes), 64)) / 2**20
    n, num_seqs = res["chunking"]["chunks"], res["chunking"]["seqs"]
    res.update(chunks=n, docs=res["chunking"]["docs"])
    emb_path = here / "db.chunks.emb.npy"
    if "embedding" not in only:
        res["embedding"], res["vectors"] = prev["embedding"], prev["vectors"]
    elif n <= args.embed_full_max:
        res["embedding"] = _run_stage("embedding", chunks=p["chunks"], num_chunks=n, chunk_size=C,
                                      out=str(emb_path))
        res["embedding"]["sampled"] = False
        res["vectors"] = "real: every chunk embedded"
    else:
        rows = np.sort(np.random.default_rng(0).choice(n, args.embed_sample, replace=False))
        np.save(here / "sample_rows.npy", rows)
        res["embedding"] = _run_stage("embedding", chunks=p["chunks"], num_chunks=n, chunk_size=C,
                                      rows=str(here / "sample_rows.npy"),
                                      out=str(here / "sample.emb.npy"))
        res["embedding"]["sampled"] = True
        res["embedding"]["chunks_embedded"] = res["embedding"]["chunks"]
        # the stage's time for all chunks, from the sample's per-chunk cost
        res["embedding"]["sample_seconds"] = res["embedding"]["seconds"]
        res["embedding"]["seconds"] *= n / res["embedding"]["chunks"]
        res["embedding"]["chunks"] = n
        full = sorted((int(d.name[1:]) for d in workdir.glob("x*")
                       if d.name[1:].isdigit() and int(d.name[1:]) < factor
                       and (d / "db.chunks.emb.npy").is_file()
                       and not (d / "tiled").exists()), reverse=True)
        if not full:
            raise RuntimeError(f"x{factor} is sampled: run a fully embedded size first (--factors 4,{factor})")
        _tile(workdir / f"x{full[0]}" / "db.chunks.emb.npy", emb_path, n)
        (here / "tiled").write_text(str(full[0]))
        res["vectors"] = (f"the {full[0]}x database's real embeddings tiled, repeated "
                          f"{n / np.load(workdir / f'x{full[0]}' / 'db.chunks.emb.npy', mmap_mode='r').shape[0]:.1f} "
                          f"times, each copy plus N(0, {TILE_NOISE}^2) noise per dimension, renormalised")
    res["index"], res["neighbours"] = dict(prev["index"]) if prev else {}, dict(prev["neighbours"]) if prev else {}
    specs = ["Flat"] + [s.format(nlist=idx.ivf_nlist(n)) for s in args.approx.split(";") if s]
    for spec in specs if {"index", "neighbours"} & only else []:  # neighbours follow the index
        key = "exact" if spec == "Flat" else re.sub(r"IVF\d+", "IVF", spec)
        out = here / f"{'exact' if spec == 'Flat' else 'approx' + str(specs.index(spec))}.index"
        if "index" in only or key not in res["index"]:
            res["index"][key] = _run_stage("index", emb=str(emb_path), out=str(out), spec=spec)
            res["index"][key]["spec"] = spec
        res["neighbours"][key] = _run_stage(
            "neighbours", index=str(out), emb=str(emb_path), k=args.knn,
            num_chunks=n, chunk_size=C, chunks=p["chunks"], doc_ids=p["doc_ids"], seqs=p["seqs"],
            num_seqs=num_seqs, seq_len=seq_len, out=str(here / f"knn.{out.stem}.dat"))
        if spec != "Flat":
            res["index"][key]["recall"] = _run_stage(
                "recall", emb=str(emb_path), exact=str(here / "exact.index"), index=str(out),
                k=args.knn, queries=args.queries,
                knn_exact=str(here / "knn.exact.dat"), knn_approx=str(here / f"knn.{out.stem}.dat"))
    for stage in STAGES:
        for rec in (res[stage].values() if stage in ("index", "neighbours") else [res[stage]]):
            rec["ms_per_chunk"] = 1000 * rec["seconds"] / n
    return res


#: the GPU assumption of the 1B projection: a fraction of an H100/H200's bf16 dense peak
GPU_PEAK_FLOPS, GPU_UTILISATION = 989e12, 0.25


def projection_1b(factors: dict, dim: int = 384, pq_m: int = 48, nlist: int = 2**22) -> dict:
    """1B chunks from the measured per-chunk costs (a projection, not a measurement): embedding
    time on this CPU and on one GPU (GPU_UTILISATION x GPU_PEAK_FLOPS, at the embedder's forward
    FLOPs per chunk), and index memory flat / HNSW32 (measured bytes per vector) / IVF-PQ."""
    sizes = sorted(factors, key=int)
    full = [factors[s]["embedding"] for s in sizes if not factors[s]["embedding"].get("sampled")]
    ms = full[-1]["ms_per_chunk"] if full else factors[sizes[-1]]["embedding"]["ms_per_chunk"]
    info = emb.tokenizer_info()
    ids, _ = emb.format_chunks(torch.zeros(1, 64, dtype=torch.long) + 1000, pad_id=info.pad_id,
                               eos_id=info.eos_id, cls_id=info.cls_id, sep_id=info.sep_id)
    flops = bert_flops(emb.get_bert(), 1, ids.shape[1])
    gpu_rate = GPU_UTILISATION * GPU_PEAK_FLOPS / flops
    n, top = 1e9, factors[sizes[-1]]
    hnsw = top["index"].get("HNSW32")
    return {
        "chunks": n, "embedding_ms_per_chunk_cpu": ms,
        "embedding_cpu_core_days": n * ms / 1000 / 86400,
        "embedding_gflop_per_chunk": flops / 1e9, "gpu_assumption":
            f"{GPU_UTILISATION:.0%} of {GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 dense peak",
        "embedding_gpu_chunks_per_s": gpu_rate, "embedding_gpu_hours": n / gpu_rate / 3600,
        "chunking_core_hours": n * top["chunking"]["ms_per_chunk"] / 1000 / 3600,
        "index_GiB": {
            "flat": n * dim * 4 / 2**30,
            "HNSW32 (measured bytes per vector)": None if hnsw is None else
                n * hnsw["index_bytes"] / top["chunks"] / 2**30,
            f"IVF{nlist}_HNSW32,PQ{pq_m}: codes + ids": n * (pq_m + 8) / 2**30,
            f"IVF{nlist}_HNSW32,PQ{pq_m}: centroids": nlist * dim * 4 / 2**30}}


def scale_summary(factors: dict) -> dict:
    """Per-chunk cost ratios largest/smallest size, memory growth, recall."""
    sizes = sorted(factors, key=int)
    lo, hi = factors[sizes[0]], factors[sizes[-1]]
    summary: dict = {"from": f"{sizes[0]}x", "to": f"{sizes[-1]}x", "per_chunk_ratio": {},
                     "anon_MB_excluding_index": {}}

    def records(f):
        yield "chunking", f["chunking"]
        yield "embedding", f["embedding"]
        for key, r in f["index"].items():
            yield f"index {key}", r
        for key, r in f["neighbours"].items():
            yield f"neighbours {key}", r

    lo_recs = dict(records(lo))
    for name, r in records(hi):
        if name in lo_recs:
            summary["per_chunk_ratio"][name] = r["ms_per_chunk"] / lo_recs[name]["ms_per_chunk"]
    if len(sizes) > 2:  # from the middle size: less of the fixed per-process costs of small sizes
        mid = dict(records(factors[sizes[-2]]))
        summary[f"per_chunk_ratio_{sizes[-1]}x_over_{sizes[-2]}x"] = {
            name: r["ms_per_chunk"] / mid[name]["ms_per_chunk"] for name, r in records(hi) if name in mid}
    for s in sizes:
        summary["anon_MB_excluding_index"][s] = {
            name: r["peak_anon_MB"] - r.get("index_bytes", 0) / 2**20 for name, r in records(factors[s])}
    first, last = summary["anon_MB_excluding_index"][sizes[0]], summary["anon_MB_excluding_index"][sizes[-1]]
    summary["anon_MB_excluding_index_growth"] = {name: last[name] - first[name] for name in last
                                                 if name in first}
    # the whole build with index="auto": chunking + embedding + auto index + its neighbours
    summary["whole_build_auto_ms_per_chunk"] = {
        s: sum(r["ms_per_chunk"] for r in (factors[s]["chunking"], factors[s]["embedding"],
                                           factors[s]["index"]["auto"], factors[s]["neighbours"]["auto"]))
        for s in sizes if "auto" in factors[s]["index"] and "auto" in factors[s]["neighbours"]}
    whole = summary["whole_build_auto_ms_per_chunk"]
    if sizes[0] in whole and sizes[-1] in whole:
        summary["per_chunk_ratio"]["whole build (auto index)"] = whole[sizes[-1]] / whole[sizes[0]]
    summary["targets"] = {
        "per_chunk_ratio_max": 1.3,
        "per_chunk_ratio_met": {k: v <= 1.3 for k, v in summary["per_chunk_ratio"].items()},
        "recall@2_min": 0.9,
        "recall@2": {f"{s}x {key}": r["recall"]["recall@2"] for s in sizes
                     for key, r in factors[s]["index"].items() if "recall" in r}}
    return summary


def _knobs(params: dict) -> str:
    """Search knobs as ``name=value,...`` (``-`` when none)."""
    return ",".join(f"{n}={v}" for n, v in params.items()) or "-"


def _built_cell(r) -> str:
    """What the library built for one index and scale (blank when it did not build it)."""
    if r is None or "factory" not in r:
        return ""
    return (f"`{r['factory']}`; {_knobs(r['search_params'])}; {r['rescore']}; "
            f"{r['build_recall_at_2']:.3f}; {r['train_s']:.1f} / {r['add_s']:.1f} / {r['tune_s']:.1f}")


def _tuned_cell(r) -> str:
    """The neighbour stage's tuned search for one index and scale (``-`` when none)."""
    t = (r or {}).get("neighbour_search")
    return "-" if not t else f"{_knobs(t['search_params'])}; {t['rescore']}; {t['recall_at_k']:.3f}; {t['seconds']:.1f}"


def _scale_table(F: dict, sizes: list, stage: str, cell) -> list[str]:
    """A markdown table, one row per index of ``stage`` and one column per scale, of ``cell(record)``."""
    lines = ["| index | " + " | ".join(f"{s}x" for s in sizes) + " |", "| --- |" + " --- |" * len(sizes)]
    for key in F[sizes[0]][stage]:
        lines.append(f"| {key} | " + " | ".join(cell(F[s][stage].get(key)) for s in sizes) + " |")
    return lines


def scale_markdown(res: dict) -> str:
    F = res["factors"]
    sizes = sorted(F, key=int)
    S = res["summary"]
    runs: dict = {}
    for s in sizes:
        for run in F[s].get("runs", []):
            key = (run["command"], run["commit"], run["stages"])
            runs.setdefault(key, [run["when_utc"], []])[1].append(f"{s}x")
    lines = ["## Database build at scale", "",
             f"{res['cpu']}, {res['threads']} thread (OMP_NUM_THREADS=1), a machine shared with "
             "other jobs, so single stage times move by 10-30% between runs. Runs, in order (a later run's "
             "figures replace an earlier one's for the stages it measured):", ""]
    lines += [f"- {when}, commit {commit}: `{cmd}` measured {stages.replace(',', ', ')} at "
              f"{', '.join(where)}"
              for (cmd, commit, stages), (when, where) in sorted(runs.items(), key=lambda kv: kv[1][0])]
    lines += ["", f"Corpus: the Python {res['python']} standard library's `.py` "
              "files and the pydoc topics, one document per file, in a seeded random order; each "
              "size holds the smaller ones. C = 64, K = 2, every stage in a fresh process (times "
              "are the stage's work, without imports and model loading; the process holds "
              f"{F[sizes[0]]['chunking']['start_rss_MB']:.0f} MB RSS, "
              f"{F[sizes[0]]['chunking']['start_anon_MB']:.0f} MB anonymous before it starts). "
              "Every index is built by the library (`index.build_index`: `auto` at the default "
              "budget of 100m, or the factory string), its search knobs and, for SQ / PQ codes, "
              "its rescoring factor tuned for recall@2 >= 0.9 on 1000 sampled chunks; the "
              "neighbour and recall stages load it as the library does (`index.read_index`).", "",
             "| size | files | MB | chunks | vectors |", "| --- | --- | --- | --- | --- |"]
    for s in sizes:
        f = F[s]
        emb_note = (f"embedding stage: {f['embedding']['chunks_embedded']:,} random chunks "
                    "embedded (its per-chunk cost); index and neighbour stages: "
                    if f["embedding"].get("sampled") else "") + f["vectors"]
        lines.append(f"| {s}x | {f['files']} | {f['bytes'] / 2**20:.1f} | {f['chunks']:,} | {emb_note} |")
    lines += ["", "Per stage: seconds, ms per chunk, peak RSS (`VmHWM`) and peak anonymous memory "
              "(RssAnon sampled every 10 ms; VmHWM also counts memmap file pages the stage "
              "touched), MB. Index size in MB.", "",
              "| stage | " + " | ".join(f"{s}x s | {s}x ms/chunk | {s}x RSS / anon" for s in sizes)
              + f" | ms/chunk {sizes[-1]}x / {sizes[0]}x |"
              + (f" {sizes[-1]}x / {sizes[-2]}x |" if len(sizes) > 2 else ""),
              "| --- |" + " --- | --- | --- |" * len(sizes) + " --- |" + (" --- |" if len(sizes) > 2 else "")]
    mid_ratio = S.get(f"per_chunk_ratio_{sizes[-1]}x_over_{sizes[-2]}x", {}) if len(sizes) > 2 else None
    names = ["chunking", "embedding"] + [f"index {k}" for k in F[sizes[0]]["index"]] +             [f"neighbours {k}" for k in F[sizes[0]]["neighbours"]]

    def rec(f, name):
        if name in ("chunking", "embedding"):
            return f[name]
        stage, key = name.split(" ", 1)
        return f[stage].get(key)

    for name in names:
        cells = []
        for s in sizes:
            r = rec(F[s], name)
            if r is None:
                cells += ["", "", ""]
                continue
            star = "*" if name == "embedding" and r.get("sampled") else ""
            cells += [f"{r['seconds']:.1f}{star}", f"{r['ms_per_chunk']:.3f}",
                      f"{r['peak_rss_MB']:.0f} / {r['peak_anon_MB']:.0f}"]
        ratio = S["per_chunk_ratio"].get(name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'' if ratio is None else f'{ratio:.2f}'} |"
                     + ("" if mid_ratio is None else f" {mid_ratio[name]:.2f} |" if name in mid_ratio else " |"))
    k = res["k"]
    whole = S.get("whole_build_auto_ms_per_chunk", {})
    lines += ["", "\\* projected from the sampled chunks' per-chunk cost.", ""]
    if whole:
        lines += ["Whole build with `index=\"auto\"` (chunking + embedding + auto index + its "
                  "neighbours), ms per chunk: " + ", ".join(f"{s}x {v:.2f}" for s, v in whole.items())
                  + (f" ({sizes[-1]}x / {sizes[0]}x = "
                     f"{S['per_chunk_ratio']['whole build (auto index)']:.2f})"
                     if "whole build (auto index)" in S["per_chunk_ratio"] else "") + ".", ""]
    lines += ["What the library built and tuned (factory string; search knobs; rescoring "
              "factor; recall@2 its build measured on 1000 sampled chunks; seconds of the stage "
              "spent training / adding / tuning):", "",
              ] + _scale_table(F, sizes, "index", _built_cell)
    lines += ["", "The neighbour stage's search (`knn.tune_neighbour_search`: the index's knobs, "
              "and the rescoring factor, raised until the neighbour search itself, with its "
              "exclusions, reaches recall@2 >= 0.9 against exact search on 1000 sampled chunks; "
              "knobs; rescoring factor; that recall; seconds of the stage it took):", "",
              ] + _scale_table(F, sizes, "neighbours", _tuned_cell)
    lines += ["", f"Index size (MB) / recall@{k} of the library's search against exact search on "
              f"{F[sizes[0]]['index'].get('HNSW32', {}).get('recall', {}).get('queries', '')} "
              f"other sampled chunks / share of the exact neighbour file's ids (other documents, "
              f"after exclusions) that the approximate one holds / recall@{k} of the same "
              "index without rescoring (where it rescores):", "",
              "| index | " + " | ".join(f"{s}x" for s in sizes) + " |",
              "| --- |" + " --- |" * len(sizes)]
    for key in F[sizes[0]]["index"]:
        cells = []
        for s in sizes:
            r = F[s]["index"].get(key)
            if r is None:
                cells.append("")
                continue
            rc = r.get("recall")
            plain = (rc or {}).get(f"recall@{k}_without_rescoring")
            cells.append(f"{r['index_bytes'] / 2**20:.1f}" + ("" if rc is None else
                         f" / {rc[f'recall@{k}']:.3f} / {rc[f'knn_file_recall@{k}']:.3f}")
                         + ("" if plain is None else f" / {plain:.3f}"))
        spec = next(F[s]["index"][key]["spec"] for s in reversed(sizes) if key in F[s]["index"])
        lines.append(f"| {key} (`{spec}`) | " + " | ".join(cells) + " |")
    T = S.get("targets", {})
    ratios = S["per_chunk_ratio"]
    growth = S.get("anon_MB_excluding_index_growth", {})
    lines += ["", f"Targets ({sizes[-1]}x against {sizes[0]}x):", "",
              f"- per-chunk time within {T.get('per_chunk_ratio_max', 1.3)}x: "
              + ", ".join(f"{name} {v:.2f} ({'met' if v <= 1.3 else '**missed**'})"
                          for name, v in ratios.items()) + ";",
              "- peak anonymous memory apart from the index (peak RssAnon minus the index's size), "
              f"growth from {sizes[0]}x to {sizes[-1]}x: "
              + ", ".join(f"{name} {v:+.0f} MB" for name, v in growth.items()) + ";",
              f"- recall@{k} against exact search ({res.get('search_params')}), at least "
              f"{T.get('recall@2_min', 0.9)}: "
              + ", ".join(f"{name} {v:.3f}" for name, v in T.get("recall@2", {}).items()) + "."]
    P = res.get("projection_1B_chunks")
    if P:
        ix = P["index_GiB"]
        lines += ["", "Projection to 1B chunks (arithmetic on the figures above, not a measurement): "
                  f"embedding {P['embedding_cpu_core_days']:.0f} core-days on this CPU at "
                  f"{P['embedding_ms_per_chunk_cpu']:.1f} ms per chunk; on one GPU "
                  f"{P['embedding_gpu_hours']:.1f} hours at {P['embedding_gflop_per_chunk']:.2f} "
                  f"GFLOP per chunk, assuming {P['gpu_assumption']}; chunking "
                  f"{P['chunking_core_hours']:.0f} core-hours; index memory (GiB) "
                  + ", ".join(f"{k} {v:,.0f}" for k, v in ix.items() if v is not None) + "."]
    return "\n".join(lines) + "\n"


def scale_main(args) -> None:
    import datetime
    import platform
    import sys

    from benchmarks.common.report import run_identity, write_section

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dbscale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("factors", {})
    for factor in (int(f) for f in args.factors.split(",") if f):  # none: only the report
        prev = results["factors"].get(str(factor))
        res = scale_one(workdir, factor, args, prev)
        commit, cpu = run_identity(REPO)
        res["runs"] = ((prev or {}).get("runs", []) if args.only else []) + [{
            "command": "python -m benchmarks.end_to_end.bench_database " + " ".join(sys.argv[1:]),
            "stages": args.only or ",".join(STAGES), "commit": commit,
            "when_utc": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"),
            "load_average": round(os.getloadavg()[0], 1)}]
        results["factors"][str(factor)] = res
        results.update(
            commit=commit, cpu=cpu, threads=torch.get_num_threads(), k=args.knn,
            python=platform.python_version(), base_mb=args.base_mb,
            command="python -m benchmarks.end_to_end.bench_database " + " ".join(sys.argv[1:]),
            when_utc=datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"),
            load_average=round(os.getloadavg()[0], 1), search_params=SEARCH_PARAMS,
            tile_noise=TILE_NOISE)
        if len(results["factors"]) > 1:
            results["summary"] = scale_summary(results["factors"])
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
    if len(results["factors"]) > 1:
        results["summary"] = scale_summary(results["factors"])
        results["projection_1B_chunks"] = projection_1b(results["factors"])
        write_atomically(out, lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
    if "summary" in results and out.resolve() == SCALE_JSON.resolve():
        write_section(REPO / "BENCHMARKS.md", "database_scale", scale_markdown(results))
    print(json.dumps(results.get("summary", results), indent=2))


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
