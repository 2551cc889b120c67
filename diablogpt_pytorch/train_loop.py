"""The training loop of the main job (``diablogpt train``; ``examples/train.py`` calls the same).

:func:`train_loop` trains a :class:`~diablogpt_pytorch.training.TrainingWrapper`'s model: the
warm-up + cosine learning rate of :func:`~diablogpt_pytorch.optim.lr_schedule`, batches in the
reproducible order of :class:`~diablogpt_pytorch.data.StepBatchSampler` (so a resumed run draws
what an uninterrupted one would), gradient accumulation, gradient clipping at norm 1, held-out
evaluations with and without retrieval at chosen steps (which leave the random streams as
they were, so the training losses do not depend on the evaluation schedule), periodic checkpoints, and the records of
:class:`~diablogpt_pytorch.tracking.MetricsLogger`. Under ``torchrun`` it steps
``wrapper.train_model`` (DistributedDataParallel; gradients are averaged over ranks on the last
micro-batch of a step only), each rank reads its own slice of every global batch, evaluation is
split across ranks and summed, and only rank 0 shows a progress bar (the tracker of the other
ranks should be built with ``enabled=False``).

:func:`plot_losses` draws ``loss.png`` (matplotlib, the ``plot`` extra; without it a warning says
so and nothing is drawn).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from diablogpt_pytorch import distributed
from diablogpt_pytorch.data import StepBatchSampler
from diablogpt_pytorch.optim import lr_schedule

__all__ = ["TrainResult", "evaluation_steps", "train_loop", "plot_losses"]

logger = logging.getLogger(__name__)

PLOT_MISSING = ("matplotlib is not installed, so the loss plot {path} is not drawn (pip install "
                "matplotlib, or pip install 'diablogpt-pytorch[plot]')")


@dataclass
class TrainResult:
    """What :func:`train_loop` returns.

    losses: the loss of every step from step 1 (a resumed run's earlier steps included), this
    rank's share of each batch; held_out: ``{'step', 'with_retrieval', 'without_retrieval'}``
    (held-out losses, nats per token) at each evaluation, the earlier run's included; final: the
    full ``wrapper.evaluate`` result of the last evaluation (None without a held-out split);
    train_seconds / tokens_per_second: training time of this call (evaluations and checkpoints
    left out) and the tokens of all ranks per second of it.
    """

    losses: list = field(default_factory=list)
    held_out: list = field(default_factory=list)
    final: Optional[dict] = None
    start_step: int = 0
    steps: int = 0
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0


def evaluation_steps(steps: int, evals: Optional[int] = None, eval_every: int = 0) -> list[int]:
    """The steps after which the held-out split is evaluated: ``evals`` evaluations spread evenly
    (the last at ``steps``) when given, else every ``eval_every`` steps (0: none), and always
    ``steps`` itself."""
    if evals:
        if evals < 0:
            raise ValueError(f"evals must be positive, got {evals}")
        chosen = {max(1, round(steps * (i + 1) / evals)) for i in range(evals)}
    else:
        chosen = set(range(eval_every, steps + 1, eval_every)) if eval_every > 0 else set()
    return sorted(chosen | {steps})


def train_loop(
    wrapper,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    warmup: Optional[int] = None,
    grad_accum: int = 1,
    seed: int = 0,
    start_step: int = 0,
    losses: Optional[list] = None,
    held_out: Optional[list] = None,
    eval_steps: Iterable[int] = (),
    eval_batches: Optional[int] = None,
    log_every: int = 10,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: int = 0,
    tracker=None,
    progress: bool = True,
) -> TrainResult:
    """Train ``wrapper``'s model from ``start_step`` to ``steps``.

    Args:
        wrapper: a ``TrainingWrapper`` (its ``train_ds``, ``train_model``, ``autocast``,
            ``evaluate`` and ``save_checkpoint`` are used).
        optimizer: e.g. ``wrapper.get_optimizer(lr=..., wd=...)``; its learning rate is set every
            step to ``lr_schedule(step, steps, lr, warmup)``.
        steps: optimizer steps in all; batch_size: sequences per rank and micro-batch;
            grad_accum: micro-batches per optimizer step; seed: the batch order's seed.
        start_step, losses, held_out: a resumed run's step and its earlier records (the
            checkpoint's ``extra['losses']`` and ``extra['curve']``).
        eval_steps: steps after which the held-out split is evaluated with and without retrieval
            (see :func:`evaluation_steps`; skipped when the wrapper has no held-out split);
            eval_batches: batches per evaluation (None: the whole split).
        log_every: steps between ``train/loss``, ``train/lr`` and ``train/tokens_per_s`` records.
        checkpoint_path, checkpoint_every: save there every ``checkpoint_every`` steps (0: never
            along the way) and at the end, with ``extra={'losses', 'curve'}`` (None: no
            checkpoints).
        tracker: a ``MetricsLogger`` (None: no records).
        progress: a tqdm progress bar showing the loss (rank 0 only).

    Raises FloatingPointError when a step's loss is not finite.
    """
    from tqdm.auto import tqdm

    model, train_model = wrapper.model, wrapper.train_model
    device = wrapper.device
    losses = list(losses or [])[:start_step]
    held_out = [h for h in (held_out or []) if h["step"] <= start_step]
    eval_steps = set(eval_steps)
    main = distributed.is_main()
    world = distributed.get_world_size()
    tokens_per_step = batch_size * grad_accum * world * model.max_seq_len
    # each rank takes its own slice of every global batch (batch_size x world_size sequences)
    sampler = StepBatchSampler(len(wrapper.train_ds), batch_size, seed=seed,
                               start_step=start_step * grad_accum)
    batches = iter(wrapper.get_dataloader(batch_sampler=sampler, num_workers=0))
    result = TrainResult(losses=losses, held_out=held_out, start_step=start_step, steps=steps)

    def evaluate(step: int) -> None:
        if wrapper.valid_ds is None:
            return
        # the random streams are put back afterwards (a DataLoader draws a seed from torch's),
        # so the training losses do not depend on when or how often the model is evaluated
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            metrics = wrapper.evaluate(batch_size=batch_size, max_batches=eval_batches,
                                       progress=False)
        with_r, without_r = (metrics[k]["loss"] for k in ("with_retrieval", "without_retrieval"))
        held_out.append({"step": step, "with_retrieval": with_r, "without_retrieval": without_r})
        if tracker is not None:
            tracker.log(step, **{"held_out/with_retrieval": with_r,
                                 "held_out/without_retrieval": without_r})
        result.final = metrics
        model.train()

    model.train()
    window_steps, window_seconds = 0, 0.0  # training time since the last record
    bar = tqdm(range(start_step, steps), desc="training", initial=start_step, total=steps,
               disable=not (progress and main))
    for step in bar:
        step_started = time.time()
        lr_now = lr_schedule(step, steps, lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        step_loss = 0.0
        with distributed.collective_errors(f"training step {step}"):
            for micro in range(grad_accum):
                seq, retrieved = (t.to(device) for t in next(batches))
                # under DDP, gradients are averaged over ranks on the last micro-batch only
                last = micro == grad_accum - 1
                with contextlib.nullcontext() if last or train_model is model \
                        else train_model.no_sync():
                    with wrapper.autocast():
                        loss = train_model(seq, retrieved, return_loss=True) / grad_accum
                    loss.backward()
                step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.time() - step_started
        result.train_seconds += seconds
        window_steps, window_seconds = window_steps + 1, window_seconds + seconds
        done = step + 1
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"the loss is {step_loss} at step {done}: lower the "
                                     "learning rate (--lr) or train in fp32 (--no-bf16)")
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        if tracker is not None and (done % log_every == 0 or done == steps):
            tracker.log(done, **{"train/loss": sum(losses[-window_steps:]) / window_steps,
                                 "train/lr": lr_now,
                                 "train/tokens_per_s": window_steps * tokens_per_step
                                 / max(window_seconds, 1e-9)})
            window_steps, window_seconds = 0, 0.0
        if done in eval_steps or done == steps:
            evaluate(done)
            if main and held_out and held_out[-1]["step"] == done and done < steps:
                bar.write(f"step {done}: held-out {held_out[-1]['with_retrieval']:.3f} with "
                          f"retrieval, {held_out[-1]['without_retrieval']:.3f} without")
        if checkpoint_path is not None and (
                (checkpoint_every and done % checkpoint_every == 0) or done == steps):
            wrapper.save_checkpoint(checkpoint_path, optimizer, step=done,
                                    extra={"losses": losses, "curve": held_out})
    result.tokens_per_second = ((steps - start_step) * tokens_per_step
                                / max(result.train_seconds, 1e-9))
    return result


def plot_losses(path: Union[str, os.PathLike], losses: list, held_out: list) -> Optional[Path]:
    """Draw the training loss by step and the held-out losses with and without retrieval to
    ``path`` (PNG, written to a temporary name and renamed). Returns the path, or None (with a
    warning saying how to get it) when matplotlib is not installed."""
    from diablogpt_pytorch._io import atomic_path

    path = Path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(PLOT_MISSING.format(path=path))
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.6, alpha=0.6,
            label="training loss (with retrieval)")
    if held_out:
        steps = [h["step"] for h in held_out]
        with_r, without_r = held_out[-1]["with_retrieval"], held_out[-1]["without_retrieval"]
        ax.plot(steps, [h["with_retrieval"] for h in held_out], "o-", color="C1",
                label=f"held-out, with retrieval ({with_r:.3f})")
        ax.plot(steps, [h["without_retrieval"] for h in held_out], "s:", color="C2",
                label=f"held-out, retrieval off, same weights ({without_r:.3f})")
        ax.set_title(f"retrieval gain on held-out text: {1 - with_r / without_r:.1%}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
