"""What the sampler families share: the model call, the progress report, default noise, the slope loop and the
ancestral loop."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from diffusion.denoisers import to_d
from diffusion.noise import BrownianTreeNoiseSampler, NoiseSampler, ancestral_step, default_noise_sampler

# step(x, sigma, sigma_next, sigma_down, denoised, predict) -> (x at sigma_down, whether to add noise up to sigma_next)
AncestralStep = Callable[..., tuple[Tensor, bool]]


def predict(model, x: Tensor, sigma: Tensor, extra: dict) -> Tensor:
    """The model's denoised prediction at one noise level, given to it once per batch item."""
    return model(x, sigma * x.new_ones([x.shape[0]]), **extra)


def report(callback, x: Tensor, i: int, sigma: Tensor, denoised: Tensor, **more) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised, **more})


def gaussian_noise(x: Tensor, extra: dict, noise_sampler: NoiseSampler | None) -> NoiseSampler:
    return noise_sampler or default_noise_sampler(x, seed=extra.get("seed"))


def brownian_noise(x: Tensor, sigmas: Tensor, extra: dict, noise_sampler: NoiseSampler | None,
                   cpu: bool = True) -> NoiseSampler:
    """The given noise sampler, else a Brownian tree over the non-zero sigma range (on x's device if not cpu)."""
    if noise_sampler is not None:
        return noise_sampler
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=extra.get("seed"), cpu=cpu)


def run_slopes(model, x, sigmas, extra_args, callback, step) -> Tensor:
    """The loop of the ODE samplers in sigma: predict, report, the slope d = (x - denoised) / sigma, then
    x = step(x, i, sigmas, denoised, d, previous_d, predict_at)."""
    extra = extra_args or {}

    def predict_at(x_: Tensor, sigma: Tensor) -> Tensor:
        return predict(model, x_, sigma, extra)

    previous_d = None
    for i in range(len(sigmas) - 1):
        denoised = predict_at(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        report(callback, x, i, sigmas[i], denoised)
        x = step(x, i, sigmas, denoised, d, previous_d, predict_at)
        previous_d = d
    return x


def run_ancestral(model, x, sigmas, extra_args, callback, noise_sampler, eta: float, s_noise: float,
                  step: AncestralStep) -> Tensor:
    """k-diffusion's ancestral loop: predict, `step` deterministically down to sigma_down, then (if the step asks)
    fresh noise * s_noise * sigma_up back up to the next sigma."""
    extra = extra_args or {}
    noise_sampler = gaussian_noise(x, extra, noise_sampler)

    def predict_at(x_: Tensor, sigma: Tensor) -> Tensor:
        return predict(model, x_, sigma, extra)

    for i in range(len(sigmas) - 1):
        denoised = predict_at(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        report(callback, x, i, sigmas[i], denoised)
        x, add_noise = step(x, sigmas[i], sigmas[i + 1], sigma_down, denoised, predict_at)
        if add_noise:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x
