"""The device and dtype policy, with CPU flags and CUDA faked where the machine has neither."""

from __future__ import annotations

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
