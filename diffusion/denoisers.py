"""Denoisers: what a sampler calls as `model(x, sigma, **extra_args) -> denoised`.

Three small layers, each wrapping the one below (k-diffusion `external.py` / sgm `guiders.py` style):

* `EpsDenoiser`: the eps parameterisation of a UNet `unet(x_scaled, timesteps, context) -> eps`.
* `CFGDenoiser`: classifier-free guidance over a positive and a negative `Conditioning`, batching every entry
  whose context can be concatenated into one UNet call (ComfyUI's `calc_cond_batch`).
* `InpaintDenoiser`: the per-step blend that keeps the unmasked latent (ComfyUI's `KSamplerX0Inpaint`).

The samplers never know which of these they drive.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion.latent import CondEntry, Conditioning
from diffusion.regions import (
    PercentToSigma,
    Region,
    add_opposite_areas,
    clipped_area,
    crop,
    is_active,
    region_weight,
    resolve,
    share_controls_with_uncond,
)
from diffusion.schedules import DiscreteSchedule

UNet = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_scaled, timesteps, context) -> eps
ContextDenoiser = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, sigma, context) -> denoised


def append_dims(v: Tensor, ndim: int) -> Tensor:
    return v[(...,) + (None,) * (ndim - v.ndim)]


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """A denoiser output as the Karras ODE derivative dx/dsigma."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def repeat_to_batch_size(t: Tensor, batch_size: int) -> Tensor:
    if t.shape[0] > batch_size:
        return t[:batch_size]
    if t.shape[0] < batch_size:
        reps = math.ceil(batch_size / t.shape[0])
        return t.repeat(reps, *([1] * (t.ndim - 1)))[:batch_size]
    return t


@dataclass(frozen=True, eq=False)
class EpsDenoiser:
    """denoised = x - eps * sigma, with the UNet fed x / sqrt(sigma^2 + 1) and the nearest timestep.

    A `control` (a conditioning entry's ControlChain, diffusion/controlnet.py) is called with the UNet's own
    inputs and sigma, `control(x_in, timesteps, context, sigma) -> residuals or None`; residuals go to the UNet
    as its `control` argument."""

    unet: UNet
    schedule: DiscreteSchedule

    def __call__(self, x: Tensor, sigma: Tensor, context: Tensor, control: Callable | None = None) -> Tensor:
        s = sigma.view(sigma.shape[:1] + (1,) * (x.ndim - 1))
        x_in = x / (s**2 + 1.0) ** 0.5
        timesteps = self.schedule.timestep(sigma).float()
        residuals = control(x_in, timesteps, context, sigma) if control is not None else None
        if residuals is None:
            eps = self.unet(x_in, timesteps, context)
        else:
            eps = self.unet(x_in, timesteps, context, control=residuals)
        return x - eps.float() * s


def _can_concat(a: Tensor, b: Tensor) -> bool:
    """ComfyUI's rule: same batch and width; token lengths may differ if their lcm is at most 4x the shorter."""
    if a.shape == b.shape:
        return True
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        return False
    return math.lcm(a.shape[1], b.shape[1]) // min(a.shape[1], b.shape[1]) <= 4


def _concat_contexts(contexts: Sequence[Tensor]) -> Tensor:
    """Repeat each context along tokens to the common lcm length (attention over repeated keys is unchanged)."""
    length = math.lcm(*(c.shape[1] for c in contexts))
    return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in contexts])


def predict_sides(model: ContextDenoiser, x: Tensor, sigma: Tensor, sides: Sequence[Sequence[CondEntry]],
                  to_sigma: PercentToSigma | None = None) -> list[Tensor]:
    """For each side, the weighted mean of its entries' predictions (zeros for an empty side).

    `to_sigma` maps timestep-range percents to sigmas (the model's schedule; needed only by entries that
    have a range). Areas, masks and timestep ranges act as in ComfyUI's calc_cond_batch.
    """
    size = tuple(x.shape[2:])
    return predict_regions(model, x, sigma, [[resolve(e, size, to_sigma) for e in side] for side in sides])


class _Run(NamedTuple):
    """One entry to predict: its context at the latent's batch, region, clipped area, side and crop size."""

    context: Tensor
    region: Region
    area: tuple[int, int, int, int] | None
    side: int
    crop_size: tuple[int, ...]


