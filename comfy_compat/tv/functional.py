"""torchvision.transforms.functional's operations packs use, on tensors [..., C, H, W] and PIL images, with the
semantics torchvision documents (antialiased resize by default, gaussian_blur's kernel and sigma rules, to_tensor's
0..1 scaling, to_pil_image's truncating float->uint8 and mode from the channel count)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .geometry import affine_output_size, apply_grid, rotation_grid, rotation_matrix


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL_RESAMPLE = {InterpolationMode.NEAREST: Image.Resampling.NEAREST, InterpolationMode.NEAREST_EXACT:
                 Image.Resampling.NEAREST, InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
                 InterpolationMode.BICUBIC: Image.Resampling.BICUBIC, InterpolationMode.BOX: Image.Resampling.BOX,
                 InterpolationMode.HAMMING: Image.Resampling.HAMMING,
                 InterpolationMode.LANCZOS: Image.Resampling.LANCZOS}


def interpolation_mode(value: Any) -> InterpolationMode:
    """An InterpolationMode from the enum, its value ("bilinear") or PIL's resample number."""
    if isinstance(value, InterpolationMode):
        return value
    if isinstance(value, str):
        return InterpolationMode(value)
    for mode, resample in _PIL_RESAMPLE.items():
        if int(resample) == value and mode is not InterpolationMode.NEAREST_EXACT:
            return mode
    raise ValueError(f"interpolation {value!r} is not a torchvision InterpolationMode")


def is_pil(img: Any) -> bool:
    return isinstance(img, Image.Image)


def get_dimensions(img: Any) -> list[int]:
    """[channels, height, width]."""
    if is_pil(img):
        return [len(img.getbands()), img.height, img.width]
    channels = img.shape[-3] if img.ndim >= 3 else 1
    return [channels, img.shape[-2], img.shape[-1]]


def get_image_size(img: Any) -> list[int]:
    """[width, height]."""
    _, height, width = get_dimensions(img)
    return [width, height]


# -- conversions ------------------------------------------------------------------------------------------------
def to_tensor(pic: Any) -> torch.Tensor:
    """A PIL image or an HxW(xC) numpy array as a [C, H, W] tensor; uint8 values are scaled to 0..1."""
    if isinstance(pic, np.ndarray):
        array = pic[:, :, None] if pic.ndim == 2 else pic
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return tensor.float().div(255) if tensor.dtype == torch.uint8 else tensor
    if not is_pil(pic):
        raise TypeError(f"to_tensor takes a PIL image or a numpy array, not {type(pic).__name__}")
    dtypes = {"I": np.int32, "I;16": np.int16, "F": np.float32}
    array = np.array(pic, dtypes.get(pic.mode, np.uint8), copy=True)
    if pic.mode == "1":
        array = 255 * array
    tensor = torch.from_numpy(array).view(pic.height, pic.width, -1).permute(2, 0, 1).contiguous()
    return tensor.float().div(255) if tensor.dtype == torch.uint8 else tensor


_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def to_pil_image(pic: Any, mode: str | None = None) -> Image.Image:
    """A [C, H, W] or [H, W] tensor (floats in 0..1, multiplied by 255 and truncated) or an HxW(xC) numpy array
    as a PIL image; 1 channel is "L" (uint8), "I;16", "I" or "F" by dtype, 2 "LA", 3 "RGB", 4 "RGBA"."""
    if isinstance(pic, torch.Tensor):
        if pic.ndim not in (2, 3):
            raise ValueError(f"to_pil_image takes a 2 or 3 dimensional tensor, got {pic.ndim} dimensions")
        pic = pic.unsqueeze(0) if pic.ndim == 2 else pic
        if pic.is_floating_point() and mode != "F":
            pic = pic.mul(255).byte()
        array = pic.detach().cpu().permute(1, 2, 0).numpy()
    elif isinstance(pic, np.ndarray):
        array = pic[:, :, None] if pic.ndim == 2 else pic
    else:
        raise TypeError(f"to_pil_image takes a tensor or a numpy array, not {type(pic).__name__}")
    channels = array.shape[2]
    if channels > 4:
        raise ValueError(f"to_pil_image makes images of 1 to 4 channels, not {channels}")
    if channels == 1:
        array = array[:, :, 0]
        inferred = {np.uint8: "L", np.int16: "I;16", np.int32: "I", np.float32: "F"}.get(array.dtype.type)
        if inferred is None:
            raise TypeError(f"to_pil_image: a 1-channel {array.dtype} image has no PIL mode")
    else:
        inferred = _MODES[channels]
        if array.dtype != np.uint8:
            raise TypeError(f"to_pil_image: a {channels}-channel image must be uint8, not {array.dtype}")
    return Image.fromarray(array, mode=mode or inferred)


