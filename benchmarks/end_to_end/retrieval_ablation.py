"""One run of an initialisation or optimisation variant on a corpus of ``retrieval_gain.py``.

    HF_HUB_OFFLINE=1 python -m benchmarks.end_to_end.retrieval_ablation --corpus near_duplicate --emb-std 0.02
    HF_HUB_OFFLINE=1 python -m benchmarks.end_to_end.retrieval_ablation --corpus natural --no-retrieval
    HF_HUB_OFFLINE=1 python -m benchmarks.end_to_end.retrieval_ablation --steps 1600 --schedule 1600

The ablations behind the library's initialisation defaults (``zero_init_residual``,
``token_emb_init_std``): the main job's CPU configuration (``config.CPU``) built with
``torch.manual_seed(0)``, the variant applied to the fresh weights, 4 x 256 tokens per step in the
order of ``StepBatchSampler(seed=0)``, bf16 autocast, ``get_optimizer`` and ``lr_schedule`` over
``--schedule`` steps; every 100 steps the held-out loss with retrieval and with it off (same
weights). Only the variant differs between runs, so runs of one corpus compare side by side; a
``--no-retrieval`` run is B of ``retrieval_gain.py`` for that variant (compare its loss without
retrieval with a retrieval run's loss with it). Each run appends a record to
``benchmarks/results/retrieval_ablation.jsonl``.

(The seeds differ from ``retrieval_gain.py``'s, so its figures and these differ by run-to-run
noise.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from diablogpt_pytorch import DIABLOGPT
from diablogpt_pytorch.config import CPU
from diablogpt_pytorch.model import ChunkedCrossAttention
from diablogpt_pytorch.training import StepBatchSampler, get_optimizer, lr_schedule

from benchmarks.common import report as _report
from benchmarks.end_to_end.retrieval_gain import CORPORA, build_wrapper, make_corpus

REPO = Path(__file__).resolve().parents[2]
logger = logging.getLogger("retrieval_ablation")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="near_duplicate", choices=CORPORA)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--schedule", type=int, default=None, help="schedule length (default: --steps)")
    p.add_argument("--emb-std", type=float, default=CPU.token_emb_init_std,
                   help="token_emb_init_std (the library default: %(default)s)")
    p.add_argument("--random-residual", action="store_true",
                   help="zero_init_residual=False: torch's default init of every output projection")
    p.add_argument("--cca-out-scale", type=float, default=1.0,
                   help="multiply the chunked cross-attention output projections by this at init")
    p.add_argument("--cca-layers", default=None, help="dec_cross_attn_layers, e.g. 1,3")
    p.add_argument("--no-retrieval", action="store_true", help="train with retrieved=None (B)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--knn", type=int, default=2)
    p.add_argument("--work", default=str(REPO / "benchmarks" / "_work" / "retrieval_gain"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "retrieval_ablation.jsonl"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    schedule = args.schedule or args.steps

    config = CPU.replace(token_emb_init_std=args.emb_std, zero_init_residual=not args.random_residual)
    if args.cca_layers:
        config = config.replace(dec_cross_attn_layers=tuple(int(i) for i in args.cca_layers.split(",")))
    work = Path(args.work)
    folder = make_corpus(args.corpus, work)
    torch.manual_seed(0)
    model = DIABLOGPT(**config.model_kwargs())
    if args.cca_out_scale != 1.0:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, ChunkedCrossAttention):
                    module.to_out.weight.mul_(args.cca_out_scale)
    wrapper = build_wrapper(folder, work / args.corpus / "db", model, args.knn, True)
    wrapper.model = wrapper.train_model = model
    optim = get_optimizer(model, lr=args.lr, wd=args.wd)
    loader = iter(wrapper.get_dataloader(
        batch_sampler=StepBatchSampler(len(wrapper.train_ds), args.batch_size, seed=0), num_workers=0))

    variant = {k: getattr(args, k) for k in ("emb_std", "random_residual", "cca_out_scale",
                                             "cca_layers", "no_retrieval", "lr", "wd")}
    commit, cpu = _report.run_identity(REPO)
    record = dict(variant=variant, corpus=args.corpus, steps=args.steps, schedule=schedule,
                  commit=commit, cpu=cpu, when=time.strftime("%Y-%m-%d"), evals=[])
    torch.manual_seed(1)
    model.train()
    started = time.time()
    for step in range(args.steps):
        for group in optim.param_groups:
            group["lr"] = lr_schedule(step, schedule, args.lr)
        seq, retrieved = next(loader)
        with wrapper.autocast():
            loss = model(seq, None if args.no_retrieval else retrieved, return_loss=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            m = wrapper.evaluate(batch_size=8, progress=False)
            w, wo = m["with_retrieval"]["loss"], m["without_retrieval"]["loss"]
            record["evals"].append(dict(step=step + 1, with_retrieval=w, without_retrieval=wo,
                                        seconds=time.time() - started))
            logger.info("step %d: held-out %.3f with retrieval, %.3f without (gain %.1f%%, %.0fs)",
                        step + 1, w, wo, 100 * (1 - w / wo), time.time() - started)
            model.train()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record["evals"][-1]))


if __name__ == "__main__":
    main()
