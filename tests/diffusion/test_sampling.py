import math

import pytest
import torch

from diffusion import samplers
from diffusion.latent import CondEntry, Conditioning, Latent
from diffusion.noise import inpaint_noise, prepare_noise
from diffusion.sampling import SD1_LATENT_SCALE, sample, select_sigmas, trim_sigmas
from diffusion.schedules import calculate_sigmas, sd1_schedule

SD1 = sd1_schedule()
pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")


class LinearUNet:
    """eps = x_scaled * mean(context): a stand-in whose guidance and batching effects are easy to compute."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context):
        self.calls.append((x.clone(), t.clone(), context.clone()))
        return x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def text(value, tokens=77):
    return Conditioning((CondEntry(torch.full((1, tokens, 8), float(value))),))


POS, NEG = text(0.6), text(0.2)


def run(latent, **kw):
    args = dict(seed=1, steps=4, cfg=1.0, sampler_name="euler", scheduler="karras")
    args.update(kw)
    unet = LinearUNet()
    return unet, sample(unet, latent, POS, NEG, **args)


def test_txt2img_starts_from_noise_at_sigma_max_and_unscales_the_result():
    latent = Latent(torch.zeros(1, 4, 4, 4))
    unet, out = run(latent, seed=123)
    noise = prepare_noise(latent.samples, 123)
    torch.testing.assert_close(unet.calls[0][0], noise)  # x / sqrt(1 + sigma^2) with x = noise * sqrt(1 + sigma^2)
    assert unet.calls[0][1].tolist() == [999.0]
    assert len(unet.calls) == 4 and out.samples.shape == (1, 4, 4, 4)


def test_end_to_end_golden_euler_with_cfg():
    """Euler, karras, cfg 3, written out by hand from ComfyUI's formulas in float64."""
    latent = Latent(torch.zeros(1, 4, 2, 2))
    _, out = run(latent, seed=5, steps=5, cfg=3.0)
    sig = [float(s) for s in calculate_sigmas(SD1, "karras", 5)]
    x = prepare_noise(latent.samples, 5).double() * math.sqrt(1 + sig[0] ** 2)
    for i in range(5):
        x_in = x / math.sqrt(sig[i] ** 2 + 1)
        cond, uncond = x - x_in * 0.6 * sig[i], x - x_in * 0.2 * sig[i]
        den = uncond + (cond - uncond) * 3.0
        x = x + (x - den) / sig[i] * (sig[i + 1] - sig[i])
    torch.testing.assert_close(out.samples.double(), x / SD1_LATENT_SCALE, rtol=1e-5, atol=1e-5)


def test_img2img_denoise_selects_the_tail_of_a_longer_schedule():
    full = calculate_sigmas(SD1, "normal", 20)
    assert torch.equal(select_sigmas(SD1, "normal", "euler", 10, 0.5), full[-11:])
    assert torch.equal(select_sigmas(SD1, "karras", "euler", 7, 0.3), calculate_sigmas(SD1, "karras", 23)[-8:])
    assert torch.equal(select_sigmas(SD1, "normal", "euler", 10, 1.0), calculate_sigmas(SD1, "normal", 10))
    assert len(select_sigmas(SD1, "normal", "euler", 10, 0.0)) == 0


def test_img2img_starts_from_latent_plus_noise_times_sigma():
    samples = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    unet, _ = run(Latent(samples), seed=9, steps=10, denoise=0.5)
    sigma0 = float(select_sigmas(SD1, "karras", "euler", 10, 0.5)[0])
    x = prepare_noise(samples, 9) * sigma0 + samples * SD1_LATENT_SCALE
    torch.testing.assert_close(unet.calls[0][0], x / math.sqrt(sigma0**2 + 1))
    assert len(unet.calls) == 10


@pytest.mark.parametrize("name", sorted(samplers.DISCARD_PENULTIMATE_SIGMA_SAMPLERS))
def test_some_samplers_drop_the_penultimate_sigma(name):
    longer = calculate_sigmas(SD1, "karras", 11)
    got = select_sigmas(SD1, "karras", name, 10, 1.0)
    assert len(got) == 11 and torch.equal(got, torch.cat([longer[:-2], longer[-1:]]))


def test_advanced_window():
    sigmas = calculate_sigmas(SD1, "normal", 10)
    part = trim_sigmas(sigmas, start_step=0, last_step=4, force_full_denoise=False)
    assert torch.equal(part, sigmas[:5]) and part[-1] > 0
    full = trim_sigmas(sigmas, 0, 4, force_full_denoise=True)
    assert torch.equal(full[:-1], sigmas[:4]) and full[-1] == 0 and sigmas[4] > 0, "input untouched"
    assert torch.equal(trim_sigmas(sigmas, 4, 10, True), sigmas[4:])
    assert trim_sigmas(sigmas, 10, None, False) is None


