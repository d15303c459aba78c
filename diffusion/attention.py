"""Multi-head scaled dot-product attention shared by the UNet's transformers and the VAE's mid-block.

One pure function around `torch.nn.functional.scaled_dot_product_attention`, so every network gets the same
fused kernel (and the same fp16/bf16 behaviour) on whatever device its inputs live on.
"""

import torch
import torch.nn.functional as F


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Attend queries [B, Nq, heads*D] to keys/values [B, Nk, heads*D]; returns [B, Nq, heads*D].

    Scale is 1/sqrt(D), as in LDM's CrossAttention and the VAE's AttnBlock (which is the one-head case).
    """
    batch, n_queries, inner = q.shape
    if inner % heads:
        raise ValueError(f"attention width {inner} is not divisible by {heads} heads")
    head_dim = inner // heads
    q, k, v = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, n_queries, inner)
