"""Latent nodes of issue #12: upscaling (LatentUpscale, LatentUpscaleBy with bislerp), compositing, blending,
batches, the tiled VAE and VAEEncodeForInpaint's mask growth, against small hand-computed expectations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion.latent import Latent
from diffusion.resample import bislerp
from engine import CancelToken, RunContext
from engine.sizes import Size
from nodes import latent as latent_nodes
from nodes import latent_batch, loaders, pixels, upscale
from nodes.folders import Folders
from nodes.runtime import Runtime

from .conftest import DEFAULT_CHECKPOINT


@pytest.fixture
def ctx(tmp_path):
    return RunContext("run", "1", "test", Runtime(Folders.at(tmp_path)), CancelToken(), lambda event: None)


@pytest.fixture(scope="module")
def tiny(tiny_base):
    """A run context on the tiny checkpoint's base folder, and its VAE."""
    context = RunContext("run", "1", "test", Runtime(Folders.at(tiny_base)), CancelToken(), lambda event: None)
    _model, _clip, vae = loaders.checkpoint_loader.fn(context, ckpt_name=DEFAULT_CHECKPOINT)
    return context, vae


def latent(*shape, seed=0, **extra):
    return Latent(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), **extra)


# --- bislerp ---------------------------------------------------------------------------------------------------

def test_bislerp_at_scale_one_is_the_identity():
    x = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(bislerp(x, 7, 5), x, atol=1e-5)


def test_bislerp_slerps_directions_and_lerps_lengths():
    """Two columns (2,0) and (0,1) widened to 4: bilinear weights 0, 1/4, 3/4, 1 (edges clamped); the direction
    turns by weight * 90 degrees and the length goes linearly from 2 to 1."""
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)  # channel 0 = (2, 0), channel 1 = (0, 1)
    out = bislerp(x, 4, 1)[0, :, 0, :]  # [channel, column]
    for column, weight in enumerate([0.0, 0.25, 0.75, 1.0]):
        angle, length = weight * math.pi / 2, 2 * (1 - weight) + 1 * weight
        expected = torch.tensor([math.cos(angle), math.sin(angle)]) * length
        assert torch.allclose(out[:, column], expected, atol=1e-5), (column, out[:, column], expected)


def test_bislerp_keeps_dtype_and_zero_vectors():
    x = torch.zeros(1, 4, 2, 2, dtype=torch.float16)
    out = bislerp(x, 3, 3)
    assert out.dtype == torch.float16 and not out.isnan().any() and out.abs().max() == 0


# --- LatentUpscale / LatentUpscaleBy -----------------------------------------------------------------------------

def test_latent_upscale_by_rounds_each_side_and_interpolates(ctx):
    """32 -> round(32 * 1.5) = 48 cells, F.interpolate(bilinear, align_corners False), as ComfyUI's hires fix."""
    samples = latent(1, 4, 32, 20)
    out = upscale.latent_upscale_by.fn(ctx, samples=samples, upscale_method="bilinear", scale_by=1.5)
    assert out.samples.shape == (1, 4, 48, 30)
    assert torch.equal(out.samples, F.interpolate(samples.samples, size=(48, 30), mode="bilinear"))


def test_latent_upscale_by_keeps_noise_mask_and_batch_index(ctx):
    mask = torch.ones(1, 1, 64, 64)
    samples = latent(2, 4, 8, 8, noise_mask=mask, batch_index=(3, 4))
    out = upscale.latent_upscale_by.fn(ctx, samples=samples, upscale_method="bislerp", scale_by=2.0)
    assert out.samples.shape == (2, 4, 16, 16)
    assert out.noise_mask is mask and out.batch_index == (3, 4)


@pytest.mark.parametrize("method", pixels.LATENT_UPSCALE_METHODS)
def test_every_latent_method_runs(ctx, method):
    out = upscale.latent_upscale.fn(ctx, samples=latent(1, 4, 8, 8), upscale_method=method, width=128, height=96,
                                    crop="disabled")
    assert out.samples.shape == (1, 4, 12, 16)


def test_latent_upscale_pixel_sizes(ctx):
    """Pixels // 8; a zero side keeps the aspect ratio; at least 64 pixels a side; both zero: unchanged."""
    samples = latent(1, 4, 8, 16)  # 128 x 64 pixels
    def run(width, height, crop="disabled"):
        return upscale.latent_upscale.fn(ctx, samples=samples, upscale_method="nearest-exact", width=width,
                                         height=height, crop=crop).samples.shape[-2:]
    assert run(0, 128) == (16, 32)
    assert run(256, 0) == (16, 32)
    assert run(8, 8) == (8, 8)
    assert upscale.latent_upscale.fn(ctx, samples=samples, upscale_method="area", width=0, height=0,
                                     crop="disabled") is samples
    centre = upscale.latent_upscale.fn(ctx, samples=samples, upscale_method="nearest-exact", width=64, height=64,
                                       crop="center").samples
    assert torch.equal(centre, samples.samples[:, :, :, 4:12])


