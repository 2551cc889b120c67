"""CPU attention kernels at the seed config's shapes: bf16 against float32 inputs to
``F.scaled_dot_product_attention``, forward + backward, median of 5 after 2 warm-ups.

The model runs the short attention windows (neighbour self-attention, encoder cross-attention,
chunked cross-attention) in float32 on CPU under bf16 autocast when this shows float32 faster;
the decoder's causal self-attention stays bf16.

    python benchmarks/bench_attention.py
"""

import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {  # name: (q shape, k/v shape, mask shape or None, causal)
    "encoder self-attention (64 neighbours x 128 tokens)": ((64, 8, 128, 64), (64, 8, 128, 64), (64, 1, 128, 128), False),
    "encoder cross-attention (256 neighbour tokens -> 64 chunk tokens)": ((32, 8, 256, 64), (32, 8, 64, 64), None, False),
    "chunked cross-attention (64 queries -> 1 + 256 neighbour tokens)": ((32, 8, 64, 64), (32, 8, 257, 64), (32, 1, 1, 257), False),
    "decoder causal self-attention (2048 tokens)": ((1, 8, 2048, 64), (1, 8, 2048, 64), None, True),
}


def time_fwd_bwd(q_shape, kv_shape, mask_shape, causal, dtype) -> float:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(q_shape, generator=g).to(dtype).requires_grad_()
    k = torch.randn(kv_shape, generator=g).to(dtype).requires_grad_()
    v = torch.randn(kv_shape, generator=g).to(dtype).requires_grad_()
    mask = None if mask_shape is None else torch.rand(mask_shape, generator=g) > 0.1

    def step():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal).sum().backward()

    for _ in range(2):
        step()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward, ms")
    for name, (q, kv, mask, causal) in SHAPES.items():
        bf16 = time_fwd_bwd(q, kv, mask, causal, torch.bfloat16)
        fp32 = time_fwd_bwd(q, kv, mask, causal, torch.float32)
        print(f"{name:70s} bf16 {bf16 * 1e3:7.1f}  fp32 {fp32 * 1e3:7.1f}  fp32/bf16 time {fp32 / bf16:.2f}")


if __name__ == "__main__":
    main()
