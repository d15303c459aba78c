"""What the UNet reads from a text context: the phrasing stage's second comparison of two encodings.

Two contexts of different phrasings cannot be compared token by token (the words sit at other positions), but the
UNet only ever sees a context through its cross-attention layers: each reads softmax(q K^T) V with K and V
projections of the context, for the queries q of the picture. `query_bank` records real queries of every
cross-attention layer of the (frozen) UNet on noisy latents of training scenes; `readout_loss` compares what a
student context and a teacher context give those queries, layer by layer, through the UNet's own projections. It
does not care where in the caption a word stands, only what the UNet gets out of the whole context.
"""

from __future__ import annotations

import torch

from demo_model import dataset
from demo_model.denoiser import alphas_cumprod, caption_ids
from demo_model.models import LATENT_SCALE
from diffusion.attention import multihead_attention
from diffusion.prompt import run_text_model
from diffusion.tokenizer import ClipTokenizer
from diffusion.unet import BasicTransformerBlock, CrossAttention, UNetModel
from diffusion.vae import AutoencoderKL


def cross_attentions(unet: UNetModel) -> list[CrossAttention]:
    return [m.attn2 for m in unet.modules() if isinstance(m, BasicTransformerBlock)]


@torch.no_grad()
def query_bank(unet: UNetModel, vae: AutoencoderKL, text, seed: int, scenes: int, per_layer: int) -> list[torch.Tensor]:
    """Up to `per_layer` queries [N, inner] of each cross-attention layer, recorded while the UNet denoises noisy
    latents of training scenes 0..scenes-1 of stream `seed` (uniform timesteps) with their captions."""
    layers = cross_attentions(unet)
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.register_forward_hook(lambda module, args, _out, i=i: captured[i].append(
        module.to_q(args[0]).flatten(0, 1).float())) for i, layer in enumerate(layers)]
    try:
        pixels, captions = dataset.batch(seed, 0, scenes)
        latents = vae.encode(torch.from_numpy(pixels)) * LATENT_SCALE
        generator = torch.Generator().manual_seed(seed)
        table = alphas_cumprod()
        t = torch.randint(0, len(table), (scenes,), generator=generator)
        abar = table[t][:, None, None, None]
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * torch.randn(latents.shape, generator=generator)
        tokenizer = ClipTokenizer()
        context, _ = run_text_model(text, caption_ids(tokenizer, captions, {}), [], layer=-1,
                                    eos_id=tokenizer.eos_id)
        unet(noisy, t.float(), context)
    finally:
        for hook in hooks:
            hook.remove()
    bank = []
    for queries in captured:
        rows = torch.cat(queries)
        bank.append(rows[torch.randperm(len(rows), generator=generator)[:per_layer]])
    return bank


def readout_loss(layers: list[CrossAttention], bank: list[torch.Tensor], student: torch.Tensor,
                 teacher: torch.Tensor, probes: int, generator: torch.Generator) -> torch.Tensor:
    """Mean over layers of the squared difference between what `probes` banked queries read from the student and
    the teacher context [B, T, D], each layer normalised by the variance of the teacher's readout."""
    total = student.new_zeros(())
    for layer, queries in zip(layers, bank, strict=True):
        q = queries[torch.randint(0, len(queries), (probes,), generator=generator)]
        q = q.unsqueeze(0).expand(student.shape[0], -1, -1)
        k, v = layer.to_k.weight.float(), layer.to_v.weight.float()
        with torch.no_grad():
            target = multihead_attention(q, teacher @ k.T, teacher @ v.T, layer.heads)
        read = multihead_attention(q, student @ k.T, student @ v.T, layer.heads)
        total = total + (read - target).square().mean() / target.var().clamp_min(1e-8)
    return total / len(layers)
