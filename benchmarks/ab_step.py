"""A/B of two versions of the model code: training steps of each in one process, alternating.

    python benchmarks/ab_step.py --old 264438b [--dtype bf16] [--rounds 6]

Loads ``diablogpt_pytorch/model.py`` as it is at git revision ``--old`` and as it is in the
working tree, side by side in this process (model.py imports only torch and einops), builds the
seed-config model of each from the same seed, and times forward + backward + fused AdamW on the
same batch (as ``compare_reference.py`` does), alternating which goes first each round after one
warm-up step each. It prints both sets of step times, their medians, the median of the per-round
ratios old/new, and the losses of each step (the two versions should track each other). A shared
machine moves absolute times; the per-round ratio, measured back to back, is the figure to quote.
This is how the commit messages of the step optimisations give their ratios.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _worker import make_batch, make_optimizer, train_step  # noqa: E402
from compare_reference import SEED_ARCHITECTURE  # noqa: E402

SEED_CONFIG = dict(num_tokens=30522, max_seq_len=2048, **SEED_ARCHITECTURE)


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="git revision of the baseline model.py")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()

    source = subprocess.run(["git", "show", f"{args.old}:diablogpt_pytorch/model.py"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        old_path = Path(tmp) / "model_old.py"
        old_path.write_text(source)
        versions = {"old": load_module(old_path, "ab_model_old"),
                    "new": load_module(REPO / "diablogpt_pytorch" / "model.py", "ab_model_new")}

    seq, retrieved = make_batch(SEED_CONFIG, batch=1, k=2, seed=1)  # compare_reference's batch
    runs = {}
    for name, module in versions.items():
        torch.manual_seed(0)
        model = module.DIABLOGPT(**SEED_CONFIG).train()
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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, old = {args.old}")
    for name in runs:
        print(f"{name}: steps {[round(t, 2) for t in times[name]]} s, median {statistics.median(times[name]):.3f} s; "
              f"losses {[round(x, 4) for x in losses[name]]}")
    ratios = [o / n for o, n in zip(times["old"], times["new"])]
    print(f"old/new: median of per-round ratios {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()
