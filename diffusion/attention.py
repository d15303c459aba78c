"""Multi-head scaled dot-product attention shared by the UNet's transformers and the VAE's mid-block.

One pure function, so every network gets the same kernels on whatever device its inputs live on:
`torch.nn.functional.scaled_dot_product_attention` (fused, flash on CPU and CUDA), except for long bf16
attention on the CPU at inference. There torch's flash kernel runs at 130-195 GFLOP/s whatever the head width
(it is bound by its own per-block bookkeeping, not by the matrix products), while oneDNN's bf16 matrix products
run near the CPU's peak. So `sliced_attention` computes one head and one slice of queries at a time with two
bf16 matrix products and a softmax, into one reused score block: 1.2-1.9x faster than flash for every UNet and
VAE shape measured on an idle machine (SD1.5's 40- and 80-wide heads, SD2.x's and SDXL's 64-wide heads at
1,024-9,216 tokens, the VAE's one 512-wide head; docs/performance.md), with less memory (one 512 x keys block
at a time). With few keys (cross-attention's 77 tokens, self-attention at the deepest levels) the scores of all
heads are small, and `batched_attention` takes them in one batched product: 1.1-1.8x faster than flash. Both
round the probabilities to bf16 before the second product (bench/precision.py measures a whole UNet call).
"""

import torch
import torch.nn.functional as F

SLICE_MIN_KEYS = 1024  # below this all heads' scores fit in one batched product (cross-attention has 77 keys)
BATCHED_SCORE_BYTES = 32 << 20  # the batched path's score block: heads are taken this many bytes' worth at a time
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
    if _cpu_bf16_inference(q, dtype):
        kernel = sliced_attention if k.shape[1] >= SLICE_MIN_KEYS else batched_attention
        return kernel(q.to(dtype), k.to(dtype), v.to(dtype), heads).to(given)
    q, k, v = (t.to(dtype).reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, n_queries, inner).to(given)


def _cpu_bf16_inference(q: torch.Tensor, dtype: torch.dtype) -> bool:
    return dtype is torch.bfloat16 and q.device.type == "cpu" and not torch.is_grad_enabled()


def batched_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The same attention as `multihead_attention` for few keys (cross-attention's 77, self-attention at the
    UNet's deepest levels): every head's scores in one batched product, as many heads at a time as fit in
    BATCHED_SCORE_BYTES (no autograd). 1.1-1.8x faster than flash for these shapes (docs/performance.md)."""
    batch, n_queries, inner = q.shape
    n_keys, head_dim = k.shape[1], inner // heads
    q = (q * head_dim**-0.5).reshape(batch, n_queries, heads, head_dim).transpose(1, 2).flatten(0, 1)
    keys_t = k.reshape(batch, n_keys, heads, head_dim).permute(0, 2, 3, 1).flatten(0, 1)
    values = v.reshape(batch, n_keys, heads, head_dim).transpose(1, 2).flatten(0, 1)
    out = q.new_empty(batch * heads, n_queries, head_dim)
    step = max(1, BATCHED_SCORE_BYTES // (n_queries * n_keys * q.element_size()))
    for start in range(0, batch * heads, step):
        rows = slice(start, start + step)
        weights = torch.bmm(q[rows], keys_t[rows])
        torch.softmax(weights, dim=-1, out=weights)
        torch.bmm(weights, values[rows], out=out[rows])
    return out.unflatten(0, (batch, heads)).transpose(1, 2).reshape(batch, n_queries, inner)


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
