"""The main job: train DIABLOGPT with retrieval on a folder of text, end to end.

    python examples/train.py                       # CUDA if available, else the small CPU config
    python examples/train.py --device cpu --steps 300
    REPROCESS=1 python examples/train.py           # rebuild the retrieval database
    python examples/train.py --resume              # continue from runs/main/checkpoint.pt
    torchrun --nproc_per_node 2 examples/train.py  # DDP: one process per GPU (or CPU share)

Without --docs it writes the default corpus (Python's own documentation topics, no download) to
<out>/text_folder. The language model's tokenizer is, by default, a lossless byte-level BPE of
4096 ids trained on the training documents (--tokenizer bert: the embedder's uncased WordPiece of
30522 ids; or a SentencePiece .model, a tokenizer.json or a Hugging Face tokenizer folder). It
builds (or reuses) the retrieval database with the offline default embedder,
trains with a progress bar showing the loss, evaluates on the held-out documents with retrieval
and with retrieval switched off, writes <out>/loss.png, <out>/metrics.json and
<out>/checkpoint.pt (also every --checkpoint-every N steps), and prints a sample generated with
retrieval. Along training it records the loss, learning rate and tokens/s (every --log-every
steps) and the held-out losses in <out>/metrics.jsonl and, with --tensorboard DIR, as
TensorBoard event files in DIR.

Under torchrun every rank runs this script: rank 0 writes the corpus and builds the database while
the others wait, each rank trains on its own share of every batch (--batch-size is per rank) with
DistributedDataParallel, evaluation is split across ranks and summed, and rank 0 alone logs,
saves the checkpoint, plots and samples.
"""

import argparse
import contextlib
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from diablogpt_pytorch import DIABLOGPT, TrainingWrapper, distributed
from diablogpt_pytorch.config import CPU, SEED
from diablogpt_pytorch.corpus import write_default_corpus
from diablogpt_pytorch.tokenizer import TRAINED_PAD_ID, load_tokenizer
from diablogpt_pytorch.tracking import MetricsLogger
from diablogpt_pytorch.training import StepBatchSampler, lr_schedule


parser = argparse.ArgumentParser(description="Train DIABLOGPT with retrieval (the main job).")
parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
parser.add_argument("--docs", default=None, help="folder of .txt documents (default: the "
                    "default corpus, written to <out>/text_folder)")
parser.add_argument("--out", default="runs/main", help="folder for database, checkpoint, plots")
parser.add_argument("--steps", type=int, default=None,
                    help="training steps (CPU 150; CUDA 200: the default corpus holds only ~56 "
                    "sequences of 2048 tokens)")
parser.add_argument("--batch-size", type=int, default=None, help="sequences per rank and "
                    "micro-batch (CPU 4, CUDA 8)")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--wd", type=float, default=0.01)
parser.add_argument("--knn", type=int, default=2)
parser.add_argument("--valid-fraction", type=float, default=0.1)
parser.add_argument("--no-bf16", action="store_true", help="train in fp32 (default: bf16 autocast)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
parser.add_argument("--max-new-tokens", type=int, default=128)
parser.add_argument("--tokenizer", default="train", help="the LM tokenizer: 'train' (default: a "
                    "byte-level BPE trained on the training documents, stored beside the "
                    "database), 'bert' (the embedder's WordPiece), a SentencePiece .model file, a "
                    "tokenizer.json or a Hugging Face tokenizer folder")
parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the trained "
                    "tokenizer (default 4096; README 'Install and run the main job' says why)")
parser.add_argument("--evals", type=int, default=4, help="held-out evaluations (with and without "
                    "retrieval) spread evenly over training, the last at the end (default 4)")
parser.add_argument("--log-every", type=int, default=10, help="steps between records of the "
                    "training loss, learning rate and tokens/s in <out>/metrics.jsonl (default 10)")
