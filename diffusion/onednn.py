"""Prepacked oneDNN convolution weights for CPU inference: reorder each 3x3 convolution's weight once, at load.

In eager mode torch hands oneDNN a plain (NHWC) weight on every call and oneDNN reorders it into its blocked
layout first: for SD1.5's UNet that is ~1.3 GB of convolution weights read and rewritten per UNet call, 60% of
the time of a call on 64x64 images and 20% (bf16) to 29% (fp32) at 256x256 (docs/performance.md).
`pack_for_cpu` swaps the 3x3 `nn.Conv2d` layers for modules that keep the reordered weight and call oneDNN's
convolution directly, as torch.compile's freezing pass does, without compiling. The same oneDNN kernels run:
results are bit for bit those of the unpacked layers in the UNet; for a few shapes (the VAE encoder's) oneDNN
picks another kernel and results differ by float rounding (1e-6 relative in fp32; tests/diffusion/test_onednn.py).

Not packed, because measuring showed no gain: 1x1 convolutions (their packed layout depends on the input's
size, and a mismatch costs a reorder per call, slower than not packing) and linear layers (oneDNN's packed
linear was no faster than torch's matmul on these shapes).
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.memory import trim_heap

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
TRIM_EVERY = 64 << 20  # give freed heap memory back to the system after this many bytes of replaced weights
EXAMPLE_HW = (64, 64)  # the spatial size weights are packed for; 3x3 layouts do not depend on it (measured)


def packing_available(dtype: torch.dtype) -> bool:
    return (dtype in PACKABLE_DTYPES and torch.backends.mkldnn.is_available()
            and (dtype is not torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()))


class PackedConv2d(nn.Module):
    """A 2-D convolution with its weight in oneDNN's blocked layout (CPU only; computes channels_last)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError("only numeric zero padding can be packed")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.padding, self.stride, self.dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
        self.groups = conv.groups
        weight = conv.weight.detach().contiguous(memory_format=torch.channels_last)
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight, self.padding, self.stride, self.dilation,
                                                              self.groups, [1, self.in_channels, *EXAMPLE_HW])
        self.register_buffer("weight", packed)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x.contiguous(memory_format=torch.channels_last), self.weight, self.bias, self.padding, self.stride,
            self.dilation, self.groups, "none", [], "")

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, padding={self.padding}"


def pack_for_cpu(module: nn.Module) -> nn.Module:
    """Replace the module's 3x3 (any non-1x1) Conv2d layers by packed ones, in place; returns the module.

    Does nothing where oneDNN cannot (other dtypes, no bf16 support). Each weight is replaced as it is packed,
    so memory never holds two copies of more than one layer."""
    names = [name for name, child in module.named_modules() if isinstance(child, nn.Conv2d)
             and child.kernel_size != (1, 1) and child.padding_mode == "zeros" and not isinstance(child.padding, str)
             and child.weight.device.type == "cpu" and packing_available(child.weight.dtype)]
    freed = 0
    for name in names:  # only names are held, so each replaced convolution's weight is freed at once
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        conv = getattr(parent, attr)
        freed += conv.weight.numel() * conv.weight.element_size()
        setattr(parent, attr, PackedConv2d(conv))
        del conv
        if freed >= TRIM_EVERY:  # freed weights below glibc's mmap threshold stay in its heap until trimmed
            trim_heap()
            freed = 0
    trim_heap()
    return module
