"""Upscale models (ESRGAN, RealESRGAN, SwinIR, ... as spandrel detects them) and tiled upscaling.

Files are read without pickle: safetensors, or `.pth`/`.pt`/`.ckpt` through torch's weights-only loader. spandrel
only sees the tensors. spandrel imports torchvision for two architectures we do not use (LaMa, RestoreFormer);
torchvision cannot be installed beside our CPU torch, so `import_spandrel` gives those two imports an inert
stand-in while spandrel loads, and takes it away again (nothing else sees a torchvision module).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from runtime.memory import is_out_of_memory

from .tiling import tiled_scale

TILE = 512  # ComfyUI's ImageUpscaleWithModel: 512-pixel tiles overlapping by 32, halved on out-of-memory
OVERLAP = 32
MIN_TILE = 128
WEIGHTS_ONLY_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
_TORCHVISION_STAND_INS = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


class UpscaleModelError(ValueError):
    """A file that is not an upscale model spandrel knows, or that cannot be read without pickle."""


def import_spandrel() -> Any:
    """The spandrel package, importable without torchvision (see the module's docstring)."""
    if "spandrel" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module("spandrel")
    if importlib.util.find_spec("spandrel") is None:
        raise UpscaleModelError("upscale models need the spandrel package: pip install --no-deps spandrel einops")
    added = [name for name in _TORCHVISION_STAND_INS if name not in sys.modules]
    for name in added:
        sys.modules[name] = _stand_in(name)
    try:
        return importlib.import_module("spandrel")
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__getattr__ = lambda attr: _unavailable(f"{name}.{attr}")  # type: ignore[method-assign]
    return module


def _unavailable(what: str) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{what} needs torchvision, which is not installed (the LaMa and RestoreFormer "
                           "architectures need it)")
    return fail


def read_weights(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a torch file loaded weights-only (never pickle)."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".safetensors", ".sft"):
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        if suffix in WEIGHTS_ONLY_SUFFIXES:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise UpscaleModelError(f"{what}: {path.name} is not a .safetensors or .pth file")
    except UpscaleModelError:
        raise
    except Exception as exc:
        hint = ("it needs pickle to load, which is refused for safety; convert it to safetensors"
                if suffix in WEIGHTS_ONLY_SUFFIXES else "the file is damaged or not safetensors")
        raise UpscaleModelError(f"{what}: cannot read {path.name} ({type(exc).__name__}: {str(exc)[:200]}); "
                                f"{hint}") from exc
    if not isinstance(loaded, Mapping):
        raise UpscaleModelError(f"{what}: {path.name} holds a {type(loaded).__name__}, not a dict of tensors")
    return dict(loaded)


def load_upscaler(path: Path, device: str = "cpu", what: str = "UpscaleModelLoader") -> Any:
    """A spandrel ImageModelDescriptor for the file, in eval mode on `device`; an error naming `what` and the file
    when spandrel does not recognise it or it is not an image-to-image model."""
    spandrel = import_spandrel()
    state = spandrel.canonicalize_state_dict(read_weights(path, what))
    try:
        model = spandrel.ModelLoader(device=torch.device(device)).load_from_state_dict(state)
    except spandrel.UnsupportedModelError as exc:
        raise UpscaleModelError(f"{what}: {path.name} is not an upscale model spandrel recognises "
                                f"(ESRGAN, RealESRGAN, SwinIR, ...); check the file") from exc
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UpscaleModelError(f"{what}: {path.name} looks like a known architecture but does not load "
                                f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(model, spandrel.ImageModelDescriptor):
        raise UpscaleModelError(f"{what}: {path.name} is a {model.architecture.name} model, not an image "
                                "upscaler (it needs a mask or is not image-to-image)")
    return model.eval()


def upscale_tiled(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, scale: int,
                  channels: int = 3, tile: int = TILE, overlap: int = OVERLAP) -> torch.Tensor:
    """[B, C, H, W] in 0..1 upscaled by `model` on overlapping tiles, clamped to 0..1; on out-of-memory the tile
    is halved and the whole image tried again, down to MIN_TILE pixels."""
    while True:
        try:
            with torch.inference_mode():
                return tiled_scale(image, model, (tile, tile), overlap, scale, channels).clamp_(0.0, 1.0)
        except Exception as exc:
            if not is_out_of_memory(exc) or tile // 2 < MIN_TILE:
                raise
            tile //= 2


def working_bytes(scale: float, tile: int = TILE) -> int:
    """Memory one tile needs beside the weights (ComfyUI's estimate: 384 floats per output value)."""
    return int(tile * tile * 3 * 4 * max(scale, 1.0) * 384)
