"""DPM-Solver++ (Lu et al. 2022) in t = -log sigma (half-log-SNR; alpha is 1 for eps models): the single-step
2S ancestral and SDE forms, and the multistep 2M, 2M SDE and 3M SDE forms. The _gpu variants keep the Brownian
tree on x's device; on CPU they equal the plain ones."""

from __future__ import annotations

from diffusion.denoisers import to_d
from diffusion.noise import ancestral_step
from diffusion.samplers.common import brownian_noise, predict, report, run_ancestral


def _dpmpp_2s_down(x, sigma, sigma_next, sigma_down, denoised, predict_at):
    if sigma_down == 0:
        return x + to_d(x, sigma, denoised) * (sigma_down - sigma), sigma_next > 0
    t, t_next = sigma.log().neg(), sigma_down.log().neg()
    h = t_next - t
    s = t + 0.5 * h
    x_2 = (s.neg().exp() / t.neg().exp()) * x - (-h * 0.5).expm1() * denoised
    denoised_2 = predict_at(x_2, s.neg().exp())
    return (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_2, sigma_next > 0


def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                              eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) single-step to sigma_down, then ancestral noise."""
    return run_ancestral(model, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, _dpmpp_2s_down)


def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                     eta=1.0, s_noise=1.0, r=0.5, cpu=True):
    """DPM-Solver++ (stochastic), two model calls per step, Brownian-tree noise."""
    if len(sigmas) <= 1:
        return x
    extra = extra_args or {}
    noise_sampler = brownian_noise(x, sigmas, extra, noise_sampler, cpu=cpu)
    for i in range(len(sigmas) - 1):
        denoised = predict(model, x, sigmas[i], extra)
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
        denoised_2 = predict(model, x_2, sigma_s_1, extra)
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
    return sample_dpmpp_sde(model, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, r, cpu=False)


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """DPM-Solver++(2M): second order from the previous prediction, in t = -log sigma."""
    extra = extra_args or {}
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = predict(model, x, sigmas[i], extra)
        report(callback, x, i, sigmas[i], denoised)
        t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = t_next - t
        if old_denoised is not None and sigmas[i + 1] != 0:
            r = (t - sigmas[i - 1].log().neg()) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        else:
            denoised_d = denoised
        x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def _sde_first_order(x, sigma, sigma_next, denoised, eta):
    """The first-order part of a DPM-Solver++ SDE step: (x at sigma_next, h, h * (eta + 1), alpha_t)."""
    lambda_s, lambda_t = sigma.log().neg(), sigma_next.log().neg()
    h = lambda_t - lambda_s
    h_eta = h * (eta + 1)
    alpha_t = sigma_next * lambda_t.exp()
    x = sigma_next / sigma * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
    return x, h, h_eta, alpha_t


def _sde_noise(x, noise_sampler, sigma, sigma_next, h, eta, s_noise):
    if eta > 0 and s_noise > 0:
        noise = noise_sampler(sigma, sigma_next)
        x = x + noise * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
    return x


def _run_sde_multistep(model, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, cpu, correct):
    """The DPM-Solver++ multistep SDE loop: predict, the first-order step, `correct(x, denoised, h, h_eta,
    alpha_t, history)` from the (denoised, h) of up to two earlier steps (newest first), then Brownian noise.
    The last step to sigma 0 lands on the prediction."""
    if len(sigmas) <= 1:
        return x
    extra = extra_args or {}
    noise_sampler = brownian_noise(x, sigmas, extra, noise_sampler, cpu=cpu)
    history, h = [], None
    for i in range(len(sigmas) - 1):
        denoised = predict(model, x, sigmas[i], extra)
        report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x, h, h_eta, alpha_t = _sde_first_order(x, sigmas[i], sigmas[i + 1], denoised, eta)
            x = correct(x, denoised, h, h_eta, alpha_t, history)
            x = _sde_noise(x, noise_sampler, sigmas[i], sigmas[i + 1], h, eta, s_noise)
        history = [(denoised, h), *history[:1]]
    return x


def _second_order(solver_type):
    """2M's correction from the previous prediction, by the midpoint or Heun rule."""

    def correct(x, denoised, h, h_eta, alpha_t, history):
        if not history:
            return x
        old_denoised, h_last = history[0]
        r = h_last / h
        if solver_type == "heun":
            return x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
        return x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)

    return correct


def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                        eta=1.0, s_noise=1.0, solver_type="midpoint", cpu=True):
    """DPM-Solver++(2M) SDE with Brownian-tree noise; solver_type 'midpoint' or 'heun'."""
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    return _run_sde_multistep(model, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, cpu,
                              _second_order(solver_type))


def sample_dpmpp_2m_sde_heun(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                             eta=1.0, s_noise=1.0):
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, "heun")


def sample_dpmpp_2m_sde_gpu(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                            eta=1.0, s_noise=1.0, solver_type="midpoint"):
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, solver_type,
                               cpu=False)


def sample_dpmpp_2m_sde_heun_gpu(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                                 eta=1.0, s_noise=1.0):
    return sample_dpmpp_2m_sde_gpu(model, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, "heun")


def _third_order(x, denoised, h, h_eta, alpha_t, history):
    """3M's correction from the two previous predictions (second order after the first step)."""
    phi_2 = h_eta.neg().expm1() / h_eta + 1
    if len(history) == 2:
        (denoised_1, h_1), (denoised_2, h_2) = history
        r0, r1 = h_1 / h, h_2 / h
        d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_3 = phi_2 / h_eta - 0.5
        return x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
    if history:
        denoised_1, h_1 = history[0]
        return x + (alpha_t * phi_2) * ((denoised - denoised_1) / (h_1 / h))
    return x


def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0,
                        cpu=True):
    """DPM-Solver++(3M) SDE: third order from the two previous predictions."""
    return _run_sde_multistep(model, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, cpu, _third_order)


def sample_dpmpp_3m_sde_gpu(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                            eta=1.0, s_noise=1.0):
    return sample_dpmpp_3m_sde(model, x, sigmas, extra_args, callback, noise_sampler, eta, s_noise, cpu=False)
