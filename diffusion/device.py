"""Device and precision choices, in one place.

Defaults: CUDA when available, else CPU; fp16 on CUDA, fp32 on CPU; the VAE in fp32 on CPU and, on CUDA, in
bf16 where the GPU supports it (fp16 VAEs overflow into black images) else fp32. Every choice can be
overridden by the user (`--device`, `--dtype`).
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} was asked for but CUDA is not available here; "
                             "use --device cpu (or install a CUDA build of torch)")
        return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """The precision of the UNet and text encoder."""
    if requested:
        if requested not in DTYPES:
            raise ValueError(f"unknown dtype {requested!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[requested]
        if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bf16; use --dtype fp16 or fp32")
        return dtype
    return torch.float16 if device.type == "cuda" else torch.float32


def pick_vae_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """The VAE's precision: fp32 unless the user asked for bf16/fp32 explicitly or a GPU supports bf16."""
    if requested == "bf16" or (requested is None and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32
