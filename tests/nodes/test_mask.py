"""Mask nodes: exact expected tensors on tiny inputs, every MaskComposite operation, all four feather edges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import CancelToken, RunContext
from nodes import mask as mask_nodes
from nodes.folders import Folders
from nodes.runtime import Runtime


@pytest.fixture
def ctx(tmp_path):
    return RunContext("run", "1", "test", Runtime(Folders.at(tmp_path)), CancelToken(), lambda event: None)


def m(rows):
    return torch.tensor([rows], dtype=torch.float32)


def exact(actual, expected):
    """Equal up to float32 rounding of the expected fractions (one ulp)."""
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0)


# --- simple nodes --------------------------------------------------------------------------------------------

def test_solid_mask(ctx):
    out = mask_nodes.solid_mask.fn(ctx, value=0.25, width=3, height=2)
    assert out.dtype == torch.float32 and out.tolist() == [[[0.25] * 3] * 2]


def test_invert_mask_accepts_a_v1_2d_mask(ctx):
    out = mask_nodes.invert_mask.fn(ctx, mask=torch.tensor([[0.0, 0.25], [1.0, 0.5]]))
    assert out.tolist() == [[[1.0, 0.75], [0.0, 0.5]]]


def test_crop_mask(ctx):
    mask = m([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    assert mask_nodes.crop_mask.fn(ctx, mask=mask, x=1, y=1, width=2, height=1).tolist() == [[[5, 6]]]
    assert mask_nodes.crop_mask.fn(ctx, mask=mask, x=2, y=1, width=512, height=512).tolist() == [[[6, 7], [10, 11]]]


def test_crop_mask_outside_is_an_error(ctx):
    with pytest.raises(ValueError, match=r"CropMask.*x=4.*4x3"):
        mask_nodes.crop_mask.fn(ctx, mask=torch.zeros(1, 3, 4), x=4, y=0, width=1, height=1)


def test_threshold_mask_is_strictly_above(ctx):
    out = mask_nodes.threshold_mask.fn(ctx, mask=m([[0.2, 0.5, 0.51, 1.0]]), value=0.5)
    assert out.tolist() == [[[0.0, 0.0, 1.0, 1.0]]]


def test_image_to_mask_channels(ctx):
    image = torch.tensor([[[[0.1, 0.2, 0.3, 0.4]]]])
    for channel, value in zip(("red", "green", "blue", "alpha"), (0.1, 0.2, 0.3, 0.4), strict=True):
        out = mask_nodes.image_to_mask.fn(ctx, image=image, channel=channel)
        assert out.shape == (1, 1, 1) and out.item() == pytest.approx(value)


def test_image_to_mask_alpha_of_rgb_is_an_error(ctx):
    with pytest.raises(ValueError, match="no alpha channel"):
        mask_nodes.image_to_mask.fn(ctx, image=torch.zeros(1, 2, 2, 3), channel="alpha")


def test_mask_to_image(ctx):
    out = mask_nodes.mask_to_image.fn(ctx, mask=torch.tensor([[0.0, 0.5]]))
    assert out.shape == (1, 1, 2, 3) and out.is_contiguous()
    assert out.tolist() == [[[[0.0] * 3, [0.5] * 3]]]


# --- MaskComposite -------------------------------------------------------------------------------------------

DEST = [[0.5, 0.5, 0.5], [0.5, 0.8, 0.2], [0.5, 0.4, 0.6]]
SOURCE = [[0.5, 0.4], [0.6, 0.9]]  # placed at (1, 1): meets DEST's bottom-right 2x2


@pytest.mark.parametrize("operation,overlap", [
    ("multiply", [[0.4, 0.08], [0.24, 0.54]]),
    ("add", [[1.0, 0.6], [1.0, 1.0]]),  # 1.3, 1.1, 1.5 clamped
    ("subtract", [[0.3, 0.0], [0.0, 0.0]]),  # -0.2, -0.2, -0.3 clamped
    # rounded (half to even): dest 1,0,0,1 ; source 0 (0.5 -> 0),0,1,1
    ("and", [[0.0, 0.0], [0.0, 1.0]]),
    ("or", [[1.0, 0.0], [1.0, 1.0]]),
    ("xor", [[1.0, 0.0], [1.0, 0.0]]),
])
def test_mask_composite_operations(ctx, operation, overlap):
    out = mask_nodes.mask_composite.fn(ctx, destination=m(DEST), source=m(SOURCE), x=1, y=1, operation=operation)
    expected = [row[:] for row in DEST]
    for r in range(2):
        expected[1 + r][1:3] = overlap[r]
    exact(out, [expected])


def test_mask_composite_clamps_everywhere_and_keeps_inputs(ctx):
    destination = m([[1.5, -0.5]])
    out = mask_nodes.mask_composite.fn(ctx, destination=destination, source=m([[0.5]]), x=0, y=0, operation="add")
    assert out.tolist() == [[[1.0, 0.0]]]
    assert destination.tolist() == [[[1.5, -0.5]]]


def test_mask_composite_negative_offset_clips(ctx):
    out = mask_nodes.mask_composite.fn(ctx, destination=torch.zeros(1, 2, 2), source=m(SOURCE), x=-1, y=-1,
                                       operation="add")
    exact(out, [[[0.9, 0.0], [0.0, 0.0]]])


def test_mask_composite_source_larger_than_destination(ctx):
    source = m([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    out = mask_nodes.mask_composite.fn(ctx, destination=torch.zeros(2, 2), source=source, x=1, y=0, operation="add")
    exact(out, [[[0.0, 0.1], [0.0, 0.4]]])


@pytest.mark.parametrize("x,y", [(2, 0), (0, 2), (-2, 0), (500, 500)])
def test_mask_composite_outside_changes_nothing(ctx, x, y):
    out = mask_nodes.mask_composite.fn(ctx, destination=m([[0.3, 0.6], [0.1, 0.9]]), source=m([[1.0, 1.0]]),
                                       x=x, y=y, operation="add")
    exact(out, [[[0.3, 0.6], [0.1, 0.9]]])


def test_mask_composite_batches(ctx):
    out = mask_nodes.mask_composite.fn(ctx, destination=torch.ones(1, 1, 2), source=torch.tensor([[[0.5]], [[0.25]]]),
                                       x=1, y=0, operation="multiply")
    assert out.tolist() == [[[1.0, 0.5]], [[1.0, 0.25]]]


# --- FeatherMask ---------------------------------------------------------------------------------------------

def feather(ctx, mask, left=0, top=0, right=0, bottom=0):
    return mask_nodes.feather_mask.fn(ctx, mask=mask, left=left, top=top, right=right, bottom=bottom)


def test_feather_left(ctx):
    exact(feather(ctx, torch.ones(1, 1, 6), left=3), [[[1 / 3, 2 / 3, 1, 1, 1, 1]]])


def test_feather_right(ctx):
    exact(feather(ctx, torch.ones(1, 1, 6), right=3), [[[1, 1, 1, 1, 2 / 3, 1 / 3]]])


def test_feather_top(ctx):
    exact(feather(ctx, torch.ones(1, 6, 1), top=3), [[[1 / 3], [2 / 3], [1], [1], [1], [1]]])


def test_feather_bottom(ctx):
    exact(feather(ctx, torch.ones(1, 6, 1), bottom=3), [[[1], [1], [1], [1], [2 / 3], [1 / 3]]])


def test_feather_all_edges_multiply_in_the_corners(ctx):
    out = feather(ctx, torch.ones(4, 4), left=2, top=2, right=2, bottom=2)
    ramp = [0.5, 1, 1, 0.5]
    exact(out, [[[r * c for c in ramp] for r in ramp]])


def test_feather_wider_than_the_mask_is_clamped(ctx):
    exact(feather(ctx, torch.ones(1, 1, 2), left=10), [[[0.5, 1.0]]])


def test_feather_is_symmetric(ctx):
    mask = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(1))
    out = feather(ctx, mask, left=3, top=2, right=0, bottom=0)
    mirrored = feather(ctx, mask.flip(-1, -2), left=0, top=0, right=3, bottom=2)
    torch.testing.assert_close(mirrored.flip(-1, -2), out, rtol=1e-6, atol=0)


# --- GrowMask ------------------------------------------------------------------------------------------------

def grow(ctx, mask, expand, tapered=True):
    return mask_nodes.grow_mask.fn(ctx, mask=mask, expand=expand, tapered_corners=tapered)


def dot(size=5):
    mask = torch.zeros(1, size, size)
    mask[0, size // 2, size // 2] = 1.0
    return mask


def test_grow_tapered_is_a_cross_then_a_diamond(ctx):
    assert grow(ctx, dot(), 1).tolist() == [[[0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0],
                                             [0, 0, 0, 0, 0]]]
    assert grow(ctx, dot(), 2).tolist() == [[[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0],
                                             [0, 0, 1, 0, 0]]]


def test_grow_square(ctx):
    out = grow(ctx, dot(), 1, tapered=False)
    assert out.tolist() == [[[0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]]


def test_shrink(ctx):
    block = torch.zeros(1, 5, 5)
    block[0, 1:4, 1:4] = 1.0
    assert grow(ctx, block, -1).tolist() == dot().tolist()
    assert grow(ctx, block, -1, tapered=False).tolist() == dot().tolist()
    assert grow(ctx, torch.ones(1, 3, 3), -1).tolist() == torch.ones(1, 3, 3).tolist()  # the border is no edge


def test_grow_grey_values_and_v1_mask(ctx):
    out = grow(ctx, torch.tensor([[0.0, 0.3, 0.0, 0.0]]), 1)
    assert out.shape == (1, 1, 4)
    exact(out, [[[0.3, 0.3, 0.3, 0.0]]])


def test_grow_huge_expand_is_quick_and_saturates(ctx):
    assert grow(ctx, dot(), 16384).eq(1).all()
    assert grow(ctx, dot(), -16384).eq(0).all()


@pytest.mark.parametrize("expand", [-2, -1, 1, 3])
@pytest.mark.parametrize("tapered", [True, False])
def test_grow_matches_scipy(ctx, expand, tapered):
    ndimage = pytest.importorskip("scipy.ndimage")
    mask = torch.rand(2, 6, 7, generator=torch.Generator().manual_seed(2))
    c = 0 if tapered else 1
    footprint = np.array([[c, 1, c], [1, 1, 1], [c, 1, c]])
    expected = []
    for item in mask.numpy():
        for _ in range(abs(expand)):
            op = ndimage.grey_dilation if expand > 0 else ndimage.grey_erosion
            item = op(item, footprint=footprint)
        expected.append(item)
    assert torch.equal(grow(ctx, mask, expand, tapered), torch.from_numpy(np.stack(expected)))