parser.add_argument("--tensorboard", default=None, metavar="DIR", help="also write those records "
                    "and the held-out losses as TensorBoard event files in DIR (needs "
                    "pip install tensorboard)")
parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="also save "
                    "<out>/checkpoint.pt every N steps (default 0: only at the end)")
args = parser.parse_args()

started = time.time()
# under torchrun: join the process group (gloo on CPU, nccl on CUDA), one device per rank
dist_info = distributed.init_distributed(device=None if args.device == "auto" else args.device)
main_rank = dist_info.is_main
logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                    format=f"%(levelname)s [rank {dist_info.rank}] %(name)s: %(message)s"
                    if dist_info.distributed else "%(levelname)s %(name)s: %(message)s")
device = dist_info.device if dist_info.distributed else torch.device(
    "cuda" if args.device == "auto" and torch.cuda.is_available()
    else ("cpu" if args.device == "auto" else args.device))
on_cuda = device.type == "cuda"
# the seed README's model on CUDA, a small one that trains in minutes on 2 CPU cores otherwise
config = (SEED if on_cuda else CPU).model_kwargs()
# the model's vocabulary is the LM tokenizer's (a trained one has <pad> = 0 and at most
# --vocab-size ids; TrainingWrapper checks num_tokens against the tokenizer it loads)
if args.tokenizer == "train":
    config.update(num_tokens=args.vocab_size, pad_id=TRAINED_PAD_ID)
else:
    _tok = load_tokenizer(args.tokenizer)
    config.update(num_tokens=_tok.vocab_size, pad_id=_tok.pad_id)
steps = args.steps if args.steps is not None else (200 if on_cuda else 150)
batch_size = args.batch_size or (8 if on_cuda else 4)
bf16 = not args.no_bf16
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
# each rank its own reproducible stream (dropout masks differ between ranks); DDP copies rank 0's
# initial weights to the others
distributed.seed_everything(args.seed)

docs = Path(args.docs) if args.docs else out / "text_folder"
if not args.docs:
    with distributed.main_process_first("writing the default corpus") as main:
        if main:
            write_default_corpus(docs)

diablo_gpt = DIABLOGPT(**config).to(device)

wrapper = TrainingWrapper(
    diablogpt=diablo_gpt,
    knn=args.knn,
    chunk_size=64,
    documents_path=docs,
    glob="**/*.txt",
    chunks_memmap_path=out / "db" / "train.chunks.dat",
    seqs_memmap_path=out / "db" / "train.seq.dat",
    doc_ids_memmap_path=out / "db" / "train.doc_ids.dat",
    max_chunks=1_000_000,
    max_seqs=100_000,
    knn_extra_neighbors=100,
    max_index_memory_usage="100m",
    current_memory_available="1G",
    valid_fraction=args.valid_fraction,
    device=device,
    bf16=bf16,
    tokenizer=args.tokenizer,
    tokenizer_vocab_size=args.vocab_size,
)
database_seconds = time.time() - started

model = wrapper.train_model  # DistributedDataParallel(diablo_gpt) under torchrun
optim = wrapper.get_optimizer(lr=args.lr, wd=args.wd)
checkpoint_path = out / "checkpoint.pt"
start_step, losses, curve = 0, [], []  # curve: held-out losses along training
if args.resume:
    payload = wrapper.load_checkpoint(checkpoint_path, optim)
    start_step, losses = payload["step"], payload["extra"]["losses"]
    curve = [c for c in payload["extra"].get("curve", []) if c["step"] <= start_step]
    if main_rank:
        print(f"resumed from {checkpoint_path} at step {start_step}")

# each rank takes its own slice of every global batch (batch_size x world_size sequences)
sampler = StepBatchSampler(len(wrapper.train_ds), batch_size, seed=args.seed,
                           start_step=start_step * args.grad_accum)
