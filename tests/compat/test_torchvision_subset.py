"""sdgraph's subset of torchvision (issue #18 follow-up: packs importing torchvision load and run without it):
each operation checked against numbers from torchvision's documented definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfy_compat.tv import functional as TF
from comfy_compat.tv import transforms as T


def test_to_tensor_scales_uint8_to_unit_range_and_puts_channels_first():
    array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    tensor = TF.to_tensor(Image.fromarray(array, "RGB"))
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert torch.allclose(tensor, torch.from_numpy(array).permute(2, 0, 1).float() / 255)
    assert TF.to_tensor(Image.fromarray(array[:, :, 0], "L")).shape == (1, 2, 3)
    floats = np.full((2, 2), 7.5, dtype=np.float32)  # not uint8: not scaled
    assert TF.to_tensor(floats).flatten().tolist() == [7.5] * 4
    assert T.ToTensor()(Image.fromarray(array, "RGB")).shape == (3, 2, 3)


def test_to_pil_image_truncates_floats_and_picks_the_mode_from_the_channels():
    assert TF.to_pil_image(torch.full((3, 2, 2), 0.5)).getpixel((0, 0)) == (127, 127, 127)  # 127.5 truncated
    assert TF.to_pil_image(torch.rand(1, 4, 5)).mode == "L"
    assert TF.to_pil_image(torch.rand(4, 5)).size == (5, 4)
    assert T.ToPILImage()(torch.rand(4, 4, 5)).mode == "RGBA"
    assert TF.to_pil_image(torch.rand(2, 4, 5)).mode == "LA"
    with pytest.raises(ValueError, match="1 to 4 channels"):
        TF.to_pil_image(torch.rand(5, 4, 4))


def gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return weights / weights.sum()


def test_gaussian_blur_of_an_impulse_is_the_documented_kernel():
    """The response to a single bright pixel is the outer product of two normalised Gaussians; sigma by default
    is 0.3 * ((k - 1) * 0.5 - 1) + 0.8; kernel_size [x, y] is width first."""
    impulse = torch.zeros(1, 1, 15, 15, dtype=torch.float64)
    impulse[..., 7, 7] = 1.0
    out = TF.gaussian_blur(impulse, [3, 5], [1.0, 2.0])
    expected = torch.outer(gaussian_1d(5, 2.0), gaussian_1d(3, 1.0))
    assert torch.allclose(out[0, 0, 5:10, 6:9], expected)
    assert out.sum().item() == pytest.approx(1.0)
    default = TF.gaussian_blur(impulse, 5)
    sigma = 0.3 * ((5 - 1) * 0.5 - 1) + 0.8
    assert torch.allclose(default[0, 0, 5:10, 5:10], torch.outer(gaussian_1d(5, sigma), gaussian_1d(5, sigma)))


def test_gaussian_blur_reflects_at_the_edges_and_checks_its_arguments():
    ramp = torch.linspace(0, 1, 8).expand(1, 8, 8).clone()  # constant down the columns
    blurred = TF.gaussian_blur(ramp, 3, 1.0)
    assert torch.allclose(blurred[0, :, 0], blurred[0, 0, 0].expand(8))
    # reflect at x=0: the left column averages ramp[1], ramp[0], ramp[1]
    k = gaussian_1d(3, 1.0).float()
    assert blurred[0, 0, 0].item() == pytest.approx((k[0] * ramp[0, 0, 1] + k[1] * ramp[0, 0, 0]
                                                     + k[2] * ramp[0, 0, 1]).item(), abs=1e-6)
    with pytest.raises(ValueError, match="odd and positive"):
        TF.gaussian_blur(ramp, 4)
    with pytest.raises(ValueError, match="sigma must be positive"):
        TF.gaussian_blur(ramp, 3, 0.0)


def test_gaussian_blur_keeps_integer_and_bool_dtypes_by_rounding():
    """essentials' MaskSmooth+ blurs a bool mask: the result is True where the blur is above one half."""
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    mask[:, 2:7, 2:7] = True
    out = TF.gaussian_blur(mask, 3)
    assert out.dtype == torch.bool
    expected = TF.gaussian_blur(mask.float(), 3).round().bool()
    assert torch.equal(out, expected) and out[0, 4, 4] and not out[0, 0, 0]
    assert TF.gaussian_blur(torch.full((1, 4, 4), 200, dtype=torch.uint8), 3).unique().tolist() == [200]


def test_gaussian_blur_class_fixed_or_drawn_sigma():
    image = torch.rand(2, 3, 10, 10)
    assert torch.equal(T.GaussianBlur((5, 5), sigma=(1.5, 1.5))(image), TF.gaussian_blur(image, 5, 1.5))
    torch.manual_seed(3)
    drawn = float(torch.empty(1).uniform_(0.1, 2.0).item())
    torch.manual_seed(3)
    assert torch.allclose(T.GaussianBlur(3)(image), TF.gaussian_blur(image, 3, drawn))


