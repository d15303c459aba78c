"""Resizing latents: bislerp, the spherical counterpart of bilinear interpolation (ComfyUI's `bislerp`
upscale method, same maths, our own code).

Each pixel's channel vector is interpolated between its two source neighbours along the great circle (slerp of
the unit directions) while its length is interpolated linearly; first along the width, then along the height.
Neighbours and weights are those of bilinear interpolation with align_corners=False (edges clamped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_PARALLEL = 1e-5  # |dot| this close to 1: the directions are (anti)parallel and slerp is ill-conditioned


def _neighbours(old: int, new: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of `new` output positions: (lower source index, upper source index, weight of the upper),
    read off torch's bilinear interpolation of the index ramp so positions match F.interpolate exactly."""
    ramp = torch.arange(old, dtype=torch.float32, device=device).reshape(1, 1, 1, old)
    position = F.interpolate(ramp, size=(1, new), mode="bilinear").flatten()
    upper_ramp = (ramp + 1).clamp(max=old - 1)
    upper = F.interpolate(upper_ramp, size=(1, new), mode="bilinear").flatten()
    return position.to(torch.int64), upper.to(torch.int64), position - position.floor()


def slerp_vectors(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Rows of `a` and `b` [N, C] interpolated by `weight` [N, 1]: slerp of the directions, lerp of the lengths.
    Nearly equal directions keep `a`; nearly opposite ones fall back to a plain lerp; zero vectors have no
    direction (they contribute only their length, 0)."""
    norm_a = a.norm(dim=-1, keepdim=True)
    norm_b = b.norm(dim=-1, keepdim=True)
    unit_a = torch.where(norm_a == 0, torch.zeros_like(a), a / norm_a)
    unit_b = torch.where(norm_b == 0, torch.zeros_like(b), b / norm_b)
    dot = (unit_a * unit_b).sum(dim=-1)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    w = weight.squeeze(1)
    out = (torch.sin((1.0 - w) * omega) / sin_omega).unsqueeze(1) * unit_a \
        + (torch.sin(w * omega) / sin_omega).unsqueeze(1) * unit_b
    out = out * (norm_a * (1.0 - weight) + norm_b * weight)
    same = (dot > 1 - _PARALLEL).unsqueeze(1)
    opposite = (dot < _PARALLEL - 1).unsqueeze(1)
    out = torch.where(same, a, out)
    return torch.where(opposite, a * (1.0 - weight) + b * weight, out)


def _slerp_last_axis(samples: torch.Tensor, new: int) -> torch.Tensor:
    """[N, C, H, W] resized along W to `new` columns."""
    n, c, h, w = samples.shape
    lower, upper, weight = _neighbours(w, new, samples.device)
    a = samples[..., lower].movedim(1, -1).reshape(-1, c)
    b = samples[..., upper].movedim(1, -1).reshape(-1, c)
    ratios = weight.reshape(1, 1, new).expand(n, h, new).reshape(-1, 1)
    return slerp_vectors(a, b, ratios).reshape(n, h, new, c).movedim(-1, 1)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[N, C, H, W] resized to height x width by bislerp (computed in float32, returned in the input's dtype)."""
    dtype = samples.dtype
    out = _slerp_last_axis(samples.float(), width)
    out = _slerp_last_axis(out.transpose(-1, -2), height).transpose(-1, -2)
    return out.contiguous().to(dtype)


def center_crop_offsets(old_width: int, old_height: int, width: int, height: int) -> tuple[int, int]:
    """Pixels to cut from each side so the aspect ratio matches width:height (ComfyUI's common_upscale)."""
    old_aspect, new_aspect = old_width / old_height, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
    # never crop everything away (ComfyUI would fail on an empty tensor)
    return min(x, (old_width - 1) // 2), min(y, (old_height - 1) // 2)
