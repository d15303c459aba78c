"""Denoisers: what a sampler calls as `model(x, sigma, **extra_args) -> denoised`.

Three small layers, each wrapping the one below (k-diffusion `external.py` / sgm `guiders.py` style):

* `ModelDenoiser`: the network's output turned into the denoised estimate for its prediction type (eps,
  v_prediction, x0, lcm: ComfyUI's comfy/model_sampling.py), with an inpainting model's extra input channels
  concatenated to x and SDXL's label vector passed as `y`.
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

UNet = Callable[..., Tensor]  # (x_scaled, timesteps, context, control=None, y=None) -> raw network output
ContextDenoiser = Callable[..., Tensor]  # (x, sigma, context, control=None, y=None, concat=None) -> denoised
ModelInputs = Callable[[CondEntry, int], tuple[Tensor | None, Tensor | None]]  # (entry, side) -> (y, concat)
LCM_SIGMA_DATA = 0.5  # the latent consistency boundary condition's sigma_data and timestep scaling
LCM_TIMESTEP_SCALING = 10.0


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


def eps_denoised(x: Tensor, sigma: Tensor, output: Tensor, timestep: Tensor) -> Tensor:
    """The network predicts the noise: x0 = x - eps * sigma."""
    return x - output * sigma


def v_denoised(x: Tensor, sigma: Tensor, output: Tensor, timestep: Tensor) -> Tensor:
    """The network predicts v (sigma_data 1): x0 = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)."""
    return x / (sigma**2 + 1.0) - output * sigma / (sigma**2 + 1.0) ** 0.5


def x0_denoised(x: Tensor, sigma: Tensor, output: Tensor, timestep: Tensor) -> Tensor:
    """The network predicts the clean latent itself."""
    return output


def lcm_denoised(x: Tensor, sigma: Tensor, output: Tensor, timestep: Tensor) -> Tensor:
    """Latent consistency: c_out * (x - eps * sigma) + c_skip * x, with the timestep scaled by 10 and sigma_data
    0.5 (c_skip = sd^2 / (t^2 + sd^2), c_out = t / sqrt(t^2 + sd^2))."""
    t = timestep * LCM_TIMESTEP_SCALING
    c_skip = LCM_SIGMA_DATA**2 / (t**2 + LCM_SIGMA_DATA**2)
    c_out = t / (t**2 + LCM_SIGMA_DATA**2) ** 0.5
    return c_out * (x - output * sigma) + c_skip * x


PREDICTION_DENOISED = {"eps": eps_denoised, "v_prediction": v_denoised, "x0": x0_denoised, "lcm": lcm_denoised}


@dataclass(frozen=True, eq=False)
class ModelDenoiser:
    """denoised from the network fed x / sqrt(sigma^2 + 1) and the schedule's nearest timestep.

    prediction: what the network predicts ("eps", "v_prediction", "x0", "lcm"). `concat` (an inpainting
    model's mask and masked-image latent, [B, 5, h, w]) is appended to the scaled x along the channels; `y`
    (SDXL's label vector) goes to the network as its `y` argument. A `control` (a conditioning entry's
    ControlChain, diffusion/controlnet.py) is called with the UNet's own inputs, sigma and this schedule,
    `control(x_in, timesteps, context, sigma, schedule=..., y=...) -> residuals or None`; residuals go to the UNet as
    its `control` argument."""

    unet: UNet
    schedule: DiscreteSchedule
    prediction: str = "eps"

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTION_DENOISED:
            raise ValueError(f"unknown prediction type {self.prediction!r}; expected one of "
                             f"{', '.join(PREDICTION_DENOISED)}")

    def __call__(self, x: Tensor, sigma: Tensor, context: Tensor, control: Callable | None = None,
                 y: Tensor | None = None, concat: Tensor | None = None) -> Tensor:
        s = sigma.view(sigma.shape[:1] + (1,) * (x.ndim - 1))
        x_in = x / (s**2 + 1.0) ** 0.5
        timesteps = self.schedule.timestep(sigma).float()
        residuals = control(x_in, timesteps, context, sigma, schedule=self.schedule, y=y) \
            if control is not None else None
        extra = {} if residuals is None else {"control": residuals}
        if y is not None:
            extra["y"] = y
        if concat is not None:
            x_in = torch.cat([x_in, concat.to(x_in)], dim=1)
        output = self.unet(x_in, timesteps, context, **extra).float()
        t = timesteps.view(s.shape)
        return PREDICTION_DENOISED[self.prediction](x, s, output, t)


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
    """One entry to predict: its context (and label vector, concat channels) at the latent's batch, region,
    clipped area, side and crop size."""

    context: Tensor
    region: Region
    area: tuple[int, int, int, int] | None
    side: int
    crop_size: tuple[int, ...]
    y: Tensor | None
    concat: Tensor | None


def _same_shape(a: Tensor | None, b: Tensor | None) -> bool:
    return (a is None) == (b is None) and (a is None or a.shape == b.shape)


def _same_batch(a: _Run, b: _Run) -> bool:
    """ComfyUI's can_concat_cond: same crop size, the same control object, concatenable contexts, label vectors
    and concat channels of the same shapes."""
    return (a.crop_size == b.crop_size and a.region.control is b.region.control
            and _can_concat(a.context, b.context) and _same_shape(a.y, b.y) and _same_shape(a.concat, b.concat))


def _at_batch(t: Tensor | None, batch: int, x: Tensor, area: tuple[int, int, int, int] | None = None) -> Tensor | None:
    return None if t is None else crop(repeat_to_batch_size(t, batch).to(x.device), area)


def _batched_inputs(group: Sequence[_Run]) -> dict[str, Tensor]:
    """The group's label vectors and concat channels, concatenated in the group's order (as its contexts)."""
    inputs = {}
    for name in ("y", "concat"):
        values = [getattr(run, name) for run in group]
        if values[0] is not None:
            inputs[name] = torch.cat(values)
    return inputs


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
            to_run.append(_Run(_at_batch(r.context, batch, x), r, area, side, size if area is None else area[:2],
                               _at_batch(r.y, batch, x), _at_batch(r.concat, batch, x, area)))
    while to_run:
        picked = [i for i, run in enumerate(to_run) if _same_batch(run, to_run[0])]
        group = [to_run[i] for i in reversed(picked)]
        to_run = [r for i, r in enumerate(to_run) if i not in set(picked)]
        n, control = len(group), group[0].region.control
        extra = _batched_inputs(group) if control is None else {"control": control, **_batched_inputs(group)}
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

    to_sigma: the model schedule's percent -> sigma (for timestep ranges). model_inputs(entry, side) gives an
    entry's extra network inputs (label vector y, concat channels; diffusion/model_conds.py) with side 0 for
    the positive, 1 for the negative. Area entries on one side get a twin on the other (ComfyUI's
    create_cond_with_same_area_if_none) before the negative is dropped at cfg 1.
    """

    model: ContextDenoiser
    positive: Conditioning
    negative: Conditioning
    cfg: float
    to_sigma: PercentToSigma | None = None
    model_inputs: ModelInputs | None = None

    def __call__(self, x: Tensor, sigma: Tensor, **_: object) -> Tensor:
        size = tuple(x.shape[2:])
        inputs = self.model_inputs or (lambda entry, side: (None, None))
        sides = [[resolve(e, size, self.to_sigma, *inputs(e, side)) for e in c.entries]
                 for side, c in enumerate((self.positive, self.negative))]
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
