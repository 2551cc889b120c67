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
    HF_HUB_OFFLINE=1 python benchmarks/bench_generation.py            # both configurations
    HF_HUB_OFFLINE=1 python benchmarks/bench_generation.py --only small --tokens 512

Results are printed and written as JSON to benchmarks/results/generation.json.
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
from diablogpt_pytorch.corpus import write_default_corpus
from diablogpt_pytorch.generation import generate
from diablogpt_pytorch.retrieval import Retriever, chunks_to_precalculated_knn_, text_folder_to_chunks_

CONFIGS = {
    # name: (model kwargs, tokens to generate)
    "small": (dict(max_seq_len=2048, enc_dim=256, enc_depth=2, dec_dim=256, dec_depth=6,
                   dec_cross_attn_layers=(3, 6), heads=4, dim_head=64), 2048),
    "seed": (dict(max_seq_len=2048, enc_dim=896, enc_depth=3, dec_dim=768, dec_depth=12,
                  dec_cross_attn_layers=(1, 3, 6, 9), heads=8, dim_head=64), 512),
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


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_config(name: str, retriever, tokens: int, skip_naive: bool) -> dict:
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
    if not skip_naive:
        naive, t_naive = timed(lambda: full_recompute_greedy(model, retriever, prompt, cached.shape[1]))
        result.update(naive_seconds=t_naive, naive_tokens_per_s=naive.shape[1] / t_naive,
                      speedup=t_naive / t_cached, outputs_identical=bool(torch.equal(naive, cached)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append")
    parser.add_argument("--tokens", type=int, default=0, help="override the tokens to generate")
    parser.add_argument("--skip-naive", action="store_true", help="measure only the cached loops")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        retriever = build_retriever(Path(tmp))
        results = []
        for name in args.only or ["small", "seed"]:
            result = run_config(name, retriever, args.tokens, args.skip_naive)
            print(json.dumps(result, indent=2), flush=True)
            results.append(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
