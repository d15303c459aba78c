"""ComfyUI's `nodes` module as packs use it: `MAX_RESOLUTION`, the built-in classes packs subclass or call
(`SaveImage`, `EmptyLatentImage`) and sdgraph's own built-in nodes as ComfyUI V1 classes under their ComfyUI
names and method names (`LoraLoader().load_lora(...)`, `CLIPTextEncode().encode(...)`): they run sdgraph's node
in the running node's context, so their MODEL/CLIP/CONDITIONING values are sdgraph's. sdgraph's own `nodes`
package answers these names (`nodes.__getattr__`), so nothing shadows it. Other ComfyUI built-ins
(`common_ksampler`, ...) are placeholders, and the nodes using them are refused when the pack loads."""

from __future__ import annotations

import json
import os
from typing import Any

from ..unavailable import placeholder

MAX_RESOLUTION = 16384


class SaveImage:
    """ComfyUI's SaveImage as a base class: PNGs with the prompt and workflow in text chunks, named
    `<prefix>_<counter>_.png`, written through `folder_paths` (sdgraph's roots and checks)."""

    def __init__(self) -> None:
        import folder_paths
        self.output_dir = folder_paths.get_output_directory()
        self.type = "output"
        self.prefix_append = ""
        self.compress_level = 4

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 - ComfyUI's name
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES: tuple[str, ...] = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"

    def save_images(self, images: Any, filename_prefix: str = "ComfyUI", prompt: Any = None,
                    extra_pnginfo: Any = None) -> dict[str, Any]:
        import folder_paths
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        from nodes.imaging import to_uint8

        prefix = filename_prefix + self.prefix_append
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            prefix, self.output_dir, images[0].shape[1], images[0].shape[0])
        os.makedirs(folder, exist_ok=True)
        results = []
        for index, image in enumerate(images):
            info = PngInfo()
            if prompt is not None:
                info.add_text("prompt", json.dumps(prompt))
            for key, value in (extra_pnginfo or {}).items():
                info.add_text(key, json.dumps(value))
            name = f"{filename.replace('%batch_num%', str(index))}_{counter:05}_.png"
            Image.fromarray(to_uint8(image)).save(os.path.join(folder, name), pnginfo=info,
                                                  compress_level=self.compress_level)
            results.append({"filename": name, "subfolder": subfolder, "type": self.type})
            counter += 1
        return {"ui": {"images": results}}


class EmptyLatentImage:
    """Zeros [batch, 4, height/8, width/8] (SD's latent), as ComfyUI's."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 - ComfyUI's name
        return {"required": {"width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
                             "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
                             "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = "latent"

    def generate(self, width: int, height: int, batch_size: int = 1) -> tuple[dict[str, Any]]:
        import torch
        return ({"samples": torch.zeros([batch_size, 4, height // 8, width // 8])},)


PROVIDED = {"MAX_RESOLUTION": MAX_RESOLUTION, "SaveImage": SaveImage, "EmptyLatentImage": EmptyLatentImage}
# ComfyUI class name -> its FUNCTION (sdgraph's node of the same name does the work)
BUILT_IN_METHODS = {"CheckpointLoaderSimple": "load_checkpoint", "LoraLoader": "load_lora",
                    "LoraLoaderModelOnly": "load_lora_model_only", "VAELoader": "load_vae", "CLIPTextEncode": "encode",
                    "CLIPSetLastLayer": "set_last_layer", "ConditioningCombine": "combine",
                    "ConditioningConcat": "concat", "ConditioningZeroOut": "zero_out",
                    "ConditioningSetTimestepRange": "set_range", "ConditioningAverage": "addWeighted",
                    "VAEDecode": "decode", "VAEEncode": "encode", "KSampler": "sample",
                    "KSamplerAdvanced": "sample", "ImageScale": "upscale", "ImageScaleBy": "upscale",
                    "ImageInvert": "invert", "LatentUpscale": "upscale", "LoadImage": "load_image"}


def built_in_class(name: str, method: str) -> type:
    """sdgraph's node `name` as a ComfyUI V1 class whose `method` runs it in the current node's context."""
    from engine.schema import node_info
    from engine.spec import Result

    from ..environment import CURRENT_RUN

    definition = _built_in_definition(name)

    def run(self: Any, **kwargs: Any) -> tuple[Any, ...]:
        ctx = CURRENT_RUN.get()
        if ctx is None:
            raise RuntimeError(f"nodes.{name}.{method}() can only be called while a node runs")
        kwargs = {key: _adapted(definition, key, value) for key, value in kwargs.items()}
        returned = definition.fn(ctx, **kwargs)
        if isinstance(returned, Result):
            return tuple(returned.outputs)
        return returned if len(definition.outputs) != 1 else (returned,)

    return type(name, (), {
        "INPUT_TYPES": classmethod(lambda cls: node_info(definition)["input"]),
        "RETURN_TYPES": tuple(out.type for out in definition.outputs),
        "RETURN_NAMES": tuple(out.name for out in definition.outputs),
        "FUNCTION": method, method: run, "CATEGORY": definition.category,
        "OUTPUT_NODE": definition.output_node, "__module__": "nodes",
        "__doc__": f"sdgraph's {name} under ComfyUI's class interface ({method})"})


def _adapted(definition: Any, name: str, value: Any) -> Any:
    """A pack passes ComfyUI's plain values (`[[tensor, {...}]]`, `{"samples": ...}`): sdgraph's node gets its
    typed value, as if the value had come along a link."""
    from nodes import ADAPTERS

    spec = definition.input(name)
    adapt = ADAPTERS.get(spec.type) if spec is not None else None
    return adapt(value) if adapt is not None and value is not None else value


def _built_in_definition(name: str) -> Any:
    import importlib

    from engine.spec import NodeDef
    from nodes import NODE_MODULES

    for module_name in NODE_MODULES:
        for value in vars(importlib.import_module(module_name)).values():
            if isinstance(value, NodeDef) and value.name == name:
                return value
    raise AttributeError(f"sdgraph has no built-in node {name!r}")


def attribute(name: str) -> Any:
    """A ComfyUI `nodes` name: provided, one of sdgraph's built-in nodes, or (CamelCase class names and
    `common_ksampler`) a placeholder of ComfyUI's internals. Other names are not ComfyUI's: AttributeError, so
    sdgraph's own submodules import and `getattr(nodes, "NODES", None)` stays None."""
    if name in PROVIDED:
        return PROVIDED[name]
    if name in BUILT_IN_METHODS:
        try:
            return built_in_class(name, BUILT_IN_METHODS[name])
        except AttributeError:
            pass
    if (name[:1].isupper() and not name.isupper()) or name == "common_ksampler":  # ComfyUI's class names
        return placeholder(f"nodes.{name}")
    raise AttributeError(f"module 'nodes' has no attribute {name!r}")
