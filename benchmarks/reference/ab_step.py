"""A/B of two revisions of the library: training steps of each in one process, alternating.

    python -m benchmarks.reference.ab_step --old 264438b [--new REV] [--dtype bf16] [--rounds 6] [--preset seed|cpu]

Extracts the whole ``diablogpt_pytorch`` package as it is at git revision ``--old`` (and at
``--new``, by default the working tree) into a temporary folder with ``git archive``, imports
each in turn under the name ``diablogpt_pytorch`` (then removes it from ``sys.modules``, so the
next import finds the other; the loaded classes keep working), builds the seed-config model
(``--preset cpu``: the small CPU preset of :mod:`diablogpt_pytorch.config`, without dropout) of
each from the same seed, and times forward + backward + fused AdamW on the same batch (as
``compare_reference.py`` does), alternating which goes first each round after one warm-up step
each. It prints both sets of step times, their medians, the median of the per-round ratios
old/new, and the losses of each step (the two versions should track each other). A shared
machine moves absolute times; the per-round ratio, measured back to back, is the figure to quote.
This is how the commit messages of the step optimisations give their ratios.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import REPO_ROOT as REPO
from benchmarks.common.worker import make_batch, make_optimizer, train_step
from benchmarks.reference.compare_reference import SEED_ARCHITECTURE
from diablogpt_pytorch.config import CPU

SEED_CONFIG = dict(num_tokens=30522, max_seq_len=2048, **SEED_ARCHITECTURE)
# the CPU preset without its dropout (so that the two versions' losses can match)
CPU_CONFIG = CPU.replace(dec_attn_dropout=0.0, dec_ff_dropout=0.0).model_kwargs()


def _forget_package() -> dict:
    """Remove ``diablogpt_pytorch`` and its submodules from ``sys.modules``; return them."""
    names = [n for n in sys.modules if n == "diablogpt_pytorch" or n.startswith("diablogpt_pytorch.")]
    return {n: sys.modules.pop(n) for n in names}


def load_model_class(revision: str | None, tmp: Path):
    """``DIABLOGPT`` of the package at git ``revision`` (None: the working tree)."""
    root = REPO
    if revision is not None:
        archive = subprocess.run(["git", "archive", revision, "diablogpt_pytorch"], cwd=REPO,
                                 check=True, capture_output=True).stdout
        root = tmp / revision.replace("/", "_")
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(root)
    saved = _forget_package()
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("diablogpt_pytorch.model").DIABLOGPT
    finally:
        sys.path.remove(str(root))
        _forget_package()
        sys.modules.update(saved)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="git revision of the baseline package")
    p.add_argument("--new", default=None, help="git revision to compare (default: the working tree)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--preset", choices=("seed", "cpu"), default="seed")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        versions = {"old": load_model_class(args.old, Path(tmp)), "new": load_model_class(args.new, Path(tmp))}

    config = SEED_CONFIG if args.preset == "seed" else CPU_CONFIG
    seq, retrieved = make_batch(config, batch=1, k=2, seed=1)  # compare_reference's batch
    runs = {}
    for name, model_class in versions.items():
        torch.manual_seed(0)
        # a revision older than an initialisation argument (zero_init_residual,
        # token_emb_init_std) runs with its own initialisation: the step's cost is the same
        accepted = inspect.signature(model_class.__init__).parameters
        model = model_class(**{k: v for k, v in config.items() if k in accepted}).train()
        runs[name] = (model, make_optimizer("ours", model))

    def step(model, opt) -> float:
        return train_step(model, opt, seq, retrieved, args.dtype)

    for run in runs.values():
        step(*run)  # warm-up: allocates the AdamW state
    times = {name: [] for name in runs}
    losses = {name: [] for name in runs}
    for r in range(args.rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            gc.collect()
            t0 = time.perf_counter()
            losses[name].append(step(*runs[name]))
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}: old {times['old'][-1]:.3f} s, new {times['new'][-1]:.3f} s", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {args.preset} preset, old = {args.old}, "
          f"new = {args.new or 'working tree'}")
    for name in runs:
        print(f"{name}: steps {[round(t, 2) for t in times[name]]} s, median {statistics.median(times[name]):.3f} s; "
              f"losses {[round(x, 4) for x in losses[name]]}")
    ratios = [o / n for o, n in zip(times["old"], times["new"])]
    print(f"old/new: median of per-round ratios {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()
