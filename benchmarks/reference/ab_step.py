"""A/B of two revisions of the library: training steps of each, alternating, one process each.

    python -m benchmarks.reference.ab_step --old 264438b [--new REV] [--dtype bf16] [--rounds 6] [--preset seed|cpu]

Exports the whole ``diablogpt_pytorch`` package as it is at git revision ``--old`` (and at
``--new``; by default a copy of the working tree's package) into a temporary folder with
``git archive``, and starts one process per side (``benchmarks/common/worker.py --serve``) that
imports only its own copy: the two packages never share an interpreter, so anything a revision
registers globally (custom ops, autograd Functions, module state) cannot leak into the other.
Each process builds the seed-config model (``--preset cpu``: the small CPU preset of
:mod:`diablogpt_pytorch.config`, without dropout) from the same seed, its optimizer (the
revision's own ``get_optimizer``) and the same batch as ``compare_reference`` does, and times
forward + backward + AdamW on request. After one warm-up step each, the rounds alternate which
side goes first; only one process computes at a time. It prints both sets of step times, their
medians, the median of the per-round ratios old/new, and the losses of each step (the two
versions should track each other). A shared machine moves absolute times; the per-round ratio,
measured back to back, is the figure to quote. This is how the commit messages of the step
optimisations give their ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from benchmarks.common import BENCH_ROOT, REPO_ROOT
from benchmarks.reference.compare_reference import SEED_ARCHITECTURE
from diablogpt_pytorch.config import CPU

WORKER = BENCH_ROOT / "common" / "worker.py"
SEED_CONFIG = dict(num_tokens=30522, max_seq_len=2048, **SEED_ARCHITECTURE)
# the CPU preset without its dropout (so that the two versions' losses can match)
CPU_CONFIG = CPU.replace(dec_attn_dropout=0.0, dec_ff_dropout=0.0).model_kwargs()


def export_package(revision: str | None, dest: Path) -> Path:
    """The ``diablogpt_pytorch`` package at git ``revision`` (None: the working tree's, copied so
    that edits during the run change nothing) under ``dest``; returns the folder to import from."""
    dest.mkdir(parents=True)
    if revision is None:
        shutil.copytree(REPO_ROOT / "diablogpt_pytorch", dest / "diablogpt_pytorch",
                        ignore=shutil.ignore_patterns("__pycache__"))
        return dest
    check = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
                           cwd=REPO_ROOT, capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"ab_step: {revision!r} is not a commit of {REPO_ROOT}: pass a revision "
                         "that `git log` shows (a hash, a branch, HEAD~1)")
    archive = subprocess.run(["git", "archive", "--format=tar", revision, "diablogpt_pytorch"],
                             cwd=REPO_ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    return dest


class Side:
    """One revision's step server: a worker process fed ``step`` lines."""

    def __init__(self, name: str, src: Path, task: dict, workdir: Path):
        self.name = name
        self.log = workdir / f"{name}.stderr.txt"
        # no PYTHONPATH: the worker imports diablogpt_pytorch from src alone
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0")
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), "--serve", json.dumps({**task, "src": str(src)})],
                cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                text=True, bufsize=1)

    def answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("AB "):
                return json.loads(line[3:])
        tail = "\n".join(self.log.read_text().strip().splitlines()[-25:])
        raise RuntimeError(f"the {self.name} side's worker exited ({self.proc.wait()}):\n{tail}")

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self.answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="git revision of the baseline package")
    p.add_argument("--new", default=None, help="git revision to compare (default: the working tree)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--preset", choices=("seed", "cpu"), default="seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads per side (default: torch's)")
    args = p.parse_args()

    config = SEED_CONFIG if args.preset == "seed" else CPU_CONFIG
    # compare_reference's batch: seed 1 (the model's seed + 1), K = 2
    task = dict(cfg=config, seed=0, k=2, dtype=args.dtype, threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="ab_step-") as tmp:
        tmp = Path(tmp)
        sides = {}
        try:
            for name, rev in (("old", args.old), ("new", args.new)):
                src = export_package(rev, tmp / f"src-{name}")
                sides[name] = Side(name, src, task, tmp)
            info = {name: side.answer() for name, side in sides.items()}  # built
            for side in sides.values():
                side.step()  # warm-up: allocates the AdamW state
            times = {name: [] for name in sides}
            losses = {name: [] for name in sides}
            for r in range(args.rounds):
                for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    res = sides[name].step()
                    times[name].append(res["s"])
                    losses[name].append(res["loss"])
                print(f"round {r + 1}: old {times['old'][-1]:.3f} s, new {times['new'][-1]:.3f} s",
                      flush=True)
        finally:
            for side in sides.values():
                side.close()
    print(f"torch {info['new']['torch']}, {info['new']['threads']} threads per process, {args.dtype}, "
          f"{args.preset} preset, old = {args.old}, new = {args.new or 'working tree'}")
    for name in sides:
        print(f"{name}: steps {[round(t, 2) for t in times[name]]} s, median "
              f"{statistics.median(times[name]):.3f} s; losses {[round(x, 4) for x in losses[name]]}")
    ratios = [o / n for o, n in zip(times["old"], times["new"])]
    print(f"old/new: median of per-round ratios {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()
