"""Every sampler against an analytic denoiser.

Data ~ N(0, I) makes the ideal denoiser D(x, sigma) = x / (1 + sigma^2) and the probability-flow ODE solvable:
x(sigma) = x(sigma_0) * sqrt((1 + sigma^2) / (1 + sigma_0^2)). Deterministic samplers must approach it (at
their order); stochastic ones must end with N(0, 1) statistics. A few samplers are also checked number for
number against loops written here straight from ComfyUI's formulas.
"""

import inspect
import math
import warnings

import pytest
import torch
import torchsde

from diffusion import samplers
from diffusion.samplers import SAMPLERS
from diffusion.schedules import calculate_sigmas, sd1_schedule

SD1 = sd1_schedule()
STOCHASTIC = {
    "euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "res_multistep_ancestral", "er_sde",
}
DETERMINISTIC = [n for n in samplers.SAMPLER_NAMES if n not in STOCHASTIC]
# samplers that stop at the last non-zero sigma instead of denoising to 0
ENDS_AT_SIGMA_MIN = {"dpm_fast": None, "dpm_adaptive": None, "uni_pc": 0.001, "uni_pc_bh2": 0.001}

pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")  # torchsde's float32 bound check


class Gaussian:
    """The ideal denoiser for N(0, I) data; counts calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, **extra):
        self.calls += 1
        assert sigma.shape == (x.shape[0],)
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2)


def start(x0, sigmas):
    return x0 * (1 + sigmas[0] ** 2).sqrt()


def exact(x0, sigma_end):
    return x0 * math.sqrt(1 + float(sigma_end) ** 2)


def end_sigma(name, sigmas):
    if name in ENDS_AT_SIGMA_MIN:
        return ENDS_AT_SIGMA_MIN[name] if ENDS_AT_SIGMA_MIN[name] is not None else sigmas[-2]
    return 0.0


def test_table_keys_match_catalog():
    assert tuple(SAMPLERS) == samplers.SAMPLER_NAMES


@pytest.mark.parametrize("name", samplers.SAMPLER_NAMES)
def test_contract(name):
    fn = SAMPLERS[name]
    params = list(inspect.signature(fn).parameters)
    assert params[:6] == ["model", "x", "sigmas", "extra_args", "callback", "noise_sampler"]
    sigmas = calculate_sigmas(SD1, "karras", 6)
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    seen = []
    out = fn(Gaussian(), start(x0, sigmas), sigmas, extra_args={"seed": 3}, callback=seen.append)
    assert out.shape == x0.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert seen and all({"x", "i", "denoised"} <= set(info) for info in seen)
    steps = [info["i"] for info in seen]
    assert steps == sorted(steps) and steps[0] == 0
    again = fn(Gaussian(), start(x0, sigmas), sigmas, extra_args={"seed": 3})
    assert torch.equal(out, again), "same seed, same result"
    other = fn(Gaussian(), start(x0, sigmas), sigmas, extra_args={"seed": 4})
    assert torch.equal(out, other) == (name not in STOCHASTIC), "only stochastic samplers depend on the seed"


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_follow_the_ode(name):
    tolerance = {"euler": 0.35, "ddim": 0.35, "heunpp2": 0.3, "gradient_estimation": 0.3, "dpm_adaptive": 0.15,
                 "heun": 0.06, "res_multistep": 0.09, "dpmpp_2m": 0.06}.get(name, 0.035)
    sigmas = calculate_sigmas(SD1, "karras", 20)
    x0 = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    out = SAMPLERS[name](Gaussian(), start(x0, sigmas), sigmas, extra_args={"seed": 0})
    want = exact(x0, end_sigma(name, sigmas))
    err = (out - want).abs().max() / want.abs().max()
    assert err < tolerance
    # and a do-nothing sampler would be far off
    assert ((start(x0, sigmas) - want).abs().max() / want.abs().max()) > 10


ORDER = {"euler": 1, "ddim": 1, "heun": 2, "dpm_2": 2, "dpmpp_2m": 2, "res_multistep": 2, "ipndm": 2,
         "ipndm_v": 2, "lms": 2}


@pytest.mark.parametrize("name", sorted(ORDER))
def test_convergence_order(name):
    x0 = torch.randn(4, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    errors = []
    for n in (20, 40):
        sigmas = calculate_sigmas(SD1, "exponential", n).double()
        out = SAMPLERS[name](Gaussian(), start(x0, sigmas), sigmas)
        errors.append((out - x0).abs().max().item())
    # halving the step divides the error by about 2^order
    assert errors[0] / errors[1] > (1.8 if ORDER[name] == 1 else 3.5), errors


@pytest.mark.parametrize("name", sorted(STOCHASTIC - {"lcm"}))
def test_stochastic_samplers_sample_the_data_distribution(name):
    sigmas = calculate_sigmas(SD1, "karras", 100)
    x0 = torch.randn(16, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    out = SAMPLERS[name](Gaussian(), start(x0, sigmas), sigmas, extra_args={"seed": 12345})
    assert abs(out.mean().item()) < 0.02
    assert out.std().item() == pytest.approx(1.0, abs=0.05)
    # the noise really is fresh: the result is not the deterministic ODE answer
    assert (out - x0).std() > 0.3


def test_lcm_returns_the_last_prediction():
    sigmas = calculate_sigmas(SD1, "karras", 5)
    seen = []
    out = SAMPLERS["lcm"](Gaussian(), torch.randn(2, 4, 3, 3) * 14.6, sigmas, {"seed": 1}, seen.append)
    assert torch.equal(out, seen[-1]["denoised"])


@pytest.mark.parametrize("gpu", ["dpmpp_sde_gpu", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde_gpu"])
def test_gpu_variants_equal_cpu_ones_on_cpu(gpu):
    sigmas = calculate_sigmas(SD1, "normal", 8)
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    a = SAMPLERS[gpu](Gaussian(), start(x0, sigmas), sigmas, extra_args={"seed": 9})
    b = SAMPLERS[gpu.removesuffix("_gpu")](Gaussian(), start(x0, sigmas), sigmas, extra_args={"seed": 9})
    assert torch.equal(a, b)


@pytest.mark.parametrize(("name", "calls"), [
    ("euler", lambda n: n), ("heun", lambda n: 2 * n - 1), ("dpm_2", lambda n: 2 * n - 1),
    ("dpmpp_sde", lambda n: 2 * n - 1), ("dpmpp_2s_ancestral", lambda n: 2 * n - 1), ("lms", lambda n: n),
    ("dpmpp_2m", lambda n: n), ("uni_pc", lambda n: n), ("dpm_fast", lambda n: n), ("heunpp2", lambda n: 3 * n - 3),
])
def test_model_evaluations(name, calls):
    sigmas = calculate_sigmas(SD1, "karras", 9)
    model = Gaussian()
    SAMPLERS[name](model, torch.randn(1, 4, 2, 2) * 14.6, sigmas, extra_args={"seed": 0})
    assert model.calls == calls(9)


# --- golden: loops written directly from ComfyUI's formulas ----------------------------------------------------


def D(x, s):
    return x / (1 + s**2)


def golden_euler(x, sig):
    for i in range(len(sig) - 1):
        x = x + (x - D(x, sig[i])) / sig[i] * (sig[i + 1] - sig[i])
    return x


def golden_euler_ancestral(x, sig, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        up = min(s1, (s1**2 * (s**2 - s1**2) / s**2) ** 0.5)
        down = (s1**2 - up**2) ** 0.5
        den = D(x, s)
        x = den if down == 0 else x + (x - den) / s * (down - s) + torch.randn(x.shape, generator=gen) * up
    return x


def golden_dpmpp_2m(x, sig):
    old = None
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        den = D(x, s)
        if s1 == 0:
            x = den
        elif old is None:
            x = (s1 / s) * x - math.expm1(-math.log(s / s1)) * den
        else:
            h, h_last = math.log(s / s1), math.log(sig[i - 1] / s)
            r = h_last / h
            x = (s1 / s) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old)
        old = den
    return x


def golden_dpmpp_2m_sde(x, sig, seed):
    positive = [s for s in sig if s > 0]
    tree = torchsde.BrownianTree(torch.tensor(min(positive)), torch.zeros_like(x), torch.tensor(max(sig)),
                                 entropy=seed)
    old = h_last = None
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        den = D(x, s)
        if s1 == 0:
            x = den
        else:
            h = math.log(s / s1)
            keep = -math.expm1(-2 * h)
            x = (s1 / s) * math.exp(-h) * x + keep * den
            if old is not None:
                x = x + 0.5 * keep * (h / h_last) * (den - old)
            dw = -tree(torch.tensor(s1), torch.tensor(s)) / math.sqrt(s - s1)
            x = x + dw * s1 * math.sqrt(keep)
            h_last = h
        old = den
    return x


@pytest.mark.parametrize("scheduler", ["karras", "normal"])
def test_golden_values(scheduler):
    sigmas = calculate_sigmas(SD1, scheduler, 12)
    sig = [float(s) for s in sigmas]
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    x = start(x0, sigmas)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = {
            "euler": golden_euler(x, sig),
            "euler_ancestral": golden_euler_ancestral(x, sig, 77),
            "dpmpp_2m": golden_dpmpp_2m(x, sig),
            "dpmpp_2m_sde": golden_dpmpp_2m_sde(x, sig, 77),
        }
        for name, want in cases.items():
            got = SAMPLERS[name](Gaussian(), x, sigmas, extra_args={"seed": 77})
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=name)


def test_one_table_of_specs_says_which_samplers_draw_noise():
    """Issue #11: one table of sampler specs (name, function, noise needed, sigma and inpainting quirks)."""
    assert {spec.name for spec in samplers.SAMPLER_SPECS if spec.noise != "none"} == STOCHASTIC
    brownian = {spec.name for spec in samplers.SAMPLER_SPECS if spec.noise == "brownian"}
    assert brownian == {name for name in STOCHASTIC if name.startswith(("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"))}
    assert samplers.DISCARD_PENULTIMATE_SIGMA_SAMPLERS == {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}
    assert samplers.RANDOM_INPAINT_NOISE_SAMPLERS == {"ddim"}
    assert SAMPLERS["ddim"] is SAMPLERS["euler"]


def test_the_table_imports_without_torch():
    """The CLI validates graphs with the sampler names alone, so the table module must not import torch."""
    import subprocess
    import sys

    code = "import sys, diffusion.samplers as s; assert s.SAMPLER_NAMES; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "False"