def test_rotate_is_counter_clockwise_with_expand_and_fill():
    image = torch.arange(24.0).view(1, 4, 6)
    assert torch.equal(TF.rotate(image, 90, expand=True), torch.rot90(image, 1, dims=(-2, -1)))
    assert torch.equal(TF.rotate(image, -90, expand=True), torch.rot90(image, -1, dims=(-2, -1)))
    assert torch.equal(TF.rotate(image, 180), torch.flip(image, (-2, -1)))
    assert torch.equal(TF.rotate(image, 180, center=[3, 2]), TF.rotate(image, 180))  # the centre by default
    rgb = torch.rand(2, 3, 10, 10)
    turned = TF.rotate(rgb, 45, fill=[1.0, 0.0, 0.5])
    assert turned[0, :, 0, 0].tolist() == [1.0, 0.0, 0.5]  # a corner comes from outside: the fill
    assert torch.equal(turned[:, :, 4:6, 4:6], TF.rotate(rgb, 45)[:, :, 4:6, 4:6])  # the middle is unchanged


def test_rotate_expand_size_matches_pil_for_general_angles():
    """expand: the output holds the whole rotated image; PIL computes the same box for angles that are not a
    multiple of 90 (which PIL transposes instead)."""
    for angle in (17.5, 30, 45, -60, 135):
        pil = Image.new("L", (13, 10)).rotate(angle, expand=True)
        assert TF.rotate(torch.zeros(1, 10, 13), angle, expand=True).shape[-2:] == (pil.height, pil.width)
    pil_out = TF.rotate(Image.new("RGB", (8, 6), (255, 0, 0)), 30, expand=True)
    assert isinstance(pil_out, Image.Image) and pil_out.size == Image.new("L", (8, 6)).rotate(30, expand=True).size


def test_resize_one_number_sets_the_shorter_edge_and_max_size_caps_the_longer():
    image = torch.rand(2, 3, 64, 96)
    assert TF.resize(image, 48).shape == (2, 3, 48, 72)
    assert TF.resize(image, [30, 40]).shape == (2, 3, 30, 40)
    assert TF.resize(image, 48, max_size=60).shape == (2, 3, 40, 60)  # 72 > 60: long edge 60, short int(60*48/72)
    assert TF.resize(torch.rand(1, 10, 7), 5).shape == (1, 7, 5)  # 10 * 5 / 7 = 7.14, truncated
    with pytest.raises(ValueError, match="strictly greater"):
        TF.resize(image, 48, max_size=48)
    assert TF.resize(Image.new("RGB", (96, 64)), 32).size == (48, 32)
    assert T.Resize(32, interpolation=TF.InterpolationMode.NEAREST)(image).shape == (2, 3, 32, 48)


def test_resize_antialiases_bilinear_by_default_and_nearest_picks_pixels():
    checker = (torch.arange(64).view(8, 8) % 2 == torch.arange(8).view(8, 1) % 2).float().expand(1, 1, 8, 8)
    smooth = TF.resize(checker, [2, 2])
    assert torch.allclose(smooth, torch.full((1, 1, 2, 2), 0.5), atol=0.01)  # antialiased: about the mean
    assert torch.equal(smooth, F.interpolate(checker, size=(2, 2), mode="bilinear", antialias=True))
    nearest = TF.resize(checker, [2, 2], TF.InterpolationMode.NEAREST)
    assert torch.equal(nearest, F.interpolate(checker, size=(2, 2), mode="nearest"))
    as_bytes = TF.resize((checker * 255).to(torch.uint8), [4, 4])
    assert as_bytes.dtype == torch.uint8


def test_crop_and_center_crop_pad_outside_with_zeros():
    image = torch.arange(25.0).view(1, 5, 5)
    assert torch.equal(TF.crop(image, 1, 2, 2, 3), image[:, 1:3, 2:5])
    outside = TF.crop(image, -1, 3, 3, 3)
    assert outside.shape == (1, 3, 3) and outside[0, 0].tolist() == [0, 0, 0] and outside[0, 1].tolist() == [3, 4, 0]
    assert torch.equal(T.CenterCrop(3)(image), image[:, 1:4, 1:4])
    assert torch.equal(TF.center_crop(image, [4, 2]), image[:, 0:4, 2:4])  # round((5-4)/2) = 0, round(1.5) = 2
    padded = TF.center_crop(torch.ones(1, 2, 2), [5, 5])  # 1 zero row/column before, 2 after
    assert padded[0].sum() == 4 and torch.equal(padded[0, 1:3, 1:3], torch.ones(2, 2))


