"""A UNet whose layers' weights are stored in fp8 and computed in the precision policy's dtype: UNETLoader's
`weight_dtype` (fp8_e4m3fn, fp8_e4m3fn_fast, fp8_e5m2), as ComfyUI offers it to halve a UNet's memory.

What is stored in fp8: every floating-point tensor with two or more dimensions (the weights of the linear and
convolution layers: all but ~0.1% of a UNet's numbers). Biases and normalisation weights keep the compute dtype,
and layers the policy keeps in fp32 (`diffusion.unet.precision_sensitive_prefixes`) stay in fp32, so the part
loads in one pass with per-key dtypes (`storage_overrides`) and its byte count is exact before it is read.

At each call a stored layer casts its weight (and bias) to its input's dtype (`StoredLinear`, `StoredConv2d`):
the cast costs a pass over the weights per call, so fp8 trades speed for memory (SDXL's UNet: 2.6 GB instead of
5.1 GB in bf16). No CPU here multiplies fp8 natively, so `fp8_e4m3fn_fast` (fp8 matrix products on GPUs that
have them) computes as `fp8_e4m3fn` does. oneDNN does not pack fp8 convolutions (diffusion/onednn.py skips them).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

FP8_STORAGE = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
               "fp8_e5m2": torch.float8_e5m2}
STORAGE_DTYPES = frozenset(FP8_STORAGE.values())


def is_stored(tensor: torch.Tensor) -> bool:
    """True for a tensor in a storage-only dtype (fp8): it is cast before any computation."""
    return tensor.dtype in STORAGE_DTYPES


class StoredLinear(nn.Linear):
    """nn.Linear whose weight may be in a storage dtype: cast to the input's dtype at each call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class StoredConv2d(nn.Conv2d):
    """nn.Conv2d whose weight may be in a storage dtype: cast to the input's dtype at each call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, self.weight.to(x.dtype), bias)


STORED_CLASSES = {nn.Linear: StoredLinear, nn.Conv2d: StoredConv2d}


def storage_overrides(matrix_keys: frozenset[str], keys: Mapping[str, str], compute: torch.dtype,
                      kept: Mapping[str, torch.dtype]) -> dict[str, torch.dtype]:
    """Per-key dtypes for a part loaded in a storage dtype: `kept` ({key prefix: dtype}, the fp32 layers) first,
    then every tensor that is not a layer's weight (a bias, a norm's scale) in `compute`. Each such key is its own
    prefix (it matches only itself: no key extends another's name)."""
    vectors = {key: compute for key in keys if key not in matrix_keys}
    return {**dict(kept), **{k: d for k, d in vectors.items() if not any(k.startswith(p) for p in kept)}}


def cast_stored_layers(module: nn.Module) -> nn.Module:
    """Make every linear and convolution layer of `module` whose weight is in a storage dtype cast it at each call
    (in place: the layers' classes change, their tensors stay)."""
    for layer in module.modules():
        stored = STORED_CLASSES.get(type(layer))
        if stored is not None and is_stored(layer.weight):
            layer.__class__ = stored
    return module
