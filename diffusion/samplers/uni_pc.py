"""UniPC (Zhao et al. 2023): multistep predictor-corrector in data prediction, variants B(h) = h ("bh1") or
e^h - 1 ("bh2"), as ComfyUI runs it for "uni_pc" / "uni_pc_bh2" (`comfy/extra_samplers/uni_pc.py`:
time-uniform multistep, order min(3, steps - 1), lower order at the end, no corrector on the last step).

UniPC works in variance-preserving scaling: x_vp = x / sqrt(1 + sigma^2), alpha = 1 / sqrt(1 + sigma^2). The last
sigma 0 is replaced by 0.001 and the result divided by that alpha, as ComfyUI does.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _log_alpha(sigma: Tensor) -> Tensor:
    return 0.5 * torch.log(1 / ((sigma * sigma) + 1))


def _alpha(sigma: Tensor) -> Tensor:
    return torch.exp(_log_alpha(sigma))


def _std(sigma: Tensor) -> Tensor:
    return torch.sqrt(1.0 - torch.exp(2.0 * _log_alpha(sigma)))


def _lambda(sigma: Tensor) -> Tensor:
    """Half log-SNR log(alpha / std)."""
    log_alpha = _log_alpha(sigma)
    return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


def _col(v: Tensor, ndim: int) -> Tensor:
    return v[(...,) + (None,) * (ndim - 1)]


def _bh_update(x, model_prev, t_prev, t, order, x0_fn, variant, use_corrector):
    """One UniPC step from t_prev[-1] to t: predictor of `order`, then (optionally) the corrector."""
    ndim = x.dim()
    lambda_prev_0, lambda_t = _lambda(t_prev[-1]), _lambda(t)
    model_prev_0 = model_prev[-1]
    sigma_prev_0, sigma_t = _std(t_prev[-1]), _std(t)
    alpha_t = torch.exp(_log_alpha(t))
    h = lambda_t - lambda_prev_0

    rks, d1s = [], []
    for i in range(1, order):
        rk = ((_lambda(t_prev[-(i + 1)]) - lambda_prev_0) / h)[0]
        rks.append(float(rk))
        d1s.append((model_prev[-(i + 1)] - model_prev_0) / rk)
    rks = torch.tensor(rks + [1.0], dtype=h.dtype, device=x.device)

    hh = -h[0]
    h_phi_1 = torch.expm1(hh)
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    h_phi_k, factorial, powers, b = h_phi_1 / hh - 1, 1, [], []
    for i in range(1, order + 1):
        powers.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(powers), torch.stack(b).to(x.device)

    d1s = torch.stack(d1s, dim=1) if d1s else None
    x_t_ = _col(sigma_t / sigma_prev_0, ndim) * x - _col(alpha_t * h_phi_1, ndim) * model_prev_0
    pred_res = 0
    if d1s is not None:
        rhos_p = torch.tensor([0.5], device=x.device) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        pred_res = torch.einsum("k,bkchw->bchw", rhos_p, d1s)
    x_t = x_t_ - _col(alpha_t * b_h, ndim) * pred_res

    model_t = None
    if use_corrector:
        rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(R, b)
        model_t = x0_fn(x_t, t)
        corr_res = torch.einsum("k,bkchw->bchw", rhos_c[:-1], d1s) if d1s is not None else 0
        x_t = x_t_ - _col(alpha_t * b_h, ndim) * (corr_res + rhos_c[-1] * (model_t - model_prev_0))
    return x_t, model_t


def sample_unipc(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, variant="bh1"):
    """UniPC multistep; `variant` "bh1" (ComfyUI's uni_pc) or "bh2" (uni_pc_bh2)."""
    if variant not in {"bh1", "bh2"}:
        raise ValueError("variant must be 'bh1' or 'bh2'")
    extra = extra_args or {}
    timesteps = sigmas.clone()
    if sigmas[-1] == 0:
        timesteps[-1] = 0.001
    batch, steps = x.shape[0], len(timesteps) - 1
    order = min(3, len(timesteps) - 2)

    def x0_fn(x_vp: Tensor, sigma: Tensor) -> Tensor:
        s = sigma.view(sigma.shape[:1] + (1,) * (x_vp.ndim - 1))
        x_in = x_vp * ((s**2 + 1.0) ** 0.5)
        eps = (x_in - model(x_in, sigma, **extra)) / s
        return (x_vp - _col(_std(sigma), x_vp.ndim) * eps) / _col(_alpha(sigma), x_vp.ndim)

    x = x / torch.sqrt(1.0 + timesteps[0] ** 2.0)
    model_prev: list[Tensor] = []
    t_prev: list[Tensor] = []
    for step_index in range(steps):
        if step_index == 0:
            vec_t = timesteps[0].expand(batch)
            model_prev, t_prev = [x0_fn(x, vec_t)], [vec_t]
        elif step_index < order:
            vec_t = timesteps[step_index].expand(batch)
            x, model_x = _bh_update(x, model_prev, t_prev, vec_t, step_index, x0_fn, variant, True)
            model_prev.append(x0_fn(x, vec_t) if model_x is None else model_x)
            t_prev.append(vec_t)
        else:
            last = step_index + (2 if step_index == steps - 1 else 1)
            for step in range(step_index, last):
                vec_t = timesteps[step].expand(batch)
                step_order = min(order, steps + 1 - step)
                x, model_x = _bh_update(x, model_prev, t_prev, vec_t, step_order, x0_fn, variant, step != steps)
                model_prev, t_prev = model_prev[1:] + model_prev[-1:], t_prev[1:] + [vec_t]
                if step < steps:
                    model_prev[-1] = x0_fn(x, vec_t) if model_x is None else model_x
        if callback is not None:
            callback({"x": x, "i": step_index, "sigma": timesteps[step_index], "sigma_hat": timesteps[step_index],
                      "denoised": model_prev[-1]})
    return x / _alpha(timesteps[-1])


def sample_unipc_bh2(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    return sample_unipc(model, x, sigmas, extra_args, callback, noise_sampler, variant="bh2")
