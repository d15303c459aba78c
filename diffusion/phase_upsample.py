"""Nearest 2x upsampling followed by a 3x3 convolution, computed on the low-resolution input.

Output pixel (2i+a, 2j+b) of `conv3x3(nearest2x(x))` reads upsampled rows 2i+a-1, 2i+a, 2i+a+1, which are input
rows i-1, i, i for a = 0 and i, i, i+1 for a = 1 (and likewise columns). So each of the four output phases (a, b)
is a 2x2 convolution of `x` whose taps are sums of the 3x3 taps: rows [w0, w1+w2] for a = 0 and [w0+w1, w2] for
a = 1. The four phases run as one 2x2 convolution with 4x the output channels over `x` padded by one pixel
(output (h+1) x (w+1)); phase (a, b) is that output shifted by (a, b), and the phases are interleaved into the
2h x 2w image. That is 16 multiply-adds per input pixel and channel pair instead of 36, and the 4x larger
upsampled tensor is never made. The result is the same up to the order of summation (and, in a 16-bit dtype,
one rounding of each summed tap).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ROW_SUMS[a] maps the 3 taps of a 3x3 kernel's rows (or columns) to the 2 taps of phase a's 2x2 kernel
ROW_SUMS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)),   # a = 0: input rows i-1 and i
            ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))   # a = 1: input rows i and i+1
PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))  # output channel block p = 2a + b of the phase convolution


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 weight [O, I, 3, 3] -> the four phases' 2x2 weights stacked as [4*O, I, 2, 2] (block p = 2a + b),
    summed in fp32 and returned in the weight's dtype."""
    if weight.ndim != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"phase_kernels needs a 3x3 convolution weight, got shape {tuple(weight.shape)}")
    sums = torch.tensor(ROW_SUMS, dtype=torch.float32, device=weight.device)  # [2 phases, 2 taps, 3 taps]
    w = weight.float()
    blocks = [torch.einsum("rk,oikl,cl->oirc", sums[a], w, sums[b]) for a, b in PHASES]
    return torch.cat(blocks).to(weight.dtype)


def interleave_phases(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The phase convolution's output [B, 4*C, h+1, w+1] -> the image [B, C, 2h, 2w] (channels_last memory):
    pixel (2i+a, 2j+b) is phase p = 2a+b's value at (i+a, j+b)."""
    batch, channels = y.shape[0], y.shape[1] // 4
    nhwc = y.permute(0, 2, 3, 1).contiguous()  # a no-op for channels_last y
    s_batch, s_row, s_col, _ = nhwc.stride()
    s_a, s_b = 2 * channels, channels  # channel block p = 2a + b starts at p * channels
    view = nhwc.as_strided((batch, height, 2, width, 2, channels),
                           (s_batch, s_row, s_row + s_a, s_col, s_col + s_b, 1), nhwc.storage_offset())
    return view.reshape(batch, 2 * height, 2 * width, channels).permute(0, 3, 1, 2)


class PhaseUpsample(nn.Module):
    """`conv(nearest2x(x))` for a 3x3, padding-1 `conv`, as four 2x2 phase convolutions (see the module doc).
    Its `conv` is a plain 2x2 Conv2d, so oneDNN packing (diffusion/onednn.py) applies to it as to any other."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
            raise ValueError(f"PhaseUpsample folds a 3x3 convolution with padding 1, got {conv}")
        weight = phase_kernels(conv.weight.detach())
        self.conv = nn.Conv2d(conv.in_channels, 4 * conv.out_channels, 2, padding=1, bias=conv.bias is not None,
                              device="meta")
        self.conv.weight = nn.Parameter(weight.contiguous(memory_format=_memory_format(conv.weight)),
                                        requires_grad=False)
        if conv.bias is not None:
            self.conv.bias = nn.Parameter(conv.bias.detach().repeat(4), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return interleave_phases(self.conv(x), x.shape[2], x.shape[3])


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() \
        else torch.contiguous_format


def upsample_then_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The formulation PhaseUpsample replaces (LDM's Upsample): nearest 2x, then the 3x3 convolution."""
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
