"""Samplers: small pure functions with one signature, and the table that names them.

    sample_x(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, **options) -> x

`model(x, sigma_batch, **extra_args)` returns the denoised prediction; `x` starts at noise level `sigmas[0]`
(k-diffusion scaling: x = data + sigma * noise); `extra_args["seed"]` seeds the default noise samplers
(deterministic samplers take `noise_sampler` only to share the signature). `callback` gets k-diffusion's dict
{"x", "i", "sigma", "sigma_hat", "denoised"} once per model step. The maths and defaults follow ComfyUI's copy
of k-diffusion (`comfy/k_diffusion/sampling.py`) for eps models; single-step methods live here, multistep ones
in `samplers_multistep`, UniPC in `uni_pc`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffusion import samplers_multistep as ms
from diffusion import uni_pc
from diffusion.denoisers import to_d
from diffusion.noise import BrownianTreeNoiseSampler, ancestral_step, default_noise_sampler
from diffusion.samplers_multistep import report

Sampler = Callable[..., Tensor]


def sample_euler(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    extra = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra)
        report(callback, x, i, sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                           eta=1.0, s_noise=1.0):
    """Euler step down to sigma_down, then fresh noise up to sigmas[i + 1]."""
    extra = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x, seed=extra.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        report(callback, x, i, sigmas[i], denoised)
        if sigma_down == 0:
            x = denoised
        else:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def sample_heun(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """Heun's method (trapezoidal); the last step to sigma 0 is plain Euler."""
    extra = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra)
        d = to_d(x, sigmas[i], denoised)
        report(callback, x, i, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra))
            x = x + (d + d_2) / 2 * dt
    return x


