"""Karras-style steps on the probability-flow ODE in sigma: Euler, Heun, DPM-2, their ancestral forms, and
gradient estimation (Euler corrected by the change of slope)."""

from __future__ import annotations

from diffusion.denoisers import to_d
from diffusion.samplers.common import run_ancestral, run_slopes


def _euler(x, i, sigmas, denoised, d, previous_d, predict_at):
    return x + d * (sigmas[i + 1] - sigmas[i])


def sample_euler(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    return run_slopes(model, x, sigmas, extra_args, callback, _euler)
def _euler_down(x, sigma, sigma_next, sigma_down, denoised, predict_at):
    if sigma_down == 0:
        return denoised, False
    return x + to_d(x, sigma, denoised) * (sigma_down - sigma), True


def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                           eta=1.0, s_noise=1.0):
    """Euler step down to sigma_down, then fresh noise up to sigmas[i + 1]."""
    return run_ancestral(model, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, _euler_down)


def _heun(x, i, sigmas, denoised, d, previous_d, predict_at):
    dt = sigmas[i + 1] - sigmas[i]
    if sigmas[i + 1] == 0:
        return x + d * dt
    x_2 = x + d * dt
    d_2 = to_d(x_2, sigmas[i + 1], predict_at(x_2, sigmas[i + 1]))
    return x + (d + d_2) / 2 * dt


def sample_heun(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """Heun's method (trapezoidal); the last step to sigma 0 is plain Euler."""
    return run_slopes(model, x, sigmas, extra_args, callback, _heun)
def _heunpp2(x, i, sigmas, denoised, d, previous_d, predict_at):
    s_end = sigmas[-1]
    dt = sigmas[i + 1] - sigmas[i]
    if sigmas[i + 1] == s_end:
        return x + d * dt
    x_2 = x + d * dt
    d_2 = to_d(x_2, sigmas[i + 1], predict_at(x_2, sigmas[i + 1]))
    if sigmas[i + 2] == s_end:
        w2 = sigmas[i + 1] / (2 * sigmas[0])
        return x + (d * (1 - w2) + d_2 * w2) * dt
    x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
    d_3 = to_d(x_3, sigmas[i + 2], predict_at(x_3, sigmas[i + 2]))
    w = 3 * sigmas[0]
    w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
    return x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt


def sample_heunpp2(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """Heun++ (Carzit's sd-webui-samplers-scheduler): up to three slopes, weighted by sigma / sigmas[0]."""
    return run_slopes(model, x, sigmas, extra_args, callback, _heunpp2)
def _midpoint(x, sigma, sigma_to, d, predict_at):
    """DPM-2's second slope, taken at the midpoint in log sigma, carried over the whole step to sigma_to."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, predict_at(x_2, sigma_mid))
    return x + d_2 * (sigma_to - sigma)


def _dpm_2(x, i, sigmas, denoised, d, previous_d, predict_at):
    if sigmas[i + 1] == 0:
        return x + d * (sigmas[i + 1] - sigmas[i])
    return _midpoint(x, sigmas[i], sigmas[i + 1], d, predict_at)


def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """DPM-Solver-2 flavoured midpoint steps (midpoint in log sigma); Euler for the last step to 0."""
    return run_slopes(model, x, sigmas, extra_args, callback, _dpm_2)
def _dpm_2_down(x, sigma, sigma_next, sigma_down, denoised, predict_at):
    d = to_d(x, sigma, denoised)
    if sigma_down == 0:
        return x + d * (sigma_down - sigma), False
    return _midpoint(x, sigma, sigma_down, d, predict_at), True


def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                           eta=1.0, s_noise=1.0):
    """DPM-2 midpoint step down to sigma_down, then fresh noise up to sigmas[i + 1]."""
    return run_ancestral(model, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, _dpm_2_down)


def sample_gradient_estimation(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, ge_gamma=2.0):
    """Euler plus a (ge_gamma - 1) correction from the change of slope (openreview o2ND9v0CeK)."""

    def step(x, i, sigmas, denoised, d, previous_d, predict_at):
        if sigmas[i + 1] == 0:
            return denoised
        dt = sigmas[i + 1] - sigmas[i]
        x = x + d * dt
        if i >= 1:
            x = x + (ge_gamma - 1) * (d - previous_d) * dt
        return x

    return run_slopes(model, x, sigmas, extra_args, callback, step)
