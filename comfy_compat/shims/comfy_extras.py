"""`comfy_extras.nodes_mask`: the `composite` helper packs call, on sdgraph's implementation (nodes.imaging).
The rest of `comfy_extras` (ComfyUI's extra node classes) imports as placeholders."""

from __future__ import annotations

from typing import Any

from . import ShimModule


def composite(destination: Any, source: Any, x: int, y: int, mask: Any = None, multiplier: int = 8,
              resize_source: bool = False) -> Any:
    """ComfyUI's composite on [B,C,H,W] (positions in units of `multiplier`, 8 for latents)."""
    from nodes.imaging import composite as place
    return place(destination, source, x, y, mask, multiplier, resize_source)


def build(env: Any, name: str) -> ShimModule:
    return ShimModule(name, {"composite": composite})
