"""Multi-head scaled dot-product attention shared by the UNet's transformers and the VAE's mid-block.

One pure function, so every network gets the same kernels on whatever device its inputs live on:
`torch.nn.functional.scaled_dot_product_attention` (fused, flash on CPU and CUDA), except for long bf16
attention on the CPU at inference. There torch's flash kernel runs at ~165 GFLOP/s on this project's CPUs
whatever the dtype (it is bound by its own per-block bookkeeping, not by the matrix products), while oneDNN's
bf16 matrix products reach ~850 GFLOP/s. So `sliced_attention` computes one head and one slice of queries
at a time with two bf16 matrix products and a softmax: SD1.5's self-attention at 512 px (2 x 8 heads, 4,096
tokens, head size 40) takes 110 ms instead of 260 ms, with less memory than flash (one 512 x 4,096 score
block at a time). Its probabilities are rounded to bf16 before the second product: a UNet call moves by
0.001% of its output more than with flash (bench/precision.py; docs/performance.md).

Heads exactly 64 wide (SD2.x's and SDXL's UNets) stay with flash: for them the slices measured 2-6x slower
than flash on a busy machine (SDXL's 10 and 20 heads at 1,024-4,096 tokens; one small product per head and
slice, each waiting for both threads), and flash is the kernel diffusers runs, the peer of issue #13's target.
With one thread the slices are 1.5x faster (docs/performance.md): re-measure on an idle machine.
"""

import torch
import torch.nn.functional as F

SLICE_MIN_KEYS = 1024  # below this flash is as fast (cross-attention has 77 keys)
SLICE_QUERIES = 512  # measured best of 256/512/1024/2048 for 4,096 keys on 2 cores (512 x 4,096 bf16 = 4 MB)
FLASH_HEAD_WIDTH = 64  # UNet heads of this width always take flash (SD2.x, SDXL); the VAE's one 512-wide head is sliced


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attend queries [B, Nq, heads*D] to keys/values [B, Nk, heads*D]; returns [B, Nq, heads*D] in q's dtype.

    Scale is 1/sqrt(D), as in LDM's CrossAttention and the VAE's AttnBlock (which is the one-head case).
    `compute_dtype` (default q's) is the dtype the products run in: bf16 for fp32 inputs takes the fast CPU path.
    """
    batch, n_queries, inner = q.shape
    if inner % heads:
        raise ValueError(f"attention width {inner} is not divisible by {heads} heads")
    head_dim = inner // heads
    given, dtype = q.dtype, compute_dtype or q.dtype
    if _use_slices(q, k, dtype, head_dim):
        return sliced_attention(q.to(dtype), k.to(dtype), v.to(dtype), heads).to(given)
    q, k, v = (t.to(dtype).reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, n_queries, inner).to(given)


def _use_slices(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype, head_dim: int) -> bool:
    return (dtype is torch.bfloat16 and q.device.type == "cpu" and k.shape[1] >= SLICE_MIN_KEYS
            and head_dim != FLASH_HEAD_WIDTH and not torch.is_grad_enabled())


def sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     slice_size: int = SLICE_QUERIES) -> torch.Tensor:
    """The same attention as `multihead_attention`, one head and `slice_size` queries at a time (no autograd)."""
    batch, n_queries, inner = q.shape
    head_dim = inner // heads
    q = (q * head_dim**-0.5).reshape(batch, n_queries, heads, head_dim)
    k = k.reshape(batch, -1, heads, head_dim)
    v = v.reshape(batch, -1, heads, head_dim)
    out = torch.empty_like(q)
    for b in range(batch):
        for h in range(heads):
            keys_t, values = k[b, :, h].t(), v[b, :, h]
            for start in range(0, n_queries, slice_size):
                rows = slice(start, start + slice_size)
                weights = torch.softmax(torch.mm(q[b, rows, h], keys_t), dim=-1)
                torch.mm(weights, values, out=out[b, rows, h])
    return out.reshape(batch, n_queries, inner)
