"""The public parity workflow dpmpp_2m / karras / empty negative prompt, pinned without its 2 GB checkpoint.

tests/fixtures/parity_dpmpp2m_karras.json holds the numbers sdgraph used when its image matched ComfyUI 0.8.0's
bit for bit: the sigmas, the timesteps given to the UNet, the tokens of both prompts and the first noise values.
The sampling loop itself is checked against a float64 loop written here from DPM-Solver++(2M)'s formulas, with a
stand-in UNet whose output depends on the context, so guidance and the negative prompt's conditioning show.

Deviations measured against ComfyUI's PNG for this workflow (the matching run is at 89 dB, at most 1/255 apart),
and what catches each. Here: the negative "" padded with token 0 (26.5 dB), an unpadded [start, end] negative
(27.0 dB), no start token (46.0 dB), a zeroed negative context (25.8 dB), first-order steps only (41.9 dB), a
fractional timestep (69.5 dB), noise * sigma instead of noise * sqrt(1 + sigma^2) at the first karras sigma, which
is a float32 step above sigma_max (62.7 dB). In test_prompt.py (encoding against transformers' forward, which has
no padding mask): padding hidden by an attention mask (35.6 dB).
"""

import json
import math
from pathlib import Path

import pytest
import torch

from diffusion.latent import CondEntry, Conditioning, Latent
from diffusion.noise import prepare_noise
from diffusion.prompt import tokenize_prompt
from diffusion.sampling import SD1_LATENT_SCALE, sample, select_sigmas
from diffusion.schedules import calculate_sigmas, sd1_schedule
from diffusion.tokenizer import ClipTokenizer

FIXTURE = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "parity_dpmpp2m_karras.json").read_text())
WORKFLOW = FIXTURE["workflow"]
SD1 = sd1_schedule()
BOS, EOS = 49406, 49407
SETTINGS = {k: WORKFLOW[k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler")}


def chunk_of(body: list[int]) -> list[int]:
    return [BOS, *body, EOS] + [EOS] * (77 - len(body) - 2)


class ContextUNet:
    """eps = x_scaled * (mean of the row's context): rows of a batched call each follow their own prompt."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context):
        self.calls.append((x.clone(), t.clone(), context.clone()))
        return x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def context(value: float) -> Conditioning:
    """A 77-token context whose mean is `value` but whose tokens differ (so a zeroed or cut context shows)."""
    ramp = torch.linspace(-1.0, 1.0, 77).view(1, 77, 1).expand(1, 77, 8)
    return Conditioning((CondEntry(value + ramp.clone()),))


def test_karras_sigmas_are_the_recorded_ones():
    want = torch.tensor(FIXTURE["sigmas"], dtype=torch.float32)
    assert torch.equal(calculate_sigmas(SD1, "karras", WORKFLOW["steps"]), want)
    assert torch.equal(select_sigmas(SD1, "karras", "dpmpp_2m", WORKFLOW["steps"]), want)  # nothing dropped
    # the first karras sigma is a float32 step above sigma_max: it must still count as full denoise
    assert float(want[0]) != float(SD1.sigma_max) and math.isclose(float(want[0]), float(SD1.sigma_max), rel_tol=1e-5)


@pytest.mark.parametrize("side", ["positive", "negative"])
def test_prompts_tokenize_to_the_recorded_chunks(side):
    chunks = tokenize_prompt(ClipTokenizer(), WORKFLOW[side]).chunks
    assert len(chunks) == 1
    assert [token for token, _ in chunks[0]] == chunk_of(FIXTURE[f"{side}_body"])
    assert {weight for _, weight in chunks[0]} == {1.0}


def test_empty_prompt_is_start_then_end_tokens_to_77():
    assert chunk_of(FIXTURE["negative_body"]) == [BOS] + [EOS] * 76


def test_initial_noise_is_the_recorded_draw():
    noise = prepare_noise(torch.zeros(WORKFLOW["latent_shape"]), WORKFLOW["seed"])
    assert noise.flatten()[:8].tolist() == FIXTURE["initial_noise_first_values"]


def golden_dpmpp_2m_cfg(
    noise: torch.Tensor, sig: list[float], cond_mean: float, uncond_mean: float, cfg: float
) -> torch.Tensor:
    """float64: eps guidance on the stand-in, then DPM-Solver++(2M) in sigma-ratio form."""
    x = noise.double() * math.sqrt(1 + sig[0] ** 2)
    old = None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        x_in = x / math.sqrt(s**2 + 1)
        cond, uncond = x - x_in * cond_mean * s, x - x_in * uncond_mean * s
        den = uncond + (cond - uncond) * cfg
        if s_next == 0:
            x = den
        else:
            blended = den
            if old is not None:
                r = math.log(sig[i - 1] / s) / math.log(s / s_next)  # previous step over this one, in log sigma
                blended = den + (den - old) / (2 * r)
            x = (s_next / s) * x + (1 - s_next / s) * blended
        old = den
    return x


def test_sampling_follows_the_recorded_path_and_the_formulas():
    latent = Latent(torch.zeros(WORKFLOW["latent_shape"]))
    positive, negative = context(0.6), context(0.2)
    unet = ContextUNet()
    out = sample(unet, latent, positive, negative, **SETTINGS)

    noise = prepare_noise(latent.samples, WORKFLOW["seed"])
    assert [float(t[0]) for _, t, _ in unet.calls] == FIXTURE["unet_timesteps"]
    for x_in, t, ctx in unet.calls:  # one call per step: both prompts batched, contexts untouched
        assert x_in.shape[0] == 2 and t.shape == (2,) and ctx.shape == (2, 77, 8)
        assert {round(float(m), 4) for m in ctx.mean(dim=(1, 2))} == {0.6, 0.2}
    torch.testing.assert_close(unet.calls[0][0][:1], noise, rtol=1e-6, atol=1e-6)  # noise * sqrt(1 + sigma^2) in

    want = golden_dpmpp_2m_cfg(noise, FIXTURE["sigmas"], 0.6, 0.2, WORKFLOW["cfg"])
    torch.testing.assert_close(out.samples.double(), want / SD1_LATENT_SCALE, rtol=1e-5, atol=1e-5)
