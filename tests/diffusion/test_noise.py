import warnings

import pytest
import torch
import torchsde

from diffusion.noise import (
    BrownianTreeNoiseSampler,
    ancestral_step,
    check_seed,
    default_noise_sampler,
    inpaint_noise,
    prepare_noise,
)

LATENT = torch.zeros(3, 4, 5, 6)


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


@pytest.mark.parametrize("seed", [0, 1, 42, 2**32 + 5, 2**63 - 1, 2**63, 2**63 + 12345, 2**64 - 1])
def test_initial_noise_is_one_randn_over_the_whole_latent(seed):
    got = prepare_noise(LATENT, seed)
    assert got.dtype == torch.float32 and got.shape == LATENT.shape
    assert torch.equal(got, _randn(LATENT.shape, seed))


def test_seeds_past_2_63_work_and_follow_torch():
    # torch seeds its Mersenne Twister from the low 32 bits; ComfyUI inherits that, and so do we
    assert torch.equal(prepare_noise(LATENT, 2**63), prepare_noise(LATENT, 0))
    assert torch.equal(prepare_noise(LATENT, 2**64 - 1), prepare_noise(LATENT, 2**32 - 1))
    assert not torch.equal(prepare_noise(LATENT, 2**63 + 1), prepare_noise(LATENT, 2**63))


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, "3", True])
def test_bad_seeds_are_refused(bad):
    with pytest.raises(ValueError):
        check_seed(bad)


def test_batch_index_draws_per_index_and_skips_unused():
    latent = torch.zeros(3, 4, 2, 2)
    got = prepare_noise(latent, 7, batch_index=[2, 5, 2])
    g = torch.Generator("cpu").manual_seed(7)
    draws = [torch.randn([1, 4, 2, 2], generator=g) for _ in range(6)]
    assert torch.equal(got, torch.cat([draws[2], draws[5], draws[2]]))


def test_batch_index_sample_is_reproducible_alone():
    # a sample picked out of a batch (LatentFromBatch keeps its index) gets the same noise on its own.
    # (Per-index draws differ from one whole-batch randn: torch's vectorised normal sampler works in chunks.)
    latent = torch.zeros(4, 4, 3, 3)
    batch = prepare_noise(latent, 11, batch_index=[0, 1, 2, 3])
    assert torch.equal(prepare_noise(latent[:1], 11, batch_index=[2]), batch[2:3])
    assert not torch.equal(batch, prepare_noise(latent, 11))


def test_ancestral_noise_uses_seed_plus_one_on_cpu():
    x = torch.zeros(2, 4, 3, 3)
    sampler = default_noise_sampler(x, seed=5)
    g = torch.Generator("cpu").manual_seed(6)
    first, second = sampler(None, None), sampler(None, None)
    assert torch.equal(first, torch.randn(x.shape, generator=g))
    assert torch.equal(second, torch.randn(x.shape, generator=g))
    assert not torch.equal(first, prepare_noise(x, 5)), "must differ from the initial noise"


def test_ancestral_noise_seed_wraps_at_2_64():
    x = torch.zeros(1, 4, 2, 2)
    assert torch.equal(default_noise_sampler(x, seed=2**64 - 1)(None, None), _randn(x.shape, 0))


def test_inpaint_noise_is_seed_plus_one():
    assert torch.equal(inpaint_noise((1, 4, 2, 2), 9), _randn((1, 4, 2, 2), 10))


def test_ancestral_step_splits_variance():
    down, up = ancestral_step(torch.tensor(2.0), torch.tensor(1.0))
    assert float(down**2 + up**2) == pytest.approx(1.0)
    assert float(up) == pytest.approx((1.0 * (4 - 1) / 4) ** 0.5)
    down0, up0 = ancestral_step(torch.tensor(2.0), torch.tensor(1.0), eta=0.0)
    assert float(down0) == 1.0 and up0 == 0.0


def test_brownian_noise_matches_torchsde_tree_with_seed_as_entropy():
    x = torch.zeros(2, 4, 3, 3)
    smin, smax = torch.tensor(0.03), torch.tensor(14.6)
    ns = BrownianTreeNoiseSampler(x, smin, smax, seed=2**63 + 3)
    tree = torchsde.BrownianTree(smin, torch.zeros_like(x), smax, entropy=2**63 + 3)
    a, b = torch.tensor(5.0), torch.tensor(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ns(a, b)
        want = tree(b, a) * -1 / (b - a).abs().sqrt()  # from 5 down to 3: the increment reversed
    assert torch.equal(got, want)


def test_brownian_noise_is_reproducible_and_unit_variance():
    x = torch.zeros(8, 4, 16, 16)
    a = BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=1)
    b = BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n1 = a(torch.tensor(2.0), torch.tensor(1.0))
        b(torch.tensor(9.0), torch.tensor(4.0))  # asking other intervals first does not change the answer
        n2 = b(torch.tensor(2.0), torch.tensor(1.0))
        other = BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=2)(torch.tensor(2.0), torch.tensor(1.0))
    assert torch.allclose(n1, n2, atol=1e-5)
    assert not torch.allclose(n1, other)
    assert n1.std().item() == pytest.approx(1.0, abs=0.05) and abs(n1.mean().item()) < 0.05
