"""Latents: empty ones, pixels <-> latents through the VAE, noise masks for inpainting."""

from __future__ import annotations

import math

from engine import INT, Input, Output, node
from engine.sizes import Size

from .latent_batch import LATENT_BATCH_NODES
from .pixels import LATENT_FACTOR, MAX_RESOLUTION


def _whole_cells(size: Size) -> Size:
    """A size cut to whole latent cells (the VAE centre-crops pixels to a multiple of its factor)."""
    return Size(size.batch, size.height // LATENT_FACTOR * LATENT_FACTOR, size.width // LATENT_FACTOR * LATENT_FACTOR)


def _empty_latent_size(width, height, batch_size):
    return _whole_cells(Size(batch_size, height, width))


def _size_of_samples(samples):
    return samples


def _encoded_size(pixels):
    return _whole_cells(pixels)


def multiple_of_8(**sizes: int) -> bool | str:
    """Validation: sizes in pixels must be multiples of 8 (the VAE's factor), checked before anything runs."""
    for name, value in sizes.items():
        if value % 8:
            low = value // 8 * 8
            return f"{name} {value} is not a multiple of 8; use {low or 8} or {low + 8}"
    return True


def _check_empty_latent(width, height):
    return multiple_of_8(width=width, height=height)


@node("EmptyLatentImage", category="latent", display_name="Empty Latent Image",
      description="A batch of zero latents: the start of txt2img.", validate=_check_empty_latent,
      size_rule=_empty_latent_size,
      inputs=[Input("width", INT, default=512, min=16, max=MAX_RESOLUTION, step=8, tooltip="pixels, multiple of 8"),
              Input("height", INT, default=512, min=16, max=MAX_RESOLUTION, step=8, tooltip="pixels, multiple of 8"),
              Input("batch_size", INT, default=1, min=1, max=4096)],
      outputs=[Output("LATENT", "LATENT")])
def empty_latent_image(ctx, width, height, batch_size):
    import torch

    from diffusion.latent import Latent
    return Latent(torch.zeros([batch_size, 4, height // 8, width // 8]))


@node("VAEDecode", category="latent", display_name="VAE Decode", description="Latents to pixels.",
      size_rule=_size_of_samples,
      inputs=[Input("samples", "LATENT"), Input("vae", "VAE")], outputs=[Output("IMAGE", "IMAGE")])
def vae_decode(ctx, samples, vae):
    working = vae.decode_working_bytes(tuple(samples.samples.shape))
    with ctx.resources.models.use(vae.handle, working=working) as network:
        return vae.decode(samples.samples, network)


def vae_encode_pixels(ctx, vae, pixels):
    with ctx.resources.models.use(vae.handle, working=vae.encode_working_bytes(tuple(pixels.shape))) as network:
        return vae.encode(pixels, network)


@node("VAEEncode", category="latent", display_name="VAE Encode", size_rule=_encoded_size,
      description="Pixels to latents (the image is centre-cropped to a multiple of 8).",
      inputs=[Input("pixels", "IMAGE"), Input("vae", "VAE")], outputs=[Output("LATENT", "LATENT")])
def vae_encode(ctx, pixels, vae):
    from diffusion.latent import Latent
    return Latent(vae_encode_pixels(ctx, vae, pixels))


def _grow_for_inpaint(mask, by: int):
    """ComfyUI's growth: a box sum over a by x by square with padding ceil((by-1)/2), clamped and rounded, cut back
    to the mask's size; with an even `by` the square is off-centre (grows by/2 - 1 up/left, by/2 down/right)."""
    import torch
    import torch.nn.functional as F

    if by == 0:
        return mask.round()
    kernel = torch.ones((1, 1, by, by), dtype=mask.dtype)
    grown = torch.clamp(F.conv2d(mask, kernel, padding=math.ceil((by - 1) / 2)), 0, 1)
    return grown[:, :, :mask.shape[-2], :mask.shape[-1]].round()


@node("VAEEncodeForInpaint", category="latent/inpaint", display_name="VAE Encode (for Inpainting)",
      size_rule=_encoded_size,
      description="Encode pixels with the masked area set to grey, and attach the (grown) mask as the noise mask. "
                  "Meant for inpainting models; with ordinary models use VAEEncode + SetLatentNoiseMask.",
      inputs=[Input("pixels", "IMAGE"), Input("vae", "VAE"), Input("mask", "MASK"),
              Input("grow_mask_by", INT, default=6, min=0, max=64, step=1)],
      outputs=[Output("LATENT", "LATENT")])
def vae_encode_for_inpaint(ctx, pixels, vae, mask, grow_mask_by):
    import torch.nn.functional as F

    from diffusion.components import crop_to_multiple
    from diffusion.latent import Latent

    factor = vae.downscale
    height, width = pixels.shape[1], pixels.shape[2]
    mask = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float(), size=(height, width),
                         mode="bilinear")
    pixels = crop_to_multiple(pixels[..., :3], factor)
    mask = crop_to_multiple(mask.movedim(1, -1), factor).movedim(-1, 1)
    grown = _grow_for_inpaint(mask.round(), grow_mask_by)
    keep = (1.0 - mask.round()).movedim(1, -1)
    pixels = (pixels - 0.5) * keep + 0.5
    return Latent(vae_encode_pixels(ctx, vae, pixels), noise_mask=grown)


@node("SetLatentNoiseMask", category="latent/inpaint", display_name="Set Latent Noise Mask",
      size_rule=_size_of_samples,
      description="Attach a mask to latents: sampling then repaints only where the mask is 1 and keeps every "
                  "other latent value exactly (training-free inpainting).",
      inputs=[Input("samples", "LATENT"), Input("mask", "MASK")], outputs=[Output("LATENT", "LATENT")])
def set_latent_noise_mask(ctx, samples, mask):
    return samples.replace(noise_mask=mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float())


def _temporal_inputs() -> list[Input]:
    """ComfyUI's inputs for video VAEs, accepted so its workflows validate; SD's image VAE does not use them."""
    return [Input("temporal_size", INT, default=64, min=8, max=4096, step=4, tooltip="video VAEs only (unused)"),
            Input("temporal_overlap", INT, default=8, min=4, max=4096, step=4, tooltip="video VAEs only (unused)")]


@node("VAEDecodeTiled", category="_for_testing", display_name="VAE Decode (Tiled)", size_rule=_size_of_samples,
      description="Latents to pixels in overlapping tiles, for images too large to decode whole: the mean of "
                  "three tilings (tall, wide and square tiles), blended with feathered edges.",
      inputs=[Input("samples", "LATENT"), Input("vae", "VAE"),
              Input("tile_size", INT, default=512, min=64, max=4096, step=32, tooltip="pixels"),
              Input("overlap", INT, default=64, min=0, max=4096, step=32,
                    tooltip="pixels; lowered to tile_size / 4 when larger"),
              *_temporal_inputs()],
      outputs=[Output("IMAGE", "IMAGE")])
def vae_decode_tiled(ctx, samples, vae, tile_size, overlap, temporal_size, temporal_overlap):
    import torch

    from diffusion.tiling import tiled_decode

    if tile_size < overlap * 4:
        overlap = tile_size // 4
    factor = vae.downscale
    tile, cells = tile_size // factor, overlap // factor
    latent = samples.samples
    working = vae.decode_working_bytes((1, latent.shape[1], min(latent.shape[2], 2 * tile),
                                        min(latent.shape[3], 2 * tile)))
    device, dtype = torch.device(vae.handle.device), vae.dtype
    with ctx.resources.models.use(vae.handle, working=working) as network, torch.inference_mode():
        out = tiled_decode(lambda z: network.decode(z.to(device=device, dtype=dtype)), latent, tile, cells, factor)
    return torch.clamp((out + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1).contiguous()


@node("VAEEncodeTiled", category="_for_testing", display_name="VAE Encode (Tiled)", size_rule=_encoded_size,
      description="Pixels to latents in overlapping tiles (the mean of three tilings), for large images.",
      inputs=[Input("pixels", "IMAGE"), Input("vae", "VAE"),
              Input("tile_size", INT, default=512, min=64, max=4096, step=64, tooltip="pixels"),
              Input("overlap", INT, default=64, min=0, max=4096, step=32, tooltip="pixels"),
              *_temporal_inputs()],
      outputs=[Output("LATENT", "LATENT")])
def vae_encode_tiled(ctx, pixels, vae, tile_size, overlap, temporal_size, temporal_overlap):
    import torch

    from diffusion.components import crop_to_multiple
    from diffusion.latent import Latent
    from diffusion.tiling import tiled_encode

    factor = vae.downscale
    pixels = crop_to_multiple(pixels[..., :3], factor).movedim(-1, 1)
    working = vae.encode_working_bytes((1, min(pixels.shape[2], 2 * tile_size), min(pixels.shape[3], 2 * tile_size)))
    device, dtype = torch.device(vae.handle.device), vae.dtype
    with ctx.resources.models.use(vae.handle, working=working) as network, torch.inference_mode():
        latent = tiled_encode(lambda x: network.encode((x * 2.0 - 1.0).to(device=device, dtype=dtype)), pixels,
                              tile_size, overlap, factor, vae.config.latent_channels)
    return Latent(latent)


NODES = [empty_latent_image, vae_decode, vae_encode, vae_encode_for_inpaint, set_latent_noise_mask,
         vae_decode_tiled, vae_encode_tiled, *LATENT_BATCH_NODES]
