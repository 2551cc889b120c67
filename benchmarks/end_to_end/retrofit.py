"""RETRO-fitting a pretrained decoder: does it beat its base, and for how much training?

    HF_HUB_OFFLINE=1 python -m benchmarks.end_to_end.retrofit                      # near_duplicate, ~10 min
    HF_HUB_OFFLINE=1 python -m benchmarks.end_to_end.retrofit --corpora natural,near_duplicate

For each corpus of ``retrieval_gain.py`` (``near_duplicate``: every document of the default corpus
twice, as it is and re-wrapped, split by file; ``natural``: the default corpus):

1. pretrain a small GPT-2 decoder (a ``transformers.GPT2LMHeadModel``, 256 wide, 4 blocks, 256
   positions, the embedder's 30522-token vocabulary, randomly initialised) on the training split
   without retrieval for ``--pretrain-steps`` and save it with ``save_pretrained`` (a later run
   with the same settings loads it instead);
2. retro-fit it (:func:`diablogpt_pytorch.retrofit.retrofit`: CCA after blocks 2 and 4, a 2-layer
   128-wide encoder, chunk size 64, K=2; base frozen; ``--enc-depth 0 --enc-next-token`` for no
   encoder and each neighbour token's input holding the next token's embedding too) and train
   the new parameters with retrieval for ``--retrofit-steps``;
3. train DIABLOGPT from scratch with retrieval (the main job's CPU configuration) for
   ``--scratch-steps``, evaluating along the way, to see at which step it reaches the
   retro-fitted model's held-out loss.

Every stage uses the library's TrainingWrapper, get_optimizer, the main job's schedule
(``lr_schedule``), 4 x 256 tokens per step and bf16 autocast (``retrieval_gain.train_run``).
Reported: held-out loss of the base, of the retro-fitted model with retrieval and without (the
latter equals the base's exactly), of DIABLOGPT from scratch, the trained parameter counts, and
the seconds of one training step of each, timed side by side (``--time-steps``).

Writes ``<out>/retrofit.json`` (every evaluation, and a history of every run) and, unless
``--no-report``, the "Retro-fitting" section of BENCHMARKS.md. Every run is reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from diablogpt_pytorch import DIABLOGPT
from diablogpt_pytorch.config import CPU
from diablogpt_pytorch.optim import get_optimizer
from diablogpt_pytorch.retrofit import retrofit
from diablogpt_pytorch.training import StepBatchSampler

from benchmarks.common import report as _report
from benchmarks.end_to_end.retrieval_gain import CORPORA, add_run_args, build_wrapper, make_corpus, train_run

REPO = Path(__file__).resolve().parents[2]
logger = logging.getLogger("retrofit")

# the base decoder: about the width and depth of the main job's CPU DIABLOGPT decoder
BASE = dict(vocab_size=30522, n_positions=CPU.max_seq_len, n_embd=256, n_layer=4, n_head=4,
            pad_token_id=0, bos_token_id=102, eos_token_id=102)
# or a Llama-family decoder of the same width and depth (rotary positions, RMSNorm, SwiGLU with
# the parameters of GPT-2's 4x MLP: 3 x 256 x 688 ~ 2 x 256 x 1024), tied input/output embeddings
BASE_LLAMA = dict(vocab_size=30522, max_position_embeddings=CPU.max_seq_len, hidden_size=256,
                  intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, tie_word_embeddings=True, pad_token_id=0,
                  bos_token_id=102, eos_token_id=102)
# the new parts: as the CPU DIABLOGPT's encoder and CCA
NEW = dict(dec_cross_attn_layers=(2, 4), enc_dim=CPU.enc_dim, enc_depth=CPU.enc_depth,
           heads=CPU.heads, dim_head=CPU.dim_head, chunk_size=CPU.chunk_size,
           max_seq_len=CPU.max_seq_len)


def new_parts(args) -> dict:
    """NEW with the run's encoder options (``--enc-depth``, ``--enc-next-token``)."""
    return dict(NEW, enc_depth=getattr(args, "enc_depth", NEW["enc_depth"]),
                enc_next_token=bool(getattr(args, "enc_next_token", False)))


def count(params) -> int:
    return sum(p.numel() for p in params)


