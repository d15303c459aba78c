"""The samplers: one table of specs here, one module per family beside it.

Every sampler is a small pure function with k-diffusion's signature

    sample_x(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, **options) -> x

`model(x, sigma_batch, **extra_args)` returns the denoised prediction; `x` starts at noise level `sigmas[0]`
(k-diffusion scaling: x = data + sigma * noise); `extra_args["seed"]` seeds the default noise samplers
(deterministic samplers take `noise_sampler` only to share the signature). `callback` gets k-diffusion's dict
{"x", "i", "sigma", "sigma_hat", "denoised"} once per model step. The maths and defaults follow ComfyUI's copy of
k-diffusion (`comfy/k_diffusion/sampling.py`) for eps models.

This module must not import torch: the CLI validates graphs with the names alone. A spec names its function as
"module:attribute" inside this package, and `SAMPLERS[name]` imports it on lookup. Names and order are ComfyUI's
(`KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]`), keeping only what we implement (not implemented: the
*_cfg_pp variants, exp_heun_2_x0*, deis, seeds_2/3, sa_solver*).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Sampler = Callable[..., Any]


@dataclass(frozen=True)
class SamplerSpec:
    """One ComfyUI sampler name and what it needs.

    noise: what randomness the sampler draws per step ("none": deterministic; "gaussian": a seeded CPU
    generator; "brownian": a Brownian tree over the sigma range). discard_penultimate_sigma: ComfyUI computes one
    extra step and drops the next-to-last sigma (KSampler.calculate_sigmas). fresh_inpaint_noise: the noise for the
    kept area of an inpainting mask is drawn fresh from seed + 1 (ComfyUI's "ddim").
    """

    name: str
    function: str  # "module:attribute" in diffusion.samplers
    noise: Literal["none", "gaussian", "brownian"] = "none"
    discard_penultimate_sigma: bool = False
    fresh_inpaint_noise: bool = False

    def load(self) -> Sampler:
        module, attribute = self.function.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), attribute)


SAMPLER_SPECS: tuple[SamplerSpec, ...] = (
    SamplerSpec("euler", "euler:sample_euler"),
    SamplerSpec("euler_ancestral", "euler:sample_euler_ancestral", noise="gaussian"),
    SamplerSpec("heun", "euler:sample_heun"),
    SamplerSpec("heunpp2", "euler:sample_heunpp2"),
    SamplerSpec("dpm_2", "euler:sample_dpm_2", discard_penultimate_sigma=True),
    SamplerSpec("dpm_2_ancestral", "euler:sample_dpm_2_ancestral", noise="gaussian", discard_penultimate_sigma=True),
    SamplerSpec("lms", "multistep:sample_lms"),
    SamplerSpec("dpm_fast", "dpm_solver:sample_dpm_fast"),
    SamplerSpec("dpm_adaptive", "dpm_solver:sample_dpm_adaptive"),
    SamplerSpec("dpmpp_2s_ancestral", "dpmpp:sample_dpmpp_2s_ancestral", noise="gaussian"),
    SamplerSpec("dpmpp_sde", "dpmpp:sample_dpmpp_sde", noise="brownian"),
    SamplerSpec("dpmpp_sde_gpu", "dpmpp:sample_dpmpp_sde_gpu", noise="brownian"),
    SamplerSpec("dpmpp_2m", "dpmpp:sample_dpmpp_2m"),
    SamplerSpec("dpmpp_2m_sde", "dpmpp:sample_dpmpp_2m_sde", noise="brownian"),
    SamplerSpec("dpmpp_2m_sde_gpu", "dpmpp:sample_dpmpp_2m_sde_gpu", noise="brownian"),
    SamplerSpec("dpmpp_2m_sde_heun", "dpmpp:sample_dpmpp_2m_sde_heun", noise="brownian"),
    SamplerSpec("dpmpp_2m_sde_heun_gpu", "dpmpp:sample_dpmpp_2m_sde_heun_gpu", noise="brownian"),
    SamplerSpec("dpmpp_3m_sde", "dpmpp:sample_dpmpp_3m_sde", noise="brownian"),
    SamplerSpec("dpmpp_3m_sde_gpu", "dpmpp:sample_dpmpp_3m_sde_gpu", noise="brownian"),
    SamplerSpec("ddpm", "ddpm:sample_ddpm", noise="gaussian"),
    SamplerSpec("lcm", "ddpm:sample_lcm", noise="gaussian"),
    SamplerSpec("ipndm", "multistep:sample_ipndm"),
    SamplerSpec("ipndm_v", "multistep:sample_ipndm_v"),
    SamplerSpec("res_multistep", "multistep:sample_res_multistep"),
    SamplerSpec("res_multistep_ancestral", "multistep:sample_res_multistep_ancestral", noise="gaussian"),
    SamplerSpec("gradient_estimation", "euler:sample_gradient_estimation"),
    SamplerSpec("er_sde", "multistep:sample_er_sde", noise="gaussian"),
    # ComfyUI's "ddim" is euler, plus fresh inpainting noise.
    SamplerSpec("ddim", "euler:sample_euler", fresh_inpaint_noise=True),
    SamplerSpec("uni_pc", "uni_pc:sample_unipc", discard_penultimate_sigma=True),
    SamplerSpec("uni_pc_bh2", "uni_pc:sample_unipc_bh2", discard_penultimate_sigma=True),
)

SCHEDULER_NAMES: tuple[str, ...] = (
    "normal",
    "karras",
    "exponential",
    "sgm_uniform",
    "simple",
    "ddim_uniform",
    "beta",
    "linear_quadratic",
    "kl_optimal",
)

SAMPLER_NAMES: tuple[str, ...] = tuple(spec.name for spec in SAMPLER_SPECS)
DISCARD_PENULTIMATE_SIGMA_SAMPLERS: frozenset[str] = frozenset(
    spec.name for spec in SAMPLER_SPECS if spec.discard_penultimate_sigma
)
RANDOM_INPAINT_NOISE_SAMPLERS: frozenset[str] = frozenset(
    spec.name for spec in SAMPLER_SPECS if spec.fresh_inpaint_noise
)


class SamplerTable(Mapping[str, Sampler]):
    """Name -> sampler function, in table order; each lookup imports the family module (Python caches it)."""

    def __init__(self, specs: tuple[SamplerSpec, ...]) -> None:
        self._specs = {spec.name: spec for spec in specs}

    def __getitem__(self, name: str) -> Sampler:
        return self._specs[name].load()

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


SAMPLERS: Mapping[str, Sampler] = SamplerTable(SAMPLER_SPECS)
