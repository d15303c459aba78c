"""The Stable Diffusion node set and the application's registry.

Node modules here import torch only inside node functions, so validating a graph or listing nodes never
loads torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine import NodeRegistry
from engine.discovery import load_packs, register_module

from .codecs import CODECS

NODE_MODULES: tuple[str, ...] = ("nodes.loaders", "nodes.conditioning", "nodes.latent", "nodes.sampling",
                                 "nodes.image", "nodes.image_io", "nodes.mask", "nodes.upscale",
                                 "nodes.controlnet", "nodes.lora", "nodes.clip_loaders", "nodes.model_sampling")

DATA_TYPES = {
    "MODEL": "a diffusion model (UNet) ready to sample",
    "CLIP": "a text encoder with its tokenizer",
    "VAE": "an image autoencoder (pixels <-> latents)",
    "CONDITIONING": "encoded prompts that steer sampling",
    "LATENT": "latent images (unscaled, [B,4,H/8,W/8]), with an optional noise mask",
    "IMAGE": "images as a float tensor [B,H,W,C] in 0..1",
    "MASK": "masks as a float tensor [B,H,W] in 0..1 (1 = selected)",
    "UPSCALE_MODEL": "an image upscaling network (ESRGAN, SwinIR, ... through spandrel)",
    "CONTROL_NET": "a ControlNet that steers sampling from a hint image",
}


def _adapt_latent(value: Any) -> Any:
    from diffusion.latent import Latent
    return Latent.from_value(value)


def _adapt_conditioning(value: Any) -> Any:
    from diffusion.latent import Conditioning
    return Conditioning.from_value(value)


ADAPTERS = {"LATENT": _adapt_latent, "CONDITIONING": _adapt_conditioning}


def register_types(registry: NodeRegistry) -> None:
    for name, description in DATA_TYPES.items():
        registry.register_type(name, description=description, adapt=ADAPTERS.get(name), source=__name__,
                               codec=CODECS.get(name))


def build_registry(*, pack_dirs: Iterable[str | Path] = (), entry_points: bool = True,
                   folders: Any = None) -> NodeRegistry:
    """Types, the built-in nodes, then custom node packs (a broken pack is listed in `load_errors`); ComfyUI packs
    load in comfy_compat's environment, whose `folder_paths` uses `folders` until a run gives its own."""
    from comfy_compat import PackEnvironment

    registry = NodeRegistry()
    register_types(registry)
    for module_name in NODE_MODULES:
        register_module(registry, importlib.import_module(module_name), pack="sdgraph")
    load_packs(registry, [Path(d) for d in pack_dirs], entry_points=entry_points,
               environment=PackEnvironment(folders))
    return registry


def __getattr__(name: str) -> Any:
    """ComfyUI's `nodes` names a custom-node pack imports (`from nodes import MAX_RESOLUTION, SaveImage`),
    answered by comfy_compat (docs/custom-nodes.md)."""
    from comfy_compat.shims import comfy_nodes
    return comfy_nodes.attribute(name)


def code_identity(pack_dirs: Iterable[str | Path] = ()) -> str:
    """What computed a cached result: the sources of sdgraph's packages and of the node packs in `pack_dirs`
    (`engine.diskcache.source_digest`). Persistent cache entries of other code are never returned."""
    from engine.diskcache import source_digest

    root = Path(__file__).resolve().parent.parent
    return source_digest([root / name for name in ("engine", "runtime", "diffusion", "nodes", "comfy_compat")]
                         + list(pack_dirs))
