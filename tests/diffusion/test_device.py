"""The device and dtype policy, with CPU flags and CUDA faked where the machine has neither."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffusion import device as policy
from diffusion.device import Precision, cpu_flags, pick_device, pick_dtype, pick_precision, pick_vae_dtype

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(policy, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)


@pytest.fixture
def no_bf16(monkeypatch):
    monkeypatch.setattr(policy, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx2", "fma"}))


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    support = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: support["bf16"])
    return support


def test_cpu_with_native_bf16_auto_is_bf16_with_an_fp32_final_unet_level_and_text_encoder(native_bf16):
    assert pick_precision(CPU, "auto") == Precision(torch.bfloat16, torch.float32, torch.bfloat16,
                                                    unet_output_fp32=True)
    assert pick_precision(CPU, "bf16").text == torch.bfloat16  # asked for explicitly


def test_cpu_default_is_auto_with_native_bf16(native_bf16):
    """The fast path is the default; --dtype fp32 reproduces ComfyUI's pixels."""
    assert pick_precision(CPU) == pick_precision(CPU, "auto")
    assert pick_precision(CPU, "fp32") == Precision(torch.float32, torch.float32, torch.float32)


def test_cpu_without_native_bf16_stays_fp32(no_bf16):
    assert pick_precision(CPU) == Precision(torch.float32, torch.float32, torch.float32)


def test_amx_counts_as_native_bf16(monkeypatch):
    monkeypatch.setattr(policy, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"amx_bf16", "amx_tile"}))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert policy.cpu_has_native_bf16()


def test_flags_without_onednn_support_are_not_enough(monkeypatch):
    monkeypatch.setattr(policy, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx512_bf16"}))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not policy.cpu_has_native_bf16()


def test_dtype_flag_overrides_every_part(native_bf16):
    assert pick_precision(CPU, "fp32") == Precision(torch.float32, torch.float32, torch.float32)
    assert pick_precision(CPU, "fp16").vae == torch.float16  # asked for explicitly
    assert pick_precision(CPU, "bf16").unet_output_fp32 and not pick_precision(CPU, "fp16").unet_output_fp32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        pick_dtype(CPU, "fp8")


def test_cuda_defaults_fp16_with_a_bf16_or_fp32_vae(fake_cuda):
    assert pick_device() == CUDA
    assert pick_precision(CUDA) == Precision(torch.float16, torch.float16, torch.bfloat16)
    fake_cuda["bf16"] = False
    assert pick_vae_dtype(CUDA) == torch.float32  # never an fp16 VAE by default: black images
    with pytest.raises(ValueError, match="does not support bf16"):
        pick_dtype(CUDA, "bf16")


def test_cuda_asked_for_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == CPU
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick_device("cuda")


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_this_machine_reports_its_own_choice():
    # whatever the hardware, auto (the default) is one of the two CPU policies and agrees with the flags
    expected = torch.bfloat16 if policy.cpu_has_native_bf16() else torch.float32
    assert pick_dtype(CPU, "auto") == expected
    assert pick_dtype(CPU) == expected


def test_sdxl_vae_is_never_fp16(fake_cuda, no_bf16):
    """Issue #13: SDXL's VAE overflows in fp16, so asking for fp16 gives it bf16 where the device has it, else
    fp32; other families (and a VAE file on its own, family None) keep what was asked for."""
    from diffusion.device import safe_vae_dtype
    from diffusion.families import FAMILIES

    half = torch.float16
    assert safe_vae_dtype(half, CUDA, FAMILIES["sdxl"]) == torch.bfloat16
    assert safe_vae_dtype(half, CUDA, FAMILIES["sdxl_refiner"]) == torch.bfloat16
    fake_cuda["bf16"] = False
    assert safe_vae_dtype(half, CUDA, FAMILIES["sdxl"]) == torch.float32
    assert safe_vae_dtype(half, CPU, FAMILIES["sdxl"]) == torch.float32  # no native bf16 on this fake CPU
    assert safe_vae_dtype(half, CUDA, FAMILIES["sd1"]) == half and safe_vae_dtype(half, CUDA, None) == half
    assert safe_vae_dtype(torch.bfloat16, CUDA, FAMILIES["sdxl"]) == torch.bfloat16


def test_a_decode_that_overflows_is_redone_in_fp32(caplog):
    """Issue #13: non-finite pixels from a half-precision decode are decoded again in fp32, with a warning; the
    borrowed network keeps its dtype."""
    from diffusion.components import ImageAutoencoder

    class OverflowsInHalf(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def decode(self, z):
            out = z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2) * self.scale
            return out if z.dtype == torch.float32 else out * float("inf")

    vae = OverflowsInHalf().to(torch.bfloat16)
    handle = SimpleNamespace(device="cpu")
    value = ImageAutoencoder(handle, config=None, dtype=torch.bfloat16, source="vae.safetensors")
    with caplog.at_level("WARNING"):
        pixels = value.decode(torch.full((1, 4, 2, 2), 0.5), vae)
    assert torch.isfinite(pixels).all() and pixels.shape == (1, 16, 16, 3)
    assert torch.allclose(pixels, torch.full_like(pixels, 0.75))
    assert "overflowed" in caplog.text and vae.scale.dtype == torch.bfloat16
