"""Loading checkpoints and VAEs from the models/ folders.

A loader checks the file from its header and returns values holding model handles; the weights are read when a
node first uses them (through the runtime's model manager), one part at a time.
"""

from __future__ import annotations

from engine import COMBO, Input, Output, node


def _checkpoint_names(resources) -> list[str]:
    return resources.folders.list_models("checkpoints") if resources is not None else []


def _vae_names(resources) -> list[str]:
    return resources.folders.list_models("vae") if resources is not None else []


def file_identity(resources, kind: str, name: str) -> tuple:
    """Name, size and modification time: a file replaced under the same name loads again."""
    path = resources.folders.model_path(kind, name)
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns, resources.device, resources.dtype)


def _checkpoint_identity(resources, ckpt_name):
    return file_identity(resources, "checkpoints", ckpt_name)


def _vae_identity(resources, vae_name):
    return file_identity(resources, "vae", vae_name)


@node("CheckpointLoaderSimple", category="loaders", aliases=("LoadCheckpoint",), display_name="Load Checkpoint",
      description="Load an SD1.x checkpoint (single-file safetensors, original LDM layout) from "
                  "models/checkpoints: its UNet (MODEL), text encoder (CLIP) and autoencoder (VAE).",
      fingerprint=_checkpoint_identity,
      inputs=[Input("ckpt_name", COMBO, options=_checkpoint_names,
                    tooltip="a file in models/checkpoints")],
      outputs=[Output("MODEL", "MODEL"), Output("CLIP", "CLIP"), Output("VAE", "VAE")])
def checkpoint_loader(ctx, ckpt_name):
    from diffusion.checkpoint import open_checkpoint
    from diffusion.components import checkpoint_values

    runtime = ctx.resources
    path = runtime.folders.model_path("checkpoints", ckpt_name)
    device, precision = runtime.placement()
    layout = open_checkpoint(path, allow_pickle=runtime.allow_pickle)  # checked from the header; nothing read
    return checkpoint_values(layout, device=device, precision=precision, tokenizer=runtime.tokenizer(),
                             embeddings_dir=runtime.folders.models("embeddings"), allow_pickle=runtime.allow_pickle)


@node("VAELoader", category="loaders", display_name="Load VAE",
      description="Load an SD1 autoencoder from models/vae, to replace a checkpoint's own VAE.",
      fingerprint=_vae_identity,
      inputs=[Input("vae_name", COMBO, options=_vae_names, tooltip="a file in models/vae")],
      outputs=[Output("VAE", "VAE")])
def vae_loader(ctx, vae_name):
    from diffusion.checkpoint import open_vae
    from diffusion.components import vae_value

    runtime = ctx.resources
    path = runtime.folders.model_path("vae", vae_name)
    device, precision = runtime.placement()
    return vae_value(open_vae(path, allow_pickle=runtime.allow_pickle), device=device, dtype=precision.vae)


NODES = [checkpoint_loader, vae_loader]
