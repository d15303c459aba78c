"""What the image, mask and latent nodes share without torch: option tables, the resolution bound, the x/y
placement inputs, and the size rules validation runs before anything does (engine/sizes.py).

nodes/image.py, nodes/mask.py, nodes/latent.py and nodes/imaging.py import from here; this module imports none of
them, so they form no import circle. Sizes are Size(batch, height, width) in pixels; a LATENT's size is the size
of the image it decodes to (LATENT_FACTOR pixels per latent cell).
"""

from __future__ import annotations

from typing import Any

from engine import INT, Input
from engine.sizes import Size

MAX_RESOLUTION = 16384
LATENT_FACTOR = 8  # pixels per latent cell of SD's autoencoder
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
LATENT_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
CROP_METHODS = ("disabled", "center")
MASK_OPERATIONS = ("multiply", "add", "subtract", "and", "or", "xor")
IMAGE_CHANNELS = ("red", "green", "blue", "alpha")


def placement_inputs() -> list[Input]:
    """x and y of a source pasted onto a destination (ImageCompositeMasked, MaskComposite)."""
    return [Input("x", INT, default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1,
                  tooltip="left edge of the source on the destination; negative or past the edge is clipped"),
            Input("y", INT, default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1,
                  tooltip="top edge of the source on the destination")]


def scaled_size(width: int, height: int, old_width: int, old_height: int) -> tuple[int, int]:
    """ImageScale's rule: a zero side follows the aspect ratio of the other (at least 1 pixel)."""
    if width == 0:
        width = max(1, round(old_width * height / max(old_height, 1)))
    elif height == 0:
        height = max(1, round(old_height * width / max(old_width, 1)))
    return width, height


def latent_target(width: int, height: int, cells_wide: int, cells_high: int) -> tuple[int, int]:
    """LatentUpscale's pixel size (ComfyUI's rule): at least 64 pixels a side; a zero side follows the latent's
    aspect ratio. The latent then gets size // 8 cells."""
    if width == 0:
        height = max(64, height)
        width = max(64, round(cells_wide * height / cells_high))
    elif height == 0:
        width = max(64, width)
        height = max(64, round(cells_high * width / cells_wide))
    return max(64, width), max(64, height)


# --- size rules: each takes inputs by name (linked images as their Size) and returns the output's Size -------

def same_as_image(image: Size) -> Size:
    return image


def same_as_mask(mask: Size) -> Size:
    return mask


def same_as_destination(destination: Size) -> Size:
    return destination


def image_scale_size(image: Size, width: int, height: int) -> Size:
    if width == 0 and height == 0:
        return image
    width, height = scaled_size(width, height, image.width, image.height)
    return Size(image.batch, height, width)


def image_scale_by_size(image: Size, scale_by: float) -> Size:
    return Size(image.batch, max(1, round(image.height * scale_by)), max(1, round(image.width * scale_by)))


def mask_composite_size(destination: Size, source: Size) -> Size:
    """The destination's size; a batch of one on either side is tiled to the other's batch."""
    return Size(max(destination.batch, source.batch), destination.height, destination.width)


def solid_mask_size(width: int, height: int) -> Size:
    return Size(1, height, width)


def crop_mask_size(mask: Size, x: int, y: int, width: int, height: int) -> Size:
    return Size(mask.batch, max(0, min(height, mask.height - y)), max(0, min(width, mask.width - x)))


def image_file_size(path: Any) -> Size | None:
    """The size LoadImage gives a file, from its header only: (frames, height, width), upright by its EXIF
    orientation; frames counts every frame, an upper bound (frames of another size are skipped when loading).
    None when Pillow cannot read the header (the node's run then says why)."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            width, height = picture.size
            frames = 1 if picture.format == "MPO" else int(getattr(picture, "n_frames", 1))
            if picture.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated a quarter turn
                width, height = height, width
    except Exception:  # unreadable, truncated, a decompression bomb: unknown here, refused when loaded
        return None
    return Size(frames, height, width)


def latent_upscale_size(samples: Size, width: int, height: int) -> Size:
    if width == 0 and height == 0:
        return samples
    width, height = latent_target(width, height, samples.width, samples.height)
    return Size(samples.batch, height // LATENT_FACTOR * LATENT_FACTOR, width // LATENT_FACTOR * LATENT_FACTOR)


def latent_upscale_by_size(samples: Size, scale_by: float) -> Size:
    def side(pixels: int) -> int:
        return max(1, round(pixels // LATENT_FACTOR * scale_by)) * LATENT_FACTOR
    return Size(samples.batch, side(samples.height), side(samples.width))


def pad_for_outpaint_size(image: Size, left: int, top: int, right: int, bottom: int) -> Size:
    """The padded image's size (the mask, one item of that size, is no larger)."""
    return Size(image.batch, image.height + top + bottom, image.width + left + right)


def image_crop_size(image: Size, width: int, height: int, x: int, y: int) -> Size:
    x, y = min(x, image.width - 1), min(y, image.height - 1)
    return Size(image.batch, max(0, min(height, image.height - y)), max(0, min(width, image.width - x)))


def image_batch_size(image1: Size, image2: Size) -> Size:
    return Size(image1.batch + image2.batch, image1.height, image1.width)
