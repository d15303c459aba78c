"""Upscaling: latents by interpolation (LatentUpscale, LatentUpscaleBy: the hires-fix pass) and images by a
model (UpscaleModelLoader + ImageUpscaleWithModel, through spandrel; docs/upscaling.md).

Torch and spandrel are imported inside the node functions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine import COMBO, FLOAT, INT, Input, Output, node
from engine.sizes import Size

from .loaders import file_identity
from .pixels import (
    CROP_METHODS,
    LATENT_UPSCALE_METHODS,
    MAX_RESOLUTION,
    latent_target,
    latent_upscale_by_size,
    latent_upscale_size,
)

ASSUMED_SCALE = 4
_METHOD = Input("upscale_method", COMBO, options=LATENT_UPSCALE_METHODS, default="nearest-exact",
                tooltip="bislerp: spherical interpolation of each latent vector; the others are torch's "
                        "interpolation modes")


@node("LatentUpscale", category="latent", display_name="Upscale Latent", size_rule=latent_upscale_size,
      description="Resize latents to width x height pixels (divided by 8 in latent cells); both 0: unchanged.",
      inputs=[Input("samples", "LATENT"), _METHOD,
              Input("width", INT, default=512, min=0, max=MAX_RESOLUTION, step=8,
                    tooltip="pixels; 0 keeps the aspect ratio from the height"),
              Input("height", INT, default=512, min=0, max=MAX_RESOLUTION, step=8,
                    tooltip="pixels; 0 keeps the aspect ratio from the width"),
              Input("crop", COMBO, options=CROP_METHODS, default="disabled",
                    tooltip="center: cut the sides that do not fit the new aspect ratio first")],
      outputs=[Output("LATENT", "LATENT")])
def latent_upscale(ctx, samples, upscale_method, width, height, crop):
    from . import imaging

    if width == 0 and height == 0:
        return samples
    cells_high, cells_wide = samples.samples.shape[-2:]
    width, height = latent_target(width, height, cells_wide, cells_high)
    return samples.replace(samples=imaging.upscale(samples.samples, width // 8, height // 8, upscale_method, crop))


@node("LatentUpscaleBy", category="latent", display_name="Upscale Latent By", size_rule=latent_upscale_by_size,
      description="Resize latents by a factor: each side becomes round(cells * scale_by) latent cells.",
      inputs=[Input("samples", "LATENT"), _METHOD,
              Input("scale_by", FLOAT, default=1.5, min=0.01, max=8.0, step=0.01)],
      outputs=[Output("LATENT", "LATENT")])
def latent_upscale_by(ctx, samples, upscale_method, scale_by):
    from . import imaging

    cells_high, cells_wide = samples.samples.shape[-2:]
    width, height = max(1, round(cells_wide * scale_by)), max(1, round(cells_high * scale_by))
    return samples.replace(samples=imaging.upscale(samples.samples, width, height, upscale_method))


@dataclass(frozen=True, eq=False)
class UpscaleModel:
    """UPSCALE_MODEL: an image-to-image network spandrel recognised; the weights load when first used."""

    handle: Any  # runtime.models.ModelHandle; load() gives a spandrel ImageModelDescriptor
    scale: int
    architecture: str
    input_channels: int
    output_channels: int
    source: str
    nbytes: int = 512

    def model_handles(self) -> tuple[Any, ...]:
        return (self.handle,)


def _upscale_model_names(resources) -> list[str]:
    return resources.folders.list_models("upscale_models") if resources is not None else []


def _upscale_model_identity(resources, model_name):
    return file_identity(resources, "upscale_models", model_name)


@node("UpscaleModelLoader", category="loaders", display_name="Load Upscale Model",
      description="Load an upscale model (ESRGAN, RealESRGAN, SwinIR, ... as spandrel detects them) from "
                  "models/upscale_models: safetensors, or .pth read weights-only (never pickle).",
      fingerprint=_upscale_model_identity,
      inputs=[Input("model_name", COMBO, options=_upscale_model_names, tooltip="a file in models/upscale_models")],
      outputs=[Output("UPSCALE_MODEL", "UPSCALE_MODEL")])
def upscale_model_loader(ctx, model_name):
    from functools import partial

    from diffusion.upscale import load_upscaler
    from runtime.models import ModelHandle

    runtime = ctx.resources
    path = runtime.folders.model_path("upscale_models", model_name, what="UpscaleModelLoader model_name")
    what = f"UpscaleModelLoader ({model_name})"
    probe = load_upscaler(path, "cpu", what)  # refuses a file spandrel does not know before anything samples
    stat = path.stat()
    device = str(runtime.placement()[0])
    handle = ModelHandle(origin=str(path), version=(stat.st_size, stat.st_mtime_ns), variant=("float32", device),
                         weight_bytes=stat.st_size, device=device, load=partial(_load, path, what),
                         label=f"upscale model {path.name}")
    return UpscaleModel(handle, int(probe.scale), probe.architecture.name, probe.input_channels,
                        probe.output_channels, str(path))


def _load(path, what, device):
    from diffusion.upscale import load_upscaler
    return load_upscaler(path, device, what)


def _model_upscaled_size(image: Size) -> Size:
    """The factor is the model's, known only once its file is read: validation assumes 4x, the factor of ESRGAN,
    RealESRGAN and most published upscalers."""
    return Size(image.batch, image.height * ASSUMED_SCALE, image.width * ASSUMED_SCALE)


@node("ImageUpscaleWithModel", category="image/upscaling", display_name="Upscale Image (using Model)",
      size_rule=_model_upscaled_size,
      description="Upscale images with an upscale model, in overlapping 512-pixel tiles (halved when memory runs "
                  "out), so large images fit in memory.",
      inputs=[Input("upscale_model", "UPSCALE_MODEL"), Input("image", "IMAGE")],
      outputs=[Output("IMAGE", "IMAGE")])
def image_upscale_with_model(ctx, upscale_model, image):
    from diffusion.upscale import upscale_tiled, working_bytes

    from . import imaging

    image = imaging.image_batch(image)
    channels = upscale_model.input_channels
    if image.shape[-1] < channels:
        raise ValueError(f"ImageUpscaleWithModel: the image has {image.shape[-1]} channels but "
                         f"{upscale_model.architecture} takes {channels}")
    pixels = image[..., :channels].movedim(-1, 1).float()
    with ctx.resources.models.use(upscale_model.handle, working=working_bytes(upscale_model.scale)) as model:
        device = next(iter(model.model.parameters()), pixels).device
        out = upscale_tiled(lambda tile: model(tile.to(device)), pixels, upscale_model.scale,
                            upscale_model.output_channels)
    return out.movedim(1, -1).contiguous()


NODES = [latent_upscale, latent_upscale_by, upscale_model_loader, image_upscale_with_model]