def test_latent_upscale_size_rules():
    assert pixels.latent_upscale_by_size(Size(1, 256, 256), 1.5) == Size(1, 384, 384)
    assert pixels.latent_upscale_size(Size(2, 64, 128), 0, 128) == Size(2, 128, 256)


# --- LatentComposite and friends -----------------------------------------------------------------------------

def test_latent_composite_feathers_only_inner_sides(ctx):
    """A 4x4 patch at x=16, y=0 px (2, 0 cells) with feather 16 px (2 cells) on an 8x8 latent: the top is on the
    border (no ramp); left, right and bottom ramp (t+1)/2 from the edge."""
    to = Latent(torch.zeros(1, 1, 8, 8))
    source = Latent(torch.ones(1, 1, 4, 4))
    out = latent_batch.latent_composite.fn(ctx, samples_to=to, samples_from=source, x=16, y=0, feather=16).samples
    rows = torch.tensor([1.0, 1.0, 1.0, 0.5])
    cols = torch.tensor([0.5, 1.0, 1.0, 0.5])
    assert torch.allclose(out[0, 0, 0:4, 2:6], rows[:, None] * cols[None, :])
    assert out[0, 0, 4:].abs().max() == 0 and out[0, 0, :, :2].abs().max() == 0


def test_latent_composite_without_feather_clips_at_the_edge(ctx):
    to = Latent(torch.zeros(1, 1, 4, 4), batch_index=(5,))
    out = latent_batch.latent_composite.fn(ctx, samples_to=to, samples_from=Latent(torch.ones(1, 1, 3, 3)), x=16,
                                           y=8, feather=0)
    expected = torch.zeros(4, 4)
    expected[1:, 2:] = 1
    assert torch.equal(out.samples[0, 0], expected) and out.batch_index == (5,)


def test_latent_composite_masked_places_by_eighths(ctx):
    destination = Latent(torch.zeros(1, 4, 4, 4))
    source = Latent(torch.ones(1, 4, 2, 2))
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])[None]
    out = latent_batch.latent_composite_masked.fn(ctx, destination=destination, source=source, x=8, y=16,
                                                  resize_source=False, mask=mask).samples
    assert torch.equal(out[0, 0, 2:, 1:3], mask[0]) and out.sum() == 4 * 3


def test_latent_blend(ctx):
    a, b = Latent(torch.full((1, 4, 2, 2), 1.0)), Latent(torch.full((1, 4, 2, 2), 3.0))
    out = latent_batch.latent_blend.fn(ctx, samples1=a, samples2=b, blend_factor=0.25)
    assert torch.allclose(out.samples, torch.full((1, 4, 2, 2), 0.25 * 1 + 0.75 * 3))
    resized = latent_batch.latent_blend.fn(ctx, samples1=a, samples2=Latent(torch.full((1, 4, 4, 4), 3.0)),
                                           blend_factor=0.5)
    assert torch.allclose(resized.samples, torch.full((1, 4, 2, 2), 2.0))


def test_repeat_latent_batch_offsets_batch_indices(ctx):
    samples = latent(2, 4, 2, 2, batch_index=(3, 4), noise_mask=torch.rand(2, 1, 16, 16))
    out = latent_batch.repeat_latent_batch.fn(ctx, samples=samples, amount=3)
    assert out.samples.shape[0] == 6 and torch.equal(out.samples[4:], samples.samples)
    assert out.batch_index == (3, 4, 5, 6, 7, 8)
    assert out.noise_mask.shape[0] == 6
    single = latent_batch.repeat_latent_batch.fn(ctx, samples=latent(1, 4, 2, 2, noise_mask=torch.ones(1, 1, 8, 8)),
                                                 amount=2)
    assert single.noise_mask.shape[0] == 1 and single.batch_index is None


