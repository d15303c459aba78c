"""DDPM's ancestral posterior steps and latent-consistency (LCM) sampling: jump towards the prediction, then
draw fresh noise for the next level."""

from __future__ import annotations

import torch

from diffusion.samplers.common import gaussian_noise, run_slopes


def _ddpm_step(x, sigma, sigma_prev, eps, noise_sampler):
    alpha_cumprod = 1 / ((sigma * sigma) + 1)
    alpha_cumprod_prev = 1 / ((sigma_prev * sigma_prev) + 1)
    alpha = alpha_cumprod / alpha_cumprod_prev
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * eps / (1 - alpha_cumprod).sqrt())
    if sigma_prev > 0:
        spread = ((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt()
        mu += spread * noise_sampler(sigma, sigma_prev)
    return mu


def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """Ancestral DDPM posterior steps, done in the variance-preserving scaling."""
    noise_sampler = gaussian_noise(x, extra_args or {}, noise_sampler)

    def step(x, i, sigmas, denoised, eps, previous_eps, predict_at):
        x = _ddpm_step(x / torch.sqrt(1.0 + sigmas[i] ** 2.0), sigmas[i], sigmas[i + 1], eps, noise_sampler)
        if sigmas[i + 1] != 0:
            x *= torch.sqrt(1.0 + sigmas[i + 1] ** 2.0)
        return x

    return run_slopes(model, x, sigmas, extra_args, callback, step)


def sample_lcm(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """Latent-consistency sampling: jump to the prediction, re-noise to the next level."""
    noise_sampler = gaussian_noise(x, extra_args or {}, noise_sampler)

    def step(x, i, sigmas, denoised, d, previous_d, predict_at):
        if sigmas[i + 1] > 0:
            return noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] + denoised
        return denoised

    return run_slopes(model, x, sigmas, extra_args, callback, step)