def pretrained_base(name: str, folder: Path, wrapper, args) -> tuple[Path, list[dict]]:
    """The base decoder for corpus ``name``: loaded from ``folder`` when a previous run saved it
    with the same settings, else pretrained here without retrieval and saved."""
    import transformers

    family = getattr(args, "base_family", "gpt2")
    config = BASE if family == "gpt2" else dict(BASE_LLAMA, family=family)
    settings = dict(config, corpus=name, steps=args.pretrain_steps, lr=args.lr, seed=args.seed,
                    batch_size=args.batch_size, documents=[str(p) for p in wrapper.train_documents])
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    done = folder / "pretrain.json"
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        logger.info("%s: reusing the base pretrained by an earlier run in %s", name, folder)
        return folder, json.loads(done.read_text())["records"]
    torch.manual_seed(args.seed)
    init = folder.with_name(folder.name + ".init")
    if family == "gpt2":
        transformers.GPT2LMHeadModel(transformers.GPT2Config(**BASE)).save_pretrained(init)
    else:
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE_LLAMA)).save_pretrained(init)
    model = retrofit(init, **NEW, freeze=False)  # retrieval off: exactly the GPT-2 model
    logger.info("%s: pretraining the base (%d parameters) for %d steps", name,
                count(model.base.parameters()), args.pretrain_steps)
    records = train_run(wrapper, model, retrieval=False, steps=args.pretrain_steps,
                        eval_at=[args.pretrain_steps], batch_size=args.batch_size, lr=args.lr,
                        wd=args.wd, seed=args.seed)
    model.base.save_pretrained(folder)
    _report.write_atomically(done, lambda tmp: tmp.write_text(json.dumps(dict(key=key, records=records))))
    return folder, records


def step_seconds(wrapper, models: dict, batch_size: int, repeats: int) -> dict:
    """Median seconds of one training step (forward with retrieval, backward, AdamW) of each of
    ``models``, measured side by side: the models take turns on the same batches, so machine load
    shifts them alike. Their weights are restored afterwards."""
    states = {k: {n: v.clone() for n, v in m.state_dict().items()} for k, m in models.items()}
    optims = {k: get_optimizer(m, lr=1e-4) for k, m in models.items()}
    loader = iter(wrapper.get_dataloader(batch_sampler=StepBatchSampler(len(wrapper.train_ds), batch_size, seed=7),
                                         num_workers=0))
    times = {k: [] for k in models}
    for i in range(repeats + 1):  # the first round warms up
        seq, retrieved = next(loader)
        for k, model in models.items():
            model.train()
            started = time.perf_counter()
            with wrapper.autocast():
                loss = model(seq, retrieved, return_loss=True)
            loss.backward()
            optims[k].step()
            optims[k].zero_grad(set_to_none=True)
            if i:
                times[k].append(time.perf_counter() - started)
    for k, model in models.items():
        model.load_state_dict(states[k])
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def first_step_reaching(records: list[dict], loss: float):
    """The first evaluated step whose held-out loss with retrieval is <= ``loss`` (else None)."""
    return next((r["step"] for r in records if r["step"] > 0 and r["with_retrieval"] <= loss), None)


def run_corpus(name: str, work: Path, args) -> dict:
    folder = make_corpus(name, work)
    torch.manual_seed(args.seed)
    scratch = DIABLOGPT(**CPU.model_kwargs())
    scratch_state = {k: v.clone() for k, v in scratch.state_dict().items()}
    wrapper = build_wrapper(folder, work / name / "db", scratch, args.knn, not args.no_bf16)

    started = time.time()
    base_path, pretrain = pretrained_base(name, work / name / "base", wrapper, args)
    pretrain_seconds = time.time() - started

    torch.manual_seed(args.seed)
    model = retrofit(base_path, **new_parts(args))
    logger.info("%s: retro-fitting, %d new parameters trained, %d frozen", name,
                count(model.new_parameters()), count(model.base.parameters()))
    started = time.time()
    fitted = train_run(wrapper, model, retrieval=True, steps=args.retrofit_steps,
                       eval_at=sorted({s for s in args.eval_at if s < args.retrofit_steps}
                                      | {args.retrofit_steps}),
                       batch_size=args.batch_size, lr=args.retrofit_lr, wd=args.wd, seed=args.seed + 1,
                       lr_floor=args.retrofit_lr_floor)
    retrofit_seconds = time.time() - started

    runs = dict(pretrain=pretrain, retrofit=fitted)
    scratch_seconds = None
    if args.scratch_steps:
        scratch.load_state_dict(scratch_state)
        torch.manual_seed(args.seed + 1)
        started = time.time()
        runs["scratch"] = train_run(
            wrapper, scratch, retrieval=True, steps=args.scratch_steps,
            eval_at=sorted({s for s in args.eval_at if s < args.scratch_steps} | {args.scratch_steps}),
            batch_size=args.batch_size, lr=args.lr, wd=args.wd, seed=args.seed)
        scratch_seconds = time.time() - started
    timing = (step_seconds(wrapper, dict(retrofit=model, scratch=scratch), args.batch_size, args.time_steps)
              if args.time_steps else None)
    final = fitted[-1]
    return dict(
        corpus=name, train_documents=len(wrapper.train_documents),
        valid_documents=len(wrapper.valid_documents),
        base_parameters=count(model.base.parameters()),
        new_parameters=count(model.new_parameters()),
        scratch_parameters=count(scratch.parameters()),
        seconds=dict(pretrain=pretrain_seconds, retrofit=retrofit_seconds, scratch=scratch_seconds),
        step_seconds=timing,
        summary=dict(
            base=final["without_retrieval"],  # equal to the base model's own loss
            base_at_start=fitted[0]["without_retrieval"],
            retrofit_with=final["with_retrieval"], retrofit_without=final["without_retrieval"],
            gain=1 - final["with_retrieval"] / final["without_retrieval"],
            scratch=runs["scratch"][-1]["with_retrieval"] if "scratch" in runs else None,
            scratch_steps_to_match=(first_step_reaching(runs["scratch"], final["with_retrieval"])
                                    if "scratch" in runs else None)),
        runs=runs)


