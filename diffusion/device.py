"""Device and precision choices, in one place.

Device: CUDA when available, else the CPU (`--device` overrides).

Precision (`--dtype` overrides all three parts at once; `--dtype auto` is the default, spelled out):

| device                                  | UNet                              | text encoder | VAE                |
|-----------------------------------------|-----------------------------------|--------------|--------------------|
| CUDA                                    | fp16                              | fp16         | bf16, else fp32    |
| CPU with native bf16 (AVX512-BF16, AMX) | bf16, some last-level layers fp32 | fp32         | bf16               |
| other CPUs                              | fp32                              | fp32         | fp32               |

`--dtype fp32` reproduces ComfyUI's pixels (its references are fp32; `make parity` runs the kit that way).
fp16 VAEs overflow into black images, so the VAE is never fp16 unless asked for, and SDXL's VAE (which overflows
in fp16 even where SD1's does not) never fp16 at all: bf16 where the device has it, else fp32
(`safe_vae_dtype`); a decode that still returns non-finite pixels is redone in fp32 (components.ImageAutoencoder).
On CPUs without native bf16
instructions bf16 is emulated and slower than fp32, so fp32 stays. The CPU's bf16 choices were measured, not
assumed (docs/performance.md, bench/precision.py, bench/sd15_step.py):
- UNet: about 2.3x faster than fp32 at 512x512. An all-bf16 call of full-size SD1.5 is 1.36% from fp32.
  Keeping the precision-sensitive layers of the last level in fp32 (Precision.unet_output_fp32) brings it to
  0.87%, for ~8% more time per 512x512 step. Those layers are the ResBlocks, the transformers' norm and
  projections, and the output layer, while attention and feed-forward stay bf16.
- text encoder: fp32, because the conditioning steers the whole trajectory. With a bf16 text encoder, the first
  demo model's 20-step txt2img of one prompt landed 13 dB PSNR from fp32 (another picture); the shipped model
  is less sensitive (47.5 dB minimum over 9 pictures either way), and SD1.5's context moves by 0.91%. fp32
  costs 0.25 GB more for SD1.5 and no measurable time (77 tokens).
- VAE: bf16 decodes 46-51 dB PSNR from fp32, twice as fast, half the memory.
The shipped demo model's txt2img in this policy is 47.5 dB PSNR from fp32 at worst (bench/precision.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    """The dtype each part of a checkpoint computes in. With `unet_output_fp32`, the UNet's most
    precision-sensitive layers (`diffusion.unet.precision_sensitive_prefixes`) stay in fp32. These are the
    ResBlocks, transformer norms and projections of the last level, and the output layer. This applies to bf16
    UNets only, and it keeps one call within 1% of fp32."""

    unet: torch.dtype
    text: torch.dtype
    vae: torch.dtype
    unet_output_fp32: bool = False

    @property
    def names(self) -> tuple[str, str, str]:
        return tuple(str(d).removeprefix("torch.") for d in (self.unet, self.text, self.vae))


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} was asked for but CUDA is not available here; "
                             "use --device cpu (or install a CUDA build of torch)")
        return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is missing)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX) and oneDNN will use it."""
    flags = cpu_flags()
    if not any(flag in flags for flag in NATIVE_BF16_FLAGS):
        return False
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


AUTO = "auto"


def _fast_cpu(device: torch.device, requested: str | None) -> bool:
    """The native-bf16 CPU path: the default (`auto`) on CPUs that compute bf16 natively."""
    return device.type == "cpu" and requested in (None, AUTO) and cpu_has_native_bf16()


def _requested(device: torch.device, requested: str | None) -> torch.dtype | None:
    if not requested or requested == AUTO:
        return None
    if requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; use one of {', '.join(DTYPES)}")
    dtype = DTYPES[requested]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16; use --dtype fp16 or fp32")
    return dtype


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """The precision of the UNet."""
    dtype = _requested(device, requested)
    if dtype is not None:
        return dtype
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if _fast_cpu(device, requested) else torch.float32


def pick_text_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """The text encoder's precision: the UNet's, except fp32 where the UNet is bf16 by the CPU policy."""
    dtype = pick_dtype(device, requested)
    if dtype is torch.bfloat16 and _fast_cpu(device, requested):
        return torch.float32
    return dtype


def pick_vae_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """The VAE's precision: never fp16 unless asked for (it overflows into black images); bf16 where the
    hardware has it, else fp32."""
    dtype = _requested(device, requested)
    if dtype is not None:
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _fast_cpu(device, requested) else torch.float32


def pick_precision(device: torch.device, requested: str | None = None) -> Precision:
    unet = pick_dtype(device, requested)
    return Precision(unet, pick_text_dtype(device, requested), pick_vae_dtype(device, requested),
                     unet_output_fp32=unet is torch.bfloat16)


FP16_UNSAFE_VAE_FAMILIES = ("sdxl", "sdxl_refiner")  # their VAE overflows in fp16 (NaN, black images)


def device_has_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_native_bf16()


def safe_vae_dtype(dtype: torch.dtype, device: torch.device, family) -> torch.dtype:
    """`dtype` for the VAE of `family` (a Family, or None for a VAE file on its own), except fp16 for a family
    whose VAE overflows in it: bf16 where the device computes it, else fp32."""
    if dtype is not torch.float16 or family is None or family.name not in FP16_UNSAFE_VAE_FAMILIES:
        return dtype
    return torch.bfloat16 if device_has_bf16(device) else torch.float32