def test_colour_adjustments_blend_as_documented():
    image = torch.rand(2, 3, 6, 6)
    gray = 0.2989 * image[:, 0] + 0.587 * image[:, 1] + 0.114 * image[:, 2]
    mean = gray.mean(dim=(-2, -1)).view(2, 1, 1, 1)
    assert torch.allclose(TF.adjust_contrast(image, 1.5), (1.5 * image - 0.5 * mean).clamp(0, 1), atol=1e-6)
    assert torch.allclose(TF.adjust_saturation(image, 0.0), gray.unsqueeze(1).expand_as(image), atol=1e-6)
    assert torch.allclose(TF.adjust_brightness(image, 2.0), (2 * image).clamp(0, 1))
    one = torch.rand(1, 1, 4, 4)  # one channel: contrast around its own mean
    assert torch.allclose(TF.adjust_contrast(one, 0.0), one.mean().expand_as(one))
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(TF.adjust_hue(red, 0.5), torch.tensor([0.0, 1.0, 1.0]).view(1, 3, 1, 1), atol=1e-5)
    assert torch.allclose(TF.adjust_hue(red, 1 / 3), torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1), atol=1e-5)
    jitter = T.ColorJitter(contrast=(1.5, 1.5), saturation=(0.0, 0.0))  # fixed factors; order is random
    once = jitter(image)
    assert torch.allclose(once, TF.adjust_contrast(TF.adjust_saturation(image, 0), 1.5), atol=1e-6) or \
        torch.allclose(once, TF.adjust_saturation(TF.adjust_contrast(image, 1.5), 0), atol=1e-6)
    with pytest.raises(ValueError, match="hue"):
        T.ColorJitter(hue=0.7)


def test_flip_perspective_and_elastic_identities():
    image = torch.rand(1, 3, 8, 10)
    assert torch.equal(T.RandomHorizontalFlip(p=1.0)(image), image.flip(-1))
    assert torch.equal(T.RandomHorizontalFlip(p=0.0)(image), image)
    assert torch.allclose(T.RandomPerspective(distortion_scale=0.0, p=1.0)(image), image, atol=1e-5)
    corners = [[0, 0], [9, 0], [9, 7], [0, 7]]
    shifted = TF.perspective(image, corners, [[x + 1, y] for x, y in corners], fill=[0.0])
    assert torch.allclose(shifted[..., 1:], image[..., :-1], atol=1e-5) and shifted[..., 0].abs().max() < 1e-5
    larger = torch.rand(3, 24, 20)  # the noise is blurred with a kernel of 8 sigma + 1 (17), reflected at edges
    assert torch.allclose(T.ElasticTransform(alpha=0.0, sigma=2.0)(larger), larger, atol=1e-5)
    torch.manual_seed(1)
    moved = T.ElasticTransform(alpha=20.0, sigma=2.0, fill=[0.5, 0.5, 0.5])(larger)
    assert moved.shape == larger.shape and not torch.allclose(moved, larger)


def test_random_resized_crop_and_rotation_keep_their_contracts():
    image = torch.rand(1, 3, 40, 60)
    torch.manual_seed(0)
    out = T.RandomResizedCrop((20, 30), scale=(1.0, 1.0), ratio=(1.5, 1.5))(image)
    assert torch.allclose(out, TF.resize(image, [20, 30]))  # the whole image at its own ratio
    assert T.RandomResizedCrop.get_params(40, 60, (5.0, 6.0), (1.5, 1.5)) == (0, 0, 40, 60)  # fallback: centre
    rotated = T.RandomRotation(10, interpolation=TF.InterpolationMode.BILINEAR, expand=True)(image)
    diagonal = math.ceil(60 * math.cos(math.radians(10)) + 40 * math.sin(math.radians(10)))
    assert rotated.shape[:2] == (1, 3) and rotated.shape[-1] <= diagonal + 1
    pipeline = T.Compose([T.RandomHorizontalFlip(p=1.0), T.CenterCrop(10)])
    assert torch.equal(pipeline(image), TF.center_crop(image.flip(-1), 10))


def test_pil_images_go_through_their_uint8_values_and_come_back_as_pil():
    """A PIL image in gives a PIL image out; its values are blurred as uint8 and rounded back (not truncated)."""
    array = (np.arange(36, dtype=np.uint8).reshape(6, 6) * 7)[:, :, None].repeat(3, axis=2)
    pil = Image.fromarray(array, "RGB")
    out = TF.gaussian_blur(pil, 3, 1.0)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (6, 6)
    expected = TF.gaussian_blur(torch.from_numpy(array).permute(2, 0, 1).float(), 3, 1.0).round()
    assert torch.equal(TF.pil_to_tensor(out).float(), expected)
    assert TF.adjust_brightness(Image.fromarray(array[:, :, 0], "L"), 2.0).mode == "L"
