"""Loading text encoders on their own: CLIPLoader (one file) and DualCLIPLoader (SDXL's two), as in ComfyUI.

Files come from models/text_encoders, then the legacy models/clip (ComfyUI lists both). Which encoder a file holds
is told from its header (`diffusion.text_parts.open_text_encoder`: OpenAI CLIP-L, OpenCLIP ViT-H or bigG), then
checked against `type`: ComfyUI's `stable_diffusion` takes whichever it is (CLIP-L: SD1, ViT-H: SD2, bigG: SDXL
refiner); `sd1`, `sd2` and `sdxl` ask for one. DualCLIPLoader's `sdxl` takes a CLIP-L and a bigG file in either order.
"""

from __future__ import annotations

from types import MappingProxyType

from engine import COMBO, Input, Output, node

TEXT_ENCODER_FOLDERS = ("text_encoders", "clip")
CLIP_LOADER_TYPES = ("stable_diffusion", "sd1", "sd2", "sdxl")
DUAL_CLIP_LOADER_TYPES = ("sdxl",)
DEVICES = ("default", "cpu")
TYPE_OF_ENCODER = MappingProxyType({"clip_l": "sd1", "open_clip_h": "sd2", "open_clip_g": "sdxl"})
DEVICE_INPUT = Input("device", COMBO, options=list(DEVICES), default="default", optional=True,
                     tooltip="cpu keeps the text encoder on the CPU whatever the runtime's device")


def _text_encoder_names(resources) -> list[str]:
    if resources is None:
        return []
    return sorted({name for kind in TEXT_ENCODER_FOLDERS for name in resources.folders.list_models(kind)})


def text_encoder_path(resources, name: str, *, what: str):
    """`name` in models/text_encoders, else in models/clip; a clear error naming both folders when in neither."""
    for kind in TEXT_ENCODER_FOLDERS:
        path = resources.folders.inside(kind, name, what=what)
        if path.is_file():
            return path
    folders = " or ".join(str(resources.folders.models(kind)) for kind in TEXT_ENCODER_FOLDERS)
    raise FileNotFoundError(f"{what}: text encoder file {name!r} not found in {folders}; put it there (available: "
                            f"{', '.join(_text_encoder_names(resources)) or 'none'})")


def _identity(resources, *names: str, device: str = "default") -> tuple:
    found = []
    for name in names:
        path = text_encoder_path(resources, name, what="text encoder")
        stat = path.stat()
        found.append((str(path), stat.st_size, stat.st_mtime_ns))
    return (*found, device, resources.device, resources.dtype)


def _clip_identity(resources, clip_name, type="stable_diffusion", device="default"):  # noqa: A002 (ComfyUI's name)
    return _identity(resources, clip_name, device=device)


def _dual_identity(resources, clip_name1, clip_name2, type="sdxl", device="default"):  # noqa: A002
    return _identity(resources, clip_name1, clip_name2, device=device)


def _open(runtime, node_name: str, input_name: str, name: str):
    from diffusion.text_parts import open_text_encoder

    return open_text_encoder(text_encoder_path(runtime, name, what=f"{node_name} input '{input_name}'"),
                             allow_pickle=runtime.allow_pickle)


def describe(layout) -> str:
    config = layout.config
    return f"{layout.label} ({config.num_hidden_layers} layers, {config.hidden_size} wide)"


def _value(runtime, layouts: tuple, clip_type: str, device: str):
    import torch

    from diffusion.clip_values import clip_value

    placed, precision = runtime.placement()
    on_cpu = device == "cpu" and placed.type != "cpu"
    return clip_value(layouts, clip_type, device=torch.device("cpu") if on_cpu else placed,
                      dtype=torch.float32 if on_cpu else precision.text, tokenizer=runtime.tokenizer(),
                      embeddings_dir=runtime.folders.models("embeddings"), allow_pickle=runtime.allow_pickle)


@node("CLIPLoader", category="advanced/loaders", display_name="Load CLIP",
      description="Load a text encoder from models/text_encoders (or models/clip): CLIP-L for SD1, OpenCLIP ViT-H "
                  "for SD2, OpenCLIP bigG (SDXL refiner). stable_diffusion takes whichever the file holds.",
      fingerprint=_clip_identity,
      inputs=[Input("clip_name", COMBO, options=_text_encoder_names,
                    tooltip="a file in models/text_encoders or models/clip"),
              Input("type", COMBO, options=list(CLIP_LOADER_TYPES), default="stable_diffusion",
                    tooltip="the model family the text encoder is for"),
              DEVICE_INPUT],
      outputs=[Output("CLIP", "CLIP")])
def clip_loader(ctx, clip_name, type="stable_diffusion", device="default"):  # noqa: A002 (ComfyUI's input name)
    layout = _open(ctx.resources, "CLIPLoader", "clip_name", clip_name)
    found = TYPE_OF_ENCODER[layout.encoder]
    if type not in ("stable_diffusion", found):
        raise ValueError(f"CLIPLoader: '{clip_name}' holds {describe(layout)}, the text encoder of {found} models, "
                         f"not of type '{type}'; choose type '{found}' or 'stable_diffusion', or another file"
                         + (" (SDXL base needs CLIP-L and bigG together: use DualCLIPLoader)"
                            if type == "sdxl" and layout.encoder == "clip_l" else ""))
    return _value(ctx.resources, (layout,), found, device)


@node("DualCLIPLoader", category="advanced/loaders", display_name="DualCLIPLoader",
      description="Load SDXL's two text encoders, CLIP-L and OpenCLIP bigG, from models/text_encoders (or "
                  "models/clip), in either order.",
      fingerprint=_dual_identity,
      inputs=[Input("clip_name1", COMBO, options=_text_encoder_names, tooltip="CLIP-L or bigG"),
              Input("clip_name2", COMBO, options=_text_encoder_names, tooltip="the other one"),
              Input("type", COMBO, options=list(DUAL_CLIP_LOADER_TYPES), default="sdxl"),
              DEVICE_INPUT],
      outputs=[Output("CLIP", "CLIP")])
def dual_clip_loader(ctx, clip_name1, clip_name2, type="sdxl", device="default"):  # noqa: A002
    first = _open(ctx.resources, "DualCLIPLoader", "clip_name1", clip_name1)
    second = _open(ctx.resources, "DualCLIPLoader", "clip_name2", clip_name2)
    by_encoder = {first.encoder: first, second.encoder: second}
    if set(by_encoder) != {"clip_l", "open_clip_g"}:
        raise ValueError(f"DualCLIPLoader: type 'sdxl' needs a CLIP-L file and an OpenCLIP bigG file; "
                         f"'{clip_name1}' holds {describe(first)} and '{clip_name2}' holds {describe(second)}")
    return _value(ctx.resources, (by_encoder["clip_l"], by_encoder["open_clip_g"]), "sdxl", device)


NODES = [clip_loader, dual_clip_loader]