def _schedule(run: dict) -> str:
    """How the run's retro-fit learning rate decayed, when not to the default 0.1 floor."""
    floor = run.get("retrofit_lr_floor", 0.1)
    return "" if floor == 0.1 else " constant" if floor == 1 else f" floor {floor}"


def _step_times(result: dict) -> str:
    """Seconds per training step of the retro-fitted model and of DIABLOGPT, side by side."""
    t = result.get("step_seconds")
    return "-" if not t else f"{t['retrofit']:.2f} / {t['scratch']:.2f}"


def _encoder(run: dict) -> str:
    """The retro-fit's encoder: its depth, and whether tokens carry the next one's embedding."""
    depth = run.get("enc_depth", NEW["enc_depth"])
    return f"{depth} layers" + (" + next token" if run.get("enc_next_token") else "")


def section(payload: dict) -> str:
    """The BENCHMARKS.md section: every run's final figures and the last run's curves."""
    lines = [
        "## Retro-fitting",
        "",
        "Generated by `python -m benchmarks.end_to_end.retrofit` (raw numbers: `benchmarks/results/retrofit.json`). "
        "A GPT-2 decoder (256 wide, 4 blocks, the embedder's vocabulary; `base` llama: a Llama-family "
        "decoder of the same width, depth and MLP parameters, `--base-family llama`) is pretrained without "
        "retrieval on the corpus's training split, then retro-fitted (CCA after blocks 2 and 4, "
        "2-layer 128-wide encoder, C = 64, K = 2, base frozen) and only the new parameters are "
        "trained with retrieval; DIABLOGPT (the main job's CPU configuration) is trained from "
        "scratch with retrieval for comparison. 4 x 256 tokens per step, bf16, `lr_schedule`. "
        "`base` is the held-out loss of the pretrained base, which is also the retro-fitted model's "
        "with retrieval off (exactly); `gain` = 1 - retro-fitted with / base; a retro-fit lr "
        "marked `constant` stays at its peak after the warm-up (`--retrofit-lr-floor 1`), else it "
        "decays to a tenth; `s per step` is the median seconds of one training step of each, timed side "
        "by side in the run (`--time-steps`); `scratch reaches it "
        "at` is the first evaluated step at which DIABLOGPT from scratch has the retro-fitted "
        "model's held-out loss (`-`: not within its steps).",
        "",
        "| when | commit | corpus | base | encoder | pretrain steps | retro-fit steps | retro-fit lr | base | retro-fitted "
        "with retrieval | gain | trained params (retro-fit / scratch) | s per step (retro-fit / scratch) | "
        "scratch steps | scratch | scratch reaches it at |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in payload["history"]:
        for r in run["results"]:
            s = r["summary"]
            scratch = "-" if s["scratch"] is None else f"{s['scratch']:.3f}"
            reach = s["scratch_steps_to_match"] if s["scratch_steps_to_match"] is not None else "-"
            lines.append(
                f"| {run['when']} | {run['commit']} | {r['corpus']} | {run.get('base_family', 'gpt2')} | {_encoder(run)} | "
                f"{run['pretrain_steps']} | "
                f"{run['retrofit_steps']} | {run.get('retrofit_lr', '-')}{_schedule(run)} | {s['base']:.3f} | {s['retrofit_with']:.3f} | "
                f"{s['gain']:.1%} | {r['new_parameters'] / 1e6:.2f}M / {r['scratch_parameters'] / 1e6:.2f}M | "
                f"{_step_times(r)} | "
                f"{run['scratch_steps']} | {scratch} | {reach} |")
    lines += ["", "Held-out loss with retrieval along every run whose curves were kept (step: loss; "
              "the scratch run's learning rate follows its own schedule of `scratch steps`, so "
              "its loss at a step depends on that length):", "",
              "| commit | corpus | base | encoder | run (steps) | held-out loss with retrieval at step |",
              "| --- | --- | --- | --- | --- | --- |"]
    for run in payload["history"]:
        for r in run["results"]:
            for label in ("retrofit", "scratch"):
                recs = r.get("runs", {}).get(label, [])
                if recs:
                    curve = ", ".join(f"{rec['step']}: {rec['with_retrieval']:.3f}" for rec in recs)
                    lines.append(f"| {run['commit']} | {r['corpus']} | {run.get('base_family', 'gpt2')} | "
                                 f"{_encoder(run) if label == 'retrofit' else '-'} | {label} ({recs[-1]['step']}) | {curve} |")
    lines += ["", f"Held-out loss along the last run ({payload['commit']}, {payload['cpu']}):", "",
              "| corpus | run | step | with retrieval | without retrieval | seconds |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in payload["results"]:
        for label in ("pretrain", "retrofit", "scratch"):
            for rec in r["runs"].get(label, []):
                lines.append(f"| {r['corpus']} | {label} | {rec['step']} | {rec['with_retrieval']:.3f} | "
                             f"{rec['without_retrieval']:.3f} | {rec['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpora", default="near_duplicate", help=f"comma-separated, of {CORPORA}")
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--retrofit-steps", type=int, default=100)
    p.add_argument("--scratch-steps", type=int, default=300,
                   help="DIABLOGPT from scratch (0 skips it); default: pretrain + retro-fit steps")
    p.add_argument("--eval-at", type=lambda s: [int(x) for x in s.split(",")],
                   default=[25, 50, 100, 150, 200, 300])
    p.add_argument("--retrofit-lr", type=float, default=1e-3)
    p.add_argument("--retrofit-lr-floor", type=float, default=0.1,
                   help="the retro-fit's learning rate decays (cosine) to this share of --retrofit-lr "
                   "(1.0: constant after the warm-up)")
    p.add_argument("--base-family", default="gpt2", choices=["gpt2", "llama"],
                   help="the base decoder: GPT-2 (default) or a Llama-family model of the same "
                   "width and depth")
    p.add_argument("--enc-depth", type=int, default=NEW["enc_depth"],
                   help="encoder layers of the retro-fit (0: CCA reads the projected neighbour tokens)")
    p.add_argument("--enc-next-token", action="store_true",
                   help="each neighbour token's encoder input also holds the next token's embedding")
    p.add_argument("--time-steps", type=int, default=10,
                   help="time this many training steps of the retro-fitted model and of DIABLOGPT "
                   "side by side (0: skip)")
    add_run_args(p, "retrieval_gain")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diablogpt_pytorch", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = [run_corpus(name, work, args) for name in args.corpora.split(",")]
    commit, cpu = _report.run_identity(REPO)
    payload = dict(commit=commit, cpu=cpu, when=time.strftime("%Y-%m-%d", time.gmtime()),
                   pretrain_steps=args.pretrain_steps, retrofit_steps=args.retrofit_steps,
                   scratch_steps=args.scratch_steps, batch_size=args.batch_size, lr=args.lr,
                   retrofit_lr=args.retrofit_lr, retrofit_lr_floor=args.retrofit_lr_floor,
                   base_family=args.base_family, enc_depth=args.enc_depth,
                   enc_next_token=args.enc_next_token, wd=args.wd, bf16=not args.no_bf16,
                   seconds=time.time() - started, results=results)
    json_path = out / "retrofit.json"
    previous = json.loads(json_path.read_text()).get("history", []) if json_path.exists() else []
    payload["history"] = previous + [{
        **{k: v for k, v in payload.items() if k not in ("results", "history")},
        "results": [{**{k: v for k, v in r.items() if k != "runs"},  # curves without the pretraining
                     "runs": {k: v for k, v in r["runs"].items() if k != "pretrain"}}
                    for r in results]}]
    _report.write_atomically(json_path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
    if not args.no_report:
        _report.write_section(REPO / "BENCHMARKS.md", "retrofit", section(payload))

    print(f"\ncommit {commit}, {cpu}, {time.time() - started:.0f} s")
    print(f"{'corpus':<16}{'base':>8}{'retro-fit':>11}{'gain':>8}{'trained':>10}{'scratch':>9}{'reaches':>9}")
    for r in results:
        s = r["summary"]
        scratch = "-" if s["scratch"] is None else f"{s['scratch']:.3f}"
        print(f"{r['corpus']:<16}{s['base']:>8.3f}{s['retrofit_with']:>11.3f}{s['gain']:>8.1%}"
              f"{r['new_parameters'] / 1e6:>9.2f}M{scratch:>9}{str(s['scratch_steps_to_match']):>9}")


if __name__ == "__main__":
    main()