def _same_batch(a: _Run, b: _Run) -> bool:
    """ComfyUI's can_concat_cond: same crop size, the same control object, concatenable contexts."""
    return a.crop_size == b.crop_size and a.region.control is b.region.control and _can_concat(a.context, b.context)


def predict_regions(model: ContextDenoiser, x: Tensor, sigma: Tensor,
                    sides: Sequence[Sequence[Region]]) -> list[Tensor]:
    """predict_sides on resolved regions: the entries active at `sigma`, batched into as few model calls as
    ComfyUI makes, each prediction added to its crop of the side's sum with its weight."""
    outs = [torch.zeros_like(x) for _ in sides]
    counts = [torch.ones_like(x) * 1e-37 for _ in sides]
    size, batch = tuple(x.shape[2:]), x.shape[0]
    to_run = []
    for side, regions in enumerate(sides):
        for r in (r for r in regions if is_active(r, sigma)):
            area = clipped_area(r, size)
            to_run.append(_Run(repeat_to_batch_size(r.context, batch).to(x.device), r, area, side,
                               size if area is None else area[:2]))
    while to_run:
        picked = [i for i, run in enumerate(to_run) if _same_batch(run, to_run[0])]
        group = [to_run[i] for i in reversed(picked)]
        to_run = [r for i, r in enumerate(to_run) if i not in set(picked)]
        n, control = len(group), group[0].region.control
        extra = {} if control is None else {"control": control}
        inputs = torch.cat([crop(x, run.area) for run in group])
        context = _concat_contexts([run.context for run in group])
        chunks = model(inputs, torch.cat([sigma] * n), context, **extra).chunk(n)
        for run, pred in zip(group, chunks, strict=True):
            weight = region_weight(run.region, x, run.area)
            crop(outs[run.side], run.area).add_(pred * weight)
            crop(counts[run.side], run.area).add_(weight)
    return [o / c for o, c in zip(outs, counts, strict=True)]


@dataclass(frozen=True, eq=False)
class CFGDenoiser:
    """uncond + (cond - uncond) * cfg on the denoised predictions; the negative side is skipped when cfg ~ 1.

    to_sigma: the model schedule's percent -> sigma (for timestep ranges). Area entries on one side get a twin
    on the other (ComfyUI's create_cond_with_same_area_if_none) before the negative is dropped at cfg 1.
    """

    model: ContextDenoiser
    positive: Conditioning
    negative: Conditioning
    cfg: float
    to_sigma: PercentToSigma | None = None

    def __call__(self, x: Tensor, sigma: Tensor, **_: object) -> Tensor:
        size = tuple(x.shape[2:])
        sides = [[resolve(e, size, self.to_sigma) for e in c.entries] for c in (self.positive, self.negative)]
        positive, negative = add_opposite_areas(sides)
        negative = share_controls_with_uncond(positive, negative)
        if math.isclose(self.cfg, 1.0):
            negative = []
        cond, uncond = predict_regions(self.model, x, sigma, [positive, negative])
        return uncond + (cond - uncond) * self.cfg


def prepare_mask(noise_mask: Tensor, shape: Sequence[int]) -> Tensor:
    """A [B?, 1?, H, W] mask resized (bilinear) to the latent's [B, C, h, w] (ComfyUI's reshape_mask)."""
    mask = noise_mask.reshape((-1, 1, noise_mask.shape[-2], noise_mask.shape[-1])).float()
    mask = F.interpolate(mask, size=tuple(shape[2:]), mode="bilinear")
    if mask.shape[1] < shape[1]:
        mask = mask.repeat(1, shape[1], 1, 1)[:, : shape[1]]
    return repeat_to_batch_size(mask, shape[0])


@dataclass(frozen=True, eq=False)
class InpaintDenoiser:
    """Before each call the kept area is reset to latent + noise * sigma; after it, denoised is the latent there.

    mask: [B, C, h, w] with 1 = repaint, 0 = keep. latent is in model space (already scaled).
    """

    model: Callable[..., Tensor]
    latent: Tensor
    noise: Tensor
    mask: Tensor

    def __call__(self, x: Tensor, sigma: Tensor, **extra: object) -> Tensor:
        keep = 1.0 - self.mask
        s = sigma.reshape([sigma.shape[0]] + [1] * (self.noise.ndim - 1))
        x = x * self.mask + (self.noise * s + self.latent) * keep
        return self.model(x, sigma, **extra) * self.mask + self.latent * keep
