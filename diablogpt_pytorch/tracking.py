"""Training metrics: a JSON Lines file and, optionally, TensorBoard.

:class:`MetricsLogger` records scalars by step: one JSON object per record in a ``.jsonl`` file
(always readable, no dependency) and, when given a folder, TensorBoard event files written with
``torch.utils.tensorboard`` (``pip install tensorboard``; without it a warning says so once and
training goes on without them). The training loop of the main job
(:func:`diablogpt_pytorch.train_loop.train_loop`, behind ``diablogpt train`` and
``examples/train.py``) logs these tags:

- ``train/loss`` (mean over the steps since the last record), ``train/lr``,
  ``train/tokens_per_s`` (training tokens of all ranks per second of training, evaluation and
  checkpoints left out), every ``log_every`` steps;
- ``held_out/with_retrieval`` and ``held_out/without_retrieval``, the held-out loss (nats per
  token) of the same weights with and without retrieval, at each evaluation.

    tracker = MetricsLogger('runs/main/metrics.jsonl', tensorboard_dir='runs/main/tensorboard')
    tracker.log(10, **{'train/loss': 5.1, 'train/lr': 1e-3})
    tracker.close()

View the event files with ``tensorboard --logdir runs/main/tensorboard``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

from diablogpt_pytorch._io import atomic_path

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

TENSORBOARD_MISSING = ("TensorBoard is not installed, so no event files are written to {dir} "
                       "(pip install tensorboard, or pip install 'diablogpt-pytorch[tensorboard]'; "
                       "the metrics still go to {jsonl})")


class MetricsLogger:
    """Scalars by step to ``jsonl_path`` and, with ``tensorboard_dir``, to TensorBoard.

    ``start_step`` (a resumed run): records after it are dropped from the JSON Lines file and
    TensorBoard is told to purge events after it, so a resumed run's curves have no duplicates.
    ``enabled=False`` (ranks other than 0) records nothing. ``jsonl_path=None`` writes no file.
    """

    def __init__(self, jsonl_path: Optional[PathLike] = None,
                 tensorboard_dir: Optional[PathLike] = None, start_step: int = 0,
                 enabled: bool = True):
        self.path = Path(jsonl_path) if jsonl_path is not None and enabled else None
        self.writer = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if start_step and self.path.is_file():
                for line in self.path.read_text().splitlines():
                    if line.strip() and json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
        if tensorboard_dir is not None and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning(TENSORBOARD_MISSING.format(dir=str(tensorboard_dir),
                                                          jsonl=str(self.path)))
            else:
                Path(tensorboard_dir).mkdir(parents=True, exist_ok=True)
                # a resumed run hides the earlier run's events after start_step
                self.writer = SummaryWriter(str(tensorboard_dir),
                                            purge_step=start_step + 1 if start_step else None)
                logger.info("TensorBoard event files in %s", tensorboard_dir)

    def log(self, step: int, **scalars: float) -> None:
        """Record ``scalars`` (tag -> number) at ``step``."""
        scalars = {k: float(v) for k, v in scalars.items() if v is not None}
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": int(step), **scalars}) + "\n")
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, int(step))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
