"""Mask nodes. MASK is a float tensor [B,H,W] in 0..1 (1 = selected); a bare [H,W] counts as a batch of one,
and every node here returns [B,H,W].

Torch is imported inside the node functions (through nodes.imaging), so listing or validating never loads it.

Where we differ from ComfyUI, on purpose:
- FeatherMask ramps the right and bottom edges exactly as the left and top ones (ComfyUI's are shifted by one
  pixel: its outermost right column gets 2/n and column 0 gets an extra 1/n).
- MaskComposite takes negative x/y (clipped) and tiles a batch of one against a larger batch on either side.
- CropMask starting outside the mask and ImageToMask's alpha of an RGB image are errors that say why, instead of
  an empty mask or an index error.
"""

from __future__ import annotations

from engine import BOOLEAN, COMBO, FLOAT, INT, Input, Output, node

from .pixels import (
    IMAGE_CHANNELS,
    MASK_OPERATIONS,
    MAX_RESOLUTION,
    crop_mask_size,
    mask_composite_size,
    placement_inputs,
    same_as_image,
    same_as_mask,
    solid_mask_size,
)


def _edge(name: str, tooltip: str) -> Input:
    return Input(name, INT, default=0, min=0, max=MAX_RESOLUTION, step=1, tooltip=tooltip)


@node("MaskComposite", category="mask", size_rule=mask_composite_size,
      inputs=[Input("destination", "MASK"), Input("source", "MASK"), *placement_inputs(),
              Input("operation", COMBO, options=MASK_OPERATIONS, default="multiply",
                    tooltip="and/or/xor treat values as 0 or 1 (rounded)")],
      outputs=[Output("MASK", "MASK")])
def mask_composite(ctx, destination, source, x, y, operation):
    """Combine `source`, placed at (x, y), with `destination` where they overlap; the result is clamped to 0..1."""
    from . import imaging

    return imaging.combine_masks(destination, source, x, y, operation)


@node("SolidMask", category="mask", size_rule=solid_mask_size,
      inputs=[Input("value", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01),
              Input("width", INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
              Input("height", INT, default=512, min=1, max=MAX_RESOLUTION, step=1)],
      outputs=[Output("MASK", "MASK")])
def solid_mask(ctx, value, width, height):
    """A mask of one value."""
    import torch

    return torch.full((1, height, width), value, dtype=torch.float32)


@node("InvertMask", category="mask", size_rule=same_as_mask, inputs=[Input("mask", "MASK")],
      outputs=[Output("MASK", "MASK")])
def invert_mask(ctx, mask):
    """1 - mask."""
    from . import imaging

    return 1.0 - imaging.mask_batch(mask)


@node("CropMask", category="mask", size_rule=crop_mask_size,
      inputs=[Input("mask", "MASK"),
              Input("x", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
              Input("y", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
              Input("width", INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
              Input("height", INT, default=512, min=1, max=MAX_RESOLUTION, step=1)],
      outputs=[Output("MASK", "MASK")])
def crop_mask(ctx, mask, x, y, width, height):
    """The part of the mask from (x, y), width x height, cut short at the mask's right and bottom edges."""
    from . import imaging

    mask = imaging.mask_batch(mask)
    mask_height, mask_width = mask.shape[-2:]
    if x >= mask_width or y >= mask_height:
        raise ValueError(f"CropMask: the crop starts at x={x}, y={y}, outside the {mask_width}x{mask_height} mask; "
                         f"use x below {mask_width} and y below {mask_height}")
    return mask[:, y:y + height, x:x + width].clone()


@node("FeatherMask", category="mask", size_rule=same_as_mask,
      inputs=[Input("mask", "MASK"),
              _edge("left", "pixels faded in from the left edge"), _edge("top", "pixels faded in from the top"),
              _edge("right", "pixels faded in from the right edge"),
              _edge("bottom", "pixels faded in from the bottom")],
      outputs=[Output("MASK", "MASK")])
def feather_mask(ctx, mask, left, top, right, bottom):
    """Fade the mask linearly towards each edge: with n pixels, the outermost is multiplied by 1/n, the next by
    2/n, up to n/n; corners get both factors."""
    from . import imaging

    return imaging.feather(mask, left, top, right, bottom)


@node("GrowMask", category="mask", size_rule=same_as_mask,
      inputs=[Input("mask", "MASK"),
              Input("expand", INT, default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1,
                    tooltip="pixels to grow by; negative shrinks"),
              Input("tapered_corners", BOOLEAN, default=True,
                    tooltip="grow through edges only (rounded, diamond-shaped corners) instead of also diagonally")],
      outputs=[Output("MASK", "MASK")])
def grow_mask(ctx, mask, expand, tapered_corners):
    """Grey dilation (or erosion when expand < 0), one pixel per step, repeated |expand| times."""
    from . import imaging

    return imaging.grow(mask, expand, tapered_corners)


@node("ThresholdMask", category="mask", size_rule=same_as_mask,
      inputs=[Input("mask", "MASK"), Input("value", FLOAT, default=0.5, min=0.0, max=1.0, step=0.01)],
      outputs=[Output("MASK", "MASK")])
def threshold_mask(ctx, mask, value):
    """1 where the mask is above `value`, else 0."""
    from . import imaging

    return (imaging.mask_batch(mask) > value).float()


@node("ImageToMask", category="mask", display_name="Convert Image to Mask", size_rule=same_as_image,
      inputs=[Input("image", "IMAGE"), Input("channel", COMBO, options=IMAGE_CHANNELS, default="red")],
      outputs=[Output("MASK", "MASK")])
def image_to_mask(ctx, image, channel):
    """One channel of the image as a mask (alpha as it is, not inverted)."""
    from . import imaging

    image = imaging.image_batch(image)
    index = IMAGE_CHANNELS.index(channel)
    if index >= image.shape[-1]:
        raise ValueError(f"ImageToMask: the image has {image.shape[-1]} channels, so it has no {channel} channel; "
                         "choose red, green or blue, or feed an image with alpha (RGBA)")
    return image[..., index].clone()


@node("MaskToImage", category="mask", display_name="Convert Mask to Image", size_rule=same_as_mask,
      inputs=[Input("mask", "MASK")], outputs=[Output("IMAGE", "IMAGE")])
def mask_to_image(ctx, mask):
    """A grey RGB image with the mask's values in all three channels."""
    from . import imaging

    return imaging.mask_batch(mask).unsqueeze(-1).repeat(1, 1, 1, 3)


NODES = [mask_composite, solid_mask, invert_mask, crop_mask, feather_mask, grow_mask, threshold_mask, image_to_mask,
         mask_to_image]
