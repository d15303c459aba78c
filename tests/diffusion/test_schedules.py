import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion import samplers
from diffusion.schedules import SCHEDULERS, calculate_sigmas, karras, scaled_linear_betas, sd1_schedule

SD1 = sd1_schedule()


def test_table_keys_match_catalog():
    assert tuple(SCHEDULERS) == samplers.SCHEDULER_NAMES


def test_sd1_table_matches_an_independent_float64_computation():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    acp = np.cumprod(1.0 - betas)
    sigmas = np.sqrt((1 - acp) / acp)
    assert SD1.sigmas.dtype == torch.float32 and SD1.sigmas.shape == (1000,)
    np.testing.assert_array_equal(SD1.sigmas.numpy(), sigmas.astype(np.float32))
    # ComfyUI takes the log in float64, then casts
    np.testing.assert_array_equal(SD1.log_sigmas.numpy(), np.log(sigmas).astype(np.float32))
    assert SD1.sigmas[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert SD1.sigmas[-1].item() == pytest.approx(14.6146, abs=1e-4)
    assert scaled_linear_betas().dtype == torch.float64


def test_timestep_is_nearest_log_sigma_index():
    assert int(SD1.timestep(SD1.sigma_max)) == 999
    assert int(SD1.timestep(SD1.sigma_min)) == 0
    idx = torch.tensor([0, 1, 17, 500, 998, 999])
    assert torch.equal(SD1.timestep(SD1.sigmas[idx]), idx)
    # halfway in log space between entries 10 and 11 rounds to one of them; just past it goes to 11
    mid = ((SD1.log_sigmas[10] + SD1.log_sigmas[11]) / 2 + 1e-4).exp()
    assert int(SD1.timestep(mid)) == 11
    assert SD1.timestep(SD1.sigmas[idx].view(2, 3)).shape == (2, 3)


def test_sigma_of_fractional_timestep_interpolates_log_sigma():
    t = torch.tensor([0.0, 999.0, 10.25, 2000.0, -5.0])
    got = SD1.sigma(t)
    ls = SD1.log_sigmas
    want = torch.stack([ls[0], ls[999], 0.75 * ls[10] + 0.25 * ls[11], ls[999], ls[0]]).exp()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def _rounded(t, n=4):
    return [round(v, n) for v in t.tolist()]


def test_known_values_normal_20():
    s = calculate_sigmas(SD1, "normal", 20)
    assert _rounded(s[:3]) == [14.6146, 10.7468, 8.0815]
    assert _rounded(s[-3:]) == [0.2322, 0.0292, 0.0]


def test_known_values_karras_20():
    s = calculate_sigmas(SD1, "karras", 20)
    assert _rounded(s[:3]) == [14.6146, 11.7254, 9.3402]
    assert _rounded(s[-3:]) == [0.0485, 0.0292, 0.0]


def test_karras_formula():
    s = karras(5, 0.1, 10.0, rho=7.0)
    ramp = np.linspace(0, 1, 5)
    want = (10.0 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s[:-1].numpy(), want, rtol=1e-6)
    assert s[-1] == 0


def test_simple_and_ddim_uniform_pick_table_entries():
    s = calculate_sigmas(SD1, "simple", 10)
    assert torch.equal(s[:-1], SD1.sigmas[[999 - 100 * i for i in range(10)]])
    d = calculate_sigmas(SD1, "ddim_uniform", 20)
    assert torch.equal(d[:-1], SD1.sigmas[list(range(951, 0, -50))])
    # ComfyUI's ddim_uniform can return more steps than asked (stride 1000 // 7 = 142 gives 8 entries)
    assert len(calculate_sigmas(SD1, "ddim_uniform", 7)) == 9


def test_beta_drops_consecutive_duplicates():
    s = calculate_sigmas(SD1, "beta", 200)
    assert len(set(s[:-1].tolist())) == len(s) - 1
    assert len(s) <= 201
    assert s[0] == SD1.sigma_max


@pytest.mark.parametrize("name", samplers.SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20, 50])
def test_scheduler_invariants(name, steps):
    s = calculate_sigmas(SD1, name, steps)
    assert s.dtype == torch.float32 and s.ndim == 1
    assert s[-1] == 0
    if name == "kl_optimal" and steps == 1:
        return  # ComfyUI divides by steps - 1 here
    assert torch.isfinite(s).all()
    assert (s[:-1] > 0).all()
    assert (s[1:] < s[:-1]).all(), "strictly decreasing"
    assert s[0] <= SD1.sigma_max * (1 + 1e-6)
    if name == "ddim_uniform":
        assert len(s) - 1 >= steps
    elif name == "beta":
        assert 1 <= len(s) - 1 <= steps
    else:
        assert len(s) == steps + 1
    if name in {"normal", "karras", "exponential", "simple", "beta", "kl_optimal", "sgm_uniform"}:
        assert s[0] == pytest.approx(float(SD1.sigma_max), rel=1e-5)
    if name in {"normal", "karras", "exponential", "kl_optimal"} and steps > 1:
        assert s[-2] == pytest.approx(float(SD1.sigma_min), rel=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.floats(min_value=0.03, max_value=14.6))
def test_timestep_sigma_roundtrip(sigma):
    t = SD1.timestep(torch.tensor(sigma))
    back = SD1.sigma(t)
    # within half a table step in log space
    step = (SD1.log_sigmas[1:] - SD1.log_sigmas[:-1]).max().item()
    assert abs(math.log(float(back)) - math.log(sigma)) <= step / 2 + 1e-6


def test_unknown_scheduler_is_refused():
    with pytest.raises(ValueError, match="unknown scheduler"):
        calculate_sigmas(SD1, "nope", 10)
