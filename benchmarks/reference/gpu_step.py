"""Training-step throughput and MFU on one accelerator (the GPU part of the performance issue).

    python -m benchmarks.reference.gpu_step                      # CUDA, seed config, bf16 autocast, seq 2048
    python -m benchmarks.reference.gpu_step --batch 8 --steps 20
    python -m benchmarks.reference.gpu_step --device cpu --seq-len 256 --steps 2    # a smoke run anywhere

Times forward + backward + AdamW (the library's ``get_optimizer``, fused where torch has it) under
``torch.autocast(device, bfloat16)`` after warm-up steps, with the device synchronised around each
step, and reports tokens/s, MFU against ``--peak-tflops`` (default 989: the H100/H200 SXM dense
bf16 peak) and against a bf16 matmul timed on the same device in the same process, and the peak
memory (``torch.cuda.max_memory_allocated``). The useful FLOPs are counted as in
``compare_reference.py`` (matmuls and attention products of our architecture, backward = 2 x
forward). Results are printed and written as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS
from benchmarks.common.report import write_atomically
from benchmarks.reference.compare_reference import SEED_ARCHITECTURE, analytic_train_flops
from diablogpt_pytorch import DIABLOGPT
from diablogpt_pytorch.training import get_optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--k", type=int, default=2, help="neighbours per chunk")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--out", type=Path, default=RESULTS / "gpu_step.json")
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu for a smoke run")
    cfg = dict(num_tokens=30522, max_seq_len=args.seq_len, **SEED_ARCHITECTURE)
    torch.manual_seed(0)
    model = DIABLOGPT(**cfg).to(device).train()
    opt = get_optimizer(model, lr=3e-4, wd=0.1)
    g = torch.Generator().manual_seed(1)
    n, chunks = args.seq_len, args.seq_len // 64
    seq = torch.randint(1, 30522, (args.batch, n + 1), generator=g).to(device)
    retrieved = torch.randint(1, 30522, (args.batch, chunks, args.k, 128), generator=g).to(device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(seq, retrieved, return_loss=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        losses.append(step())
        sync(device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = analytic_train_flops(cfg, args.batch, args.k)["train_step"]
    achieved = flops / step_s / 1e12
    measured = matmul_tflops(device, args.matmul_n)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "config": cfg, "batch": args.batch, "k": args.k,
        "dtype": "bf16 autocast", "step_s": times, "median_step_s": step_s,
        "tokens_per_s": args.batch * n / step_s, "useful_tflop_per_step": flops / 1e12,
        "achieved_tflops": achieved, "peak_tflops": args.peak_tflops,
        "mfu_vs_peak": achieved / args.peak_tflops,
        "measured_bf16_matmul_tflops": measured, "mfu_vs_measured_matmul": achieved / measured,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                            if device.type == "cuda" else None),
        "losses": losses,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(args.out, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    gib = result["peak_memory_gib"]
    memory = "n/a (no allocator statistics off CUDA)" if gib is None else f"{gib:.1f} GiB"
    print(f"{result['device']}: {step_s * 1e3:.1f} ms/step, {result['tokens_per_s']:.0f} tokens/s, "
          f"{achieved:.1f} TFLOP/s = MFU {100 * result['mfu_vs_peak']:.1f}% of {args.peak_tflops:.0f} "
          f"({100 * result['mfu_vs_measured_matmul']:.1f}% of the measured {measured:.0f} TFLOP/s bf16 "
          f"matmul); peak memory {memory}; wrote {args.out}")


if __name__ == "__main__":
    main()