def test_advanced_two_pass_with_leftover_noise():
    latent = Latent(torch.zeros(1, 4, 4, 4))
    _, first = run(latent, steps=10, start_step=0, last_step=6, force_full_denoise=False)
    unet, second = run(first, steps=10, add_noise=False, start_step=6, last_step=10000)
    sigma6 = float(calculate_sigmas(SD1, "karras", 10)[6])
    # no new noise: the second pass starts exactly from the first pass's leftover-noise latent
    torch.testing.assert_close(unet.calls[0][0], first.samples * SD1_LATENT_SCALE / math.sqrt(sigma6**2 + 1))
    assert len(unet.calls) == 4
    _, single = run(latent, steps=10)
    torch.testing.assert_close(second.samples, single.samples, rtol=1e-5, atol=1e-5)


def test_nothing_to_do_returns_the_input():
    latent = Latent(torch.randn(1, 4, 2, 2))
    assert run(latent, denoise=0.0)[1] is latent
    unet, out = run(latent, steps=5, start_step=5)
    assert out is latent and not unet.calls


def test_callback_reports_every_step():
    seen = []
    run(Latent(torch.zeros(1, 4, 2, 2)), steps=6, callback=lambda *a: seen.append(a))
    assert [(s, t) for s, t, _, _ in seen] == [(i, 6) for i in range(6)]
    assert seen[0][2].shape == seen[0][3].shape == (1, 4, 2, 2)


def test_output_keeps_mask_and_batch_index():
    mask = torch.ones(1, 1, 16, 16)
    latent = Latent(torch.zeros(2, 4, 2, 2), noise_mask=mask, batch_index=(4, 7))
    _, out = run(latent)
    assert out.noise_mask is mask and out.batch_index == (4, 7)


def test_batch_index_sample_reproduces_its_place_in_the_batch():
    _, batch = run(Latent(torch.zeros(3, 4, 4, 4), batch_index=(0, 1, 2)), seed=2**63 + 7)
    _, single = run(Latent(torch.zeros(1, 4, 4, 4), batch_index=(2,)), seed=2**63 + 7)
    assert torch.equal(single.samples, batch.samples[2:3])


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "ddim"])
@pytest.mark.parametrize("seed", [2**63, 2**64 - 1])
def test_huge_seeds(name, seed):
    latent = Latent(torch.zeros(1, 4, 2, 2), noise_mask=torch.ones(1, 1, 16, 16))
    a = run(latent, seed=seed, sampler_name=name)[1].samples
    b = run(latent, seed=seed, sampler_name=name)[1].samples
    assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("name", samplers.SAMPLER_NAMES)
def test_inpainting_keeps_every_unmasked_value_exactly(name):
    samples = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:, :] = 1.0  # repaint the bottom half
    latent = Latent(samples, noise_mask=mask)
    _, out = run(latent, sampler_name=name, steps=5, cfg=2.5, seed=11)
    assert torch.equal(out.samples[:, :, :2], samples[:, :, :2])
    assert not torch.equal(out.samples[:, :, 2:], samples[:, :, 2:])
    assert torch.isfinite(out.samples).all()


def test_ddim_inpaints_with_fresh_noise_in_the_kept_area():
    samples = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2:, :] = 1.0
    sigma0 = float(calculate_sigmas(SD1, "karras", 4)[0])
    for name, noise in [("ddim", inpaint_noise(samples.shape, 3)), ("euler", prepare_noise(samples, 3))]:
        unet, _ = run(Latent(samples, noise_mask=mask), sampler_name=name, seed=3)
        kept = (samples * SD1_LATENT_SCALE + noise * sigma0) / math.sqrt(sigma0**2 + 1)
        torch.testing.assert_close(unet.calls[0][0][:, :, :2], kept[:, :, :2])


def test_unknown_names_and_bad_inputs_are_refused():
    latent = Latent(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="unknown sampler"):
        run(latent, sampler_name="nope")
    with pytest.raises(ValueError, match="unknown scheduler"):
        run(latent, scheduler="nope")
    with pytest.raises(ValueError, match="seed"):
        run(latent, seed=-1)
    with pytest.raises(ValueError, match="steps"):
        run(latent, steps=0)


def test_accepts_comfyui_shaped_inputs():
    unet = LinearUNet()
    out = sample(unet, {"samples": torch.zeros(1, 4, 2, 2)}, POS.to_comfy(), NEG.to_comfy(), seed=0, steps=2,
                 cfg=7.0, sampler_name="dpmpp_2m", scheduler="normal")
    assert isinstance(out, Latent) and out["samples"].shape == (1, 4, 2, 2)
    assert len(unet.calls) == 2 and unet.calls[0][0].shape[0] == 2, "cond and uncond in one call"