def test_latent_from_batch_clamps_and_indexes(ctx):
    samples = latent(4, 4, 2, 2, noise_mask=torch.arange(2.0).reshape(2, 1, 1, 1).expand(2, 1, 8, 8))
    out = latent_batch.latent_from_batch.fn(ctx, samples=samples, batch_index=2, length=5)
    assert torch.equal(out.samples, samples.samples[2:]) and out.batch_index == (2, 3)
    assert out.noise_mask[:, 0, 0, 0].tolist() == [0.0, 1.0]  # the 2-mask batch repeated to 4, then items 2, 3
    last = latent_batch.latent_from_batch.fn(ctx, samples=samples, batch_index=9, length=1)
    assert torch.equal(last.samples, samples.samples[3:]) and last.batch_index == (3,)
    again = latent_batch.latent_from_batch.fn(ctx, samples=latent(4, 4, 2, 2, batch_index=(10, 11, 12, 13)),
                                              batch_index=1, length=2)
    assert again.batch_index == (11, 12)


def test_batch_size_rules():
    assert latent_batch._from_batch_size(Size(4, 8, 8), 2, 5) == Size(2, 8, 8)
    assert latent_batch._repeated_size(Size(2, 8, 8), 3) == Size(6, 8, 8)


# --- tiled VAE and inpaint growth (tiny checkpoint) ------------------------------------------------------------

def test_vae_decode_tiled_is_close_to_the_plain_decode(tiny):
    context, vae = tiny
    samples = latent(1, 4, 24, 24, seed=3)
    plain = latent_nodes.vae_decode.fn(context, samples=samples, vae=vae)
    other = latent_nodes.vae_decode.fn(context, samples=latent(1, 4, 24, 24, seed=4), vae=vae)
    tiled = latent_nodes.vae_decode_tiled.fn(context, samples=samples, vae=vae, tile_size=128, overlap=32,
                                             temporal_size=64, temporal_overlap=8)
    assert tiled.shape == plain.shape == (1, 192, 192, 3)
    # the tiny VAE's mid-block attention sees the whole latent, so tiles differ a little (~0.04 here)
    assert (tiled - plain).abs().mean() < 0.35 * (other - plain).abs().mean()
    whole = latent_nodes.vae_decode_tiled.fn(context, samples=samples, vae=vae, tile_size=512, overlap=64,
                                             temporal_size=64, temporal_overlap=8)
    assert torch.allclose(whole, plain, atol=1e-5)  # fits in every tile: three whole decodes, averaged


def test_vae_encode_tiled_is_close_to_the_plain_encode(tiny):
    context, vae = tiny
    image = torch.rand(1, 200, 196, 3, generator=torch.Generator().manual_seed(2))
    plain = latent_nodes.vae_encode.fn(context, pixels=image, vae=vae).samples
    other = latent_nodes.vae_encode.fn(context, pixels=torch.rand(1, 200, 196, 3), vae=vae).samples
    tiled = latent_nodes.vae_encode_tiled.fn(context, pixels=image, vae=vae, tile_size=128, overlap=32,
                                             temporal_size=64, temporal_overlap=8).samples
    assert tiled.shape == plain.shape == (1, 4, 25, 24)
    assert (tiled - plain).abs().mean() < 0.35 * (other - plain).abs().mean()


def test_vae_encode_for_inpaint_grows_the_mask_as_comfyui(tiny):
    """grow_mask_by 6: ComfyUI's conv2d with a 6x6 box and padding 3, cut to size. Cross-correlation puts output
    row i over input rows i-3 .. i+2, so a pixel grows 2 rows up/left and 3 down/right (the parity README says
    the reverse, but the same conv2d call gives this)."""
    context, vae = tiny
    mask = torch.zeros(1, 32, 32)
    mask[0, 10, 20] = 1.0
    out = latent_nodes.vae_encode_for_inpaint.fn(context, pixels=torch.rand(1, 32, 32, 3), vae=vae, mask=mask,
                                                 grow_mask_by=6)
    grown = out.noise_mask[0, 0]
    rows, cols = grown.nonzero(as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 13, 18, 23)


def test_tiled_decode_passes_use_tall_wide_and_square_tiles():
    """VAEDecodeTiled's three passes, in ComfyUI's order: (2t, t/2), (t/2, 2t), (t, t) latent cells; a pointwise
    decoder comes out exactly (the feathered weights are normalised)."""
    from diffusion.tiling import tiled_decode

    shapes = []
    def decode(z):
        shapes.append(tuple(z.shape[-2:]))
        return z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2)
    z = torch.randn(1, 4, 40, 40)
    out = tiled_decode(decode, z, 16, 4, 8)
    assert shapes[0] == (32, 8) and (8, 32) in shapes and shapes[-1] == (16, 16)
    assert torch.allclose(out, z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2), atol=1e-5)
