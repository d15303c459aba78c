"""Live previews while sampling: each step's denoised latent shown as a small RGB image.

latent2rgb projects the 4 latent channels onto RGB with a fixed 4x3 matrix per latent format (ComfyUI's
latent_formats facts: SD1 and SD2 share one, SDXL has its own and a bias); TAESD (diffusion/taesd.py) decodes
properly when its weights are in models/vae_approx/, else latent2rgb is used. A `Previewer` owns the method and
the TAESD networks it has loaded; a sampler hands it `LatentPreview`s through the progress events.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import taesd

log = logging.getLogger(__name__)

MAX_PREVIEW_SIDE = 512  # ComfyUI's default preview size
LATENT_TO_PIXELS = 8  # a latent pixel covers 8x8 image pixels

# Rows: latent channels 0-3; columns: R, G, B.
SD1_RGB_FACTORS = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
                   (-0.2120, -0.2616, -0.7177))
SDXL_RGB_FACTORS = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                    (-0.3165, -0.2492, -0.2188))
SDXL_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def latent_format(family: str | None) -> str:
    """The preview format of a model family: "sdxl" for SDXL base and refiner, else "sd1" (SD1 and SD2)."""
    return "sdxl" if family and family.startswith("sdxl") else "sd1"


def family_of(model: Any) -> str | None:
    """The family name of a MODEL (a Family's name, or a name), None when the model does not say."""
    family = getattr(model, "family", None)
    return family if isinstance(family, str) or family is None else getattr(family, "name", None)


def latent_to_rgb(latent: torch.Tensor, fmt: str = "sd1") -> torch.Tensor:
    """[4, h, w] model-space latent -> [h, w, 3] RGB in [0, 1] by the format's linear projection."""
    factors = torch.tensor(SDXL_RGB_FACTORS if fmt == "sdxl" else SD1_RGB_FACTORS, dtype=torch.float32)
    bias = torch.tensor(SDXL_RGB_BIAS if fmt == "sdxl" else (0.0, 0.0, 0.0))
    rgb = latent.float().movedim(0, -1) @ factors + bias
    return ((rgb + 1) / 2).clamp(0, 1)


@dataclass(frozen=True)
class LatentPreview:
    """What a sampler reports with each step: the denoised latent of the first image and the model's family."""

    latent: torch.Tensor  # [C, h, w], model space
    family: str | None = None


@dataclass
class Previewer:
    """Turns LatentPreviews into PIL images by `method`; TAESD networks are loaded once, when first needed."""

    method: str = "latent2rgb"
    vae_approx: Path | None = None  # the folder of TAESD weights (models/vae_approx)
    _networks: dict[str, Any] = field(default_factory=dict)

    def __call__(self, preview: Any) -> Any:
        """A PIL image for a LatentPreview (None with method none); anything else is passed through."""
        if not isinstance(preview, LatentPreview):
            return preview
        if self.method == "none" or preview.latent.shape[0] != 4:
            return None
        fmt = latent_format(preview.family)
        network = self._taesd(fmt) if self.method == "taesd" else None
        rgb = taesd.decode(network, preview.latent) if network is not None else latent_to_rgb(preview.latent, fmt)
        from PIL import Image
        image = Image.fromarray((rgb * 255).round().to(torch.uint8).cpu().numpy())
        if network is None:  # one pixel per latent: shown at the output's size, in blocks (cheap, and visible)
            image = image.resize((image.width * LATENT_TO_PIXELS, image.height * LATENT_TO_PIXELS), Image.NEAREST)
        if max(image.size) > MAX_PREVIEW_SIDE:
            image.thumbnail((MAX_PREVIEW_SIDE, MAX_PREVIEW_SIDE))
        return image

    def _taesd(self, fmt: str) -> Any:
        if fmt not in self._networks:
            path = taesd.find_weights(self.vae_approx, fmt) if self.vae_approx is not None else None
            self._networks[fmt] = None
            if path is None:
                log.info("no TAESD weights for %s in %s: previews use latent2rgb", fmt, self.vae_approx)
            else:
                try:
                    self._networks[fmt] = taesd.load_decoder(path)
                except Exception as exc:  # a damaged file must not stop sampling: fall back
                    log.warning("cannot load TAESD weights %s (%s): previews use latent2rgb", path, exc)
        return self._networks[fmt]