def sample_heunpp2(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """Heun++ (Carzit's sd-webui-samplers-scheduler): up to three slopes, weighted by sigma / sigmas[0]."""
    extra = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra)
        d = to_d(x, sigmas[i], denoised)
        report(callback, x, i, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra))
        if sigmas[i + 2] == s_end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * s_in, **extra))
            w = 3 * sigmas[0]
            w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """DPM-Solver-2 flavoured midpoint steps (midpoint in log sigma); Euler for the last step to 0."""
    extra = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra)
        d = to_d(x, sigmas[i], denoised)
        report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                           eta=1.0, s_noise=1.0):
    extra = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x, seed=extra.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        report(callback, x, i, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                              eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) single-step to sigma_down, then ancestral noise."""
    extra = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x, seed=extra.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        report(callback, x, i, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = sigmas[i].log().neg(), sigma_down.log().neg()
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (s.neg().exp() / t.neg().exp()) * x - (-h * 0.5).expm1() * denoised
            denoised_2 = model(x_2, s.neg().exp() * s_in, **extra)
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                     eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic), two model calls per step, Brownian-tree noise."""
    if len(sigmas) <= 1:
        return x
    extra = extra_args or {}
    if noise_sampler is None:
        noise_sampler = BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=extra.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra)
        report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        fac = 1 / (2 * r)
        sigma_s_1 = lambda_s_1.neg().exp()
        alpha_s = sigmas[i] * lambda_s.exp()
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        # Step 1: to the intermediate point
        sd, su = ancestral_step(lambda_s.neg().exp(), lambda_s_1.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s_1 * noise_sampler(sigmas[i], sigma_s_1) * s_noise * su
        denoised_2 = model(x_2, sigma_s_1 * s_in, **extra)
        # Step 2: the whole step with the blended prediction
        sd, su = ancestral_step(lambda_s.neg().exp(), lambda_t.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


def sample_dpmpp_sde_gpu(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                         eta=1.0, s_noise=1.0, r=0.5):
    """dpmpp_sde with the Brownian tree on x's device (on CPU this is dpmpp_sde)."""
    if len(sigmas) <= 1:
        return x
    if noise_sampler is None:
        seed = (extra_args or {}).get("seed")
        noise_sampler = BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed, cpu=False)
    return sample_dpmpp_sde(model, x, sigmas, extra_args, callback, noise_sampler, eta=eta, s_noise=s_noise, r=r)


def _ddpm_step(x, sigma, sigma_prev, eps, noise_sampler):
    alpha_cumprod = 1 / ((sigma * sigma) + 1)
    alpha_cumprod_prev = 1 / ((sigma_prev * sigma_prev) + 1)
    alpha = alpha_cumprod / alpha_cumprod_prev
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * eps / (1 - alpha_cumprod).sqrt())
    if sigma_prev > 0:
        spread = ((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt()
        mu += spread * noise_sampler(sigma, sigma_prev)
    return mu


def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """Ancestral DDPM posterior steps, done in the variance-preserving scaling."""
    extra = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x, seed=extra.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra)
        report(callback, x, i, sigmas[i], denoised)
        eps = (x - denoised) / sigmas[i]
        x = _ddpm_step(x / torch.sqrt(1.0 + sigmas[i] ** 2.0), sigmas[i], sigmas[i + 1], eps, noise_sampler)
        if sigmas[i + 1] != 0:
            x *= torch.sqrt(1.0 + sigmas[i + 1] ** 2.0)
    return x


def sample_lcm(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """Latent-consistency sampling: jump to the prediction, re-noise to the next level."""
    extra = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x, seed=extra.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra)
        report(callback, x, i, sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] + x
    return x


# --- DPM-Solver (Lu et al. 2022) with fixed or adaptive steps in t = -log sigma ---------------------------------


def _dpm_eps(model, extra, cache: dict, key: str, x: Tensor, t: Tensor) -> Tensor:
    if key not in cache:
        sigma = t.neg().exp()
        cache[key] = (x - model(x, sigma * x.new_ones([x.shape[0]]), **extra)) / sigma
    return cache[key]


def _dpm_step(model, extra, cache, x, t, t_next, order, r1=None):
    """One DPM-Solver step of order 1, 2 (midpoint r1, default 1/2) or 3 (r1 = 1/3, r2 = 2/3)."""
    h = t_next - t
    sig = lambda u: u.neg().exp()  # noqa: E731
    eps = _dpm_eps(model, extra, cache, "eps", x, t)
    base = x - sig(t_next) * h.expm1() * eps
    if order == 1:
        return base
    r1 = (1 / 2 if order == 2 else 1 / 3) if r1 is None else r1
    s1 = t + r1 * h
    u1 = x - sig(s1) * (r1 * h).expm1() * eps
    eps_r1 = _dpm_eps(model, extra, cache, "eps_r1", u1, s1)
    if order == 2:
        return base - sig(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
    r2 = 2 / 3
    s2 = t + r2 * h
    u2 = x - sig(s2) * (r2 * h).expm1() * eps - sig(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
    eps_r2 = _dpm_eps(model, extra, cache, "eps_r2", u2, s2)
    return base - sig(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)


def _dpm_noise(sigma_from, sigma_to, t_end, eta):
    """(t to step to, extra noise amount) for an eta-ancestral DPM-Solver step."""
    sd, _ = ancestral_step(sigma_from, sigma_to, eta)
    t_to = torch.minimum(t_end, sd.log().neg())
    return t_to, (sigma_to**2 - t_to.neg().exp() ** 2) ** 0.5


def dpm_solver_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, noise_sampler=None,
                    eta=0.0, s_noise=1.0):
    """DPM-Solver-fast: n model calls spread over third-order steps (plus a final 2/1)."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    extra = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x, seed=extra.get("seed"))
    t_start, t_end = torch.as_tensor(sigma_max).log().neg(), torch.as_tensor(sigma_min).log().neg()
    if not t_end > t_start and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    m = math.floor(n / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        cache: dict = {}
        t, t_next = ts[i], ts[i + 1]
        t_to, su = _dpm_noise(t.neg().exp(), t_next.neg().exp(), t_end, eta) if eta else (t_next, 0.0)
        denoised = x - t.neg().exp() * _dpm_eps(model, extra, cache, "eps", x, t)
        report(callback, x, i, t.neg().exp(), denoised, t=t, t_up=t)
        x = _dpm_step(model, extra, cache, x, t, t_to, order)
        x = x + su * s_noise * noise_sampler(t.neg().exp(), t_next.neg().exp())
    return x


def dpm_solver_adaptive(model, x, sigma_min, sigma_max, n=None, extra_args=None, callback=None, noise_sampler=None,
                        order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                        accept_safety=0.81, eta=0.0, s_noise=1.0):
    """DPM-Solver-12/23 with an embedded error estimate and a PID step-size controller (n is unused)."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    if order not in {2, 3}:
        raise ValueError("order should be 2 or 3")
    extra = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x, seed=extra.get("seed"))
    t_start, t_end = torch.as_tensor(sigma_max).log().neg(), torch.as_tensor(sigma_min).log().neg()
    forward = t_end > t_start
    if not forward and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    h = abs(h_init) * (1 if forward else -1)
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    ctrl_order = 1.5 if eta else order
    b1, b2, b3 = (pcoeff + icoeff + dcoeff) / ctrl_order, -(pcoeff + 2 * dcoeff) / ctrl_order, dcoeff / ctrl_order
    errs: list[float] = []
    s, x_prev, steps = t_start, x, 0
    while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
        cache: dict = {}
        t = torch.minimum(t_end, s + h) if forward else torch.maximum(t_end, s + h)
        t_to, su = _dpm_noise(s.neg().exp(), t.neg().exp(), t_end, eta) if eta else (t, 0.0)
        denoised = x - s.neg().exp() * _dpm_eps(model, extra, cache, "eps", x, s)
        if order == 2:
            x_low = _dpm_step(model, extra, cache, x, s, t_to, 1)
            x_high = _dpm_step(model, extra, cache, x, s, t_to, 2)
        else:
            x_low = _dpm_step(model, extra, cache, x, s, t_to, 2, r1=1 / 3)
            x_high = _dpm_step(model, extra, cache, x, s, t_to, 3)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        inv_error = 1 / (float(error) + 1e-8)
        errs = [inv_error] * 3 if not errs else [inv_error] + errs[1:]
        factor = 1 + math.atan(errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3 - 1)
        if factor >= accept_safety:
            errs = [errs[0], errs[0], errs[1]]
            x_prev = x_low
            x = x_high + su * s_noise * noise_sampler(s.neg().exp(), t.neg().exp())
            s = t
        h *= factor
        steps += 1
        report(callback, x, steps - 1, s.neg().exp(), denoised, t=s, t_up=s, error=error, h=h)
    return x


def _on_sigma_range(fn: Sampler) -> Sampler:
    """ComfyUI runs dpm_fast / dpm_adaptive between sigmas[0] and the last non-zero sigma."""

    def run(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, **options):
        if len(sigmas) <= 1:
            return x
        sigma_min = sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]
        return fn(model, x, sigma_min, sigmas[0], len(sigmas) - 1, extra_args=extra_args, callback=callback,
                  noise_sampler=noise_sampler, **options)

    run.__name__ = run.__qualname__ = f"sample_{fn.__name__.removeprefix('dpm_solver_')}"
    run.__doc__ = fn.__doc__
    return run


SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "heunpp2": sample_heunpp2,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": ms.sample_lms,
    "dpm_fast": _on_sigma_range(dpm_solver_fast),
    "dpm_adaptive": _on_sigma_range(dpm_solver_adaptive),
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_gpu": sample_dpmpp_sde_gpu,
    "dpmpp_2m": ms.sample_dpmpp_2m,
    "dpmpp_2m_sde": ms.sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": ms.sample_dpmpp_2m_sde_gpu,
    "dpmpp_2m_sde_heun": ms.sample_dpmpp_2m_sde_heun,
    "dpmpp_2m_sde_heun_gpu": ms.sample_dpmpp_2m_sde_heun_gpu,
    "dpmpp_3m_sde": ms.sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": ms.sample_dpmpp_3m_sde_gpu,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "ipndm": ms.sample_ipndm,
    "ipndm_v": ms.sample_ipndm_v,
    "res_multistep": ms.sample_res_multistep,
    "res_multistep_ancestral": ms.sample_res_multistep_ancestral,
    "gradient_estimation": ms.sample_gradient_estimation,
    "er_sde": ms.sample_er_sde,
    "ddim": sample_euler,  # ComfyUI's "ddim" is euler (plus fresh inpainting noise, see catalog)
    "uni_pc": uni_pc.sample_unipc,
    "uni_pc_bh2": uni_pc.sample_unipc_bh2,
}
