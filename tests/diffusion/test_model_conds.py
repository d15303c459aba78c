"""Issue #13: SDXL label vectors (ComfyUI's model_base.SDXL / SDXLRefiner.encode_adm, encode_model_conds) and the
extra input channels of inpainting models (model_base.concat_cond), per conditioning entry."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.adm import number_embedding, refiner_label, sdxl_label
from diffusion.denoisers import CFGDenoiser, ModelDenoiser
from diffusion.families import FAMILIES
from diffusion.latent import CondEntry, Conditioning, Latent
from diffusion.model_conds import (
    BLANK_INPAINT_LATENT,
    check_conditioning,
    concat_channels,
    label_vector,
    model_inputs,
)
from diffusion.sampling import sample, select_sigmas
from diffusion.schedules import sd1_schedule

SDXL, REFINER, INPAINT = FAMILIES["sdxl"], FAMILIES["sdxl_refiner"], FAMILIES["sd1_inpaint"]


def reference_embedding(value: float) -> list[float]:
    """Timestep(256): freqs exp(-ln(10000) * i / 128), i < 128; [cos(v * f), sin(v * f)]."""
    freqs = [math.exp(-math.log(10000) * i / 128) for i in range(128)]
    return [math.cos(value * f) for f in freqs] + [math.sin(value * f) for f in freqs]


def test_number_embedding_is_cos_then_sin():
    torch.testing.assert_close(number_embedding([512.0])[0].double(), torch.tensor(reference_embedding(512.0),
                               dtype=torch.float64), atol=1e-4, rtol=0)


def test_sdxl_label_order_is_pooled_height_width_crop_h_crop_w_target_height_target_width():
    pooled = torch.arange(1280.0).unsqueeze(0)
    y = sdxl_label(pooled, height=512, width=768, crop_h=8, crop_w=16, target_height=1024, target_width=640)
    assert y.shape == (1, 2816)
    torch.testing.assert_close(y[:, :1280], pooled)
    for i, value in enumerate((512, 768, 8, 16, 1024, 640)):
        torch.testing.assert_close(y[0, 1280 + 256 * i:1280 + 256 * (i + 1)], number_embedding([value])[0])


def test_refiner_label_ends_with_the_aesthetic_score():
    y = refiner_label(torch.zeros(2, 1280), height=1024, width=1024, crop_h=0, crop_w=0, aesthetic_score=6.0)
    assert y.shape == (2, 2560)
    torch.testing.assert_close(y[1, -256:], number_embedding([6.0])[0])


def entry(**fields):
    return CondEntry(torch.zeros(1, 77, 2048), torch.ones(1, 1280), **fields)


def test_plain_entry_on_sdxl_takes_the_latents_size_crop_zero_and_target_equal_to_size():
    """encode_model_conds: width = latent W * 8, height = latent H * 8 (here 96 x 64 cells -> 768 x 512)."""
    y = label_vector(SDXL, entry(), 0, (64, 96))
    want = sdxl_label(torch.ones(1, 1280), height=512, width=768, crop_h=0, crop_w=0, target_height=512,
                      target_width=768)
    torch.testing.assert_close(y, want)
    y = label_vector(SDXL, entry(width=1024, height=1024, crop_w=4, crop_h=2, target_width=800,
                                 target_height=600), 0, (64, 96))
    torch.testing.assert_close(y, sdxl_label(torch.ones(1, 1280), height=1024, width=1024, crop_h=2, crop_w=4,
                                             target_height=600, target_width=800))


def test_refiner_default_aesthetic_score_is_6_positive_and_2_5_negative():
    pooled = torch.ones(1, 1280)
    for side, score in ((0, 6.0), (1, 2.5)):
        want = refiner_label(pooled, height=512, width=512, crop_h=0, crop_w=0, aesthetic_score=score)
        torch.testing.assert_close(label_vector(REFINER, entry(), side, (64, 64)), want)
    y = label_vector(REFINER, entry(aesthetic_score=7.5, width=1024, height=768), 1, (64, 64))
    want = refiner_label(pooled, height=768, width=1024, crop_h=0, crop_w=0, aesthetic_score=7.5)
    torch.testing.assert_close(y, want)


def test_sd1_conditioning_on_an_sdxl_model_is_a_clear_error():
    sd1 = Conditioning((CondEntry(torch.zeros(1, 77, 768), torch.zeros(1, 768)),))
    with pytest.raises(ValueError, match=r"SDXL base.*positive conditioning entry 1.*SD1\.x text encoder"):
        check_conditioning(SDXL, (sd1, sd1))
    with pytest.raises(ValueError, match="negative conditioning entry 1 has no pooled output"):
        check_conditioning(SDXL, (Conditioning((entry(),)), Conditioning((CondEntry(torch.zeros(1, 77, 2048)),))))
    check_conditioning(FAMILIES["sd1"], (sd1, sd1))


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, **extra):
        self.calls.append({"x": x.clone(), "t": t.clone(), "context": context.clone(), **extra})
        return torch.zeros_like(x[:, :4])


def test_label_vectors_are_batched_like_contexts_through_cfg():
    """Cond and uncond go in one call; y is cat'd in the same order as the contexts (each entry its own)."""
    unet = Recorder()
    positive = Conditioning((CondEntry(torch.ones(1, 77, 2048), torch.ones(1, 1280), width=1024, height=1024),))
    negative = Conditioning((entry(),))
    x = torch.zeros(1, 4, 8, 8)
    model = CFGDenoiser(ModelDenoiser(unet, sd1_schedule()), positive, negative, 5.0, None,
                        model_inputs(SDXL, x, None))
    model(x, torch.tensor([1.0]))
    assert len(unet.calls) == 1 and unet.calls[0]["y"].shape == (2, 2816)
    by_side = [label_vector(SDXL, negative.entries[0], 1, (8, 8)), label_vector(SDXL, positive.entries[0], 0, (8, 8))]
    order = [int(c.mean()) for c in unet.calls[0]["context"]]  # 0: the negative's context, 1: the positive's
    assert sorted(order) == [0, 1]
    torch.testing.assert_close(unet.calls[0]["y"], torch.cat([by_side[k] for k in order]))


