"""Where and when each conditioning entry acts: areas, masks and timestep ranges (ComfyUI's calc_cond_batch).

A `CondEntry` says what the user asked for (an area in latent cells or fractions, a mask of any size, a
percent range of the schedule). `resolve` turns it into a `Region` for one latent size and one schedule,
as ComfyUI's `process_conds` does once per sampling run; `region_input` and `region_weight` give the crop
of x the model sees and the weight its prediction is added back with (ComfyUI's `get_area_and_mult`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion.latent import CondEntry
from diffusion.schedules import DiscreteSchedule

PercentToSigma = Callable[[float], float]

FEATHER = 8  # the most latent rows/columns an area's inner edge is faded over
NEVER_STARTED = 999999999.9  # ComfyUI's sigma for 0 %: higher than any real sigma


def percent_to_sigma(schedule: DiscreteSchedule, percent: float) -> float:
    """The sigma at `percent` of the way through the model's schedule (0.0 -> 999999999.9, 1.0 -> 0)."""
    if percent <= 0.0:
        return NEVER_STARTED
    if percent >= 1.0:
        return 0.0
    return float(schedule.sigma(torch.tensor((1.0 - percent) * 999.0)))


@dataclass(frozen=True, eq=False)
class Region:
    """A CondEntry resolved for one latent: area in latent cells (h, w, y, x) or None, mask [B, h, w] at the
    latent's size or None, and the sigma window (sigma_start >= sigma >= sigma_end) where it is used."""

    context: Tensor
    strength: float = 1.0
    area: tuple[int, int, int, int] | None = None
    mask: Tensor | None = None
    mask_strength: float = 1.0
    sigma_start: float | None = None
    sigma_end: float | None = None
    control: Any = None
    control_to_uncond: bool = False  # the entry's control_apply_to_uncond, or its control's apply_to_uncond
    y: Tensor | None = None  # the network's label vector (SDXL), [1 or B, adm channels]
    concat: Tensor | None = None  # an inpainting model's extra input channels at the whole latent's size


def _percentage_area(area: tuple, size: Sequence[int]) -> tuple[int, int, int, int]:
    _, h, w, y, x = area
    return max(1, round(h * size[0])), max(1, round(w * size[1])), round(y * size[0]), round(x * size[1])


