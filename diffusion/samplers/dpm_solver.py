"""DPM-Solver (Lu et al. 2022) with fixed ("dpm_fast") or adaptive ("dpm_adaptive") steps in t = -log sigma.

ComfyUI runs both between sigmas[0] and the last non-zero sigma; `sample_dpm_fast` / `sample_dpm_adaptive` take the
shared sampler signature and call the solvers on that range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion.noise import ancestral_step
from diffusion.samplers.common import gaussian_noise, predict, report


def _dpm_eps(model, extra, cache: dict, key: str, x: Tensor, t: Tensor) -> Tensor:
    if key not in cache:
        sigma = t.neg().exp()
        cache[key] = (x - predict(model, x, sigma, extra)) / sigma
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
    noise_sampler = gaussian_noise(x, extra, noise_sampler)
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
    noise_sampler = gaussian_noise(x, extra, noise_sampler)
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


def _on_sigma_range(solver):
    """ComfyUI runs dpm_fast / dpm_adaptive between sigmas[0] and the last non-zero sigma."""

    def run(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, **options):
        if len(sigmas) <= 1:
            return x
        sigma_min = sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]
        return solver(model, x, sigma_min, sigmas[0], len(sigmas) - 1, extra_args=extra_args, callback=callback,
                      noise_sampler=noise_sampler, **options)

    run.__name__ = run.__qualname__ = f"sample_{solver.__name__.removeprefix('dpm_solver_')}"
    run.__doc__ = solver.__doc__
    return run


sample_dpm_fast = _on_sigma_range(dpm_solver_fast)
sample_dpm_adaptive = _on_sigma_range(dpm_solver_adaptive)