def test_sdxl_sampling_scales_by_the_sdxl_latent_factor_and_passes_y():
    unet = Recorder()
    positive = Conditioning((entry(),))
    latent = Latent(torch.ones(1, 4, 4, 4))
    out = sample(unet, latent, positive, positive, seed=0, steps=4, cfg=1.0, sampler_name="euler",
                 scheduler="normal", add_noise=False, start_step=3, family=SDXL)
    first = unet.calls[0]
    assert first["y"].shape == (1, 2816) and len(unet.calls) == 1
    # the last step alone, no noise: x_in = latent * 0.13025 / sqrt(sigma^2 + 1)
    sig = float(select_sigmas(sd1_schedule(), "normal", "euler", 4)[3])
    torch.testing.assert_close(first["x"], torch.full_like(first["x"], 0.13025 / math.sqrt(sig**2 + 1)))
    # eps 0 denoises to x itself: the latent comes back after unscaling by the same factor
    torch.testing.assert_close(out.samples, latent.samples)


def test_concat_from_the_entry_is_mask_then_scaled_masked_image():
    latent_in = torch.zeros(1, 4, 4, 4)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16, :] = 1.0
    image = torch.full((1, 4, 4, 4), 2.0)
    out = concat_channels(CondEntry(torch.zeros(1, 1, 8), concat_latent_image=image, concat_mask=mask),
                          latent_in, None, 0.18215)
    assert out.shape == (1, 5, 4, 4)
    assert out[0, 0, :2].eq(1).all() and out[0, 0, 2:].eq(0).all()
    torch.testing.assert_close(out[:, 1:], image * 0.18215)


def test_concat_falls_back_to_the_latents_noise_mask_and_the_latent_itself():
    """VAEEncodeForInpaint + an inpainting model: ComfyUI uses the sampled latent and its (rounded) denoise mask."""
    latent_in = torch.randn(2, 4, 4, 4)
    denoise_mask = torch.full((2, 4, 4, 4), 0.4)
    denoise_mask[:, :, 0] = 0.6
    out = concat_channels(CondEntry(torch.zeros(1, 1, 8)), latent_in, denoise_mask, 0.18215)
    torch.testing.assert_close(out[:, 1:], latent_in)
    assert out[:, 0, 0].eq(1).all() and out[:, 0, 1:].eq(0).all()


def test_concat_without_any_mask_is_ones_and_a_black_images_latent():
    out = concat_channels(CondEntry(torch.zeros(1, 1, 8)), torch.randn(1, 4, 2, 3), None, 0.18215)
    assert out[:, 0].eq(1).all()
    torch.testing.assert_close(out[0, 1:, 1, 2], torch.tensor(BLANK_INPAINT_LATENT))


def test_inpainting_model_gets_nine_channels_and_the_kept_area_stays():
    unet = Recorder()
    positive = Conditioning((CondEntry(torch.zeros(1, 77, 8)),))
    samples = torch.randn(1, 4, 4, 4)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:] = 1.0
    out = sample(unet, Latent(samples, noise_mask=mask), positive, positive, seed=1, steps=3, cfg=1.0,
                 sampler_name="euler", scheduler="normal", family=INPAINT)
    assert all(call["x"].shape == (1, 9, 4, 4) for call in unet.calls)
    torch.testing.assert_close(unet.calls[0]["x"][:, 5:], samples * 0.18215)
    assert unet.calls[0]["x"][0, 4, :, :2].eq(0).all() and unet.calls[0]["x"][0, 4, :, 2:].eq(1).all()
    torch.testing.assert_close(out.samples[..., :2], samples[..., :2])


def test_an_area_entry_gets_its_crop_of_the_concat_channels():
    """CONDNoiseShape: the concat input is cropped with the entry's area, like x."""
    unet = Recorder()
    samples = torch.randn(1, 4, 8, 8)
    positive = Conditioning((CondEntry(torch.zeros(1, 77, 8), area=(4, 2, 1, 3)),))
    negative = Conditioning((CondEntry(torch.zeros(1, 77, 8)),))
    latent_in = samples * 0.18215
    mask = torch.ones(1, 4, 8, 8)
    model = CFGDenoiser(ModelDenoiser(unet, sd1_schedule()), positive, negative, 2.0, None,
                        model_inputs(INPAINT, latent_in, mask))
    model(latent_in, torch.tensor([1.0]))
    crops = [call["x"] for call in unet.calls if call["x"].shape[-2:] == (4, 2)]
    assert crops and all(c.shape[1] == 9 for c in crops)
    torch.testing.assert_close(crops[0][:, 5:], latent_in[..., 1:5, 3:5].repeat(crops[0].shape[0], 1, 1, 1))
