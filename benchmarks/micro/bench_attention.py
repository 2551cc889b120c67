"""Attention forward + backward at the model's shapes on CPU: the ways bf16 training could run it.

    python -m benchmarks.micro.bench_attention [--reps 5] [--inputs fp32]

Why ``kernels.attention`` sends the short non-causal windows to ``_WindowAttention`` under bf16
autocast on CPU, and leaves the long causal decoder attention on torch's flash attention. For each
shape (the seed config's: batch 1, seq 2048, C = 64, K = 2, 8 heads of 64) it times, in one
process and alternating, forward + backward of:

- ``sdpa bf16``: ``F.scaled_dot_product_attention`` (torch's CPU flash kernel) in bf16;
- ``sdpa fp32``: the same in float32, with the casts from and back to the bf16 projections (the
  route this library took before ``_WindowAttention``);
- ``window bf16``: ``kernels.window_attention._WindowAttention`` (matmul probabilities, fused softmax and softmax
  backward).

Inputs come out of a projection (views of one qkv/kv tensor) and grads go back through the
(b, n, h*d) layout, as in the model. Figures are milliseconds per call, the median over ``--reps``
rounds after two warm-up calls. ``--inputs fp32`` times float32 training instead (``sdpa fp32``
against ``window fp32``), the case ``kernels.attention`` leaves on SDPA.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common.timing import alternating_median_ms
from diablogpt_pytorch.kernels.window_attention import _WindowAttention

SHAPES = {  # name: (batch, query length, key length, causal, padding mask)
    "decoder self-attention (causal)": (1, 2048, 2048, True, False),
    "neighbour self-attention": (64, 128, 128, False, True),
    "encoder cross-attention": (32, 256, 64, False, False),
    "chunked cross-attention": (32, 64, 257, False, True),
}
HEADS, DIM_HEAD = 8, 64


def sdpa(dtype):
    def attend(q, k, v, mask, causal):
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, is_causal=causal)
        return out.to(q.dtype)
    return attend


def window(q, k, v, mask, causal):
    if causal:
        return None  # not a window: the model never sends causal attention there
    return _WindowAttention.apply(q, k, v, mask, 0.0)


WAYS = {"bf16": {"sdpa bf16": sdpa(torch.bfloat16), "sdpa fp32": sdpa(torch.float32), "window bf16": window},
        "fp32": {"sdpa fp32": sdpa(torch.float32), "window fp32": window}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--inputs", choices=tuple(WAYS), default="bf16", help="dtype of the projections (training dtype)")
    args = p.parse_args()
    named = WAYS[args.inputs]
    dtype = torch.bfloat16 if args.inputs == "bf16" else torch.float32
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per forward + backward, "
          f"median of {args.reps}")
    print(f"{'shape':34s}" + "".join(f"{w:>14s}" for w in named))
    for name, (batch, lq, lk, causal, masked) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        inner = HEADS * DIM_HEAD
        x_q = torch.randn(batch, lq, inner, generator=g).to(dtype).requires_grad_()
        x_kv = torch.randn(batch, lk, 2 * inner, generator=g).to(dtype).requires_grad_()
        mask = None
        if masked:
            mask = torch.rand(batch, 1, 1, lk, generator=g) > 0.1
            mask[..., 0] = True
        grad_out = torch.randn(batch, lq, inner, generator=g).to(dtype)

        def run(attend):
            q = x_q.view(batch, lq, HEADS, DIM_HEAD).transpose(1, 2)
            k, v = x_kv.view(batch, lk, 2, HEADS, DIM_HEAD).permute(2, 0, 3, 1, 4)
            out = attend(q, k, v, mask, causal)
            if out is None:
                return False
            out = out.transpose(1, 2).reshape(batch, lq, inner)
            torch.autograd.grad(out, (x_q, x_kv), grad_out)
            return True

        # the first call (untimed) also sorts out a way that does not apply to this shape
        ways = {w: (lambda f=f: run(f)) for w, f in named.items() if run(f)}
        ms = alternating_median_ms(ways, args.reps, warmup=1)
        cells = [f"{ms[w]:14.1f}" if w in ms else f"{'-':>14s}" for w in named]
        print(f"{name:34s}" + "".join(cells))


if __name__ == "__main__":
    main()
