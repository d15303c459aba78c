"""Stage 2: the conditional UNet and the CLIP text encoder, trained jointly from scratch on frozen-VAE latents.

SD1's objective: latents x0 = 0.18215 * VAE mean (of a pool of scenes encoded once), t uniform in 0..999
on SD1's scaled-linear table, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, and the UNet predicts eps from
(x_t, t, text). Captions are dropped (replaced by the empty prompt) 10% of the time so that classifier-free
guidance works. The text goes through exactly the tokenisation and `run_text_model` path that inference uses.
An exponential moving average of the weights is what gets exported.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextModel

from demo_model import dataset
from demo_model.models import LATENT_SCALE, DemoArchitecture, new_denoiser
from demo_model.state import load_snapshot, save_snapshot, step_generator, warmup_lr
from diffusion.prompt import run_text_model, tokenize_prompt
from diffusion.schedules import scaled_linear_betas
from diffusion.tokenizer import ClipTokenizer
from diffusion.unet import UNetModel
from diffusion.vae import AutoencoderKL


@dataclass(frozen=True)
class DenoiserSchedule:
    steps: int = 3400
    batch_size: int = 64
    lr: float = 6e-4
    warmup: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    data_seed: int = 3
    init_seed: int = 4
    save_every: int = 100
    bf16: bool = True
    pool_size: int = 8192  # scenes encoded once by the frozen VAE; batches are drawn from them at random
    # From step `layout_from` on, each sample's loss is weighted by 1/SNR(t) clamped to [1, layout_weight_cap]
    # (normalised over the batch): the eps objective barely penalises a wrong layout at high noise, where SNR is
    # small, and position is decided there (docs/demo-model.md).
    layout_from: int = 2200
    layout_weight_cap: float = 5.0


def alphas_cumprod() -> torch.Tensor:
    return torch.cumprod(1.0 - scaled_linear_betas(), dim=0).float()


def caption_ids(tokenizer: ClipTokenizer, captions: list[str], cache: dict[str, list[int]]) -> torch.Tensor:
    """Token ids [B, 77] as CLIPTextEncode builds them (start, tokens, end, end-token padding)."""
    rows = []
    for text in captions:
        if text not in cache:
            cache[text] = [token for token, _ in tokenize_prompt(tokenizer, text).chunks[0]]
        rows.append(cache[text])
    return torch.tensor(rows, dtype=torch.long)


def layout_weights(table: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-timestep loss weights: 1/SNR(t) = (1 - abar) / abar, clamped to [1, cap] (all ones for cap <= 1)."""
    return ((1 - table) / table).clamp(min=1.0, max=max(cap, 1.0))


def diffusion_loss(unet: UNetModel, text: CLIPTextModel, latents: torch.Tensor, ids: torch.Tensor,
                   generator: torch.Generator, table: torch.Tensor, eos_id: int,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """The eps-prediction MSE on one batch of scaled latents; with per-timestep `weights`, each sample's MSE is
    weighted by its timestep's weight (normalised so that the weights of the batch sum to one)."""
    t = torch.randint(0, len(table), (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    abar = table[t][:, None, None, None]
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    context, _ = run_text_model(text, ids, [], layer=-1, eos_id=eos_id)
    per_sample = (unet(noisy, t.float(), context).float() - noise).square().flatten(1).mean(1)
    w = torch.ones_like(per_sample) if weights is None else weights[t]
    return (w * per_sample).sum() / w.sum()


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    return vae.encode(pixels) * LATENT_SCALE


def latent_pool(vae: AutoencoderKL, seed: int, size: int, path, chunk: int = 64) -> tuple[torch.Tensor, list[str]]:
    """Scaled latents and captions of training scenes 0..size-1 of stream `seed`, cached at `path`."""
    key = (seed, size, float(vae.quant_conv.weight.double().sum()))  # a retrained VAE invalidates the cache
    cached = load_snapshot(path)
    if cached is not None and cached["key"] == key:
        return cached["latents"], cached["captions"]
    latents, captions = [], []
    for start in range(0, size, chunk):
        pixels, texts = dataset.batch(seed, start, min(chunk, size - start))
        latents.append(encode_latents(vae, torch.from_numpy(pixels)))
        captions += texts
    pool = torch.cat(latents)
    save_snapshot(path, {"key": key, "latents": pool, "captions": captions})
    return pool, captions


def drop_captions(captions: list[str], generator: torch.Generator, rate: float) -> list[str]:
    keep = torch.rand(len(captions), generator=generator) >= rate
    return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]


def train_denoiser(arch: DemoArchitecture, vae: AutoencoderKL, snapshot_path, schedule: DenoiserSchedule,
                   progress: Callable[[int, dict], None] | None = None) -> tuple[UNetModel, CLIPTextModel, int]:
    """Train (or resume) the UNet and text encoder; returns their EMA copies (eval mode) and the step reached."""
    unet, text = new_denoiser(arch, schedule.init_seed)
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text)
    params = list(unet.parameters()) + list(text.parameters())
    optimiser = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.0, betas=(0.9, 0.99))
    state = load_snapshot(snapshot_path)
    step = 0
    if state is not None:
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        optimiser.load_state_dict(state["optimizer"])
        step = state["step"]
    tokenizer, cache, table = ClipTokenizer(), {}, alphas_cumprod()
    layout = layout_weights(table, schedule.layout_weight_cap)
    pool, pool_captions = latent_pool(vae, schedule.data_seed, schedule.pool_size,
                                      Path(snapshot_path).with_name("latents.pt"))
    unet.train()
    text.train()
    while step < schedule.steps:
        for group in optimiser.param_groups:
            group["lr"] = warmup_lr(schedule.lr, step, schedule.warmup)
        generator = step_generator(schedule.data_seed, step)
        picks = torch.randint(0, len(pool), (schedule.batch_size,), generator=generator)
        latents, captions = pool[picks], [pool_captions[i] for i in picks.tolist()]
        ids = caption_ids(tokenizer, drop_captions(captions, generator, schedule.caption_dropout), cache)
        weights = layout if step >= schedule.layout_from else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=schedule.bf16):
            loss = diffusion_loss(unet, text, latents, ids, generator, table, tokenizer.eos_id, weights)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        decay = min(schedule.ema_decay, (1 + step) / (10 + step))
        update_ema(ema_unet, unet, decay)
        update_ema(ema_text, text, decay)
        step += 1
        if progress:
            progress(step, {"loss": loss.item()})
        if step % schedule.save_every == 0 or step == schedule.steps:
            save_snapshot(snapshot_path, {
                "unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema_unet.state_dict(),
                "ema_text": ema_text.state_dict(), "optimizer": optimiser.state_dict(), "step": step,
            })
    return ema_unet.eval().requires_grad_(False), ema_text.eval().requires_grad_(False), step
