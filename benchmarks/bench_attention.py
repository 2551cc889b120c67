"""torch's CPU flash attention, forward + backward, in bf16 against float32 at the model's shapes.

    python benchmarks/bench_attention.py [--reps 3]

Why ``model._attention_dtype`` runs the short non-causal windows in float32 under bf16 autocast
on CPU: at these shapes torch's bf16 flash-attention backward is about twice as slow as its
float32 one, while the long causal decoder attention is faster in bf16. Shapes are the seed
config's (batch 1, seq 2048, C = 64, K = 2, 8 heads of 64). Each figure is the per-call time of
the forward and of the backward kernel, as torch.profiler reports them, median over ``--reps``
profiled runs after two warm-up runs; both dtypes are measured in the same process, one after
the other for each shape.
Inputs come out of a projection (views of one qkv/kv tensor) and grads go back through the
(b, n, h*d) layout, as in the model.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

SHAPES = {  # name: (batch, query length, key length, causal, padding mask)
    "decoder self-attention (causal)": (1, 2048, 2048, True, False),
    "neighbour self-attention": (64, 128, 128, False, True),
    "encoder cross-attention": (32, 256, 64, False, False),
    "chunked cross-attention": (32, 64, 257, False, True),
}
HEADS, DIM_HEAD = 8, 64


def kernel_ms(batch, lq, lk, causal, masked, dtype, reps):
    g = torch.Generator().manual_seed(0)
    inner = HEADS * DIM_HEAD
    x_q = torch.randn(batch, lq, inner, generator=g).to(dtype).requires_grad_()
    x_kv = torch.randn(batch, lk, 2 * inner, generator=g).to(dtype).requires_grad_()
    mask = None
    if masked:
        mask = torch.rand(batch, 1, 1, lk, generator=g) > 0.1
        mask[..., 0] = True
    grad_out = torch.randn(batch, lq, inner, generator=g).to(dtype)

    def run():
        q = x_q.view(batch, lq, HEADS, DIM_HEAD).transpose(1, 2)
        k, v = x_kv.view(batch, lk, 2, HEADS, DIM_HEAD).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        out = out.transpose(1, 2).reshape(batch, lq, inner)
        torch.autograd.grad(out, (x_q, x_kv), grad_out)

    for _ in range(2):
        run()
    fwd, bwd = [], []
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        for e in prof.key_averages():
            if e.key.startswith("aten::_scaled_dot_product_flash_attention_for_cpu"):
                (bwd if e.key.endswith("backward") else fwd).append(e.cpu_time_total / e.count / 1e3)
    return statistics.median(fwd), statistics.median(bwd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call (forward / backward)")
    print(f"{'window':34s} {'bf16':>15s} {'float32':>15s}  backward bf16/fp32")
    for name, (batch, lq, lk, causal, masked) in SHAPES.items():
        bf = kernel_ms(batch, lq, lk, causal, masked, torch.bfloat16, args.reps)
        fp = kernel_ms(batch, lq, lk, causal, masked, torch.float32, args.reps)
        print(f"{name:34s} {bf[0]:6.1f} / {bf[1]:6.1f} {fp[0]:6.1f} / {fp[1]:6.1f}  {bf[1] / fp[1]:5.2f}x")


if __name__ == "__main__":
    main()
