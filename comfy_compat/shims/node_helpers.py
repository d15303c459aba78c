"""`node_helpers`: Pillow with truncated-file tolerance, conditioning values, alpha channel fitting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import ShimModule


def pillow(fn: Callable[[Any], Any], arg: Any) -> Any:
    """`fn(arg)`, retried once with Pillow's truncated-image tolerance when the file is cut short."""
    from PIL import ImageFile
    try:
        return fn(arg)
    except (OSError, UnboundLocalError, ValueError):
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return fn(arg)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def conditioning_set_values(conditioning: Any, values: dict | None = None, append: bool = False) -> list:
    """A copy of the conditioning with `values` set in every entry's options (appended to lists with
    `append`)."""
    out = []
    for embedding, options in conditioning:
        options = dict(options)
        for key, value in (values or {}).items():
            options[key] = (list(options.get(key) or []) + list(value)) if append else value
        out.append([embedding, options])
    return out


def image_alpha_fix(destination: Any, source: Any) -> tuple[Any, Any]:
    """Give both images the larger channel count (an alpha of 1 added to the 3-channel one)."""
    from nodes.imaging import fit_channels
    if destination.shape[-1] < source.shape[-1]:
        return fit_channels(source, destination), source
    return destination, fit_channels(destination, source)


def build(env: Any, name: str) -> ShimModule:
    return ShimModule(name, {"pillow": pillow, "conditioning_set_values": conditioning_set_values,
                             "image_alpha_fix": image_alpha_fix})
