"""Image nodes: resize, invert, composite. IMAGE is a float tensor [B,H,W,C] in 0..1.

Torch is imported inside the node functions (through nodes.imaging), so listing or validating never loads it.

Where we differ from ComfyUI, on purpose (each case is one where ComfyUI fails or gives a wrong result):
- ImageCompositeMasked takes negative x/y (the source hangs off the left/top edge and is clipped); ComfyUI
  declares min 0 and its composite() breaks on negative offsets.
- An RGB source composited onto an RGBA destination gets an opaque alpha; ComfyUI pads the destination instead
  and fails.
- ImageScaleBy never makes a side smaller than 1 pixel, and ImageScale's center crop never cuts everything away.
"""

from __future__ import annotations

from engine import BOOLEAN, COMBO, FLOAT, INT, Input, Output, node

from .pixels import (
    CROP_METHODS,
    MAX_RESOLUTION,
    UPSCALE_METHODS,
    image_batch_size,
    image_crop_size,
    image_scale_by_size,
    image_scale_size,
    pad_for_outpaint_size,
    placement_inputs,
    same_as_destination,
    same_as_image,
    scaled_size,
)

_METHOD = Input("upscale_method", COMBO, options=UPSCALE_METHODS, default="nearest-exact",
                tooltip="lanczos resizes 8-bit copies with Pillow; the others interpolate the floats with torch")


@node("ImageScale", category="image/upscaling", display_name="Upscale Image", size_rule=image_scale_size,
      inputs=[Input("image", "IMAGE"), _METHOD,
              Input("width", INT, default=512, min=0, max=MAX_RESOLUTION, step=1,
                    tooltip="0 keeps the aspect ratio from the height"),
              Input("height", INT, default=512, min=0, max=MAX_RESOLUTION, step=1,
                    tooltip="0 keeps the aspect ratio from the width"),
              Input("crop", COMBO, options=CROP_METHODS, default="disabled",
                    tooltip="center: cut the sides that do not fit the new aspect ratio before resizing")],
      outputs=[Output("IMAGE", "IMAGE")])
def image_scale(ctx, image, upscale_method, width, height, crop):
    """Resize images to width x height (both 0: unchanged)."""
    from . import imaging

    if width == 0 and height == 0:
        return image
    image = imaging.image_batch(image)
    width, height = scaled_size(width, height, image.shape[2], image.shape[1])
    return imaging.upscale(image.movedim(-1, 1), width, height, upscale_method, crop).movedim(1, -1).contiguous()


@node("ImageScaleBy", category="image/upscaling", display_name="Upscale Image By", size_rule=image_scale_by_size,
      inputs=[Input("image", "IMAGE"), _METHOD,
              Input("scale_by", FLOAT, default=1.0, min=0.01, max=8.0, step=0.01)],
      outputs=[Output("IMAGE", "IMAGE")])
def image_scale_by(ctx, image, upscale_method, scale_by):
    """Resize images by a factor (each side rounded to whole pixels, at least one)."""
    from . import imaging

    image = imaging.image_batch(image)
    width = max(1, round(image.shape[2] * scale_by))
    height = max(1, round(image.shape[1] * scale_by))
    return imaging.upscale(image.movedim(-1, 1), width, height, upscale_method).movedim(1, -1).contiguous()


@node("ImageInvert", category="image", display_name="Invert Image", size_rule=same_as_image,
      inputs=[Input("image", "IMAGE")], outputs=[Output("IMAGE", "IMAGE")])
def image_invert(ctx, image):
    """1 - pixel, for every channel."""
    return 1.0 - image


@node("ImageCompositeMasked", category="image", size_rule=same_as_destination,
      inputs=[Input("destination", "IMAGE"), Input("source", "IMAGE"), *placement_inputs(),
              Input("resize_source", BOOLEAN, default=False,
                    tooltip="stretch the source (bilinear) to the destination's size first"),
              Input("mask", "MASK", optional=True,
                    tooltip="where the source shows (1) or the destination stays (0); stretched to the source's "
                            "size")],
      outputs=[Output("IMAGE", "IMAGE")])
