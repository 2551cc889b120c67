"""The main job as a script: `diablogpt train` (diablogpt_pytorch.cli) with this script's defaults.

    python examples/train.py                       # CUDA if available, else the small CPU config
    python examples/train.py --device cpu --steps 300
    REPROCESS=1 python examples/train.py           # rebuild the retrieval database
    python examples/train.py --resume              # continue from runs/main/checkpoint.pt
    torchrun --nproc_per_node 2 examples/train.py  # DDP: one process per GPU (or CPU share)

It takes every flag of `diablogpt train` (`python examples/train.py --help` lists them: --docs,
--out, --steps, --batch-size, --grad-accum, --lr, --wd, --knn, --valid-fraction, --no-bf16,
--seed, --resume, --max-new-tokens, --tokenizer, --vocab-size, --evals, --log-every,
--tensorboard DIR, --checkpoint-every N, a --config file, ...). The one difference: on CUDA
(unless --device cpu) it trains the seed's configuration, 200 steps of 8 sequences per rank
(`--preset seed --steps 200 --batch-size 8`; flags given here override them). The training loop
is the library's, diablogpt_pytorch.train_loop.train_loop; what the job writes and prints is
described in the README, "Install and run the main job".
"""

import sys

import torch

from diablogpt_pytorch.cli import main


def defaults(argv):
    """The seed's configuration on CUDA, unless the flags ask for the CPU."""
    on_cpu = "cpu" in [value for flag, value in zip(argv, argv[1:]) if flag == "--device"] \
        or "--device=cpu" in argv
    if torch.cuda.is_available() and not on_cpu:
        return ["--preset", "seed", "--steps", "200", "--batch-size", "8"]
    return []


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(["train", *defaults(argv), *argv]))
