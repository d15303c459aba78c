"""Packed oneDNN convolutions compute what the unpacked ones do: bit for bit in the UNet at the sizes tested; in
the VAE's encoder oneDNN picks another kernel for some shapes, so results agree to float rounding there."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusion.make_checkpoint import PRESETS
from diffusion.onednn import PackedConv2d, pack_for_cpu, packing_available
from diffusion.unet import UNetModel
from diffusion.vae import AutoencoderKL

DTYPES = [d for d in (torch.float32, torch.bfloat16) if packing_available(d)]


def _randomised(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.to(dtype=dtype, memory_format=torch.channels_last).eval().requires_grad_(False)


@pytest.mark.skipif(not DTYPES, reason="oneDNN is not available")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hw", [(8, 8), (5, 7), (16, 12)])
def test_packed_unet_is_bit_identical(dtype, hw):
    plain = _randomised(UNetModel(PRESETS["tiny"].unet), dtype)
    packed = pack_for_cpu(copy.deepcopy(plain))
    assert any(isinstance(m, PackedConv2d) for m in packed.modules())
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) for m in packed.modules())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *hw, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    context = torch.randn(2, 77, 32, generator=g).to(dtype)
    with torch.inference_mode():
        want = plain(x, torch.tensor([999.0, 10.0]), context)
        got = packed(x, torch.tensor([999.0, 10.0]), context)
    assert torch.equal(got, want)


@pytest.mark.skipif(not DTYPES, reason="oneDNN is not available")
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_vae_is_bit_identical_both_ways(dtype):
    plain = _randomised(AutoencoderKL(PRESETS["tiny"].vae), dtype)
    packed = pack_for_cpu(copy.deepcopy(plain))
    g = torch.Generator().manual_seed(2)
    pixels = torch.rand(1, 3, 24, 40, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    with torch.inference_mode():
        latent = plain.encode(pixels)
        torch.testing.assert_close(packed.encode(pixels), latent, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(packed.decode(latent), plain.decode(latent), rtol=tolerance, atol=tolerance)


def test_nothing_is_packed_where_onednn_cannot():
    module = UNetModel(PRESETS["tiny"].unet).to(torch.float16)
    assert pack_for_cpu(module) is module
    assert not any(isinstance(m, PackedConv2d) for m in module.modules())
