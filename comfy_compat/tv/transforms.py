"""torchvision.transforms' classes packs use (the same classes serve `transforms.v2`): callables over a tensor
[..., C, H, W] or a PIL image. Random ones draw their parameters from torch's generator as torchvision does, so
`torch.manual_seed` makes them repeatable."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import functional as TF
from .functional import InterpolationMode


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high).item())


def _size_pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    values = list(size)
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _range(value: Any, name: str, center: float = 1.0, bound: tuple[float, float] = (0, float("inf"))) -> Any:
    """ColorJitter's factor ranges: a number v is [center - v, center + v] (not below the bound), a pair is used
    as given; a range that is just the centre is None (no change)."""
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"ColorJitter's {name} must be non-negative, got {value}")
        low, high = center - float(value), center + float(value)
        low = max(low, 0.0) if bound[0] == 0 else low
    else:
        low, high = (float(v) for v in value)
    if not bound[0] <= low <= high <= bound[1]:
        raise ValueError(f"ColorJitter's {name} range ({low}, {high}) must lie in {bound}")
    return None if low == high == center else (low, high)


class Compose:
    def __init__(self, transforms: Sequence[Callable[[Any], Any]]):
        self.transforms = list(transforms)

    def __call__(self, img: Any) -> Any:
        for transform in self.transforms:
            img = transform(img)
        return img


class ToTensor:
    def __call__(self, pic: Any) -> torch.Tensor:
        return TF.to_tensor(pic)


class ToPILImage:
    def __init__(self, mode: str | None = None):
        self.mode = mode

    def __call__(self, pic: Any) -> Any:
        return TF.to_pil_image(pic, self.mode)


class Resize:
    def __init__(self, size: Any, interpolation: Any = InterpolationMode.BILINEAR, max_size: int | None = None,
                 antialias: bool | None = True):
        self.size, self.interpolation, self.max_size, self.antialias = size, interpolation, max_size, antialias

    def __call__(self, img: Any) -> Any:
        return TF.resize(img, self.size, self.interpolation, self.max_size, self.antialias)


class CenterCrop:
    def __init__(self, size: Any):
        self.size = _size_pair(size)

    def __call__(self, img: Any) -> Any:
        return TF.center_crop(img, self.size)


class GaussianBlur:
    """Blur with kernel_size; sigma a number, or (min, max) from which one sigma is drawn per call."""

    def __init__(self, kernel_size: Any, sigma: Any = (0.1, 2.0)):
        self.kernel_size = [int(k) for k in TF._pair(kernel_size, "GaussianBlur's kernel_size")]
        if any(k <= 0 or k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"GaussianBlur's kernel_size must be odd and positive, got {self.kernel_size}")
        low, high = (float(sigma), float(sigma)) if isinstance(sigma, int | float) else (float(s) for s in sigma)
        if not 0 < low <= high:
            raise ValueError(f"GaussianBlur's sigma must be positive with min <= max, got ({low}, {high})")
        self.sigma = (low, high)

    def __call__(self, img: Any) -> Any:
        sigma = _uniform(*self.sigma)
        return TF.gaussian_blur(img, self.kernel_size, [sigma, sigma])


class ColorJitter:
    """Brightness, contrast, saturation and hue, each by a factor drawn from its range, in a random order."""

    def __init__(self, brightness: Any = 0, contrast: Any = 0, saturation: Any = 0, hue: Any = 0):
        self.brightness = _range(brightness, "brightness")
        self.contrast = _range(contrast, "contrast")
        self.saturation = _range(saturation, "saturation")
        self.hue = _range(hue, "hue", center=0.0, bound=(-0.5, 0.5))

    def __call__(self, img: Any) -> Any:
        steps = [(self.brightness, TF.adjust_brightness), (self.contrast, TF.adjust_contrast),
                 (self.saturation, TF.adjust_saturation), (self.hue, TF.adjust_hue)]
        for index in torch.randperm(4).tolist():
            factors, adjust = steps[index]
            if factors is not None:
                img = adjust(img, _uniform(*factors))
        return img


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: Any) -> Any:
        return TF.hflip(img) if torch.rand(1).item() < self.p else img


class RandomRotation:
    def __init__(self, degrees: Any, interpolation: Any = InterpolationMode.NEAREST, expand: bool = False,
                 center: Sequence[int] | None = None, fill: Any = 0):
        self.degrees = (-float(degrees), float(degrees)) if isinstance(degrees, int | float) else tuple(degrees)
        self.interpolation, self.expand, self.center, self.fill = interpolation, expand, center, fill

    def __call__(self, img: Any) -> Any:
        angle = _uniform(*self.degrees)
        fill = self.fill
        if not TF.is_pil(img) and isinstance(fill, int | float):
            fill = [float(fill)] * TF.get_dimensions(img)[0]
        return TF.rotate(img, angle, self.interpolation, self.expand, self.center, fill)


class RandomPerspective:
    def __init__(self, distortion_scale: float = 0.5, p: float = 0.5,
                 interpolation: Any = InterpolationMode.BILINEAR, fill: Any = 0):
        self.distortion_scale, self.p, self.interpolation, self.fill = distortion_scale, p, interpolation, fill

    def __call__(self, img: Any) -> Any:
        if torch.rand(1).item() >= self.p:
            return img
        _, height, width = TF.get_dimensions(img)
        start, end = self.get_params(width, height, self.distortion_scale)
        return TF.perspective(img, start, end, self.interpolation, self.fill)

    @staticmethod
    def get_params(width: int, height: int, distortion_scale: float) -> tuple[list[list[int]], list[list[int]]]:
        """The image's corners, and each moved inwards by up to distortion_scale of half the image."""
        dx, dy = int(distortion_scale * (width // 2)), int(distortion_scale * (height // 2))

        def pick(low: int, high: int) -> int:
            return int(torch.randint(low, high, size=(1,)).item())
        top_left = [pick(0, dx + 1), pick(0, dy + 1)]
        top_right = [pick(width - dx - 1, width), pick(0, dy + 1)]
        bottom_right = [pick(width - dx - 1, width), pick(height - dy - 1, height)]
        bottom_left = [pick(0, dx + 1), pick(height - dy - 1, height)]
        start = [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
        return start, [top_left, top_right, bottom_right, bottom_left]


class RandomResizedCrop:
    def __init__(self, size: Any, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 interpolation: Any = InterpolationMode.BILINEAR, antialias: bool | None = True):
        self.size = _size_pair(size)
        self.scale, self.ratio, self.interpolation, self.antialias = scale, ratio, interpolation, antialias

    def __call__(self, img: Any) -> Any:
        _, height, width = TF.get_dimensions(img)
        top, left, h, w = self.get_params(height, width, self.scale, self.ratio)
        return TF.resize(TF.crop(img, top, left, h, w), list(self.size), self.interpolation, None, self.antialias)

    @staticmethod
    def get_params(height: int, width: int, scale: Sequence[float],
                   ratio: Sequence[float]) -> tuple[int, int, int, int]:
        """A crop of area scale x the image's and aspect ratio in `ratio` (log-uniform), 10 tries, else the
        central crop closest to `ratio`."""
        area = height * width
        log_ratio = torch.log(torch.tensor(ratio))
        for _ in range(10):
            target_area = area * _uniform(scale[0], scale[1])
            aspect = math.exp(_uniform(float(log_ratio[0]), float(log_ratio[1])))
            w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,)).item())
                left = int(torch.randint(0, width - w + 1, size=(1,)).item())
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(height * max(ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


class ElasticTransform:
    """Displace pixels by random noise blurred with sigma and scaled by alpha (in pixels of the image)."""

    def __init__(self, alpha: Any = 50.0, sigma: Any = 5.0, interpolation: Any = InterpolationMode.BILINEAR,
                 fill: Any = 0):
        self.alpha = [float(a) for a in TF._pair(alpha, "ElasticTransform's alpha")]
        self.sigma = [float(s) for s in TF._pair(sigma, "ElasticTransform's sigma")]
        self.interpolation, self.fill = interpolation, fill

    def __call__(self, img: Any) -> Any:
        _, height, width = TF.get_dimensions(img)
        displacement = self.get_params(self.alpha, self.sigma, [height, width])
        fill = self.fill
        if not TF.is_pil(img) and isinstance(fill, int | float):
            fill = [float(fill)] * TF.get_dimensions(img)[0]
        return TF.elastic_transform(img, displacement, self.interpolation, fill)

    @staticmethod
    def get_params(alpha: Sequence[float], sigma: Sequence[float], size: list[int]) -> torch.Tensor:
        """1 x H x W x 2 displacements: uniform noise in -1..1, blurred (kernel 8 sigma + 1, made odd), times
        alpha / size per axis."""
        axes = []
        for index in range(2):
            noise = torch.rand([1, 1, *size]) * 2 - 1
            if sigma[index] > 0.0:
                kernel = int(8 * sigma[index] + 1)
                kernel += 1 - kernel % 2
                noise = TF.gaussian_blur(noise, [kernel, kernel], list(sigma))
            axes.append(noise * alpha[index] / size[index])
        return torch.cat(axes, 1).permute([0, 2, 3, 1])
