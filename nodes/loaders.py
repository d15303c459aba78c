"""Loading checkpoints, bare UNets and VAEs from the models/ folders.

A loader checks the file from its header and returns values holding model handles; the weights are read when a
node first uses them (through the runtime's model manager), one part at a time. The family (SD1.x, SD2.x, SDXL
base or refiner, inpainting variants) is detected from the keys and shapes; the MODEL carries it, so the latent
scale and prediction type follow the model, and a VAE file (which carries no family) pairs with any MODEL.
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


UNET_FOLDERS = ("diffusion_models", "unet")  # ComfyUI's folder and its legacy name, searched in this order
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")  # UNETLoader's options, as ComfyUI lists them


def _unet_names(resources) -> list[str]:
    if resources is None:
        return []
    return sorted({name for kind in UNET_FOLDERS for name in resources.folders.list_models(kind)})


def unet_path(resources, unet_name: str):
    """The file in models/diffusion_models, else in the legacy models/unet."""
    for kind in UNET_FOLDERS[:-1]:
        path = resources.folders.models(kind) / unet_name
        if path.is_file():
            return resources.folders.model_path(kind, unet_name)
    return resources.folders.model_path(UNET_FOLDERS[-1], unet_name)


def _unet_identity(resources, unet_name, weight_dtype):
    path = unet_path(resources, unet_name)
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns, resources.device, resources.dtype, weight_dtype)


def _checkpoint_identity(resources, ckpt_name):
    return file_identity(resources, "checkpoints", ckpt_name)


def _vae_identity(resources, vae_name):
    return file_identity(resources, "vae", vae_name)


@node("CheckpointLoaderSimple", category="loaders", aliases=("LoadCheckpoint",), display_name="Load Checkpoint",
      description="Load a single-file checkpoint (SD1.x, SD2.x, SDXL base or refiner, inpainting models; "
                  "original LDM layout) from models/checkpoints: its UNet (MODEL), text encoders (CLIP) and "
                  "autoencoder (VAE). The family is told from the weights, not the file name.",
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


@node("UNETLoader", category="advanced/loaders", display_name="Load Diffusion Model",
      description="Load a UNet on its own (SD1.x, SD2.x, SDXL) from models/diffusion_models (or the legacy "
                  "models/unet): keys 'input_blocks...' or 'model.diffusion_model.input_blocks...'. Pair it with "
                  "CLIPLoader/DualCLIPLoader and VAELoader.",
      fingerprint=_unet_identity,
      inputs=[Input("unet_name", COMBO, options=_unet_names, tooltip="a file in models/diffusion_models"),
              Input("weight_dtype", COMBO, options=WEIGHT_DTYPES, default="default",
                    tooltip="default: the device's precision policy. fp8_*: the layers' weights are stored in fp8 "
                            "(half of bf16's memory) and cast to the policy's dtype at each call (slower); "
                            "fp8_e4m3fn_fast computes as fp8_e4m3fn here (no fp8 matrix products on this device)")],
      outputs=[Output("MODEL", "MODEL")])
def unet_loader(ctx, unet_name, weight_dtype):
    from diffusion.checkpoint import open_unet
    from diffusion.components import model_value
    from diffusion.weight_storage import FP8_STORAGE

    runtime = ctx.resources
    device, precision = runtime.placement()
    family, layout = open_unet(unet_path(runtime, unet_name), allow_pickle=runtime.allow_pickle)
    return model_value(layout, family, device=device, precision=precision, storage=FP8_STORAGE.get(weight_dtype))


@node("VAELoader", category="loaders", display_name="Load VAE",
      description="Load an autoencoder (SD1.x/SD2.x or SDXL VAE) from models/vae, to replace a checkpoint's own "
                  "VAE. A VAE file carries no family: the latent scale comes from the MODEL it is used with.",
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


NODES = [checkpoint_loader, unet_loader, vae_loader]