def _mask_at(mask: Tensor, size: Sequence[int]) -> Tensor:
    """[B, h, w] at the latent size (bilinear, as ComfyUI's common_upscale with crop 'none')."""
    mask = mask.float()
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    elif mask.ndim == 4:
        mask = mask.reshape(-1, mask.shape[-2], mask.shape[-1])
    if tuple(mask.shape[1:]) != tuple(size):
        mask = F.interpolate(mask.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
    return mask


def _mask_bounds(mask: Tensor) -> tuple[int, int, int, int]:
    """The bounding box of the mask's non-zero cells as an area, at least 8x8 ((8, 8, 0, 0) when empty)."""
    nonzero = torch.nonzero(mask.abs().amax(dim=0))
    if len(nonzero) == 0:
        return 8, 8, 0, 0
    (y0, x0), (y1, x1) = nonzero.min(dim=0).values.tolist(), nonzero.max(dim=0).values.tolist()
    return max(8, y1 - y0 + 1), max(8, x1 - x0 + 1), y0, x0


def resolve(entry: CondEntry, size: Sequence[int], to_sigma: PercentToSigma | None, y: Tensor | None = None,
            concat: Tensor | None = None) -> Region:
    """An entry for a latent of spatial `size` (h, w); `to_sigma` maps start/end percents to sigmas; `y` and
    `concat` are the entry's extra network inputs (diffusion/model_conds.py), cropped with its area."""
    area = entry.area
    if area is not None and area[0] == "percentage":
        area = _percentage_area(area, size)
    mask = None
    if entry.mask is not None:
        mask = _mask_at(entry.mask.to(entry.context.device), size)
        if entry.set_area_to_bounds:
            area = _mask_bounds(mask)
    sigma_start = sigma_end = None
    if entry.start_percent != 0.0 or entry.end_percent != 1.0:
        if to_sigma is None:
            raise ValueError("this conditioning has a timestep range (ConditioningSetTimestepRange) but the "
                             "sampler was not given the model's schedule to map percents to sigmas")
        sigma_start, sigma_end = to_sigma(entry.start_percent), to_sigma(entry.end_percent)
    to_uncond = entry.control_apply_to_uncond or bool(getattr(entry.control, "apply_to_uncond", False))
    return Region(entry.context, entry.strength, area, mask, entry.mask_strength, sigma_start, sigma_end,
                  entry.control, to_uncond, y, concat)


def is_active(region: Region, sigma: Tensor) -> bool:
    """False outside the entry's timestep range (sigma above its start or below its end)."""
    s = float(sigma.reshape(-1)[0])
    if region.sigma_start is not None and s > region.sigma_start:
        return False
    return not (region.sigma_end is not None and s < region.sigma_end)


def clipped_area(region: Region, size: Sequence[int]) -> tuple[int, int, int, int] | None:
    """The area cut at the latent's bottom/right edge, as ComfyUI narrows x."""
    if region.area is None:
        return None
    h, w, y, x = region.area
    if y >= size[0] or x >= size[1] or y < 0 or x < 0:
        raise ValueError(f"conditioning area (h={h}, w={w}, y={y}, x={x}) in latent cells lies outside the "
                         f"{size[0]}x{size[1]} latent; set x/y (pixels / 8) inside the image")
    return min(size[0] - y, h), min(size[1] - x, w), y, x


def crop(t: Tensor, area: tuple[int, int, int, int] | None) -> Tensor:
    if area is None:
        return t
    h, w, y, x = area
    return t[..., y:y + h, x:x + w]


def region_weight(region: Region, x: Tensor, area: tuple[int, int, int, int] | None) -> Tensor:
    """The weight of the region's prediction on its crop of x: mask * mask_strength * strength, or for an
    area without a mask, strength feathered over min(8, size // 4) cells on each side inside the latent."""
    shape = crop(x, area).shape
    if region.mask is None:
        weight = torch.ones(shape, dtype=x.dtype, device=x.device)
    else:
        mask = crop(region.mask[: shape[0]], area) * region.mask_strength
        weight = mask.unsqueeze(1).repeat(max(1, shape[0] // mask.shape[0]), shape[1], 1, 1).to(x)
    weight = weight * region.strength
    if region.mask is None and area is not None:
        for dim, (length, offset, full) in enumerate(zip(area[:2], area[2:], x.shape[2:], strict=True)):
            weight = weight * _feather(length, offset > 0, offset + length < full).to(x).view(
                (-1, 1) if dim == 0 else (1, -1))
    return weight


def _feather(length: int, fade_start: bool, fade_end: bool) -> Tensor:
    """Per-cell factors along one side of an area: (t+1)/rr over rr = min(8, length // 4) cells at each
    faded edge (both factors apply where the two edges overlap)."""
    ramp = torch.ones(length, dtype=torch.float64)
    rr = min(FEATHER, length // 4)
    steps = torch.tensor([(1.0 / rr) * (t + 1) for t in range(rr)], dtype=torch.float64)
    if fade_start:
        ramp[:rr] *= steps
    if fade_end:
        ramp[length - rr:] *= steps.flip(0)
    return ramp.float()


def _area_inside(inner: tuple, outer: tuple) -> bool:
    return (all(a >= b for a, b in zip(inner[2:], outer[2:], strict=True))
            and all(a + oa <= b + ob for a, oa, b, ob in zip(inner[:2], inner[2:], outer[:2], outer[2:], strict=True)))


def add_opposite_areas(sides: Sequence[list[Region]]) -> list[list[Region]]:
    """ComfyUI's create_cond_with_same_area_if_none: every area entry gets a twin on each other side, with
    that side's context (of the smallest entry containing the area, or its first whole-latent entry), so
    cond and uncond are predicted on the same crop. No twin when that side has an entry with the same area."""
    sides = [list(s) for s in sides]
    for k in range(len(sides)):
        for region in sides[k]:
            if region.area is None:
                continue
            for kk in range(len(sides)):
                if kk != k:
                    twin = _twin(sides[kk], region)
                    if twin is not None:
                        sides[kk].append(twin)
    return sides


def _twin(others: list[Region], region: Region) -> Region | None:
    smallest = None
    for other in others:
        if other.area is None:
            if smallest is None:
                smallest = other
        elif _area_inside(region.area, other.area) and (
                smallest is None or smallest.area is None
                or math.prod(smallest.area[:2]) > math.prod(other.area[:2])):
            smallest = other
    if smallest is None or smallest.area == region.area:
        return None
    return replace(region, context=smallest.context, y=smallest.y, concat=smallest.concat)


def share_controls_with_uncond(positive: Sequence[Region], negative: list[Region]) -> list[Region]:
    """ComfyUI's apply_empty_x_to_equal_area for ControlNetApply (control_apply_to_uncond): unless a
    whole-latent negative entry already has a control, the i-th such positive control goes to the
    (i mod n)-th of the n whole-latent negative entries without one (a later control replaces an earlier).
    Applying it twice changes nothing (the negative then has a control)."""
    controls = [r.control for r in positive if r.control_to_uncond and r.area is None and r.control is not None]
    whole = [i for i, r in enumerate(negative) if r.area is None]
    if not controls or any(negative[i].control is not None for i in whole) or not whole:
        return negative
    negative = list(negative)
    for n, control in enumerate(controls):
        i = whole[n % len(whole)]
        negative[i] = replace(negative[i], control=control)
    return negative
