"""Pixel helpers shared by the image and mask nodes: shapes, resizing, compositing, masks, PNG files.

Conventions (ComfyUI's): IMAGE is float [B,H,W,C] in 0..1, MASK is float [B,H,W] in 0..1 (a bare [H,W] from
older nodes counts as a batch of one). Resizing and compositing work channels-first, [B,C,H,W].

This module imports torch, numpy and Pillow at the top, so node modules import it inside their functions only.
Every function returns new tensors and never changes its arguments.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from diffusion.denoisers import repeat_to_batch_size
from diffusion.resample import bislerp, center_crop_offsets

from .pixels import LATENT_UPSCALE_METHODS, MASK_OPERATIONS, UPSCALE_METHODS

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


# --- shapes --------------------------------------------------------------------------------------------------

def image_batch(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """[B,H,W,C] (a single [H,W,C] becomes a batch of one)."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise ValueError(f"{what} must be an IMAGE tensor [batch, height, width, channels], "
                         f"got shape {tuple(image.shape)}")
    return image


def mask_batch(mask: torch.Tensor, what: str = "mask") -> torch.Tensor:
    """[B,H,W]; [H,W] becomes a batch of one and extra leading axes fold into the batch (as ComfyUI does)."""
    if mask.dim() < 2:
        raise ValueError(f"{what} must be a MASK tensor [batch, height, width], got shape {tuple(mask.shape)}")
    return mask.reshape(-1, mask.shape[-2], mask.shape[-1])


