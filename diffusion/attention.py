"""Multi-head scaled dot-product attention shared by the UNet's transformers and the VAE's mid-block.

One pure function, so every network gets the same kernels on whatever device its inputs live on:
`torch.nn.functional.scaled_dot_product_attention` (fused, flash on CPU and CUDA), except for long bf16
attention on the CPU at inference. There torch's flash kernel runs at 130-195 GFLOP/s whatever the head width
(it is bound by its own per-block bookkeeping, not by the matrix products), while oneDNN's bf16 matrix products
run near the CPU's peak. So `sliced_attention` computes one head and one slice of queries at a time with two
bf16 matrix products and a softmax, into one reused score block: 1.2-1.9x faster than flash for every UNet and
VAE shape measured on an idle machine (SD1.5's 40- and 80-wide heads, SD2.x's and SDXL's 64-wide heads at
1,024-9,216 tokens, the VAE's one 512-wide head; docs/performance.md), with less memory (one 512 x keys block
at a time). Its probabilities are rounded to bf16 before the second product: a UNet call moves by 0.001% of its
output more than with flash (bench/precision.py).
"""

import torch
import torch.nn.functional as F

SLICE_MIN_KEYS = 1024  # below this flash is as fast (cross-attention has 77 keys)
SLICE_QUERIES = 512  # measured best of 256/512/1024/2048 for 4,096 keys on 2 cores (512 x 4,096 bf16 = 4 MB)
PRODUCT_BLOCK = 64  # oneDNN's bf16 products are fastest with an output width that is a multiple of this


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
            and not torch.is_grad_enabled())


def sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     slice_size: int = SLICE_QUERIES) -> torch.Tensor:
    """The same attention as `multihead_attention`, one head and `slice_size` queries at a time (no autograd).

    Each head's keys are made contiguous once (not read strided by every slice's product); the scores of a slice
    live in one block reused for every slice, and the softmax overwrites them. For heads
    whose width is not a multiple of `PRODUCT_BLOCK` (SD1.5's 40 and 80), the second product is computed
    transposed, values^T @ weights^T, whose output width is the slice instead of the head: 1.2-1.4x faster for
    the same sums (the result is the same bit for bit)."""
    batch, n_queries, inner = q.shape
    head_dim = inner // heads
    q = (q * head_dim**-0.5).reshape(batch, n_queries, heads, head_dim)
    k = k.reshape(batch, -1, heads, head_dim)
    v = v.reshape(batch, -1, heads, head_dim)
    out = torch.empty_like(q)
    scores = q.new_empty(min(slice_size, n_queries), k.shape[1])
    transposed = head_dim % PRODUCT_BLOCK != 0
    head_out_t = q.new_empty(head_dim, n_queries) if transposed else None
    for b in range(batch):
        for h in range(heads):
            keys_t = k[b, :, h].t().contiguous()
            values = v[b, :, h].t().contiguous() if transposed else v[b, :, h]
            for start in range(0, n_queries, slice_size):
                rows = slice(start, start + slice_size)
                block = scores[:min(slice_size, n_queries - start)]
                torch.mm(q[b, rows, h], keys_t, out=block)
                torch.softmax(block, dim=-1, out=block)
                if transposed:
                    torch.mm(values, block.t(), out=head_out_t[:, rows])
                else:
                    torch.mm(block, values, out=out[b, rows, h])
            if transposed:
                out[b, :, h] = head_out_t.t()
    return out.reshape(batch, n_queries, inner)
