"""Issue #13: prediction types and model schedules (ComfyUI's comfy/model_sampling.py and ModelSamplingDiscrete).

Reference numbers come from the published formulas, written out here in numpy/math, not from our code."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffusion import samplers
from diffusion.denoisers import ModelDenoiser
from diffusion.families import FAMILIES, ModelSampling
from diffusion.latent import CondEntry, Conditioning, Latent
from diffusion.sampling import sample
from diffusion.schedules import model_schedule, sd1_schedule

SD1 = sd1_schedule()
pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")


def constant_unet(value):
    return lambda x, t, context, **_: torch.full_like(x, value)


def test_v_prediction_denoised_is_the_published_formula():
    """v model (sigma_data 1): x0 = x / (s^2 + 1) - v * s / sqrt(s^2 + 1); x = 3, s = 2, v = 0.5 -> 0.6 - 1/sqrt(5)."""
    x, sigma = torch.full((1, 4, 2, 2), 3.0), torch.tensor([2.0])
    out = ModelDenoiser(constant_unet(0.5), SD1, "v_prediction")(x, sigma, torch.zeros(1, 1, 8))
    torch.testing.assert_close(out, torch.full_like(x, 0.6 - 1 / math.sqrt(5)))


def test_eps_and_x0_predictions():
    x, sigma = torch.full((1, 4, 2, 2), 3.0), torch.tensor([2.0])
    eps = ModelDenoiser(constant_unet(0.5), SD1, "eps")(x, sigma, torch.zeros(1, 1, 8))
    x0 = ModelDenoiser(constant_unet(0.5), SD1, "x0")(x, sigma, torch.zeros(1, 1, 8))
    torch.testing.assert_close(eps, torch.full_like(x, 3.0 - 0.5 * 2.0))
    torch.testing.assert_close(x0, torch.full_like(x, 0.5))


def test_lcm_denoised_uses_the_distilled_timestep_and_boundary_conditions():
    """LCM: t = network timestep * 10, c_skip = 0.25 / (t^2 + 0.25), c_out = t / sqrt(t^2 + 0.25),
    x0 = c_out * (x - eps * sigma) + c_skip * x; the lowest distilled level is network timestep 19."""
    schedule = model_schedule(ModelSampling("lcm"))
    sigma = schedule.sigmas[:1].clone()
    x = torch.full((1, 4, 2, 2), 3.0)
    out = ModelDenoiser(constant_unet(0.5), schedule, "lcm")(x, sigma, torch.zeros(1, 1, 8))
    t, s = 190.0, float(sigma)
    want = t / math.sqrt(t * t + 0.25) * (3.0 - 0.5 * s) + 0.25 / (t * t + 0.25) * 3.0
    torch.testing.assert_close(out, torch.full_like(x, want))


def test_lcm_schedule_is_every_20th_level_from_the_top():
    schedule = model_schedule(ModelSampling("lcm"))
    assert len(schedule.sigmas) == 50
    torch.testing.assert_close(schedule.sigmas, SD1.sigmas[19::20])
    assert int(schedule.timestep(schedule.sigmas[-1:])) == 999 and int(schedule.timestep(schedule.sigmas[:1])) == 19
    torch.testing.assert_close(schedule.sigma(torch.tensor(999.0)), SD1.sigmas[999])


def _numpy_sigmas(start, end, n=1000, zsnr=False):
    """make_beta_schedule("linear") and, for zsnr, Lin et al. 2023 algorithm 1 on sqrt(alpha_bar) with the last
    alpha_bar set to 4.8973451890853435e-08 (ComfyUI's finite stand-in for 0)."""
    betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    alphas_bar = np.cumprod(1.0 - betas)
    if zsnr:
        sqrt_ab = np.sqrt(alphas_bar)
        first, last = sqrt_ab[0], sqrt_ab[-1]
        sqrt_ab = (sqrt_ab - last) * first / (first - last)
        alphas_bar = sqrt_ab**2
        alphas_bar[-1] = 4.8973451890853435e-08
    return np.sqrt((1 - alphas_bar) / alphas_bar)


def test_zsnr_schedule_matches_the_published_rescale():
    schedule = model_schedule(ModelSampling("v_prediction", zsnr=True))
    want = _numpy_sigmas(0.00085, 0.012, zsnr=True)
    for t in (0, 250, 500, 900, 998, 999):
        assert float(schedule.sigmas[t]) == pytest.approx(want[t], rel=1e-6)
    assert float(schedule.sigma_max) == pytest.approx(math.sqrt((1 - 4.8973451890853435e-08) / 4.8973451890853435e-08),
                                                      rel=1e-6)  # 4518.9
    assert float(schedule.sigma_min) == pytest.approx(float(SD1.sigma_min), rel=1e-6)  # the first level is kept


def test_schedule_follows_the_models_beta_range():
    schedule = model_schedule(ModelSampling(linear_start=0.0001, linear_end=0.02))
    want = _numpy_sigmas(0.0001, 0.02)
    assert float(schedule.sigma_max) == pytest.approx(want[-1], rel=1e-6)
    assert float(schedule.sigma_max) != pytest.approx(float(SD1.sigma_max), rel=1e-3)


V_ZSNR = replace(FAMILIES["sd1"], sampling=ModelSampling("v_prediction", zsnr=True))
TARGET = 0.7


def ideal_v_unet(schedule):
    """The v a perfect network predicts when every clean latent is TARGET, at the table sigma of the timestep."""
    def unet(x_in, t, context, **_):
        s = schedule.sigmas[t.long()].view(-1, 1, 1, 1).double()
        x = x_in.double() * (s * s + 1).sqrt()
        return ((x / (s * s + 1) - TARGET) * (s * s + 1).sqrt() / s).float()
    return unet


@pytest.mark.parametrize("sampler_name", samplers.SAMPLER_NAMES)
def test_every_sampler_drives_a_v_model_on_a_zero_terminal_snr_schedule(sampler_name):
    """sigma_max is ~4519 with zsnr: every sampler must stay finite and land on what the v model denoises to
    (dpm_fast and dpm_adaptive stop at the last non-zero sigma, as in ComfyUI: that much noise is left)."""
    schedule = model_schedule(V_ZSNR.sampling)
    positive = Conditioning((CondEntry(torch.zeros(1, 1, 8)),))
    out = sample(ideal_v_unet(schedule), Latent(torch.zeros(1, 4, 4, 4)), positive, positive, seed=3, steps=8,
                 cfg=1.0, sampler_name=sampler_name, scheduler="karras", family=V_ZSNR)
    assert torch.isfinite(out.samples).all()
    leftover = 5 * float(schedule.sigma_min) if sampler_name in ("dpm_fast", "dpm_adaptive") else 0.0
    torch.testing.assert_close(out.samples * V_ZSNR.latent_scale, torch.full_like(out.samples, TARGET),
                               atol=2e-2 + leftover, rtol=0)
