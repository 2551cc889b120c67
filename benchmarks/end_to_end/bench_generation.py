"""Generation speed: cached decoding (ours) against the full-recompute loop (the reference's algorithm).

Batch 1, retrieval at every chunk with the real faiss Retriever over a database built from the
default corpus with the offline embedder. Both loops generate greedily with identical neighbours
(the same retriever), and the outputs are checked equal. Reported per configuration:

- tokens/s of ``diablogpt_pytorch.generation.generate`` (cached, retrieval at each chunk);
- tokens/s of the full-recompute loop: for every new token a full forward over the whole sequence
  with all neighbours re-encoded (retrieval once per completed chunk, as the reference does);
- tokens/s of the cached loop with retrieval switched off (same decoder), and the ratio of per-token
  costs with/without retrieval.

Usage:
    HF_HUB_OFFLINE=1 python -m benchmarks.end_to_end.bench_generation            # both configurations
    HF_HUB_OFFLINE=1 python -m benchmarks.end_to_end.bench_generation --only small --tokens 512 --naive full
    HF_HUB_OFFLINE=1 python -m benchmarks.end_to_end.bench_generation --retrieval-latency

The full-recompute loop is quadratic in the length (hours at 2048 tokens on 2 cores), so by
default it runs for its first --calibrate tokens only (output checked against the cached loop)
and the whole run is estimated from its per-step cost measured at 8 lengths, integrated over the
steps; the estimate's error on the measured head is reported beside it.

Results are printed and written as JSON to benchmarks/results/generation.json.

``--retrieval-latency``: milliseconds per ``Retriever.retrieve`` call (embedding the query chunks,
searching, gathering neighbour tokens) of one chunk and of 8, over an exact, an HNSW32 and the
compressed index auto picks for the same database (rescored) (results/retrieval_latency.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from diablogpt_pytorch import DIABLOGPT
from diablogpt_pytorch.config import SEED
from diablogpt_pytorch.corpus import write_default_corpus
from diablogpt_pytorch.generation import generate
from diablogpt_pytorch.retrieval import Retriever, chunks_to_precalculated_knn_, text_folder_to_chunks_

from benchmarks.common import REPO_ROOT, RESULTS
from benchmarks.common.report import run_identity, write_atomically, write_section

CONFIGS = {
    # name: (model kwargs, tokens to generate)
    "small": (dict(max_seq_len=2048, enc_dim=256, enc_depth=2, dec_dim=256, dec_depth=6,
                   dec_cross_attn_layers=(3, 6), heads=4, dim_head=64), 2048),
    "seed": (SEED.replace(dec_attn_dropout=0.0, dec_ff_dropout=0.0).model_kwargs(), 512),
}
K = 2


def build_retriever(workdir: Path) -> Retriever:
    docs = workdir / "docs"
    write_default_corpus(docs)
    paths = {name: workdir / f"db.{name}.dat" for name in ("chunks", "seqs", "doc_ids")}
    stats = text_folder_to_chunks_(docs, "**/*.txt", paths["chunks"], paths["seqs"], paths["doc_ids"],
                                   chunk_size=64, seq_len=2048)
    chunks_to_precalculated_knn_(K, stats["chunks"], 64, paths["chunks"], paths["doc_ids"])
    return Retriever(paths["chunks"], paths["doc_ids"])


class CountingRetriever:
    """Wraps a retriever to time retrieval separately."""

    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def retrieve(self, chunks, k, exclude_doc_ids=None):
        t = time.perf_counter()
        out = self.inner.retrieve(chunks, k, exclude_doc_ids)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out


@torch.no_grad()
def full_recompute_greedy(model, retriever, prompt: torch.Tensor, length: int) -> torch.Tensor:
    """The reference's algorithm: every new token runs the model over the whole sequence and
    re-encodes every neighbour; retrieval happens once per completed chunk."""
    C = model.chunk_size
    seq = prompt
    neighbours = []
    while seq.shape[1] < length:
        while len(neighbours) < seq.shape[1] // C:
            u = len(neighbours)
            neighbours.append(retriever.retrieve(seq[:, u * C:(u + 1) * C][:, None], K)[:, 0])
        retrieved = torch.stack(neighbours, dim=1) if neighbours else None
        logits = model(seq, retrieved)[:, -1]
        seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)
    return seq


@torch.no_grad()
def estimated_full_recompute_seconds(model, retriever, prompt: torch.Tensor, length: int, points: int = 8,
                                     repeats: int = 2) -> float:
    """Seconds the full-recompute loop would take from len(prompt) to ``length`` tokens, from the
    measured cost of one full forward (with neighbours re-encoded) at ``points`` lengths,
    integrated over every step (trapezoid rule; the cost grows smoothly with the length)."""
    C = model.chunk_size
    seq = torch.randint(1, model.num_tokens, (1, length))
    neighbours = retriever.retrieve(seq[:, : (length // C) * C].reshape(1, length // C, C), K)
    grid = sorted({int(x) for x in torch.linspace(prompt.shape[1], length - 1, points).round().tolist()})
    costs = []
    for n in grid:
        model(seq[:, :n], neighbours[:, : n // C] if n >= C else None)  # warm-up at this length
        best = min(timed(lambda: model(seq[:, :n], neighbours[:, : n // C] if n >= C else None))[1]
                   for _ in range(repeats))
        costs.append(best)
    total = 0.0
    for (n0, c0), (n1, c1) in zip(zip(grid, costs), zip(grid[1:], costs[1:])):
        total += (c0 + c1) / 2 * (n1 - n0)
    return total + costs[-1]  # the last step


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_config(name: str, retriever, tokens: int, naive_mode: str, calibrate: int) -> dict:
    kwargs, default_tokens = CONFIGS[name]
    tokens = tokens or default_tokens
    torch.manual_seed(0)
    model = DIABLOGPT(**kwargs).eval()
    prompt = torch.tensor([[retriever.eos_id]])
    counting = CountingRetriever(retriever)
    def gen(new_tokens=tokens - 1, **kw):
        return generate(model, counting, prompt, temperature=0.0, num_neighbors=K,
                        max_new_tokens=new_tokens, **kw)

    gen(new_tokens=70)  # warm-up (one chunk boundary)
    counting.seconds = counting.calls = 0
    cached, t_cached = timed(gen)
    retrieval_seconds, retrieval_calls = counting.seconds, counting.calls
    no_retrieval, t_plain = timed(lambda: gen(use_retrieval=False))
    result = dict(
        config=name, model=kwargs, tokens=int(cached.shape[1]), threads=torch.get_num_threads(),
        cached_seconds=t_cached, cached_tokens_per_s=cached.shape[1] / t_cached,
        retrieval_seconds=retrieval_seconds, retrieval_calls=retrieval_calls,
        no_retrieval_seconds=t_plain, no_retrieval_tokens_per_s=no_retrieval.shape[1] / t_plain,
        cost_ratio_with_vs_without_retrieval=(t_cached / cached.shape[1]) / (t_plain / no_retrieval.shape[1]),
    )
    if naive_mode == "full":
        naive, t_naive = timed(lambda: full_recompute_greedy(model, retriever, prompt, cached.shape[1]))
        result.update(naive_mode="measured", naive_seconds=t_naive, naive_tokens_per_s=naive.shape[1] / t_naive,
                      speedup=t_naive / t_cached, outputs_identical=bool(torch.equal(naive, cached)))
    elif naive_mode == "sampled":
        # the full loop is quadratic in the length (hours at 2048 tokens on 2 cores): measure it
        # for the first `calibrate` tokens (and check its output), estimate the whole run from
        # per-step costs sampled along the length, and report the estimate's error on the part
        # that was measured
        head, t_head = timed(lambda: full_recompute_greedy(model, retriever, prompt, calibrate))
        est_head = estimated_full_recompute_seconds(model, retriever, prompt, calibrate)
        est_total = estimated_full_recompute_seconds(model, retriever, prompt, cached.shape[1])
        est_total += retrieval_seconds  # the loop retrieves once per chunk, like the cached one
        result.update(naive_mode="estimated from sampled per-step costs", naive_seconds=est_total,
                      naive_tokens_per_s=cached.shape[1] / est_total, speedup=est_total / t_cached,
                      calibration_tokens=calibrate, calibration_measured_seconds=t_head,
                      calibration_estimated_seconds=est_head,
                      outputs_identical_on_calibration=bool(torch.equal(head, cached[:, :calibrate])))
    return result


#: indexes of the retrieval latency run: (name, index=, max_index_memory_usage as a share of flat)
LATENCY_INDEXES = (("exact", "exact", 1.0), ("HNSW32", "HNSW32", 1.0), ("auto, 1/4 flat", "auto", 0.25))


def retrieval_latency(workdir: Path, calls: int = 200, batch: int = 1) -> list[dict]:
    """ms per ``Retriever.retrieve`` call of ``batch`` chunks over the default corpus database,
    for an exact, an HNSW32 and the compressed index ``index='auto'`` picks under a quarter of the
    flat index's size (each with the search knobs and rescoring factor its build tuned for
    recall@2 >= 0.9); also the faiss
    search alone (same queries, embedded beforehand) and the build's recorded recall."""
    import numpy as np

    from diablogpt_pytorch import embedder as emb
    from diablogpt_pytorch import index as idx
    from diablogpt_pytorch.retrieval import chunks_to_index_and_embed, open_chunks

    retriever = build_retriever(workdir)
    n, C = retriever.num_chunks, retriever.chunk_size
    chunks = open_chunks(retriever.chunks.filename, n, C)
    rows = np.random.default_rng(0).choice(n, calls * batch, replace=False if calls * batch <= n else True)
    queries = torch.from_numpy(np.asarray(chunks[np.sort(rows), :C], dtype=np.int64)).reshape(calls, batch, C)
    flat = idx.flat_index_bytes(n, emb.hidden_size(None))
    out = []
    for name, spec, share in LATENCY_INDEXES:
        path = workdir / f"latency.{spec}.{share}.index"
        chunks_to_index_and_embed(n, C, retriever.chunks.filename, index=spec, index_file=path,
                                  max_index_memory_usage=int(flat * share))
        r = Retriever(retriever.chunks.filename, index_file=path)
        vectors = [emb.embed_chunks(q, r.embedder, "cpu", dtype=r.dtype, normalize=True,
                                    tokenizer=r.tokenizer).numpy() for q in queries]
        for q in queries[:5]:  # warm-up
            r.retrieve(q, K)
        times, search = [], []
        for q, v in zip(queries, vectors):
            t = time.perf_counter()
            r.retrieve(q, K)
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            r.index.search(v, K)
            search.append(time.perf_counter() - t)
        record = idx.index_record(path)
        out.append({"index": name, "factory": record["factory"], "chunks": n, "batch": batch,
                    "query_dtype": r.dtype,
                    "search_params": record.get("search_params"), "rescore": record.get("rescore", 0),
                    "recall_at_2": record.get("recall_at_2"),
                    "index_mb": round(record["bytes"] / 2**20, 3),
                    "retrieve_ms_mean": round(1000 * float(np.mean(times)), 3),
                    "retrieve_ms_p50": round(1000 * float(np.median(times)), 3),
                    "retrieve_ms_p90": round(1000 * float(np.percentile(times, 90)), 3),
                    "search_ms_mean": round(1000 * float(np.mean(search)), 4)})
        print(json.dumps(out[-1]), flush=True)
    return out