def fit_channels(destination: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`source` [...,C] with the destination's channel count: extra channels dropped, a missing alpha added as
    opaque (ComfyUI pads the destination instead, which breaks the composite; we pad the source)."""
    want, have = destination.shape[-1], source.shape[-1]
    if have > want:
        return source[..., :want]
    if have < want:
        pad = torch.ones(*source.shape[:-1], want - have, dtype=source.dtype, device=source.device)
        return torch.cat([source, pad], dim=-1)
    return source


# --- resizing ------------------------------------------------------------------------------------------------

def upscale(samples: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """Resize [B,C,H,W] to height x width: torch interpolation, Pillow for lanczos, bislerp for latents;
    `crop="center"` first cuts the sides that do not fit the new aspect ratio."""
    methods = dict.fromkeys(UPSCALE_METHODS + LATENT_UPSCALE_METHODS)
    if method not in methods:
        raise ValueError(f"unknown upscale method {method!r}; use one of {', '.join(methods)}")
    if crop == "center":
        old_h, old_w = samples.shape[-2:]
        x, y = center_crop_offsets(old_w, old_h, width, height)
        samples = samples[:, :, y:old_h - y, x:old_w - x]
    if method == "lanczos":
        return lanczos(samples, width, height)
    if method == "bislerp":
        return bislerp(samples, width, height)
    return F.interpolate(samples, size=(height, width), mode=method)


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pillow's Lanczos on 8-bit copies (values truncated to 0..255 as ComfyUI does), back to floats."""
    out = []
    for item in samples:
        pixels = np.clip(255.0 * item.movedim(0, -1).float().cpu().numpy(), 0, 255).astype(np.uint8)
        if pixels.shape[-1] in (1, 3, 4):
            picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
            resized = np.asarray(picture.resize((width, height), resample=Image.Resampling.LANCZOS))
            resized = resized.reshape(height, width, -1)
        else:  # any other channel count: one grey image per channel
            resized = np.stack([np.asarray(Image.fromarray(pixels[..., c]).resize(
                (width, height), resample=Image.Resampling.LANCZOS)) for c in range(pixels.shape[-1])], axis=-1)
        out.append(torch.from_numpy(resized.astype(np.float32) / 255.0).movedim(-1, 0))
    return torch.stack(out).to(samples.device, samples.dtype)


# --- compositing ---------------------------------------------------------------------------------------------

def _overlap(offset: int, size: int, limit: int) -> tuple[int, int, int]:
    """Where a span of `size` placed at `offset` meets 0..limit: (start in destination, start in source,
    length); length <= 0 means no overlap."""
    start = max(offset, 0)
    end = min(offset + size, limit)
    return start, start - offset, end - start


def paste(destination: torch.Tensor, source: torch.Tensor, left: int, top: int,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """`source` [B,C,h,w] blended over `destination` [B,C,H,W] with its top-left corner at (left, top), clipped
    at every edge: out = mask * source + (1 - mask) * destination where they overlap."""
    out = destination.clone()
    h, w = source.shape[-2:]
    y0, sy, rows = _overlap(top, h, out.shape[-2])
    x0, sx, cols = _overlap(left, w, out.shape[-1])
    if rows <= 0 or cols <= 0:
        return out
    src = source[:, :, sy:sy + rows, sx:sx + cols]
    if mask is None:
        mask = torch.ones_like(src)
    else:
        mask = mask[:, :, sy:sy + rows, sx:sx + cols]
    region = out[:, :, y0:y0 + rows, x0:x0 + cols]
    out[:, :, y0:y0 + rows, x0:x0 + cols] = mask * src + (torch.ones_like(mask) - mask) * region
    return out


def composite(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None = None,
              multiplier: int = 1, resize_source: bool = False) -> torch.Tensor:
    """ComfyUI's composite() on [B,C,H,W]: the source optionally stretched to the destination's size, repeated
    to its batch, placed at (x, y) / multiplier; the mask (any size) stretched bilinearly to the source's size."""
    source = source.to(destination.device, destination.dtype)
    if resize_source:
        source = F.interpolate(source, size=destination.shape[-2:], mode="bilinear")
    source = repeat_to_batch_size(source, destination.shape[0])
    h, w = source.shape[-2:]
    x = max(-w * multiplier, min(x, destination.shape[-1] * multiplier))
    y = max(-h * multiplier, min(y, destination.shape[-2] * multiplier))
    if mask is not None:
        mask = mask_batch(mask).to(destination.device, destination.dtype).unsqueeze(1)
        if mask.shape[-2:] != (h, w):
            mask = F.interpolate(mask, size=(h, w), mode="bilinear")
        mask = repeat_to_batch_size(mask, source.shape[0])
    return paste(destination, source, x // multiplier, y // multiplier, mask)


def combine_masks(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, operation: str) -> torch.Tensor:
    """MaskComposite: `source` placed at (x, y) on `destination`, combined where they overlap, clipped at the
    edges; the whole result clamped to 0..1. and/or/xor compare values rounded to 0 or 1."""
    if operation not in MASK_OPERATIONS:
        raise ValueError(f"unknown mask operation {operation!r}; use one of {', '.join(MASK_OPERATIONS)}")
    destination = mask_batch(destination, "destination")
    source = mask_batch(source, "source").to(destination.device, destination.dtype)
    batch = max(destination.shape[0], source.shape[0])
    out = repeat_to_batch_size(destination, batch).clone()
    source = repeat_to_batch_size(source, batch)
    h, w = source.shape[-2:]
    y0, sy, rows = _overlap(y, h, out.shape[-2])
    x0, sx, cols = _overlap(x, w, out.shape[-1])
    if rows > 0 and cols > 0:
        dst = out[:, y0:y0 + rows, x0:x0 + cols]
        src = source[:, sy:sy + rows, sx:sx + cols]
        if operation == "multiply":
            value = dst * src
        elif operation == "add":
            value = dst + src
        elif operation == "subtract":
            value = dst - src
        else:
            a, b = torch.round(dst).bool(), torch.round(src).bool()
            value = {"and": torch.bitwise_and, "or": torch.bitwise_or, "xor": torch.bitwise_xor}[operation](a, b)
            value = value.to(out.dtype)
        out[:, y0:y0 + rows, x0:x0 + cols] = value
    return torch.clamp(out, 0.0, 1.0)


# --- masks ---------------------------------------------------------------------------------------------------

def _ramp(count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Factors 1/count, 2/count, ..., count/count for the `count` pixels nearest an edge (outermost first)."""
    return ((torch.arange(count, dtype=torch.float64) + 1) / count).to(dtype=dtype, device=device)


def feather(mask: torch.Tensor, left: int, top: int, right: int, bottom: int) -> torch.Tensor:
    """Fade a mask linearly towards each edge: the outermost pixel is multiplied by 1/n, the n-th from the edge
    by n/n = 1, the same on all four sides (ComfyUI's right and bottom ramps are shifted by one pixel)."""
    out = mask_batch(mask).clone()
    height, width = out.shape[-2:]
    left, right = min(left, width), min(right, width)
    top, bottom = min(top, height), min(bottom, height)
    kind = (out.dtype, out.device)
    if left:
        out[:, :, :left] *= _ramp(left, *kind)
    if right:
        out[:, :, width - right:] *= _ramp(right, *kind).flip(0)
    if top:
        out[:, :top, :] *= _ramp(top, *kind)[:, None]
    if bottom:
        out[:, height - bottom:, :] *= _ramp(bottom, *kind).flip(0)[:, None]
    return out


def pad_for_outpaint(image: torch.Tensor, left: int, top: int, right: int, bottom: int,
                     feathering: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ImagePadForOutpaint: IMAGE [B,H',W',C] grown with 0.5 grey, and MASK [1,H',W'] that is 1 on the padding and,
    inside the image, ((f-d)/f)^2 where d < f is the distance to the nearest padded side (rows from the top count
    from 0, from the bottom from 1, as ComfyUI does); only when 2f is less than both image sides."""
    batch, height, width, channels = image.shape
    out = torch.full((batch, height + top + bottom, width + left + right, channels), 0.5, dtype=torch.float32)
    out[:, top:top + height, left:left + width, :] = image
    mask = torch.ones((height + top + bottom, width + left + right), dtype=torch.float32)
    inside = torch.zeros((height, width), dtype=torch.float32)
    if 0 < feathering and feathering * 2 < height and feathering * 2 < width:
        rows = torch.arange(height, dtype=torch.float64)[:, None]
        cols = torch.arange(width, dtype=torch.float64)[None, :]
        far = torch.full((height, width), float(max(height, width)), dtype=torch.float64)
        distance = torch.minimum(torch.minimum(rows if top else far, height - rows if bottom else far),
                                 torch.minimum(cols if left else far, width - cols if right else far))
        ramp = ((feathering - distance) / feathering) ** 2
        inside = torch.where(distance < feathering, ramp, torch.zeros_like(ramp)).to(torch.float32)
    mask[top:top + height, left:left + width] = inside
    return out, mask.unsqueeze(0)


def _dilate_cross(x: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` grey dilations with the 3x3 cross (centre and its four neighbours); outside counts as -inf."""
    for _ in range(steps):
        padded = F.pad(x, (1, 1, 1, 1), value=-math.inf)
        x = torch.stack([x, padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2],
                         padded[:, 1:-1, 2:]]).amax(dim=0)
    return x


def _dilate_square(x: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` grey dilations with the full 3x3 square = one max over a (2*steps+1) square (separable)."""
    k = 2 * steps + 1
    x = F.max_pool2d(x.unsqueeze(1), kernel_size=(1, k), stride=1, padding=(0, steps))
    x = F.max_pool2d(x, kernel_size=(k, 1), stride=1, padding=(steps, 0))
    return x.squeeze(1)


def grow(mask: torch.Tensor, expand: int, tapered_corners: bool) -> torch.Tensor:
    """GrowMask: |expand| grey dilations (expand > 0) or erosions (< 0) with a 3x3 footprint, the cross when
    `tapered_corners`, else the square; pixels outside the mask never count (scipy's grey_dilation with its
    default reflect boundary gives the same)."""
    m = mask_batch(mask)
    if expand == 0:
        return m.clone()
    height, width = m.shape[-2:]
    # after this many steps every pixel has seen the whole mask: further steps change nothing
    steps = min(abs(expand), height + width if tapered_corners else max(height, width))
    x = m if m.dtype in (torch.float32, torch.float64) else m.float()
    x = x if expand > 0 else -x
    x = _dilate_cross(x, steps) if tapered_corners else _dilate_square(x, steps)
    return (x if expand > 0 else -x).to(m.dtype)


# --- files ---------------------------------------------------------------------------------------------------

def _frame_pixels(frame: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB float32 [H,W,3] in 0..1, alpha float32 [H,W] or None) of one decoded frame."""
    if frame.mode in SIXTEEN_BIT_MODES:  # 16-bit grey: keep its precision (Pillow's RGB conversion clips at 255)
        grey = np.clip(np.asarray(frame).astype(np.float32) / 65535.0, 0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=-1), None
    rgb = np.asarray(frame.convert("RGB")).astype(np.float32) / 255.0
    if "A" in frame.getbands():
        alpha = np.asarray(frame.getchannel("A")).astype(np.float32) / 255.0
    elif frame.mode == "P" and "transparency" in frame.info:
        alpha = np.asarray(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0
    else:
        alpha = None
    return rgb, alpha


def read_image(path: Any, name: str, reader: Callable[[Image.Image], Any]) -> Any:
    """`reader(picture)` on the image file at `path`; a file Pillow cannot decode is an error naming `name`."""
    try:
        with Image.open(path) as picture:
            return reader(picture)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"input file {name!r} is not an image Pillow can read ({exc}); "
                         "use a PNG, JPEG, WebP, BMP, GIF or TIFF file") from exc


def load_frames(picture: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """LoadImage: every frame the size of the first (others skipped; MPO files give their first frame only),
    each turned upright by its EXIF orientation. Returns IMAGE [N,H,W,3] and MASK [N,H,W] with mask = 1 - alpha;
    frames without alpha get an all-zero mask of the image's size."""
    images, masks = [], []
    for frame in ImageSequence.Iterator(picture):
        frame = ImageOps.exif_transpose(frame)
        rgb, alpha = _frame_pixels(frame)
        if images and rgb.shape != images[0].shape:
            continue
        images.append(rgb)
        masks.append(1.0 - alpha if alpha is not None else np.zeros(rgb.shape[:2], dtype=np.float32))
        if picture.format == "MPO":
            break
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks))


def load_channel(picture: Image.Image, channel: str) -> torch.Tensor:
    """LoadImageMask: one channel of the (first, EXIF-upright) frame as MASK [1,H,W]; alpha is inverted
    (1 = transparent), an image without alpha counts as opaque."""
    frame = ImageOps.exif_transpose(picture)
    rgb, alpha = _frame_pixels(frame)
    if channel == "alpha":
        values = 1.0 - alpha if alpha is not None else np.zeros(rgb.shape[:2], dtype=np.float32)
    else:
        values = rgb[..., ("red", "green", "blue").index(channel)]
    return torch.from_numpy(np.ascontiguousarray(values))[None]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H,W,C] floats to 8-bit pixels exactly as ComfyUI's SaveImage: 255 * x, clipped, then truncated."""
    return np.clip(255.0 * image.float().cpu().numpy(), 0, 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray, texts: Mapping[str, str], compress_level: int) -> bytes:
    """A PNG of 8-bit pixels [H,W,C] (C = 1, 3 or 4) with one text chunk per entry of `texts`."""
    if pixels.shape[-1] not in (1, 3, 4):
        raise ValueError(f"cannot save an image with {pixels.shape[-1]} channels as PNG; use 1, 3 or 4")
    picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    info = PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def metadata_texts(prompt: Mapping[str, Any] | None, extra_pnginfo: Mapping[str, Any] | None) -> dict[str, str]:
    """ComfyUI's PNG text chunks: "prompt" (the API graph as JSON) and one chunk per extra_pnginfo entry."""
    texts: dict[str, str] = {}
    if prompt:
        texts["prompt"] = json.dumps(prompt, default=_jsonable)
    for key, value in (extra_pnginfo or {}).items():
        texts[str(key)] = json.dumps(value, default=_jsonable)
    return texts


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    return str(value)
