"""`comfy_api`, `comfy_api.latest` and its `io` and `ui`: ComfyUI's V3 node API. `io` is `engine.comfy_io`
(V3 nodes load natively into the registry, `engine.comfy_v3`); a type it does not list (`io.Tracks`,
`io.BoundingBox`) is made on first use with ComfyUI's name for it. `ui` builds the UI payloads."""

from __future__ import annotations

import uuid
from typing import Any

from engine import comfy_io

from . import ShimModule


def build(env: Any, name: str) -> ShimModule:
    if name == "comfy_api":
        return ShimModule(name, {}, package=True, fallback=lambda child: env.module(f"comfy_api.{child}"))
    if name == "comfy_api.latest.io":
        public = {key: value for key, value in vars(comfy_io).items() if not key.startswith("_")}
        return ShimModule(name, public, fallback=lambda type_name: comfy_io.comfy_type(
            comfy_io.io_type_of(type_name), type_name))
    if name == "comfy_api.latest.ui":
        return ShimModule(name, _ui_names(env))
    return ShimModule(name, {"io": env.module("comfy_api.latest.io"), "ui": env.module("comfy_api.latest.ui"),
                             "ComfyExtension": comfy_io.ComfyExtension}, package=True,
                      fallback=lambda child: env.module(f"comfy_api.latest.{child}"))


def _ui_names(env: Any) -> dict[str, Any]:
    class SavedResult(dict):
        def __init__(self, filename: str, subfolder: str = "", type: Any = "output"):
            super().__init__(filename=filename, subfolder=subfolder, type=getattr(type, "value", type))

    class SavedImages:
        def __init__(self, results: list[Any], is_animated: bool = False):
            self.results, self.is_animated = list(results), is_animated

        def as_dict(self) -> dict[str, Any]:
            return {"images": [dict(r) for r in self.results], "animated": (self.is_animated,)}

    class PreviewImage(SavedImages):
        """Saves each image of the batch as a PNG in temp/ and shows it."""

        def __init__(self, image: Any, animated: bool = False, cls: Any = None, **_: Any):
            super().__init__([_save_temp_png(env, frame) for frame in image], animated)

    class PreviewMask(PreviewImage):
        def __init__(self, mask: Any, animated: bool = False, cls: Any = None, **_: Any):
            image = mask.reshape(-1, mask.shape[-2], mask.shape[-1], 1).expand(-1, -1, -1, 3)
            super().__init__(image, animated, cls)

    class PreviewText:
        def __init__(self, value: str, **_: Any):
            self.value = value

        def as_dict(self) -> dict[str, Any]:
            return {"text": (self.value,)}

    return {"SavedResult": SavedResult, "SavedImages": SavedImages, "PreviewImage": PreviewImage,
            "PreviewMask": PreviewMask, "PreviewText": PreviewText}


def _save_temp_png(env: Any, frame: Any) -> dict[str, str]:
    from PIL import Image

    from nodes.imaging import to_uint8

    folders = env.run_folders()
    folders.temp.mkdir(parents=True, exist_ok=True)
    filename = f"v3_preview_{uuid.uuid4().hex[:12]}.png"
    Image.fromarray(to_uint8(frame)).save(folders.inside("temp", filename), compress_level=1)
    return {"filename": filename, "subfolder": "", "type": "temp"}
