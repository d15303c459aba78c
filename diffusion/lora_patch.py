"""Patching a loaded network with LoRA patches without writing its weights (see diffusion/lora.py and
docs/lora.md).

- Plain LoRAs on the UNet's linear and convolution layers: a forward hook adds `(strength * alpha / rank) *
  up(down(x))` to the layer's output, the merged weight's result up to float rounding, at the cost of rank-r
  products per call.
- Everything else (LoHa, LoKr, DoRA, Tucker LoCon, full differences, and every text-encoder patch, whose merged
  weight ComfyUI rounds to fp16): a parametrization computes ComfyUI's merged weight from the untouched original
  each time the layer runs.
- 3x3 convolutions packed for oneDNN (diffusion/onednn.py) cannot be merged into: their delta is convolved and
  added to the output.

Removing a set (`remove_patches`) drops the hooks and parametrizations; the original tensor objects come back
bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .lora import Adapter, LoraError
from .unet import GEGLU

TEXT_ROUNDING = torch.float16  # ComfyUI's text encoder dtype, also on the CPU
READS_WEIGHTS = (GEGLU,)  # modules that use a child's weight directly instead of calling it: no output hooks


class PatchedWeight(nn.Module):
    """A parametrization: the stored weight with patches applied in fp32, cast back (through `rounding` first)."""

    def __init__(self, patches: list[tuple[Adapter, float]], rounding: torch.dtype | None):
        super().__init__()
        self.patches, self.rounding = patches, rounding

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return patched_weight(weight, self.patches, self.rounding)


def patched_weight(weight: torch.Tensor, patches: list[tuple[Adapter, float]],
                   rounding: torch.dtype | None = None) -> torch.Tensor:
    """ComfyUI's `calculate_weight`: fp32 copy, every patch in order, cast back to the weight's dtype."""
    out = weight.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    for adapter, strength in patches:
        out = adapter.apply(out, strength)
    if rounding is not None:
        out = out.to(rounding)
    return out.to(weight.dtype)


def _patch_groups(module: nn.Module, patches: tuple, part: str) -> dict[str, list[tuple[Adapter, float]]]:
    """{parameter name in `module`: [(adapter, strength), ...]} in the order the patches were added."""
    grouped: dict[str, list[tuple[Adapter, float]]] = {}
    for patch, strength in patches:
        for name, adapter in patch.adapters.items():
            path = text_parameter(module, name) if part == "text_encoder" else name
            grouped.setdefault(path, []).append((adapter, strength))
    return grouped


def text_parameter(module: nn.Module, name: str) -> str:
    """Where a text-encoder weight named as `lora_keys.text_weight_shapes` names it (`encoder.layers.0.mlp.fc1.
    weight`; `<encoder>.` first for a CLIP of several encoders, whose module is a ModuleDict) sits in `module`."""
    if isinstance(module, nn.ModuleDict):
        encoder, _, rest = name.partition(".")
        return f"{encoder}.{text_parameter(module[encoder], rest)}"
    inside = hasattr(module, "text_model") and not name.startswith("text_projection.")
    return ("text_model." if inside else "") + name


def set_patches(module: nn.Module, patches: tuple, *, part: str) -> None:
    """Make `module` compute with exactly `patches` ((PartPatch, strength) pairs, applied in order): the previous
    set is removed first, restoring the original tensors."""
    remove_patches(module)
    hooks = []
    rounding = TEXT_ROUNDING if part == "text_encoder" else None
    for name, chain in _patch_groups(module, patches, part).items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        parent = module.get_submodule(owner_name.rpartition(".")[0])
        if attr == "weight" and part == "unet" and all(_low_rank(a) for a, _ in chain) and _bypassable(owner) \
                and not isinstance(parent, READS_WEIGHTS):
            hooks.append(owner.register_forward_hook(_low_rank_bypass(owner, chain)))
        elif attr == "weight" and _is_packed(owner):
            hooks.append(owner.register_forward_hook(_added_conv(chain)))
        else:
            parametrize.register_parametrization(owner, attr, PatchedWeight(chain, rounding), unsafe=True)
    module._lora_hooks = hooks  # what remove_patches undoes besides the parametrizations


def remove_patches(module: nn.Module) -> None:
    for hook in getattr(module, "_lora_hooks", ()):
        hook.remove()
    module._lora_hooks = []
    for sub in module.modules():
        if parametrize.is_parametrized(sub):
            for attr in list(sub.parametrizations.keys()):
                if any(isinstance(p, PatchedWeight) for p in sub.parametrizations[attr]):
                    parametrize.remove_parametrizations(sub, attr, leave_parametrized=False)


def _low_rank(adapter: Adapter) -> bool:
    return adapter.kind == "lora" and "mid" not in adapter.tensors and "dora_scale" not in adapter.tensors


def _bypassable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        (isinstance(module, nn.Conv2d) or _is_packed(module)) and module.groups == 1)


def _low_rank_bypass(layer: nn.Module, chain: list[tuple[Adapter, float]]):
    """A forward hook adding `(strength * alpha / rank) * up(down(x))` of each plain LoRA to the layer's output:
    the merged weight's result up to float rounding, for rank-r products per call instead of a pass over W."""
    terms = []
    for adapter, strength in chain:
        down, up = adapter.tensors["down"], adapter.tensors["up"]
        scale = adapter.alpha / down.shape[0] if adapter.alpha is not None else 1.0
        terms.append((down, up, strength * scale))
    conv = not isinstance(layer, nn.Linear)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for down, up, factor in terms:
            down, up = down.to(x.device, x.dtype), up.to(x.device, x.dtype)
            if conv:
                h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)
                h = F.conv2d(h, up)
            else:
                h = F.linear(F.linear(x, down.flatten(1)), up.flatten(1))
            output = output + factor * h
        return output
    return hook


def _is_packed(module: nn.Module) -> bool:
    return type(module).__name__ == "PackedConv2d"


def _added_conv(chain: list[tuple[Adapter, float]]):
    """A forward hook adding `conv(x, sum of patches)` to a packed convolution's output."""
    def hook(conv: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if any("dora_scale" in a.tensors for a, _ in chain):
            raise LoraError("DoRA patches on 3x3 convolutions need the plain weights; run with --dtype fp16 or on "
                            "a device where convolutions are not packed")
        shape = torch.Size([conv.out_channels, conv.in_channels // conv.groups, *_kernel(conv, chain)])
        delta = torch.zeros(shape, device=x.device)
        for adapter, strength in chain:
            delta = adapter.apply(delta, strength)
        return output + F.conv2d(x.contiguous(memory_format=torch.channels_last), delta.to(x.dtype), None,
                                 conv.stride, conv.padding, conv.dilation, conv.groups)
    return hook


def _kernel(conv: nn.Module, chain: list[tuple[Adapter, float]]) -> tuple[int, int]:
    per_channel = chain[0][0].delta_numel() // (conv.out_channels * (conv.in_channels // conv.groups))
    side = math.isqrt(per_channel)
    return side, side