def image_composite_masked(ctx, destination, source, x, y, resize_source, mask=None):
    """Paste `source` onto `destination` at (x, y), blended by `mask`, clipped at the destination's edges."""
    from . import imaging

    destination = imaging.image_batch(destination, "destination")
    source = imaging.fit_channels(destination, imaging.image_batch(source, "source"))
    out = imaging.composite(destination.movedim(-1, 1), source.movedim(-1, 1), x, y, mask, 1, resize_source)
    return out.movedim(1, -1).contiguous()


def _side(name: str) -> Input:
    return Input(name, INT, default=0, min=0, max=MAX_RESOLUTION, step=8, tooltip="pixels of grey to add")


@node("ImagePadForOutpaint", category="image", display_name="Pad Image for Outpainting",
      size_rule=pad_for_outpaint_size,
      description="Grow images with 0.5 grey on each side, and a mask that is 1 on the new area and fades in "
                  "over `feathering` pixels inside the image along the padded sides.",
      inputs=[Input("image", "IMAGE"), _side("left"), _side("top"), _side("right"), _side("bottom"),
              Input("feathering", INT, default=40, min=0, max=MAX_RESOLUTION, step=1,
                    tooltip="pixels inside the image over which the mask falls from 1 to 0 (quadratically)")],
      outputs=[Output("IMAGE", "IMAGE"), Output("MASK", "MASK")])
def image_pad_for_outpaint(ctx, image, left, top, right, bottom, feathering):
    from . import imaging

    image = imaging.image_batch(image)
    return imaging.pad_for_outpaint(image, left, top, right, bottom, feathering)


@node("ImageCrop", category="image/transform", display_name="Image Crop", size_rule=image_crop_size,
      description="The width x height region at (x, y), cut short at the image's edges.",
      inputs=[Input("image", "IMAGE"),
              Input("width", INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
              Input("height", INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
              Input("x", INT, default=0, min=0, max=MAX_RESOLUTION, step=1,
                    tooltip="left edge; past the image it is moved to the last column"),
              Input("y", INT, default=0, min=0, max=MAX_RESOLUTION, step=1,
                    tooltip="top edge; past the image it is moved to the last row")],
      outputs=[Output("IMAGE", "IMAGE")])
def image_crop(ctx, image, width, height, x, y):
    from . import imaging

    image = imaging.image_batch(image)
    x, y = min(x, image.shape[2] - 1), min(y, image.shape[1] - 1)
    return image[:, y:y + height, x:x + width, :].clone()


@node("ImageBatch", category="image", display_name="Batch Images", size_rule=image_batch_size,
      description="image2's items appended to image1's; image2 is resized (bilinear, centre crop) to image1's size "
                  "and a missing alpha channel on either side is added as opaque.",
      inputs=[Input("image1", "IMAGE"), Input("image2", "IMAGE")], outputs=[Output("IMAGE", "IMAGE")])
def image_batch(ctx, image1, image2):
    import torch

    from . import imaging

    image1, image2 = imaging.image_batch(image1, "image1"), imaging.image_batch(image2, "image2")
    if image1.shape[-1] < image2.shape[-1]:
        image1 = imaging.fit_channels(image2, image1)
    image2 = imaging.fit_channels(image1, image2).to(image1.dtype)
    if image2.shape[1:3] != image1.shape[1:3]:
        image2 = imaging.upscale(image2.movedim(-1, 1), image1.shape[2], image1.shape[1], "bilinear", "center")
        image2 = image2.movedim(1, -1)
    return torch.cat((image1, image2), dim=0)


NODES = [image_scale, image_scale_by, image_invert, image_composite_masked, image_pad_for_outpaint, image_crop,
         image_batch]