def latency_markdown(res: dict) -> str:
    lines = [
        "## Retrieval latency: exact and approximate indexes",
        "",
        f"`python -m benchmarks.end_to_end.bench_generation --retrieval-latency` (commit {res['commit']}, "
        f"{res['cpu']}, {res['threads']} torch thread(s), load average {res['load_average']}): "
        f"milliseconds per `Retriever.retrieve` call over the default corpus database "
        f"({res['batch_1'][0]['chunks']} chunks, all-MiniLM-L6-v2, {res['batch_1'][0]['query_dtype']} "
        "query embedding): embedding the query "
        "chunks, the faiss search, gathering neighbour tokens; `search` is the faiss search alone on "
        "the same queries embedded beforehand. Each index with the knobs its build tuned for "
        "recall@2 >= 0.9 (recall as recorded by the build, 1,000 sampled chunks).",
        "",
        "| index (factory string) | knobs | recall@2 | index MB | batch | retrieve ms mean / p50 / p90 | search ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in ("batch_1", "batch_8"):
        for r in res[key]:
            knobs = ", ".join([f"{k}={v}" for k, v in (r["search_params"] or {}).items()]
                              + ([f"rescored x{r['rescore']}"] if r.get("rescore") else [])) or "-"
            lines.append(f"| {r['index']} (`{r['factory']}`) | {knobs} | {r['recall_at_2']:.3f} | "
                         f"{r['index_mb']:.2f} | {r['batch']} | {r['retrieve_ms_mean']:.1f} / "
                         f"{r['retrieve_ms_p50']:.1f} / {r['retrieve_ms_p90']:.1f} | "
                         f"{r['search_ms_mean']:.3f} |")
    rows = res["batch_1"] + res["batch_8"]
    share = max(r["search_ms_mean"] / r["retrieve_ms_mean"] for r in rows)
    lines += ["", f"The faiss search is at most {100 * share:.1f}% of a call here: embedding the query "
              "chunks with the BERT dominates, so at this size the index changes latency by less "
              "than the run-to-run spread; it decides memory and the build's neighbour search "
              "(see Database build at scale)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append")
    parser.add_argument("--tokens", type=int, default=0, help="override the tokens to generate")
    parser.add_argument("--naive", choices=["full", "sampled", "skip"], default="sampled",
                        help="run the full-recompute loop to the end (full), measure its first "
                             "--calibrate tokens and estimate the rest from sampled per-step costs "
                             "(sampled, default), or skip it")
    parser.add_argument("--calibrate", type=int, default=192, help="tokens of the measured head (sampled mode)")
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "results" / "generation.json"))
    parser.add_argument("--retrieval-latency", action="store_true",
                        help="instead: ms per Retriever.retrieve call over exact, HNSW32 and compressed "
                             "indexes of the default corpus database (results/retrieval_latency.json)")
    parser.add_argument("--calls", type=int, default=200, help="retrieve calls timed per index")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.retrieval_latency:
        with tempfile.TemporaryDirectory() as tmp:
            results = {"batch_1": retrieval_latency(Path(tmp), args.calls, 1),
                       "batch_8": retrieval_latency(Path(tmp), max(1, args.calls // 8), 8),
                       "threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 1)}
        results["commit"], results["cpu"] = run_identity(REPO_ROOT)
        out = RESULTS / "retrieval_latency.json"
        write_atomically(out, lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
        write_section(REPO_ROOT / "BENCHMARKS.md", "retrieval_latency",
                      latency_markdown(results))
        print(f"wrote {out} and the retrieval_latency section of BENCHMARKS.md")
        return
    with tempfile.TemporaryDirectory() as tmp:
        retriever = build_retriever(Path(tmp))
        results = []
        for name in args.only or ["small", "seed"]:
            result = run_config(name, retriever, args.tokens, args.naive, args.calibrate)
            print(json.dumps(result, indent=2), flush=True)
            results.append(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
