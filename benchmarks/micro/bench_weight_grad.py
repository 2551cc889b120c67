"""A linear layer's weight gradient ``g.T @ x`` at the seed config's shapes, bf16 and float32 on CPU.

    python -m benchmarks.micro.bench_weight_grad [--reps 7]

Why ``kernels._common._weight_grad`` copies the transposed gradient into a contiguous tensor first in bf16
when the layer's input is at least twice as wide as its output: g is (N, out), x is (N, in), and the
contraction runs over the N tokens, so one operand is always transposed. For each shape and dtype
it times, in one process and alternating, ``g.t() @ x`` against ``g.t().contiguous() @ x`` (the
copy included), and prints the ratio. Two more columns bound what any layout trick could gain: the
same product from an already contiguous ``g.T`` (copy excluded: the layout oneDNN multiplies
fastest) and the transposing copy alone. In bf16 the transposed product runs at about half the
rate of the contiguous one, but torch's transposing copy costs about as much as that difference,
so the copy pays only where g is the narrow operand (in = 4 out). Shapes: N = 2048 decoder tokens
or 8192 encoder (neighbour) tokens; (out, in) of the feed-forward and attention projections.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common.timing import alternating_median_ms

SHAPES = [  # (tokens, out, in)
    (2048, 768, 3072),   # decoder feed-forward output projection
    (8192, 896, 3584),   # encoder feed-forward output projection
    (2048, 512, 768),    # CCA query projection
    (2048, 3072, 768),   # decoder feed-forward input projection (out > in)
    (2048, 1536, 768),   # decoder qkv projection (out > in)
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per weight gradient, "
          f"median of {args.reps}")
    print(f"{'dtype':8s} {'tokens':>6s} {'out':>5s} {'in':>5s} {'g.t() @ x':>10s} {'contiguous':>11s} "
          f"{'speed-up':>9s} {'no copy':>8s} {'copy':>6s}  TFLOP/s transposed / no copy")
    for dtype in (torch.bfloat16, torch.float32):
        for n, out, inn in SHAPES:
            g = torch.randn(n, out).to(dtype)
            x = torch.randn(n, inn).to(dtype)
            gt = g.t().contiguous()
            ways = {"transposed": lambda: g.t() @ x, "contiguous": lambda: g.t().contiguous() @ x,
                    "no copy": lambda: gt @ x, "copy": lambda: g.t().contiguous()}
            a, b, c, d = alternating_median_ms(ways, args.reps).values()
            flop = 2 * n * out * inn
            name = str(dtype).replace("torch.", "")
            print(f"{name:8s} {n:6d} {out:5d} {inn:5d} {a:10.1f} {b:11.1f} {a / b:8.2f}x {c:8.1f} {d:6.1f}  "
                  f"{flop / a / 1e9:.2f} / {flop / c / 1e9:.2f}")


if __name__ == "__main__":
    main()
