"""Noise schedules: a model's discrete sigma table, sigma <-> timestep, and ComfyUI's schedulers.

`model_schedule(sampling)` builds the table a model family (or ModelSamplingDiscrete) asks for: the beta schedule
from linear_start/linear_end/timesteps, optionally rescaled to zero terminal SNR, and for "lcm" the 50-step
distilled table ComfyUI's ModelSamplingDiscreteDistilled uses.

Every scheduler returns a 1-D float32 sigma tensor, descending, ending with 0 (the `append_zero` habit).
Numbers follow ComfyUI (`comfy/model_sampling.py` ModelSamplingDiscrete, `comfy/samplers.py` schedulers,
k-diffusion `get_sigmas_*`) including the dtypes the intermediate values are computed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffusion.families import ModelSampling

ZSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08  # ComfyUI's stand-in for the zero terminal alpha_bar (finite sigma)
LCM_ORIGINAL_TIMESTEPS = 50  # the steps an LCM was distilled on: its table keeps every 1000 // 50-th level


def append_zero(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_zeros([1])])


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """A DDPM-style model's noise levels: `sigmas[t]` for integer timesteps t, ascending."""

    sigmas: Tensor  # float32 [N]
    log_sigmas: Tensor  # float32 [N], the log taken before the cast to float32
    skip_steps: int = 1  # a distilled table: entry i is the network's timestep i * skip_steps + skip_steps - 1

    @classmethod
    def from_betas(cls, betas: Tensor, zsnr: bool = False) -> DiscreteSchedule:
        """betas in float64, as ComfyUI's make_beta_schedule gives them."""
        return cls.from_sigmas(sigmas_from_betas(betas, zsnr))

    @classmethod
    def from_sigmas(cls, sigmas: Tensor) -> DiscreteSchedule:
        return cls(sigmas=sigmas.float(), log_sigmas=sigmas.log().float())

    @property
    def sigma_min(self) -> Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: Tensor) -> Tensor:
        """The network timestep of the table entry nearest in log-sigma (an int64 tensor shaped like `sigma`)."""
        dists = sigma.reshape(-1).log() - self.log_sigmas[:, None]
        index = dists.abs().argmin(dim=0).view(sigma.shape)
        return index if self.skip_steps == 1 else index * self.skip_steps + (self.skip_steps - 1)

    def sigma(self, timestep: Tensor) -> Tensor:
        """Sigma at a possibly fractional network timestep, interpolating linearly in log-sigma."""
        t = timestep.float()
        if self.skip_steps != 1:
            t = (t - (self.skip_steps - 1)) / self.skip_steps
        t = torch.clamp(t, min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


def scaled_linear_betas(start: float = 0.00085, end: float = 0.012, n: int = 1000) -> Tensor:
    """SD1's "linear" schedule in ldm's naming: linear in sqrt(beta), float64."""
    return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2


def sd1_schedule() -> DiscreteSchedule:
    """The SD1.x table: sigma 0.0292 (t=0) ... 14.6146 (t=999)."""
    return DiscreteSchedule.from_betas(scaled_linear_betas())


def sigmas_from_betas(betas: Tensor, zsnr: bool = False) -> Tensor:
    """sqrt((1 - alpha_bar) / alpha_bar) in float64, optionally rescaled to zero terminal SNR."""
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return rescale_zero_terminal_snr(sigmas) if zsnr else sigmas


def rescale_zero_terminal_snr(sigmas: Tensor) -> Tensor:
    """Lin et al. 2023 (arXiv 2305.08891, algorithm 1) on sqrt(alpha_bar): shift so the last is 0, scale so the
    first is unchanged; the last alpha_bar is then ZSNR_LAST_ALPHA_BAR instead of 0, as in ComfyUI."""
    sqrt_ab = (1 / (sigmas * sigmas + 1)).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab**2
    alphas_bar[-1] = ZSNR_LAST_ALPHA_BAR
    return ((1 - alphas_bar) / alphas_bar) ** 0.5


def distilled(schedule: DiscreteSchedule, original_timesteps: int = LCM_ORIGINAL_TIMESTEPS) -> DiscreteSchedule:
    """ComfyUI's ModelSamplingDiscreteDistilled: every (N // original_timesteps)-th level counted from the top."""
    n = len(schedule.sigmas)
    skip = n // original_timesteps
    picked = torch.stack([schedule.sigmas[n - 1 - x * skip] for x in range(original_timesteps)]).flip(0)
    return DiscreteSchedule(picked, picked.log(), skip_steps=skip)


def model_schedule(sampling: ModelSampling) -> DiscreteSchedule:
    """The table of a model's `ModelSampling` (diffusion/families.py)."""
    betas = scaled_linear_betas(sampling.linear_start, sampling.linear_end, sampling.timesteps)
    schedule = DiscreteSchedule.from_betas(betas, zsnr=sampling.zsnr)
    return distilled(schedule) if sampling.prediction == "lcm" else schedule


# --- schedulers on the model's own table ---------------------------------------------------------------------


def normal(schedule: DiscreteSchedule, steps: int, sgm: bool = False) -> Tensor:
    """Timesteps evenly spaced from sigma_max's to sigma_min's, mapped back to sigmas."""
    start, end = int(schedule.timestep(schedule.sigma_max)), int(schedule.timestep(schedule.sigma_min))
    zero_terminal = not sgm and math.isclose(float(schedule.sigma(torch.tensor(end))), 0, abs_tol=1e-5)
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        timesteps = torch.linspace(start, end, steps + 1 if zero_terminal else steps)
    sigmas = torch.tensor([float(schedule.sigma(t)) for t in timesteps], dtype=torch.float32)
    return sigmas if zero_terminal else append_zero(sigmas)


def sgm_uniform(schedule: DiscreteSchedule, steps: int) -> Tensor:
    return normal(schedule, steps, sgm=True)


def simple(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Every len/steps-th table entry from the top."""
    stride = len(schedule.sigmas) / steps
    return append_zero(torch.tensor([float(schedule.sigmas[-(1 + int(x * stride))]) for x in range(steps)]))


def ddim_uniform(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Table entries 1, 1+k, 1+2k, ... (k = len // steps), reversed; may give more than `steps` sigmas."""
    zero_terminal = math.isclose(float(schedule.sigmas[1]), 0, abs_tol=1e-5)
    stride = max(len(schedule.sigmas) // (steps + 1 if zero_terminal else steps), 1)
    picked = [float(s) for s in schedule.sigmas[1::stride]]
    return torch.tensor(picked[::-1] + ([] if zero_terminal else [0.0]), dtype=torch.float32)


def beta(schedule: DiscreteSchedule, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> Tensor:
    """Timesteps at Beta(alpha, beta) quantiles (arXiv 2407.12173), consecutive duplicates dropped."""
    import scipy.stats  # here: importing it costs ~0.4 s, which a run that needs no beta schedule should not pay

    last = len(schedule.sigmas) - 1
    ts = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta_) * last)
    kept = [int(t) for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    return append_zero(torch.tensor([float(schedule.sigmas[t]) for t in kept]))


def linear_quadratic(schedule: DiscreteSchedule, steps: int, threshold_noise: float = 0.025,
                     linear_steps: int | None = None) -> Tensor:
    """Linear then quadratic in 1 - sigma/sigma_max (from genmo's mochi); the last entry is 0."""
    if steps == 1:
        fractions = [1.0, 0.0]
    else:
        n_lin = steps // 2 if linear_steps is None else linear_steps
        n_quad = steps - n_lin
        step_diff = n_lin - threshold_noise * steps
        quad = step_diff / (n_lin * n_quad**2)
        lin = threshold_noise / n_lin - 2 * step_diff / n_quad**2
        const = quad * n_lin**2
        rising = [i * threshold_noise / n_lin for i in range(n_lin)]
        rising += [quad * i**2 + lin * i + const for i in range(n_lin, steps)] + [1.0]
        fractions = [1.0 - r for r in rising]
    return torch.tensor(fractions, dtype=torch.float32) * schedule.sigma_max


# --- schedulers on (sigma_min, sigma_max) ----------------------------------------------------------------------


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022): evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Evenly spaced in log sigma."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Evenly spaced in arctan(sigma) (AUTOMATIC1111 PR 15608)."""
    w = torch.arange(n, dtype=torch.float).div_(n - 1)
    sigmas = w.new_zeros(n + 1)
    sigmas[:-1] = (w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)).tan_()
    return sigmas


def _on_range(fn: Callable[[int, float, float], Tensor]) -> Callable[[DiscreteSchedule, int], Tensor]:
    return lambda schedule, steps: fn(steps, float(schedule.sigma_min), float(schedule.sigma_max))


SCHEDULERS: dict[str, Callable[[DiscreteSchedule, int], Tensor]] = {
    "normal": normal,
    "karras": _on_range(karras),
    "exponential": _on_range(exponential),
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "linear_quadratic": linear_quadratic,
    "kl_optimal": _on_range(kl_optimal),
}


def calculate_sigmas(schedule: DiscreteSchedule, scheduler: str, steps: int) -> Tensor:
    try:
        fn = SCHEDULERS[scheduler]
    except KeyError:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}") from None
    return fn(schedule, steps)
