"""`torchvision`, `torchvision.transforms` (and `.functional`), `torchvision.transforms.v2` (the same namespace,
and `.functional`): the subset of torchvision that packs use (`comfy_compat.tv`), offered only when a real
torchvision is not importable (the finder comes last). Any other name of these modules is a placeholder, and
any other `torchvision.*` module an `UnavailableModule`: a node whose code uses one is refused at load with
"uses torchvision.X, which sdgraph's compatibility layer does not provide"."""

from __future__ import annotations

from typing import Any

from ..tv import functional, transforms
from ..unavailable import placeholder
from . import ShimModule

FUNCTIONS = ("to_tensor", "pil_to_tensor", "to_pil_image", "get_dimensions", "get_image_size", "gaussian_blur",
             "resize", "crop", "center_crop", "hflip", "vflip", "rotate", "perspective", "elastic_transform",
             "rgb_to_grayscale", "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue",
             "InterpolationMode")
CLASSES = ("Compose", "ToTensor", "ToPILImage", "Resize", "CenterCrop", "GaussianBlur", "ColorJitter",
           "RandomHorizontalFlip", "RandomRotation", "RandomPerspective", "RandomResizedCrop", "ElasticTransform")


def _module(name: str, attributes: dict[str, Any], *, package: bool = False) -> ShimModule:
    module = ShimModule(name, attributes, package=package, fallback=lambda attr: placeholder(f"{name}.{attr}"),
                        doc=f"sdgraph's subset of {name} (torchvision is not installed)")
    module.__dict__["__sdgraph_subset__"] = True
    return module


def build(env: Any, name: str) -> ShimModule:
    if name == "torchvision":
        return _module(name, {"transforms": env.module("torchvision.transforms")}, package=True)
    if name.endswith(".functional"):
        return _module(name, {key: getattr(functional, key) for key in FUNCTIONS})
    namespace = {key: getattr(transforms, key) for key in CLASSES}
    namespace["InterpolationMode"] = functional.InterpolationMode
    namespace["functional"] = env.module(f"{name}.functional")
    if name == "torchvision.transforms":
        namespace["v2"] = env.module("torchvision.transforms.v2")
    return _module(name, namespace, package=True)