def _as_batch(img: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """[..., C, H, W] (or [H, W]) as [N, C, H, W], and the shape to restore."""
    shape = img.shape
    if img.ndim == 2:
        return img.reshape(1, 1, *shape), shape
    return img.reshape(-1, *shape[-3:]), shape


def _restore(out: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    leading = shape[:-2] if len(shape) == 2 else shape[:-3] + (out.shape[-3],)
    out = out.reshape(*leading, out.shape[-2], out.shape[-1])
    if dtype.is_floating_point:
        return out
    if dtype == torch.uint8:
        out = out.clamp(0, 255)
    return out.round().to(dtype)


def pil_to_tensor(pic: Image.Image) -> torch.Tensor:
    """A PIL image as a uint8 (or its own integer type) [C, H, W] tensor, values unscaled."""
    array = np.array(pic, copy=True)
    return torch.from_numpy(array).view(pic.height, pic.width, -1).permute(2, 0, 1).contiguous()


def _pil_roundtrip(img: Image.Image, fn: Any) -> Image.Image:
    """A tensor operation on a PIL image, through its uint8 values (rounded back, as torchvision does)."""
    out = fn(pil_to_tensor(img.convert("RGB") if img.mode not in ("L", "LA", "RGB", "RGBA") else img))
    return to_pil_image(out).convert(img.mode)


# -- blur -------------------------------------------------------------------------------------------------------
def _pair(value: Any, what: str) -> list[Any]:
    if isinstance(value, int | float):
        return [value, value]
    values = list(value)
    if len(values) == 1:
        return values * 2
    if len(values) != 2:
        raise ValueError(f"{what} takes one value or two, got {len(values)}")
    return values


def gaussian_kernel1d(size: int, sigma: float) -> torch.Tensor:
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def gaussian_blur(img: Any, kernel_size: Any, sigma: Any = None) -> Any:
    """Blur with a Gaussian kernel: kernel_size is one odd positive int or [x, y]; sigma one positive float or
    [x, y], by default 0.3 * ((k - 1) * 0.5 - 1) + 0.8 per axis; edges reflect."""
    sizes = [int(k) for k in _pair(kernel_size, "gaussian_blur's kernel_size")]
    if any(k <= 0 or k % 2 == 0 for k in sizes):
        raise ValueError(f"gaussian_blur's kernel_size must be odd and positive, got {sizes}")
    sigmas = [0.15 * k + 0.35 for k in sizes] if sigma is None else [float(s) for s in _pair(sigma, "sigma")]
    if any(s <= 0 for s in sigmas):
        raise ValueError(f"gaussian_blur's sigma must be positive, got {sigmas}")
    if is_pil(img):
        return _pil_roundtrip(img, lambda t: gaussian_blur(t, sizes, sigmas))
    batch, shape = _as_batch(img)
    dtype = batch.dtype if batch.is_floating_point() else torch.float32
    batch = batch.to(dtype)
    kx, ky = (gaussian_kernel1d(k, s).to(dtype=dtype, device=batch.device) for k, s in zip(sizes, sigmas, strict=True))
    kernel = (ky[:, None] * kx[None, :]).expand(batch.shape[1], 1, sizes[1], sizes[0])
    padded = F.pad(batch, [sizes[0] // 2, sizes[0] // 2, sizes[1] // 2, sizes[1] // 2], mode="reflect")
    return _restore(F.conv2d(padded, kernel, groups=batch.shape[1]), shape, img.dtype)


# -- geometry ---------------------------------------------------------------------------------------------------
def resized_output_size(height: int, width: int, size: Any, max_size: int | None = None) -> tuple[int, int]:
    """(height, width) after resize: [h, w] as given; one number sets the shorter edge, keeping the aspect ratio
    (the longer edge truncated), then the longer edge is capped at max_size."""
    if isinstance(size, int) or len(size) == 1:
        requested = size if isinstance(size, int) else size[0]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = requested, int(requested * long / short)
        if max_size is not None:
            if max_size <= requested:
                raise ValueError(f"max_size = {max_size} must be strictly greater than the requested size for the "
                                 f"smaller edge size = {requested}")
            if new_long > max_size:
                new_short, new_long = int(max_size * new_short / new_long), max_size
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if max_size is not None:
        raise ValueError("max_size is only supported when size is a single number")
    return int(size[0]), int(size[1])


def resize(img: Any, size: Any, interpolation: Any = InterpolationMode.BILINEAR, max_size: int | None = None,
           antialias: bool | None = True) -> Any:
    mode = interpolation_mode(interpolation)
    _, height, width = get_dimensions(img)
    new_h, new_w = resized_output_size(height, width, size, max_size)
    if is_pil(img):
        return img.resize((new_w, new_h), _PIL_RESAMPLE[mode])
    if (new_h, new_w) == (height, width):
        return img
    if mode not in (InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT, InterpolationMode.BILINEAR,
                    InterpolationMode.BICUBIC):
        raise ValueError(f"resize of a tensor supports nearest, nearest-exact, bilinear and bicubic, not {mode.value}")
    batch, shape = _as_batch(img)
    batch = batch if batch.is_floating_point() else batch.float()
    smooth = mode in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
    out = F.interpolate(batch, size=(new_h, new_w), mode=mode.value, align_corners=False if smooth else None,
                        antialias=bool(antialias) and smooth)
    return _restore(out, shape, img.dtype)


def crop(img: Any, top: int, left: int, height: int, width: int) -> Any:
    """The region [top, top + height) x [left, left + width); parts outside the image are zeros."""
    if is_pil(img):
        return img.crop((left, top, left + width, top + height))
    img_h, img_w = img.shape[-2:]
    bottom, right = top + height, left + width
    if top < 0 or left < 0 or bottom > img_h or right > img_w:
        pads = [max(-left, 0), max(right - img_w, 0), max(-top, 0), max(bottom - img_h, 0)]
        region = img[..., max(top, 0):min(bottom, img_h), max(left, 0):min(right, img_w)]
        return F.pad(region, pads, value=0)
    return img[..., top:bottom, left:right]


def center_crop(img: Any, output_size: Any) -> Any:
    crop_h, crop_w = (output_size, output_size) if isinstance(output_size, int) else _pair(output_size, "size")
    _, img_h, img_w = get_dimensions(img)
    return crop(img, _centred_start(img_h, crop_h), _centred_start(img_w, crop_w), crop_h, crop_w)


def _centred_start(length: int, cropped: int) -> int:
    """Where a centred crop starts: rounded to even, or (a crop larger than the image) padded evenly with the
    extra pixel after, as torchvision pads before cropping."""
    return -((cropped - length) // 2) if cropped > length else int(round((length - cropped) / 2.0))


def hflip(img: Any) -> Any:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if is_pil(img) else img.flip(-1)


def vflip(img: Any) -> Any:
    return img.transpose(Image.Transpose.FLIP_TOP_BOTTOM) if is_pil(img) else img.flip(-2)


def _fill_list(fill: Any) -> list[float] | None:
    if fill is None:
        return None
    return [float(fill)] if isinstance(fill, int | float) else [float(f) for f in fill]


def rotate(img: Any, angle: float, interpolation: Any = InterpolationMode.NEAREST, expand: bool = False,
           center: Sequence[int] | None = None, fill: Any = None) -> Any:
    """Rotate counter-clockwise by `angle` degrees about `center` (default the image's centre); `expand` grows
    the output to hold the whole rotated image; areas outside are `fill` (one value or one per channel) or 0."""
    mode = interpolation_mode(interpolation)
    if is_pil(img):
        fillcolor = fill if fill is None or isinstance(fill, int | float) else tuple(int(f) for f in fill)
        return img.rotate(angle, resample=_PIL_RESAMPLE[mode], expand=expand, center=center, fillcolor=fillcolor)
    _, height, width = get_dimensions(img)
    offset = [0.0, 0.0] if center is None else [c - s * 0.5 for c, s in zip(center, (width, height), strict=True)]
    matrix = rotation_matrix(-angle, offset)
    out_w, out_h = affine_output_size(matrix, width, height) if expand else (width, height)
    batch, shape = _as_batch(img)
    dtype = batch.dtype if batch.is_floating_point() else torch.float32
    grid = rotation_grid(matrix, width, height, out_w, out_h, dtype, batch.device)
    out = apply_grid(batch.to(dtype), grid, mode.value, _fill_list(fill))
    return _restore(out, shape, img.dtype)


def perspective(img: Any, startpoints: Any, endpoints: Any, interpolation: Any = InterpolationMode.BILINEAR,
                fill: Any = None) -> Any:
    from .geometry import perspective_coefficients, perspective_grid
    if is_pil(img):
        return _pil_roundtrip(img, lambda t: perspective(t, startpoints, endpoints, interpolation, fill))
    coefficients = perspective_coefficients(endpoints, startpoints)
    batch, shape = _as_batch(img)
    dtype = batch.dtype if batch.is_floating_point() else torch.float32
    grid = perspective_grid(coefficients, batch.shape[-1], batch.shape[-2], dtype, batch.device)
    out = apply_grid(batch.to(dtype), grid, interpolation_mode(interpolation).value, _fill_list(fill))
    return _restore(out, shape, img.dtype)


def elastic_transform(img: Any, displacement: torch.Tensor, interpolation: Any = InterpolationMode.BILINEAR,
                      fill: Any = None) -> Any:
    """Move each pixel by `displacement` (1 x H x W x 2, in grid_sample's -1..1 units)."""
    if is_pil(img):
        return _pil_roundtrip(img, lambda t: elastic_transform(t, displacement, interpolation, fill))
    batch, shape = _as_batch(img)
    dtype = batch.dtype if batch.is_floating_point() else torch.float32
    height, width = batch.shape[-2:]
    ys, xs = (torch.linspace((-s + 1) / s, (s - 1) / s, s, dtype=dtype, device=batch.device) for s in (height, width))
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([grid_x, grid_y], -1).unsqueeze(0) + displacement.to(device=batch.device, dtype=dtype)
    out = apply_grid(batch.to(dtype), grid, interpolation_mode(interpolation).value, _fill_list(fill))
    return _restore(out, shape, img.dtype)


# -- colour -----------------------------------------------------------------------------------------------------
def rgb_to_grayscale(img: Any, num_output_channels: int = 1) -> Any:
    if is_pil(img):
        gray = img.convert("L")
        return gray if num_output_channels == 1 else gray.convert("RGB")
    r, g, b = img.unbind(dim=-3)
    gray = (0.2989 * r + 0.587 * g + 0.114 * b).to(img.dtype).unsqueeze(dim=-3)
    return gray.expand(img.shape) if num_output_channels == 3 else gray


def _blend(img: torch.Tensor, other: torch.Tensor, ratio: float) -> torch.Tensor:
    bound = 1.0 if img.is_floating_point() else 255.0
    return (ratio * img + (1.0 - ratio) * other).clamp(0, bound).to(img.dtype)


def _check_channels(img: torch.Tensor, what: str, allowed: tuple[int, ...] = (1, 3)) -> int:
    channels = get_dimensions(img)[0]
    if channels not in allowed:
        raise TypeError(f"{what} takes images of {' or '.join(map(str, allowed))} channels, got {channels}")
    return channels


def adjust_brightness(img: Any, brightness_factor: float) -> Any:
    if is_pil(img):
        return _pil_roundtrip(img, lambda t: adjust_brightness(t, brightness_factor))
    return _blend(img, torch.zeros_like(img), brightness_factor)


def adjust_contrast(img: Any, contrast_factor: float) -> Any:
    """Blend with the mean grey level of each image (over its channels, height and width)."""
    if is_pil(img):
        return _pil_roundtrip(img, lambda t: adjust_contrast(t, contrast_factor))
    channels = _check_channels(img, "adjust_contrast")
    dtype = img.dtype if img.is_floating_point() else torch.float32
    gray = rgb_to_grayscale(img).to(dtype) if channels == 3 else img.to(dtype)
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(img, mean, contrast_factor)


def adjust_saturation(img: Any, saturation_factor: float) -> Any:
    if is_pil(img):
        return _pil_roundtrip(img, lambda t: adjust_saturation(t, saturation_factor))
    if _check_channels(img, "adjust_saturation") == 1:
        return img
    return _blend(img, rgb_to_grayscale(img), saturation_factor)


def adjust_hue(img: Any, hue_factor: float) -> Any:
    """Shift the hue by `hue_factor` (-0.5..0.5 of a turn)."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5]")
    if is_pil(img):
        return _pil_roundtrip(img, lambda t: adjust_hue(t, hue_factor))
    if _check_channels(img, "adjust_hue") == 1:
        return img
    import kornia.color
    batch, shape = _as_batch(img if img.is_floating_point() else img.float() / 255)
    hsv = kornia.color.rgb_to_hsv(batch)
    hue = torch.remainder(hsv[:, :1] + hue_factor * 2 * math.pi, 2 * math.pi)
    out = kornia.color.hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], dim=1))
    return _restore(out if img.is_floating_point() else out * 255, shape, img.dtype)
