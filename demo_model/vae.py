"""Stage 1: the KL autoencoder, trained on the synthetic scenes with MSE + a small KL term.

It is trained on 32x32 crops (a quarter of the cost; convolutions do not care), then briefly on whole scenes
so that the mid-block attention sees the 8x8 latents it will meet at inference.

When the stage finishes, the latent space is rescaled (exactly, see `models.rescale_vae`) so that latents times
SD1's 0.18215 have unit standard deviation, as the sampler and the UNet's noise schedule expect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from demo_model import dataset
from demo_model.models import LATENT_SCALE, DemoArchitecture, new_vae, rescale_vae
from demo_model.state import load_snapshot, save_snapshot, step_generator, warmup_lr
from diffusion.vae import AutoencoderKL


@dataclass(frozen=True)
class VAESchedule:
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 30
    crop: int = 32  # pixels per side while training, until the last `full_steps` (whole 64x64 scenes)
    full_steps: int = 60
    kl_weight: float = 1e-4
    data_seed: int = 1
    init_seed: int = 2
    save_every: int = 50


def vae_loss(vae: AutoencoderKL, pixels: torch.Tensor, kl_weight: float):
    """(total, reconstruction MSE, KL per latent value). The decoder sees the posterior's mean, as inference
    does (`AutoencoderKL.encode` returns the mean); the KL term only keeps the latents near unit scale."""
    mean, log_variance = vae.quant_conv(vae.encoder(pixels)).chunk(2, dim=1)
    log_variance = log_variance.clamp(-30.0, 20.0)
    reconstruction = F.mse_loss(vae.decode(mean), pixels)
    kl = 0.5 * (mean.pow(2) + log_variance.exp() - 1.0 - log_variance).mean()
    return reconstruction + kl_weight * kl, reconstruction, kl


def crop(pixels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random `size`-square crop per image, at offsets that keep the 8-pixel latent grid."""
    if size >= pixels.shape[-1]:
        return pixels
    cells = (pixels.shape[-1] - size) // 8 + 1
    offsets = torch.randint(0, cells, (pixels.shape[0], 2), generator=generator) * 8
    return torch.stack([p[:, y:y + size, x:x + size] for p, (y, x) in zip(pixels, offsets.tolist(), strict=True)])


@torch.no_grad()
def latent_std(vae: AutoencoderKL, seed: int, count: int = 256) -> float:
    pixels, _ = dataset.batch(seed, 10_000_000, count)
    return float(vae.encode(torch.from_numpy(pixels)).std())


def train_vae(arch: DemoArchitecture, snapshot_path, schedule: VAESchedule,
              progress: Callable[[int, dict], None] | None = None) -> AutoencoderKL:
    """Train (or resume, or just load when finished) the VAE; returns it rescaled, in eval mode."""
    vae = new_vae(arch, schedule.init_seed)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=schedule.lr, weight_decay=0.0)
    state = load_snapshot(snapshot_path)
    step = 0
    if state is not None:
        vae.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        step = state["step"]
        if state.get("scaled"):
            return vae.eval().requires_grad_(False)
    vae.train()
    while step < schedule.steps:
        for group in optimiser.param_groups:
            group["lr"] = warmup_lr(schedule.lr, step, schedule.warmup)
        pixels, _ = dataset.batch(schedule.data_seed, step * schedule.batch_size, schedule.batch_size)
        size = dataset.SIZE if step >= schedule.steps - schedule.full_steps else schedule.crop
        pixels = crop(torch.from_numpy(pixels), size, step_generator(schedule.data_seed, step))
        loss, reconstruction, kl = vae_loss(vae, pixels, schedule.kl_weight)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimiser.step()
        step += 1
        if progress:
            progress(step, {"mse": reconstruction.item(), "kl": kl.item()})
        if step % schedule.save_every == 0 and step < schedule.steps:
            save_snapshot(snapshot_path, {"model": vae.state_dict(), "optimizer": optimiser.state_dict(),
                                          "step": step, "scaled": False})
    vae.eval()
    rescale_vae(vae, 1.0 / (LATENT_SCALE * latent_std(vae, schedule.data_seed)))
    save_snapshot(snapshot_path, {"model": vae.state_dict(), "optimizer": optimiser.state_dict(),
                                  "step": step, "scaled": True})
    return vae.requires_grad_(False)
