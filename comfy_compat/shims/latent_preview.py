"""`latent_preview`: sdgraph makes its own previews; a pack asking for ComfyUI's previewer gets none."""

from __future__ import annotations

from typing import Any

from . import ShimModule


class LatentPreviewer:
    """The base class packs subclass; it previews nothing."""

    def decode_latent_to_preview_image(self, preview_format: str, x0: Any) -> Any:
        return None


def build(env: Any, name: str) -> ShimModule:
    return ShimModule(name, {"LatentPreviewer": LatentPreviewer, "get_previewer": lambda *args, **kwargs: None,
                             "MAX_PREVIEW_RESOLUTION": 512})
