"""AdamW step time at the seed config: torch's default CPU AdamW vs the fused kernel that
``TrainingWrapper.get_optimizer`` / ``training.get_optimizer`` picks. Alternating, median of 5.

    python -m benchmarks.micro.bench_optimizer
"""

import statistics
import time

import torch

from diablogpt_pytorch import DIABLOGPT
from diablogpt_pytorch.config import SEED
from diablogpt_pytorch.training import get_optimizer


def main() -> None:
    torch.manual_seed(0)
    model = DIABLOGPT(**SEED.replace(dec_attn_dropout=0.0, dec_ff_dropout=0.0).model_kwargs())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {"default": get_optimizer(model, fused=False), "fused": get_optimizer(model)}
    times = {name: [] for name in optimizers}
    for opt in optimizers.values():  # warm-up: allocates the state
        opt.step()
    for _ in range(5):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        print(f"{name:8s} AdamW step: {t * 1000:7.1f} ms (median of 5, {torch.get_num_threads()} threads)")
    print(f"fused is {med['default'] / med['fused']:.2f}x faster")


if __name__ == "__main__":
    main()
