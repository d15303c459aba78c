"""Random noise, seeded exactly as ComfyUI seeds it, so the same seed gives the same image.

* Initial latent noise: one CPU generator seeded with `seed`, one `randn` over the whole [B, C, h, w] latent;
  with a `batch_index`, one [1, C, h, w] draw per index 0..max(index), keeping the drawn ones (`prepare_noise`).
* Ancestral / per-step noise: a CPU generator seeded with `seed + 1` (ComfyUI's `default_noise_sampler` adds 1
  on CPU so the first step's noise is not the initial noise again; ComfyUI PR 11528).
* SDE samplers: a `torchsde.BrownianTree` on CPU with `entropy=seed` over [sigma_min, sigma_max].

Seeds are integers in [0, 2**64). torch seeds its Mersenne Twister from the low 32 bits only, so e.g. 2**63 draws
what 0 draws; that is torch's behaviour and ComfyUI's too. `seed + 1` wraps to 0 at 2**64 (ComfyUI overflows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchsde
from torch import Tensor

SEED_LIMIT = 2**64

NoiseSampler = Callable[[Tensor, Tensor], Tensor]


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return seed


def cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(check_seed(seed))


def prepare_noise(latent: Tensor, seed: int, batch_index: Sequence[int] | None = None) -> Tensor:
    """The initial noise for `latent`'s shape, drawn on CPU as ComfyUI's `comfy.sample.prepare_noise`."""
    generator = cpu_generator(seed)
    kw = dict(dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu")
    if batch_index is None:
        return torch.randn(latent.size(), **kw)
    unique, inverse = np.unique(np.asarray(batch_index), return_inverse=True)
    drawn = [torch.randn([1, *latent.shape[1:]], **kw) for _ in range(int(unique[-1]) + 1)]
    kept = [drawn[int(i)] for i in unique]
    return torch.cat([kept[int(i)] for i in inverse.reshape(-1)], dim=0)


def inpaint_noise(shape: Sequence[int], seed: int) -> Tensor:
    """Fresh noise for the masked-out area ("ddim" in ComfyUI: euler with inpaint_options random)."""
    return torch.randn(tuple(shape), generator=cpu_generator((seed + 1) % SEED_LIMIT), device="cpu")


def default_noise_sampler(x: Tensor, seed: int | None = None) -> NoiseSampler:
    """Independent N(0, I) noise shaped like x at every call; seed + 1 on CPU as ComfyUI."""
    generator = None
    if seed is not None:
        offset = 1 if x.device.type == "cpu" else 0
        generator = torch.Generator(device=x.device).manual_seed((check_seed(seed) + offset) % SEED_LIMIT)

    def sample(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return sample


def ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(sigma_down, sigma_up): the noise level to step down to and how much fresh noise to add after."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class BrownianTreeNoiseSampler:
    """Brownian increments W(sigma_next) - W(sigma), normalised to unit variance (ComfyUI's, single seed).

    The tree is built once over [sigma_min, sigma_max], so the noise for an interval does not depend on which
    other intervals were asked for; a seed makes it reproducible.
    """

    def __init__(self, x: Tensor, sigma_min, sigma_max, seed: int | None = None, cpu: bool = True):
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self._sign = 1 if t0 < t1 else -1
        t0, t1 = (t0, t1) if t0 < t1 else (t1, t0)
        w0 = torch.zeros_like(x)
        if seed is None:
            seed = torch.randint(0, 2**63 - 1, ()).item()
        self._cpu = cpu
        if cpu:
            t0, w0, t1 = t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu()
        self._tree = torchsde.BrownianTree(t0, w0, t1, entropy=check_seed(seed))

    def __call__(self, sigma, sigma_next) -> Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        device, dtype = lo.device, lo.dtype
        if self._cpu:
            lo, hi = lo.detach().cpu().float(), hi.detach().cpu().float()
        w = self._tree(lo, hi).to(device=device, dtype=dtype) * (self._sign * sign)
        return w / (t1 - t0).abs().sqrt()
