"""Issue #13: KSamplerAdvanced handover. Base steps 0..k with return_with_leftover_noise, then k..n with add_noise
disabled (the same model, or the refiner with its own model, schedule and conditioning)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from diffusion.denoisers import CFGDenoiser, ModelDenoiser
from diffusion.families import FAMILIES, ModelSampling
from diffusion.latent import CondEntry, Conditioning, Latent
from diffusion.samplers import SAMPLERS
from diffusion.sampling import sample, select_sigmas
from diffusion.schedules import model_schedule

pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")
MEAN, VAR = 0.3, 0.25  # the clean latents are N(MEAN, VAR): the ideal denoiser is linear in x


def gaussian_eps_unet(x_in, t, context, **_):
    """eps of the ideal denoiser for N(MEAN, VAR) data, at sigma recovered from the SD1 table's timestep t."""
    sigma = model_schedule(ModelSampling()).sigmas[t.long()].view(-1, 1, 1, 1)
    x = x_in * (sigma**2 + 1).sqrt()
    denoised = MEAN + VAR / (VAR + sigma**2) * (x - MEAN) * context.mean()
    return (x - denoised) / sigma


POS = Conditioning((CondEntry(torch.ones(1, 4, 8)),))
NEG = Conditioning((CondEntry(torch.full((1, 4, 8), 0.5)),))
STEPS, K = 8, 5


def run(unet, latent, *, family=FAMILIES["sd1"], positive=POS, negative=NEG, **kw):
    args = dict(seed=7, steps=STEPS, cfg=3.0, scheduler="karras", family=family)
    return sample(unet, latent, positive, negative, **(args | kw))


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m"])
def test_the_handed_over_latent_is_the_full_runs_state_at_step_k(sampler_name):
    latent = Latent(torch.zeros(1, 4, 4, 4))
    states = {}
    run(gaussian_eps_unet, latent, sampler_name=sampler_name,
        callback=lambda i, total, x, denoised: states.setdefault(i, x.clone()))
    first = run(gaussian_eps_unet, latent, sampler_name=sampler_name, start_step=0, last_step=K,
                force_full_denoise=False)
    torch.testing.assert_close(first.samples * FAMILIES["sd1"].latent_scale, states[K], rtol=1e-5, atol=1e-5)


def test_euler_halves_equal_one_full_run():
    latent = Latent(torch.zeros(1, 4, 4, 4))
    full = run(gaussian_eps_unet, latent, sampler_name="euler")
    first = run(gaussian_eps_unet, latent, sampler_name="euler", last_step=K, force_full_denoise=False)
    second = run(gaussian_eps_unet, first, sampler_name="euler", add_noise=False, start_step=K, last_step=10000)
    torch.testing.assert_close(second.samples, full.samples, rtol=1e-5, atol=1e-5)


def test_dpmpp_2m_second_half_restarts_its_history_as_comfyui_does():
    """A multistep sampler's second half starts without the first half's last denoised (its first step is first
    order), as two ComfyUI KSamplerAdvanced nodes do: exactly dpmpp_2m run from the handed-over state on
    sigmas[k:], with no noise added."""
    latent = Latent(torch.zeros(1, 4, 4, 4))
    scale = FAMILIES["sd1"].latent_scale
    first = run(gaussian_eps_unet, latent, sampler_name="dpmpp_2m", last_step=K, force_full_denoise=False)
    second = run(gaussian_eps_unet, first, sampler_name="dpmpp_2m", add_noise=False, start_step=K)
    schedule = model_schedule(ModelSampling())
    sigmas = select_sigmas(schedule, "karras", "dpmpp_2m", STEPS)
    model = CFGDenoiser(ModelDenoiser(gaussian_eps_unet, schedule), POS, NEG, 3.0)
    with torch.no_grad():
        want = SAMPLERS["dpmpp_2m"](model, first.samples * scale, sigmas[K:]) / scale
    torch.testing.assert_close(second.samples, want, rtol=1e-5, atol=1e-5)


def zero_eps(x_in, t, context, **_):
    return torch.zeros_like(x_in)


class Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x_in, t, context, **extra):
        self.calls.append({"t": t.clone(), "context": context.clone(), **extra})
        return self.fn(x_in, t, context, **extra)


def test_the_refiners_model_schedule_and_conditioning_run_the_second_half():
    base_family = replace(FAMILIES["sdxl"], sampling=ModelSampling(linear_end=0.012))
    refiner_family = replace(FAMILIES["sdxl_refiner"], sampling=ModelSampling(linear_end=0.02))
    base, refiner = Recorder(zero_eps), Recorder(zero_eps)
    base_cond = Conditioning((CondEntry(torch.ones(1, 4, 2048), torch.ones(1, 1280)),))
    ref_pos = Conditioning((CondEntry(torch.full((1, 4, 1280), 2.0), torch.ones(1, 1280), aesthetic_score=6.0),))
    ref_neg = Conditioning((CondEntry(torch.full((1, 4, 1280), 3.0), torch.ones(1, 1280), aesthetic_score=2.5),))
    latent = Latent(torch.zeros(1, 4, 4, 4))
    first = run(base, latent, family=base_family, positive=base_cond, negative=base_cond, sampler_name="euler",
                last_step=K, force_full_denoise=False)
    run(refiner, first, family=refiner_family, positive=ref_pos, negative=ref_neg, sampler_name="euler",
        add_noise=False, start_step=K)
    assert len(base.calls) == K and len(refiner.calls) == STEPS - K
    assert all(c["y"].shape[-1] == 2816 for c in base.calls) and all(c["y"].shape[-1] == 2560 for c in refiner.calls)
    assert sorted(float(v) for v in refiner.calls[0]["context"].mean(dim=(1, 2))) == [2.0, 3.0]
    schedule = model_schedule(refiner_family.sampling)
    sigma_k = select_sigmas(schedule, "karras", "euler", STEPS)[K]
    assert int(refiner.calls[0]["t"][0]) == int(schedule.timestep(sigma_k))
    assert int(refiner.calls[0]["t"][0]) != int(model_schedule(base_family.sampling).timestep(
        select_sigmas(model_schedule(base_family.sampling), "karras", "euler", STEPS)[K]))
