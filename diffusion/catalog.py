"""Names of the samplers and schedulers we implement, in ComfyUI's order and spelling.

This module must not import torch: the CLI validates graphs with it alone. The torch tables
(`diffusion.samplers.SAMPLERS`, `diffusion.schedules.SCHEDULERS`) are tested to have exactly these keys.

Order follows ComfyUI's `KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]`, keeping only what we implement
(not implemented: the *_cfg_pp variants, exp_heun_2_x0*, deis, seeds_2/3, sa_solver*).
"""

SAMPLER_NAMES: tuple[str, ...] = (
    "euler",
    "euler_ancestral",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "res_multistep",
    "res_multistep_ancestral",
    "gradient_estimation",
    "er_sde",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
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

# ComfyUI computes one extra step and drops the next-to-last sigma for these (KSampler.calculate_sigmas).
DISCARD_PENULTIMATE_SIGMA_SAMPLERS: frozenset[str] = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})

# ComfyUI's "ddim" is euler whose inpainting noise for the kept area is drawn fresh from seed + 1.
RANDOM_INPAINT_NOISE_SAMPLERS: frozenset[str] = frozenset({"ddim"})
