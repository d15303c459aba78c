"""Multistep samplers that reuse earlier slopes or predictions: linear multistep (lms), iPNDM, RES multistep and
the ER-SDE solver. DPM-Solver++ 2M/3M live with their family in `dpmpp`."""

from __future__ import annotations

import torch
from scipy import integrate
from torch import Tensor

from diffusion.denoisers import to_d
from diffusion.noise import ancestral_step
from diffusion.samplers.common import gaussian_noise, predict, report


def _lms_coeff(order: int, t, i: int, j: int) -> float:
    def basis(tau):
        prod = 1.0
        for k in range(order):
            if j != k:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


def sample_lms(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, order=4):
    """Linear multistep on the derivatives, coefficients by integrating Lagrange polynomials in sigma."""
    extra = extra_args or {}
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = predict(model, x, sigmas[i], extra)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            cur = min(i + 1, order)
            coeffs = [_lms_coeff(cur, sigmas_cpu, i, j) for j in range(cur)]
            x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=False))
    return x


_IPNDM_FIXED = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


def _ipndm_v_coeffs(order: int, h: list) -> list:
    """Variable-step weights of the current and previous slopes; h = [h_n, h_n-1, h_n-2, h_n-3]."""
    if order == 1:
        return [1]
    h0, h1 = h[0], h[1]
    c = [(2 + h0 / h1) / 2, -(h0 / h1) / 2]
    if order == 2:
        return c
    h2 = h[2]
    t1 = (1 - h0 / (3 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return [c[0] + t1, c[1] - (1 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = h[3]
    t2 = ((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2))) \
        * (h0 * (h0 + h1) * (h0 + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [c[0] + t1 + t2, c[1] - (1 + h1 / h2) * t1 - (1 + (h1 / h2) + q) * t2,
            t1 * h1 / h2 + ((h1 / h2) + q * (1 + h2 / h3)) * t2, -t2 * q * h1 / h2]


def _weighted(coeffs, slopes: list[Tensor]) -> Tensor:
    """coeffs[0] * slopes[0] + coeffs[1] * slopes[1] + ..., summed left to right."""
    total = coeffs[0] * slopes[0]
    for c, d in zip(coeffs[1:], slopes[1:], strict=False):
        total = total + c * d
    return total


def _ipndm(model, x, sigmas, extra_args, callback, max_order, variable):
    extra = extra_args or {}
    slopes: list[Tensor] = []  # newest last
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = predict(model, x, t_cur, extra)
        report(callback, x, i, t_cur, denoised)
        d_cur = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        history = [d_cur] + slopes[::-1]
        if t_next == 0:
            x_next = denoised
        elif variable:
            hs = [t_next - t_cur] + [sigmas[i - k] - sigmas[i - k - 1] for k in range(order - 1)]
            x_next = x + (t_next - t_cur) * _weighted(_ipndm_v_coeffs(order, hs), history)
        else:
            numerators, denominator = _IPNDM_FIXED[order]
            x_next = x + (t_next - t_cur) * (_weighted(numerators, history) / denominator if order > 1 else d_cur)
        slopes = (slopes + [d_cur])[-(max_order - 1):]
        x = x_next
    return x


def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, max_order=4):
    """Improved PNDM: Adams-Bashforth on the derivative with fixed-step weights (zju-pi diff-solvers)."""
    return _ipndm(model, x, sigmas, extra_args, callback, max_order, variable=False)


def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, max_order=4):
    """iPNDM with variable-step weights."""
    return _ipndm(model, x, sigmas, extra_args, callback, max_order, variable=True)


def _res_multistep(model, x, sigmas, extra_args, callback, noise_sampler, s_noise, eta):
    """RES second-order multistep (arXiv 2308.02157) in t = -log sigma, optionally ancestral."""
    extra = extra_args or {}
    noise_sampler = gaussian_noise(x, extra, noise_sampler)
    old_sigma_down, old_denoised = None, None
    for i in range(len(sigmas) - 1):
        denoised = predict(model, x, sigmas[i], extra)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        report(callback, x, i, sigmas[i], denoised)
        if sigma_down == 0 or old_denoised is None:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old = sigmas[i].log().neg(), old_sigma_down.log().neg()
            t_next, t_prev = sigma_down.log().neg(), sigmas[i - 1].log().neg()
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            x = h.neg().exp() * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised, old_sigma_down = denoised, sigma_down
    return x


def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, s_noise=1.0):
    return _res_multistep(model, x, sigmas, extra_args, callback, noise_sampler, s_noise, eta=0.0)


def sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                                   eta=1.0, s_noise=1.0):
    return _res_multistep(model, x, sigmas, extra_args, callback, noise_sampler, s_noise, eta=eta)


def _er_sde_noise_scaler(x: Tensor) -> Tensor:
    return x * ((x**0.3).exp() + 10.0)


def sample_er_sde(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, s_noise=1.0, max_stage=3):
    """Extended reverse-time SDE solver, VP ER-SDE-Solver-3 (arXiv 2309.06169)."""
    extra = extra_args or {}
    noise_sampler = gaussian_noise(x, extra, noise_sampler)
    points = 200.0
    point_indice = torch.arange(0, points, dtype=torch.float32, device=x.device)
    er_lambdas = sigmas.log().neg().neg().exp()  # sigma / alpha
    old_denoised, old_denoised_d = None, None
    for i in range(len(sigmas) - 1):
        denoised = predict(model, x, sigmas[i], extra)
        report(callback, x, i, sigmas[i], denoised)
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s, alpha_t = sigmas[i] / lam_s, sigmas[i + 1] / lam_t
            r = _er_sde_noise_scaler(lam_t) / _er_sde_noise_scaler(lam_s)
            x = alpha_t / alpha_s * r * x + alpha_t * (1 - r) * denoised
            if stage >= 2:
                dt = lam_t - lam_s
                step = -dt / points
                pos = lam_t + point_indice * step
                scaled = _er_sde_noise_scaler(pos)
                s = torch.sum(1 / scaled) * step
                denoised_d = (denoised - old_denoised) / (lam_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * _er_sde_noise_scaler(lam_t)) * denoised_d
                if stage >= 3:
                    s_u = torch.sum((pos - lam_s) / scaled) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((lam_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt**2) / 2 + s_u * _er_sde_noise_scaler(lam_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                amount = (lam_t**2 - lam_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * amount
        old_denoised = denoised
    return x