train_dl = iter(wrapper.get_dataloader(batch_sampler=sampler, num_workers=0))
eval_steps = sorted({max(1, round(steps * (i + 1) / max(1, args.evals))) for i in range(args.evals)}
                    | {steps})


# rank 0 records loss, lr and tokens/s every --log-every steps and the held-out losses at each
# evaluation (<out>/metrics.jsonl, and TensorBoard with --tensorboard)
tracker = MetricsLogger(out / "metrics.jsonl", args.tensorboard, start_step, enabled=main_rank)
tokens_per_step = batch_size * args.grad_accum * dist_info.world_size * config["max_seq_len"]


def held_out(step):
    """Held-out loss with and without retrieval (same weights), split across ranks."""
    metrics = wrapper.evaluate(batch_size=batch_size, progress=False)
    curve.append(dict(step=step, with_retrieval=metrics["with_retrieval"]["loss"],
                      without_retrieval=metrics["without_retrieval"]["loss"]))
    tracker.log(step, **{"held_out/with_retrieval": curve[-1]["with_retrieval"],
                         "held_out/without_retrieval": curve[-1]["without_retrieval"]})
    return metrics


diablo_gpt.train()
train_started = time.time()
window_steps, window_seconds = 0, 0.0  # training time since the last record
bar = tqdm(range(start_step, steps), desc="training", initial=start_step, total=steps,
           disable=not main_rank)
for step in bar:
    step_started = time.time()
    for group in optim.param_groups:
        group["lr"] = lr_schedule(step, steps, args.lr)
    step_loss = 0.0
    with distributed.collective_errors(f"training step {step}"):
        for micro in range(args.grad_accum):
            seq, retrieved = map(lambda t: t.to(device), next(train_dl))
            # gradients are averaged over ranks on the last micro-batch only
            last = micro == args.grad_accum - 1
            with contextlib.nullcontext() if last or model is diablo_gpt else model.no_sync():
                with wrapper.autocast():
                    loss = model(seq, retrieved, return_loss=True) / args.grad_accum
                loss.backward()
            step_loss += loss.item()
    torch.nn.utils.clip_grad_norm_(diablo_gpt.parameters(), 1.0)
    optim.step()
    optim.zero_grad(set_to_none=True)
    losses.append(step_loss)  # this rank's share of the batch (rank 0's is shown and plotted)
    bar.set_postfix(loss=f"{losses[-1]:.3f}")
    window_steps, window_seconds = window_steps + 1, window_seconds + time.time() - step_started
    if (step + 1) % args.log_every == 0 or step + 1 == steps:
        tracker.log(step + 1, **{"train/loss": sum(losses[-window_steps:]) / window_steps,
                                 "train/lr": optim.param_groups[0]["lr"],
                                 "train/tokens_per_s": window_steps * tokens_per_step
                                 / max(window_seconds, 1e-9)})
        window_steps, window_seconds = 0, 0.0
    if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < steps:
        checkpoint_started = time.time()
        wrapper.save_checkpoint(checkpoint_path, optim, step=step + 1,
                                extra={"losses": losses, "curve": curve})
        train_started += time.time() - checkpoint_started  # tokens/s counts training alone
    if step + 1 in eval_steps and step + 1 < steps:
        eval_started = time.time()
        held_out(step + 1)
        if main_rank:
            bar.write(f"step {step + 1}: held-out {curve[-1]['with_retrieval']:.3f} with retrieval, "
                      f"{curve[-1]['without_retrieval']:.3f} without")
        train_started += time.time() - eval_started  # tokens/s counts training alone
        diablo_gpt.train()
train_seconds = time.time() - train_started
world_size = dist_info.world_size
tokens_per_second = ((steps - start_step) * batch_size * args.grad_accum * world_size
                     * config["max_seq_len"] / max(train_seconds, 1e-9))

