"""Issue #17 (VAE decode twice as fast): the folded upsampling (diffusion/phase_upsample.py) computes what LDM's
nearest-2x + 3x3 convolution computes, and the loaders use it for 16-bit VAEs while fp32 stays unfolded."""

import pytest
import torch
from torch import nn

from diffusion.make_checkpoint import PRESETS, random_weights
from diffusion.onednn import PackedConv2d, packing_available
from diffusion.phase_upsample import PhaseUpsample, interleave_phases, phase_kernels, upsample_then_conv
from diffusion.vae import AutoencoderKL, Upsample, build_vae, fold_upsamples

TINY = PRESETS["tiny"].vae


def random_conv(channels: int, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(channels, channels, 3, padding=1).eval().requires_grad_(False)


def tiny_weights(seed: int = 3) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        layout = {k: (torch.float32, tuple(t.shape)) for k, t in AutoencoderKL(TINY).state_dict().items()}
    return random_weights(layout, seed)


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 8, 1, 1), (1, 8, 6, 3)])
def test_phase_upsample_equals_nearest_then_conv_in_fp32(shape):
    """Edges included (1x1 and odd sizes): the zero padding of the upsampled image is the low-res image's."""
    conv = random_conv(8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = upsample_then_conv(x, conv), PhaseUpsample(conv)(x)
    assert got.shape == (shape[0], 8, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_phase_upsample_keeps_channels_last_and_matches_when_packed():
    """The VAE computes channels_last with its convolutions packed for oneDNN: same values, NHWC memory out."""
    if not packing_available(torch.float32):
        pytest.skip("oneDNN is not available")
    conv = random_conv(16, seed=2)
    folded = PhaseUpsample(conv)
    folded.conv = PackedConv2d(folded.conv)
    x = torch.randn(1, 16, 6, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got, want = folded(x), upsample_then_conv(x, conv)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_phase_kernels_sum_the_taps_each_phase_reads():
    """Phase (a, b) of a kernel whose taps are 1..9 sums the taps that land on each low-res pixel."""
    weight = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # rows [1 2 3], [4 5 6], [7 8 9]
    kernels = phase_kernels(weight)[:, 0]
    assert kernels.shape == (4, 2, 2)
    torch.testing.assert_close(kernels[0], torch.tensor([[1.0, 5.0], [11.0, 28.0]]))  # a=0, b=0
    torch.testing.assert_close(kernels[3], torch.tensor([[12.0, 9.0], [15.0, 9.0]]))  # a=1, b=1


def test_phase_kernels_refuse_other_shapes():
    with pytest.raises(ValueError, match="3x3"):
        phase_kernels(torch.zeros(4, 4, 2, 2))
    with pytest.raises(ValueError, match="padding 1"):
        PhaseUpsample(nn.Conv2d(4, 4, 3, padding=0))


def test_interleave_places_each_phase():
    """Pixel (2i+a, 2j+b) comes from phase 2a+b at (i+a, j+b) of the (h+1) x (w+1) phase output."""
    y = torch.arange(4 * 3 * 4, dtype=torch.float32).reshape(1, 4, 3, 4)  # C = 1, h = 2, w = 3
    out = interleave_phases(y, 2, 3)[0, 0]
    for i in range(2):
        for j in range(3):
            for a in range(2):
                for b in range(2):
                    assert out[2 * i + a, 2 * j + b] == y[0, 2 * a + b, i + a, j + b]


def test_folded_decode_matches_the_unfolded_one_in_fp32():
    """The whole decoder with folded upsampling against LDM's formulation (the code as it was), fp32."""
    weights = tiny_weights()
    plain, folded = build_vae(weights, fold=False), build_vae(weights, fold=True)
    latent = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = plain.decode(latent), folded.decode(latent)
    assert got.shape == want.shape == (2, 3, 40, 48)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_build_vae_folds_16_bit_vaes_and_keep_fp32_as_ldm():
    """build_vae (and the checkpoint loaders' builder) fold by default in bf16/fp16 only: fp32 keeps LDM's
    upsample so that `--dtype fp32` reproduces ComfyUI's pixels exactly."""
    weights = tiny_weights()
    kinds = {dtype: {type(level.upsample) for level in build_vae({k: v.to(dtype) for k, v in weights.items()})
                     .decoder.up if hasattr(level, "upsample")} for dtype in (torch.float32, torch.bfloat16)}
    assert kinds == {torch.float32: {Upsample}, torch.bfloat16: {PhaseUpsample}}


def test_fold_upsamples_is_idempotent():
    model = fold_upsamples(build_vae(tiny_weights(), fold=False))
    first = [level.upsample.conv.weight for level in model.decoder.up if hasattr(level, "upsample")]
    fold_upsamples(model)
    again = [level.upsample.conv.weight for level in model.decoder.up if hasattr(level, "upsample")]
    assert len(again) == len(first) == len(TINY.channel_mult) - 1
    assert all(a is b for a, b in zip(again, first, strict=True))


def test_checkpoint_loader_folds_a_bf16_vae(tmp_path):
    """The path every VAEDecode takes: a checkpoint's VAE part read in bf16 comes out folded."""
    from diffusion.checkpoint import open_checkpoint
    from diffusion.make_checkpoint import make_checkpoint

    path = tmp_path / "tiny.safetensors"
    make_checkpoint(path, preset="tiny", seed=1)
    vae = open_checkpoint(path).vae.load(dtype=torch.bfloat16, channels_last=True)
    assert all(isinstance(level.upsample, PhaseUpsample) for level in vae.decoder.up if hasattr(level, "upsample"))
