import pytest
import torch

from diffusion.denoisers import CFGDenoiser, InpaintDenoiser, ModelDenoiser, prepare_mask, to_d
from diffusion.latent import CondEntry, Conditioning
from diffusion.schedules import sd1_schedule

SD1 = sd1_schedule()


class SpyUNet:
    """eps = x_scaled * mean(context) + 0.01 * t/1000: depends on every input, invariant to repeating tokens."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context):
        self.calls.append((x.clone(), t.clone(), context.clone()))
        assert x.shape[0] == t.shape[0] == context.shape[0]
        return x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 0.01 * t.view(-1, 1, 1, 1) / 1000


def ctx(value, tokens=77, width=8):
    return torch.full((1, tokens, width), float(value))


def cond(*entries):
    return Conditioning(tuple(CondEntry(ctx(v, t), strength=s) for v, t, s in entries))


def test_eps_parameterisation():
    unet = SpyUNet()
    x = torch.randn(2, 4, 3, 3)
    sigma = torch.tensor([14.6146, 1.0])
    out = ModelDenoiser(unet, SD1)(x, sigma, ctx(0.5).repeat(2, 1, 1))
    x_in, t, _ = unet.calls[0]
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_in, x / (s**2 + 1) ** 0.5)
    assert t.dtype == torch.float32 and t.tolist() == [999.0, float(SD1.timestep(torch.tensor(1.0)))]
    eps = x_in * 0.5 + 0.01 * t.view(-1, 1, 1, 1) / 1000
    torch.testing.assert_close(out, x - eps * s)


def test_to_d():
    x, den = torch.ones(1, 1, 1, 2), torch.zeros(1, 1, 1, 2)
    assert torch.equal(to_d(x, torch.tensor(2.0), den), torch.full((1, 1, 1, 2), 0.5))


def separate(x, sigma, value, tokens=77):
    """The prediction for one context, in its own UNet call."""
    return ModelDenoiser(SpyUNet(), SD1)(x, sigma, ctx(value, tokens).repeat(x.shape[0], 1, 1))


def test_cfg_batches_cond_and_uncond_into_one_call():
    unet = SpyUNet()
    x, sigma = torch.randn(2, 4, 3, 3), torch.tensor([3.0, 3.0])
    out = CFGDenoiser(ModelDenoiser(unet, SD1), cond((2.0, 77, 1.0)), cond((0.5, 77, 1.0)), 7.5)(x, sigma)
    assert len(unet.calls) == 1
    x_in, t, context = unet.calls[0]
    assert x_in.shape[0] == 4 and context.shape == (4, 77, 8)
    # ComfyUI's order inside the batch: negative first, then positive
    assert context[:2].eq(0.5).all() and context[2:].eq(2.0).all()
    c, u = separate(x, sigma, 2.0), separate(x, sigma, 0.5)
    torch.testing.assert_close(out, u + (c - u) * 7.5)


def test_cfg_one_skips_the_negative_entirely():
    unet = SpyUNet()
    x, sigma = torch.randn(3, 4, 2, 2), torch.full((3,), 2.0)
    out = CFGDenoiser(ModelDenoiser(unet, SD1), cond((2.0, 77, 1.0)), cond((0.5, 77, 1.0)), 1.0)(x, sigma)
    assert len(unet.calls) == 1 and unet.calls[0][0].shape[0] == 3
    assert unet.calls[0][2].eq(2.0).all()
    assert torch.equal(out, separate(x, sigma, 2.0))


def test_different_token_lengths_are_repeated_to_a_common_length():
    unet = SpyUNet()
    x, sigma = torch.randn(1, 4, 2, 2), torch.tensor([1.5])
    out = CFGDenoiser(ModelDenoiser(unet, SD1), cond((2.0, 154, 1.0)), cond((0.5, 77, 1.0)), 5.0)(x, sigma)
    assert len(unet.calls) == 1 and unet.calls[0][2].shape == (2, 154, 8)
    c, u = separate(x, sigma, 2.0, 154), separate(x, sigma, 0.5, 77)
    torch.testing.assert_close(out, u + (c - u) * 5.0)


def test_lengths_too_far_apart_run_separately():
    unet = SpyUNet()
    x, sigma = torch.randn(1, 4, 2, 2), torch.tensor([1.5])
    CFGDenoiser(ModelDenoiser(unet, SD1), cond((2.0, 385, 1.0)), cond((0.5, 77, 1.0)), 5.0)(x, sigma)
    assert [c[2].shape[1] for c in unet.calls] == [385, 77]


def test_several_entries_are_averaged_by_strength():
    unet = SpyUNet()
    x, sigma = torch.randn(2, 4, 2, 2), torch.tensor([1.0, 1.0])
    positive = cond((2.0, 77, 1.0), (4.0, 77, 3.0))
    out = CFGDenoiser(ModelDenoiser(unet, SD1), positive, cond((0.5, 77, 1.0)), 1.0)(x, sigma)
    assert len(unet.calls) == 1 and unet.calls[0][0].shape[0] == 4
    want = (separate(x, sigma, 2.0) * 1.0 + separate(x, sigma, 4.0) * 3.0) / 4.0
    torch.testing.assert_close(out, want)


def test_batched_context_is_repeated_to_the_latent_batch():
    unet = SpyUNet()
    x, sigma = torch.randn(4, 4, 2, 2), torch.full((4,), 1.0)
    CFGDenoiser(ModelDenoiser(unet, SD1), cond((2.0, 77, 1.0)), cond((0.5, 77, 1.0)), 2.0)(x, sigma)
    assert unet.calls[0][2].shape == (8, 77, 8)


def test_inpaint_blend_before_and_after_the_model():
    seen = {}

    def inner(x, sigma, **extra):
        seen["x"], seen["extra"] = x, extra
        return x * 0.5

    latent, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    mask = torch.zeros(2, 4, 3, 3)
    mask[:, :, 1:, :] = 1
    x, sigma = torch.randn(2, 4, 3, 3), torch.tensor([2.0, 2.0])
    out = InpaintDenoiser(inner, latent, noise, mask)(x, sigma, seed=3)
    assert seen["extra"] == {"seed": 3}
    keep = mask == 0
    assert torch.equal(seen["x"][keep], (latent + noise * 2.0)[keep])
    assert torch.equal(seen["x"][~keep], x[~keep])
    assert torch.equal(out[keep], latent[keep]), "kept area is the latent, exactly"
    assert torch.equal(out[~keep], (x * 0.5)[~keep])


def test_prepare_mask_resizes_to_latent_and_batch():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :] = 1.0
    m = prepare_mask(mask, (3, 4, 8, 8))
    assert m.shape == (3, 4, 8, 8)
    assert m[:, :, :4].eq(1).all() and m[:, :, 4:].eq(0).all()
    # a [H, W] mask and a [B, H, W] mask work too; bilinear gives fractions on a soft edge
    soft = prepare_mask(torch.linspace(0, 1, 16).repeat(16, 1), (1, 4, 4, 4))
    assert soft.shape == (1, 4, 4, 4) and 0 < soft[0, 0, 0, 1] < 1
    assert prepare_mask(torch.ones(2, 8, 8), (2, 4, 4, 4)).eq(1).all()


@pytest.mark.parametrize("cfg", [1.0, 1.0 + 1e-12])
def test_cfg_close_to_one_counts_as_one(cfg):
    unet = SpyUNet()
    CFGDenoiser(ModelDenoiser(unet, SD1), cond((2.0, 77, 1.0)), cond((0.5, 77, 1.0)), cfg)(
        torch.randn(1, 4, 2, 2), torch.tensor([1.0]))
    assert unet.calls[0][0].shape[0] == 1
