"""Image nodes (resize, invert, composite): exact expected tensors on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine import CancelToken, RunContext
from nodes import image as image_nodes
from nodes.folders import Folders
from nodes.runtime import Runtime


@pytest.fixture
def ctx(tmp_path):
    return RunContext("run", "1", "test", Runtime(Folders.at(tmp_path)), CancelToken(), lambda event: None)


def img(values, channels=3):
    """A [1,H,W,C] image whose every channel is `values` ([H,W])."""
    grey = torch.tensor(values, dtype=torch.float32)
    return grey[None, :, :, None].repeat(1, 1, 1, channels)


def grey(image):
    """Channel 0 of item 0 as nested lists (all channels are equal in these tests)."""
    return image[0, :, :, 0].tolist()


def scale(ctx, image, method, width, height, crop="disabled"):
    return image_nodes.image_scale.fn(ctx, image=image, upscale_method=method, width=width, height=height,
                                      crop=crop)


# --- ImageInvert ---------------------------------------------------------------------------------------------

def test_invert(ctx):
    out = image_nodes.image_invert.fn(ctx, image=img([[0.0, 0.25], [1.0, 0.5]]))
    assert grey(out) == [[1.0, 0.75], [0.0, 0.5]]
    assert out.shape == (1, 2, 2, 3)


# --- ImageScale ----------------------------------------------------------------------------------------------

def test_scale_zero_zero_returns_the_image_unchanged(ctx):
    image = img([[0.1, 0.2]])
    assert scale(ctx, image, "bilinear", 0, 0) is image


@pytest.mark.parametrize("width,height,expected", [(0, 3, (3, 6)), (6, 0, (3, 6)), (0, 1, (1, 2)), (1, 0, (1, 1))])
def test_scale_zero_side_keeps_aspect(ctx, width, height, expected):
    image = torch.rand(1, 2, 4, 3)  # H=2, W=4
    assert scale(ctx, image, "nearest-exact", width, height).shape[1:3] == expected


def test_nearest_exact_doubles_pixels(ctx):
    out = scale(ctx, img([[0.0, 1.0], [0.5, 0.25]]), "nearest-exact", 4, 4)
    assert grey(out) == [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0],
                         [0.5, 0.5, 0.25, 0.25], [0.5, 0.5, 0.25, 0.25]]


def test_bilinear_half_pixel_centres(ctx):
    # align_corners=False: output centres at -0.25, 0.25, 0.75, 1.25 source pixels (clamped at the ends)
    out = scale(ctx, img([[0.0, 1.0]]), "bilinear", 4, 1)
    assert grey(out) == [[0.0, 0.25, 0.75, 1.0]]


def test_area_averages_blocks(ctx):
    out = scale(ctx, img([[0.0, 1.0, 0.5, 0.5], [1.0, 0.0, 0.25, 0.75]]), "area", 2, 1)
    assert grey(out) == [[0.5, 0.5]]


def _bicubic_row(row, width):
    """Reference: Keys cubic convolution (a = -0.75), half-pixel centres, edge pixels repeated."""
    def weight(t):
        t, a = abs(t), -0.75
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        if t < 2:
            return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
        return 0.0
    n, out = len(row), []
    for i in range(width):
        s = (i + 0.5) * n / width - 0.5
        base = int(np.floor(s))
        out.append(sum(weight(s - (base + k)) * row[min(max(base + k, 0), n - 1)] for k in (-1, 0, 1, 2)))
    return out


def test_bicubic_matches_cubic_convolution(ctx):
    row = [0.0, 1.0, 0.25, 0.5]
    out = scale(ctx, img([row]), "bicubic", 7, 1)
    np.testing.assert_allclose(grey(out)[0], _bicubic_row(row, 7), rtol=0, atol=1e-6)


def test_lanczos_is_pillow_on_truncated_8bit(ctx):
    values = torch.rand(1, 3, 5, 3, generator=torch.Generator().manual_seed(0))
    out = scale(ctx, values, "lanczos", 7, 4)
    pixels = np.clip(255.0 * values[0].numpy(), 0, 255).astype(np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize((7, 4), Image.Resampling.LANCZOS)) / np.float32(255)
    assert out.shape == (1, 4, 7, 3)
    assert torch.equal(out[0], torch.from_numpy(expected.astype(np.float32)))


def test_lanczos_truncates_like_comfyui(ctx):
    out = scale(ctx, img([[0.999, 0.999], [0.999, 0.999]]), "lanczos", 3, 3)
    assert torch.all(out == 254 / 255)  # 254.745 truncates to 254


def test_center_crop_cuts_the_sides_of_a_wide_image(ctx):
    # W=4, H=2 to 2x2: old aspect 2 > 1, so x = round((4 - 4 * 0.5) / 2) = 1 pixel off each side
    out = scale(ctx, img([[0.0, 0.1, 0.2, 0.3], [0.4, 0.5, 0.6, 0.7]]), "nearest-exact", 2, 2, "center")
    np.testing.assert_allclose(grey(out), [[0.1, 0.2], [0.5, 0.6]])


def test_center_crop_cuts_top_and_bottom_of_a_tall_image(ctx):
    out = scale(ctx, img([[0.0], [0.1], [0.2], [0.3]]), "nearest-exact", 1, 2, "center")
    np.testing.assert_allclose(grey(out), [[0.1], [0.2]])


def test_center_crop_never_empties_the_image(ctx):
    out = scale(ctx, img([[0.0, 1.0]]), "nearest-exact", 1000, 1, "center")  # 2x1 -> far wider
    assert out.shape == (1, 1, 1000, 3)


def test_scale_keeps_batch_and_alpha(ctx):
    out = scale(ctx, torch.rand(2, 2, 2, 4), "lanczos", 3, 3)
    assert out.shape == (2, 3, 3, 4)


def test_scale_by(ctx):
    out = image_nodes.image_scale_by.fn(ctx, image=img([[0.0, 1.0]]), upscale_method="nearest-exact", scale_by=2.0)
    assert grey(out) == [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]
    tiny = image_nodes.image_scale_by.fn(ctx, image=img([[0.5, 0.5]]), upscale_method="bilinear", scale_by=0.01)
    assert tiny.shape == (1, 1, 1, 3)


# --- ImageCompositeMasked ------------------------------------------------------------------------------------

def composite(ctx, destination, source, x, y, mask=None, resize_source=False):
    return image_nodes.image_composite_masked.fn(ctx, destination=destination, source=source, x=x, y=y,
                                                 resize_source=resize_source, mask=mask)


def test_composite_pastes_at_xy(ctx):
    out = composite(ctx, img([[0.0] * 4] * 3), img([[1.0, 0.5]]), 1, 2)
    assert grey(out) == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1.0, 0.5, 0]]


def test_composite_clips_negative_offsets(ctx):
    out = composite(ctx, img([[0.0] * 3] * 3), img([[0.1, 0.2], [0.3, 0.4]]), -1, -1)
    np.testing.assert_allclose(grey(out), [[0.4, 0, 0], [0, 0, 0], [0, 0, 0]])


def test_composite_clips_at_right_and_bottom(ctx):
    out = composite(ctx, img([[0.0] * 3] * 3), img([[0.1, 0.2], [0.3, 0.4]]), 2, 2)
    np.testing.assert_allclose(grey(out), [[0, 0, 0], [0, 0, 0], [0, 0, 0.1]])


def test_composite_source_larger_than_destination(ctx):
    source = img([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    out = composite(ctx, img([[0.0] * 2] * 2), source, 0, 0)
    np.testing.assert_allclose(grey(out), [[0.1, 0.2], [0.4, 0.5]])
    out = composite(ctx, img([[0.0] * 2] * 2), source, -1, 0)
    np.testing.assert_allclose(grey(out), [[0.2, 0.3], [0.5, 0.6]])


@pytest.mark.parametrize("x,y", [(3, 0), (0, 3), (-2, 0), (100, 100), (-100, -100)])
def test_composite_outside_changes_nothing(ctx, x, y):
    destination = img([[0.5] * 3] * 3)
    assert torch.equal(composite(ctx, destination, img([[1.0, 1.0], [1.0, 1.0]]), x, y), destination)


def test_composite_blends_by_mask(ctx):
    mask = torch.tensor([[[1.0, 0.0], [0.25, 0.5]]])
    out = composite(ctx, img([[0.2, 0.2], [0.2, 0.2]]), img([[1.0, 1.0], [1.0, 1.0]]), 0, 0, mask)
    np.testing.assert_allclose(grey(out), [[1.0, 0.2], [0.4, 0.6]], rtol=0, atol=1e-7)


def test_composite_stretches_the_mask_to_the_source(ctx):
    mask = torch.tensor([[0.5]])  # a V1-style [H,W] mask, 1x1, for a 2x2 source
    out = composite(ctx, img([[0.0] * 3] * 3), img([[1.0, 1.0], [1.0, 1.0]]), 1, 1, mask)
    assert grey(out) == [[0, 0, 0], [0, 0.5, 0.5], [0, 0.5, 0.5]]


def test_composite_clipped_mask_follows_source(ctx):
    mask = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    out = composite(ctx, img([[0.0] * 2] * 2), img([[0.5, 0.6], [0.7, 0.8]]), -1, 0, mask)
    np.testing.assert_allclose(grey(out), [[0.6, 0], [0.8, 0]])


def test_composite_resize_source(ctx):
    out = composite(ctx, img([[0.0] * 4] * 4), img([[0.7]]), 0, 0, resize_source=True)
    np.testing.assert_allclose(grey(out), [[0.7] * 4] * 4)


def test_composite_repeats_source_over_the_batch_and_keeps_inputs(ctx):
    destination = torch.zeros(2, 2, 2, 3)
    source = img([[1.0]])
    out = composite(ctx, destination, source, 1, 0)
    assert out.shape == (2, 2, 2, 3)
    assert out[:, 0, 1].eq(1).all() and out.sum() == 6
    assert destination.sum() == 0  # the input is not changed


def test_composite_channel_counts(ctx):
    rgb_destination, rgba_source = torch.zeros(1, 2, 2, 3), torch.full((1, 1, 1, 4), 0.5)
    assert composite(ctx, rgb_destination, rgba_source, 0, 0).shape == (1, 2, 2, 3)
    out = composite(ctx, torch.zeros(1, 2, 2, 4), torch.full((1, 1, 1, 3), 0.5), 0, 0)
    assert out.shape == (1, 2, 2, 4)
    assert out[0, 0, 0].tolist() == [0.5, 0.5, 0.5, 1.0]  # the source's missing alpha counts as opaque
    assert out[0, 1, 1].tolist() == [0, 0, 0, 0]


# --- ImagePadForOutpaint, ImageCrop, ImageBatch (issue #12) ----------------------------------------------------

def pad(ctx, image, left=0, top=0, right=0, bottom=0, feathering=0):
    return image_nodes.image_pad_for_outpaint.fn(ctx, image=image, left=left, top=top, right=right, bottom=bottom,
                                                 feathering=feathering)


def test_pad_for_outpaint_grey_padding_and_mask(ctx):
    """Padding is 0.5 grey with mask 1; inside, ((f-d)/f)^2 with d the distance to a padded side only: columns
    count from 0 at the left, rows from 1 at the bottom (ComfyUI's d2 - i)."""
    image = torch.zeros(1, 10, 10, 3)
    out, mask = pad(ctx, image, left=4, bottom=2, feathering=3)
    assert out.shape == (1, 12, 14, 3) and mask.shape == (1, 12, 14)
    assert torch.all(out[:, :, :4] == 0.5) and torch.all(out[:, 10:] == 0.5) and torch.all(out[:, :10, 4:] == 0)
    assert torch.all(mask[0, :, :4] == 1) and torch.all(mask[0, 10:] == 1)
    inside = mask[0, :10, 4:]
    ramp = [1.0, (2 / 3) ** 2, (1 / 3) ** 2, 0.0]
    assert torch.allclose(inside[0, :4], torch.tensor(ramp))  # top row: only the left side is padded
    assert torch.allclose(inside[7:, 9], torch.tensor([0.0, (1 / 3) ** 2, (2 / 3) ** 2]))
    assert inside[:7, 5:].abs().max() == 0  # top is not padded: no ramp there


def test_pad_for_outpaint_skips_feathering_wider_than_half_the_image(ctx):
    _out, mask = pad(ctx, torch.zeros(1, 8, 8, 3), left=8, feathering=4)  # 2 * 4 is not < 8
    assert mask[0, :, 8:].abs().max() == 0 and torch.all(mask[0, :, :8] == 1)


def test_image_crop_clamps_the_corner(ctx):
    image = torch.arange(16.0).reshape(1, 4, 4, 1)
    out = image_nodes.image_crop.fn(ctx, image=image, width=3, height=2, x=2, y=9)
    assert out.shape == (1, 1, 2, 1) and out.flatten().tolist() == [14.0, 15.0]


def test_image_batch_resizes_and_pads_channels(ctx):
    first = torch.zeros(1, 4, 4, 4)
    second = torch.ones(2, 8, 8, 3)
    out = image_nodes.image_batch.fn(ctx, image1=first, image2=second)
    assert out.shape == (3, 4, 4, 4) and torch.all(out[1:] == 1) and torch.all(out[:1] == 0)