metrics = held_out(steps)
with_r, without_r = metrics["with_retrieval"], metrics["without_retrieval"]
wrapper.save_checkpoint(checkpoint_path, optim, step=steps, extra={"losses": losses, "curve": curve})
tracker.close()
if not main_rank:  # rank 0 alone plots, samples and reports
    distributed.cleanup()
    raise SystemExit(0)

plt.figure(figsize=(7, 4))
plt.plot(range(1, len(losses) + 1), losses, lw=0.6, alpha=0.6, label="training loss (with retrieval)")
plt.plot([c["step"] for c in curve], [c["with_retrieval"] for c in curve], "o-", color="C1",
         label=f"held-out, with retrieval ({with_r['loss']:.3f})")
plt.plot([c["step"] for c in curve], [c["without_retrieval"] for c in curve], "s:", color="C2",
         label=f"held-out, retrieval off, same weights ({without_r['loss']:.3f})")
plt.title(f"retrieval gain on held-out text: {1 - with_r['loss'] / without_r['loss']:.1%}")
plt.xlabel("step")
plt.ylabel("cross-entropy (nats/token)")
plt.legend()
plt.tight_layout()
plt.savefig(out / "loss.png", dpi=120)

# a sample: the first chunk of a held-out document as the prompt, retrieval at chunk boundaries
prompt, _ = wrapper.valid_ds[0]
prompt = prompt[None, :64].to(device)
sampled = wrapper.generate(prompt, filter_thres=0.9, temperature=1.0,
                           max_new_tokens=args.max_new_tokens)

summary = dict(
    device=str(device), bf16=bf16, config=config, tokenizer=wrapper.tokenizer.identity(),
    valid_bytes=wrapper.valid_num_bytes, steps=steps, batch_size=batch_size,
    grad_accum=args.grad_accum, world_size=world_size,
    train_documents=len(wrapper.train_documents), valid_documents=len(wrapper.valid_documents),
    train_stats=wrapper.train_stats, valid_stats=wrapper.valid_stats,
    final_train_loss=sum(losses[-10:]) / len(losses[-10:]),
    held_out=metrics, held_out_curve=curve,
    retrieval_gain=1 - with_r["loss"] / without_r["loss"], tokens_per_second=tokens_per_second,
    database_seconds=database_seconds, train_seconds=train_seconds,
    wall_seconds=time.time() - started,
)
(out / "metrics.json").write_text(json.dumps(summary, indent=2))

print()
print(f"device {device}, bf16 {bf16}, {steps} steps of {batch_size} x {config['max_seq_len']} "
      f"tokens" + (f" x {args.grad_accum} micro-batches" if args.grad_accum > 1 else "")
      + (f" x {world_size} ranks" if world_size > 1 else "")
      + f", {tokens_per_second:.0f} tokens/s; train docs {len(wrapper.train_documents)}, "
      f"held-out docs {len(wrapper.valid_documents)}")
print(f"{'held-out':<20}{'loss':>8}{'ppl':>10}{'bpb':>8}")
for name, m in (("with retrieval", with_r), ("without retrieval", without_r)):
    print(f"{name:<20}{m['loss']:>8.3f}{m['perplexity']:>10.1f}{m['bits_per_byte']:>8.3f}")
print(f"retrieval gain (loss without / with, same weights): "
      f"{1 - with_r['loss'] / without_r['loss']:.1%}; along training: "
      + ", ".join(f"step {c['step']} {1 - c['with_retrieval'] / c['without_retrieval']:.1%}"
                  for c in curve))
print(f"\nprompt: {wrapper.ids_to_text(prompt[0])}")
print(f"sample: {wrapper.ids_to_text(sampled[0, prompt.shape[1]:])}")
print(f"\ncheckpoint {checkpoint_path}, loss curve {out / 'loss.png'}, metrics {out / 'metrics.json'}")
print(f"wall time {time.time() - started:.0f}s (database {database_seconds:.0f}s, "
      f"training {train_seconds:.0f}s)")
distributed.cleanup()
