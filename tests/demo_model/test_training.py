"""Training on a micro architecture: losses fall, resumption continues exactly, the export loads as SD1."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from demo_model import dataset, models
from demo_model.denoiser import (
    DenoiserSchedule,
    alphas_cumprod,
    caption_ids,
    diffusion_loss,
    encode_latents,
    layout_weights,
    train_denoiser,
)
from demo_model.state import step_generator
from demo_model.vae import VAESchedule, train_vae, vae_loss
from diffusion.checkpoint import load_checkpoint
from diffusion.prompt import encode_prompt
from diffusion.tokenizer import ClipTokenizer

ARCH = models.micro_architecture()


def _fit(loss_fn, params, steps: int, lr: float) -> tuple[float, float]:
    optimiser = torch.optim.Adam(params, lr=lr)
    first = None
    for _ in range(steps):
        loss = loss_fn()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        first = loss.item() if first is None else first
    return first, loss_fn().item()


def test_vae_steps_reduce_the_reconstruction_loss():
    vae = models.new_vae(ARCH, 0)
    pixels = torch.from_numpy(dataset.batch(0, 0, 4)[0])[:, :, :32, :32]
    before, after = _fit(lambda: vae_loss(vae, pixels, 1e-4)[0], vae.parameters(), 8, 2e-3)
    assert after < 0.9 * before


def test_denoiser_steps_reduce_the_eps_loss():
    vae = models.new_vae(ARCH, 0).eval()
    unet, text = models.new_denoiser(ARCH, 0)
    pixels, captions = dataset.batch(0, 0, 4)
    latents = encode_latents(vae, torch.from_numpy(pixels))
    tokenizer = ClipTokenizer()
    ids = caption_ids(tokenizer, captions, {})
    table = alphas_cumprod()

    def loss():
        return diffusion_loss(unet, text, latents, ids, step_generator(0, 0), table, tokenizer.eos_id)

    before, after = _fit(loss, [*unet.parameters(), *text.parameters()], 8, 1e-3)
    assert after < 0.9 * before


def test_layout_weights_are_one_over_snr_clamped():
    table = alphas_cumprod()
    weights = layout_weights(table, cap=5.0)
    inverse_snr = (1 - table) / table
    low, high = inverse_snr < 1, inverse_snr > 5
    assert low[:100].all() and high[-100:].all() and (~low & ~high).any()
    assert (weights[low] == 1).all() and (weights[high] == 5).all()
    torch.testing.assert_close(weights[~low & ~high], inverse_snr[~low & ~high])
    assert (layout_weights(table, cap=0.5) == 1).all()  # a cap below 1 means the plain eps loss


def test_weighted_loss_is_the_weighted_mean_of_per_sample_losses():
    torch.manual_seed(0)
    unet, text = models.new_denoiser(ARCH, 0)
    latents = torch.randn(3, 4, 8, 8)
    tokenizer = ClipTokenizer()
    ids = caption_ids(tokenizer, ["a red circle", "", "a blue star"], {})
    table = alphas_cumprod()

    def loss(weights=None):
        with torch.no_grad():
            return diffusion_loss(unet, text, latents, ids, step_generator(0, 0), table, tokenizer.eos_id, weights)

    plain = loss()
    torch.testing.assert_close(loss(torch.full((1000,), 7.0)), plain)  # only relative weights matter
    t = torch.randint(0, len(table), (3,), generator=step_generator(0, 0))  # the timesteps the loss draws first
    assert len(set(t.tolist())) == 3

    def one_hot(i: int, value: float = 1.0) -> torch.Tensor:
        w = torch.full((1000,), 1e-12)
        w[t[i]] = value
        return w

    each = torch.stack([loss(one_hot(i)) for i in range(3)])  # each sample's own loss
    torch.testing.assert_close(plain, each.mean())
    doubled = torch.ones(1000)
    doubled[t[0]] = 2.0
    torch.testing.assert_close(loss(doubled), (2 * each[0] + each[1] + each[2]) / 4)


def test_caption_ids_match_the_inference_tokenisation():
    tokenizer = ClipTokenizer()
    ids = caption_ids(tokenizer, ["a small red circle at the top on a blue background", ""], {})
    assert ids.shape == (2, 77)
    assert ids[0, 0] == tokenizer.bos_id and ids[1, 1] == tokenizer.eos_id and (ids[1, 1:] == tokenizer.eos_id).all()
    assert tokenizer.decode(ids[0, 1:12].tolist()).strip() == "a small red circle at the top on a blue background"


def test_rescaled_vae_computes_the_same_pictures_from_scaled_latents():
    vae = models.new_vae(ARCH, 0).eval()
    pixels = torch.from_numpy(dataset.batch(0, 0, 2)[0])
    with torch.no_grad():
        latents, decoded = vae.encode(pixels), vae.decode(vae.encode(pixels))
        models.rescale_vae(vae, 3.0)
        assert torch.allclose(vae.encode(pixels), 3.0 * latents, atol=1e-5)
        assert torch.allclose(vae.decode(vae.encode(pixels)), decoded, atol=1e-4)


def _schedules(steps: int) -> tuple[VAESchedule, DenoiserSchedule]:
    vae = VAESchedule(steps=2, batch_size=2, warmup=1, full_steps=1, save_every=1)
    denoiser = dataclasses.replace(DenoiserSchedule(), steps=steps, batch_size=2, warmup=1, save_every=1, bf16=False,
                                   pool_size=6, layout_from=2)  # resumption also crosses the switch of loss
    return vae, denoiser


def test_resume_continues_from_the_saved_step_exactly(tmp_path):
    vae_schedule, three = _schedules(3)
    vae = train_vae(ARCH, tmp_path / "vae.pt", vae_schedule)
    reached = []
    straight_unet, straight_text, step = train_denoiser(ARCH, vae, tmp_path / "straight.pt", three)
    assert step == 3
    _, two = _schedules(2)
    train_denoiser(ARCH, vae, tmp_path / "resumed.pt", two)
    assert torch.load(tmp_path / "resumed.pt", weights_only=False)["step"] == 2
    resumed_unet, resumed_text, step = train_denoiser(ARCH, vae, tmp_path / "resumed.pt", three,
                                                      progress=lambda s, _: reached.append(s))
    assert step == 3 and reached == [3]
    for a, b in zip(straight_unet.state_dict().values(), resumed_unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight_text.state_dict().values(), resumed_text.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # A finished VAE snapshot is loaded as it is, without training again.
    again = train_vae(ARCH, tmp_path / "vae.pt", vae_schedule, progress=lambda s, _: reached.append(-s))
    assert reached == [3]
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), again.state_dict().values(), strict=True))


def test_export_loads_with_load_checkpoint_unchanged(tmp_path):
    vae = models.new_vae(ARCH, 0).eval()
    unet, text = models.new_denoiser(ARCH, 0)
    path = models.export_checkpoint(tmp_path / "demo.safetensors", unet, vae, text.eval(), {"note": "test"})
    checkpoint = load_checkpoint(path)
    assert checkpoint.unet_config == ARCH.unet
    assert checkpoint.vae_config == ARCH.vae
    assert checkpoint.text_config.hidden_size == ARCH.text.hidden_size
    assert checkpoint.text_config.vocab_size == 49408
    expected = unet.state_dict()["out.2.weight"].half().float()
    assert torch.equal(checkpoint.unet.state_dict()["out.2.weight"], expected)
    tokenizer = ClipTokenizer()
    prompt = "a small red circle at the top on a blue background"
    ours, _ = encode_prompt(text.half().float().eval(), tokenizer, prompt)
    loaded, _ = encode_prompt(checkpoint.text_encoder, tokenizer, prompt)
    assert torch.allclose(ours, loaded, atol=1e-5)


def test_load_parts_reads_an_export_back_exactly(tmp_path):
    """`train-demo --start-from FILE` reads an exported checkpoint back into training modules without loss."""
    vae = models.new_vae(ARCH, 0).eval()
    unet, text = models.new_denoiser(ARCH, 7)
    path = models.export_checkpoint(tmp_path / "demo.safetensors", unet, vae, text.eval())
    again = models.load_parts(path, ARCH)
    written = models.sd1_state_dict(unet, vae, text)
    read = models.sd1_state_dict(*again)
    assert written.keys() == read.keys() and all(torch.equal(written[k], read[k]) for k in written)
    with pytest.raises(ValueError, match="--arch"):
        models.load_parts(path, models.demo_architecture())
