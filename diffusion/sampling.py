"""One entry point for the KSampler and KSamplerAdvanced nodes: `sample(...)`.

It reproduces ComfyUI's `common_ksampler` -> `comfy.sample.sample` -> `KSampler.sample` -> `CFGGuider` ->
`KSAMPLER.sample` path, written as numbered steps. The model's `Family` (diffusion/families.py) gives the
latent scale, the schedule and prediction type (`family.sampling`, which ModelSamplingDiscrete replaces), SDXL's
label vectors and an inpainting model's extra input channels (diffusion/model_conds.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from diffusion.denoisers import CFGDenoiser, InpaintDenoiser, ModelDenoiser, UNet, prepare_mask
from diffusion.families import FAMILIES, SD1_LATENT_SCALE, Family
from diffusion.latent import Conditioning, Latent
from diffusion.model_conds import check_conditioning, model_inputs
from diffusion.noise import check_seed, inpaint_noise, prepare_noise
from diffusion.regions import percent_to_sigma
from diffusion.samplers import DISCARD_PENULTIMATE_SIGMA_SAMPLERS, RANDOM_INPAINT_NOISE_SAMPLERS, SAMPLERS
from diffusion.schedules import SCHEDULERS, DiscreteSchedule, calculate_sigmas, model_schedule

__all__ = ["SD1_LATENT_SCALE", "sample", "select_sigmas", "trim_sigmas"]

# callback(step, total, x, denoised): x and denoised in model space (latent * the family's latent scale).
ProgressCallback = Callable[[int, int, Tensor, Tensor], None]


def select_sigmas(schedule: DiscreteSchedule, scheduler: str, sampler_name: str, steps: int,
                  denoise: float | None = 1.0) -> Tensor:
    """KSampler's sigmas: one extra step then drop the penultimate sigma for some samplers; for denoise < 1,
    a schedule of int(steps / denoise) steps of which the last steps + 1 sigmas are kept."""

    def full(n: int) -> Tensor:
        if sampler_name not in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
            return calculate_sigmas(schedule, scheduler, n)
        sigmas = calculate_sigmas(schedule, scheduler, n + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])

    if denoise is None or denoise > 0.9999:
        return full(steps)
    if denoise <= 0.0:
        return torch.zeros(0)
    return full(int(steps / denoise))[-(steps + 1):]


def trim_sigmas(sigmas: Tensor, start_step: int | None, last_step: int | None,
                force_full_denoise: bool) -> Tensor | None:
    """KSamplerAdvanced's window; None when start_step leaves nothing to do (the latent is returned as is)."""
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return None
        sigmas = sigmas[start_step:]
    return sigmas


def noise_scaling(sigma: Tensor, noise: Tensor, latent: Tensor, max_denoise: bool) -> Tensor:
    """The starting x: noise * sqrt(1 + sigma^2) at full denoise (what the eps model expects at sigma_max),
    else noise * sigma; plus the latent."""
    return (noise * torch.sqrt(1.0 + sigma**2.0) if max_denoise else noise * sigma) + latent


def _check(sampler_name: str, scheduler: str, steps: int, positive: Conditioning, negative: Conditioning,
           cfg: float) -> None:
    if sampler_name not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler_name!r}; choose one of {', '.join(SAMPLERS)}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not positive.entries:
        raise ValueError("positive conditioning is empty")
    if not negative.entries and not math.isclose(cfg, 1.0):
        raise ValueError("negative conditioning is empty but cfg != 1 needs it")


def sample(unet: UNet, latent: Latent | dict[str, Any], positive: Conditioning | Sequence[Any],
           negative: Conditioning | Sequence[Any], *, seed: int, steps: int, cfg: float, sampler_name: str,
           scheduler: str, denoise: float = 1.0, add_noise: bool = True, start_step: int | None = None,
           last_step: int | None = None, force_full_denoise: bool = False,
           callback: ProgressCallback | None = None, family: Family = FAMILIES["sd1"]) -> Latent:
    """Denoise `latent` with the network `unet(x, timesteps, context, control=None, y=None) -> output` of a
    model of `family`; returns a Latent (unscaled) that keeps the input's noise_mask and batch_index."""
    # 1. Check and type the inputs.
    latent = Latent.from_value(latent)
    positive, negative = Conditioning.from_value(positive), Conditioning.from_value(negative)
    _check(sampler_name, scheduler, steps, positive, negative, cfg)
    check_conditioning(family, (positive, negative))
    check_seed(seed)
    schedule = model_schedule(family.sampling)

    # 2. The sigmas: scheduler, denoise, then KSamplerAdvanced's start/end window.
    sigmas = select_sigmas(schedule, scheduler, sampler_name, steps, denoise)
    sigmas = trim_sigmas(sigmas, start_step, last_step, force_full_denoise)
    if sigmas is None or len(sigmas) == 0:
        return latent

    with torch.no_grad():
        # 3. Initial noise from the seed (zeros when add_noise is off), on CPU as ComfyUI draws it.
        samples = latent.samples.float()
        if add_noise:
            noise = prepare_noise(samples, seed, latent.batch_index).float()
        else:
            noise = torch.zeros(samples.shape, dtype=torch.float32)

        # 4. Into model space (process_latent_in).
        latent_in = samples * family.latent_scale
        mask = None
        if latent.noise_mask is not None:
            mask = prepare_mask(latent.noise_mask.to(samples.device), samples.shape)

        # 5. The denoiser: the network's prediction type -> guidance -> optional inpainting blend.
        to_sigma = functools.partial(percent_to_sigma, schedule)
        denoiser = ModelDenoiser(unet, schedule, family.sampling.prediction)
        model: Callable[..., Tensor] = CFGDenoiser(denoiser, positive, negative, cfg, to_sigma,
                                                   model_inputs(family, latent_in, mask))
        if mask is not None:
            kept_noise = inpaint_noise(noise.shape, seed) if sampler_name in RANDOM_INPAINT_NOISE_SAMPLERS else noise
            model = InpaintDenoiser(model, latent_in, kept_noise, mask)

        # 6. The starting point.
        max_sigma, first = float(schedule.sigma_max), float(sigmas[0])
        max_denoise = math.isclose(max_sigma, first, rel_tol=1e-05) or first > max_sigma
        x = noise_scaling(sigmas[0], noise, latent_in, max_denoise)

        # 7. The denoising loop.
        total = len(sigmas) - 1
        k_callback = None
        if callback is not None:
            def k_callback(info: dict[str, Any]) -> None:
                callback(int(info["i"]), total, info["x"], info["denoised"])

        x = SAMPLERS[sampler_name](model, x, sigmas, extra_args={"seed": seed}, callback=k_callback)

        # 8. Back to the VAE's space (process_latent_out); the kept area is the input latent, bit for bit.
        out = x.float() / family.latent_scale
        if mask is not None:
            out = torch.where(mask == 0, samples, out)
    return latent.replace(samples=out)
