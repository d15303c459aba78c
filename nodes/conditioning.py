"""Prompts to conditioning, and the nodes that say where and when a conditioning acts.

CLIPTextEncode, CLIPTextEncodeSDXL (size conditioning), CLIPTextEncodeSDXLRefiner, CLIPSetLastLayer,
ConditioningCombine; ConditioningSetArea(Percentage/Strength),
ConditioningSetMask, ConditioningSetTimestepRange (read by the sampler: diffusion/regions.py);
ConditioningZeroOut, ConditioningConcat, ConditioningAverage (arithmetic on the context); InpaintModelConditioning.
Inputs, defaults and numbers follow ComfyUI's nodes of the same names.
"""

from __future__ import annotations

import logging
import os

from engine import BOOLEAN, COMBO, FLOAT, INT, STRING, Input, Output, node
from engine.sizes import Size

from .pixels import LATENT_FACTOR, MAX_RESOLUTION

log = logging.getLogger(__name__)

COND_IN = Input("conditioning", "CONDITIONING")
COND_OUT = [Output("CONDITIONING", "CONDITIONING")]
STRENGTH = Input("strength", FLOAT, default=1.0, min=0.0, max=10.0, step=0.01,
                 tooltip="weight of this conditioning's prediction where it applies")


def _embedding_files(resources, text=None):
    """A prompt naming `embedding:` reads files in models/embeddings: their names, sizes and dates are part of the
    node's key, so a changed embedding is encoded again (and a stored encoding is not reused)."""
    folders = getattr(resources, "folders", None)
    if folders is None or (text is not None and "embedding:" not in text.lower()):
        return ""
    root = folders.models("embeddings")
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                stat = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            found.append((os.path.relpath(os.path.join(dirpath, name), root), stat.st_size, stat.st_mtime_ns))
    return sorted(found)


@node("CLIPTextEncode", category="conditioning", aliases=("CLIPEncode",), display_name="CLIP Text Encode (Prompt)",
      description="Encode a prompt with the text encoder. Weighting as ComfyUI: (word) x1.1, (word:1.3), "
                  "\\( escapes; embedding:name uses models/embeddings/name.",
      fingerprint=_embedding_files,
      inputs=[Input("text", STRING, multiline=True, default="", tooltip="the prompt"),
              Input("clip", "CLIP")],
      outputs=[Output("CONDITIONING", "CONDITIONING")])
def clip_text_encode(ctx, text, clip):
    with ctx.resources.models.use(clip.handle) as text_model:
        return clip.encode(text, text_model)


def _size_input(name: str, default: int, tooltip: str) -> Input:
    return Input(name, INT, default=default, min=0, max=MAX_RESOLUTION, tooltip=tooltip)


@node("CLIPTextEncodeSDXL", category="advanced/conditioning", display_name="CLIP Text Encode (SDXL)",
      description="Encode an SDXL prompt: text_g for OpenCLIP-G, text_l for CLIP-L, with SDXL's size "
                  "conditioning (the original size, its crop and the target size, in pixels).",
      fingerprint=_embedding_files,
      inputs=[Input("clip", "CLIP"),
              _size_input("width", 1024, "the original image width the model is told"),
              _size_input("height", 1024, "the original image height the model is told"),
              _size_input("crop_w", 0, "left crop in pixels (0: uncropped)"),
              _size_input("crop_h", 0, "top crop in pixels (0: uncropped)"),
              _size_input("target_width", 1024, "the width the model is asked to compose for"),
              _size_input("target_height", 1024, "the height the model is asked to compose for"),
              Input("text_g", STRING, multiline=True, default="", tooltip="the prompt for OpenCLIP-G"),
              Input("text_l", STRING, multiline=True, default="", tooltip="the prompt for CLIP-L")],
      outputs=COND_OUT)
def clip_text_encode_sdxl(ctx, clip, width, height, crop_w, crop_h, target_width, target_height, text_g, text_l):
    if not hasattr(clip, "encode_sdxl"):
        raise ValueError("CLIPTextEncodeSDXL needs the CLIP of an SDXL base checkpoint (CLIP-L + OpenCLIP-G); "
                         "this CLIP has one text encoder: use CLIPTextEncode")
    with ctx.resources.models.use(clip.handle) as text_model:
        conditioning = clip.encode_sdxl(text_g, text_l, text_model)
    return _set(conditioning, width=width, height=height, crop_w=crop_w, crop_h=crop_h, target_width=target_width,
                target_height=target_height)


@node("CLIPTextEncodeSDXLRefiner", category="advanced/conditioning", display_name="CLIP Text Encode (SDXL Refiner)",
      description="Encode a prompt for the SDXL refiner with its aesthetic score (6 is ComfyUI's default; "
                  "lower for the negative, e.g. 2.5) and the image size in pixels.",
      fingerprint=_embedding_files,
      inputs=[Input("ascore", FLOAT, default=6.0, min=0.0, max=1000.0, step=0.01,
                    tooltip="the aesthetic score the refiner is conditioned on"),
              _size_input("width", 1024, "the image width the model is told"),
              _size_input("height", 1024, "the image height the model is told"),
              Input("text", STRING, multiline=True, default="", tooltip="the prompt"),
              Input("clip", "CLIP")],
      outputs=COND_OUT)
def clip_text_encode_sdxl_refiner(ctx, ascore, width, height, text, clip):
    with ctx.resources.models.use(clip.handle) as text_model:
        conditioning = clip.encode(text, text_model)
    return _set(conditioning, aesthetic_score=ascore, width=width, height=height)


@node("CLIPSetLastLayer", category="conditioning", display_name="CLIP Set Last Layer",
      description="Condition on an earlier layer of the text encoder: -1 is the last, -2 is 'clip skip 2'.",
      inputs=[Input("clip", "CLIP"), Input("stop_at_clip_layer", INT, default=-1, min=-24, max=-1, step=1)],
      outputs=[Output("CLIP", "CLIP")])
def clip_set_last_layer(ctx, clip, stop_at_clip_layer):
    layers = clip.layers
    if -stop_at_clip_layer > layers:
        raise ValueError(f"stop_at_clip_layer {stop_at_clip_layer} goes past the first layer: this text encoder "
                         f"has {layers} layers, so use a value from -1 to -{layers}")
    return clip.with_layer(stop_at_clip_layer)


@node("ConditioningCombine", category="conditioning", display_name="Conditioning (Combine)",
      description="Use both conditionings: each is predicted separately and the predictions are averaged.",
      inputs=[Input("conditioning_1", "CONDITIONING"), Input("conditioning_2", "CONDITIONING")],
      outputs=[Output("CONDITIONING", "CONDITIONING")])
def conditioning_combine(ctx, conditioning_1, conditioning_2):
    return conditioning_1.combine(conditioning_2)


def _set(conditioning, **fields):
    """ComfyUI's conditioning_set_values: every entry with these fields replaced."""
    from diffusion.latent import Conditioning
    return Conditioning(tuple(e.replace(**fields) for e in conditioning.entries))


def _pixels_to_cells(value: int) -> int:
    return value // LATENT_FACTOR


@node("ConditioningSetArea", category="conditioning", display_name="Conditioning (Set Area)",
      description="Use this conditioning only inside a rectangle (pixels, rounded down to latent cells); "
                  "its inner edges fade over up to 8 cells. Combine several to prompt regions separately.",
      inputs=[COND_IN,
              Input("width", INT, default=64, min=64, max=MAX_RESOLUTION, step=8),
              Input("height", INT, default=64, min=64, max=MAX_RESOLUTION, step=8),
              Input("x", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
              Input("y", INT, default=0, min=0, max=MAX_RESOLUTION, step=8), STRENGTH],
      outputs=COND_OUT)
def conditioning_set_area(ctx, conditioning, width, height, x, y, strength):
    area = tuple(_pixels_to_cells(v) for v in (height, width, y, x))
    return _set(conditioning, area=area, strength=strength, set_area_to_bounds=False)


@node("ConditioningSetAreaPercentage", category="conditioning", display_name="Conditioning (Set Area with Percentage)",
      description="ConditioningSetArea with the rectangle as fractions of the image (resolved when sampling).",
      inputs=[COND_IN,
              Input("width", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01),
              Input("height", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01),
              Input("x", FLOAT, default=0.0, min=0.0, max=1.0, step=0.01),
              Input("y", FLOAT, default=0.0, min=0.0, max=1.0, step=0.01), STRENGTH],
      outputs=COND_OUT)
def conditioning_set_area_percentage(ctx, conditioning, width, height, x, y, strength):
    return _set(conditioning, area=("percentage", height, width, y, x), strength=strength,
                set_area_to_bounds=False)


@node("ConditioningSetAreaStrength", category="conditioning",
      description="Set the weight of this conditioning's prediction.", inputs=[COND_IN, STRENGTH],
      outputs=COND_OUT)
def conditioning_set_area_strength(ctx, conditioning, strength):
    return _set(conditioning, strength=strength)


@node("ConditioningSetMask", category="conditioning", display_name="Conditioning (Set Mask)",
      description="Weight this conditioning by a mask (resized to the latent), times strength. 'mask bounds' "
                  "also predicts only on the mask's bounding box.",
      inputs=[COND_IN, Input("mask", "MASK"),
              Input("strength", FLOAT, default=1.0, min=0.0, max=10.0, step=0.01),
              Input("set_cond_area", COMBO, options=("default", "mask bounds"), default="default")],
      outputs=COND_OUT)
def conditioning_set_mask(ctx, conditioning, mask, strength, set_cond_area):
    if mask.ndim < 3:
        mask = mask.unsqueeze(0)
    return _set(conditioning, mask=mask, set_area_to_bounds=set_cond_area != "default", mask_strength=strength)


@node("ConditioningSetTimestepRange", category="advanced/conditioning",
      description="Use this conditioning only from start to end, as fractions of the sampling schedule "
                  "(0 = the first, noisiest step).",
      inputs=[COND_IN, Input("start", FLOAT, default=0.0, min=0.0, max=1.0, step=0.001),
              Input("end", FLOAT, default=1.0, min=0.0, max=1.0, step=0.001)],
      outputs=COND_OUT)
def conditioning_set_timestep_range(ctx, conditioning, start, end):
    return _set(conditioning, start_percent=start, end_percent=end)


@node("ConditioningZeroOut", category="advanced/conditioning",
      description="Zero the text context and pooled output (an 'empty' conditioning, e.g. for the negative).",
      inputs=[COND_IN], outputs=COND_OUT)
def conditioning_zero_out(ctx, conditioning):
    import torch

    from diffusion.latent import Conditioning
    return Conditioning(tuple(
        e.replace(context=torch.zeros_like(e.context), pooled=None if e.pooled is None else torch.zeros_like(e.pooled))
        for e in conditioning.entries))


def _first_context(node_name: str, conditioning_from):
    if not conditioning_from.entries:
        raise ValueError(f"{node_name}: conditioning_from is empty; connect a text encoder's output")
    if len(conditioning_from.entries) > 1:
        log.warning("%s: conditioning_from has %d entries; only the first is used", node_name,
                    len(conditioning_from.entries))
    return conditioning_from.entries[0]


@node("ConditioningConcat", category="conditioning",
      description="Append conditioning_from's tokens to each entry of conditioning_to (the prompts are "
                  "attended to together, unlike Combine).",
      inputs=[Input("conditioning_to", "CONDITIONING"), Input("conditioning_from", "CONDITIONING")],
      outputs=COND_OUT)
def conditioning_concat(ctx, conditioning_to, conditioning_from):
    import torch

    from diffusion.latent import Conditioning
    tokens = _first_context("ConditioningConcat", conditioning_from).context
    out = []
    for e in conditioning_to.entries:
        if e.context.shape[0] != tokens.shape[0] or e.context.shape[2] != tokens.shape[2]:
            raise ValueError(f"ConditioningConcat: conditioning_to's context {list(e.context.shape)} and "
                             f"conditioning_from's {list(tokens.shape)} differ in batch or width; use prompts "
                             f"from the same text encoder")
        out.append(e.replace(context=torch.cat((e.context, tokens), dim=1)))
    return Conditioning(tuple(out))


@node("ConditioningAverage", category="conditioning",
      description="Blend conditioning_to with conditioning_from's first entry: to * s + from * (1 - s), for the "
                  "context (from cut or zero-padded to to's token length) and the pooled output.",
      inputs=[Input("conditioning_to", "CONDITIONING"), Input("conditioning_from", "CONDITIONING"),
              Input("conditioning_to_strength", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01)],
      outputs=COND_OUT)
def conditioning_average(ctx, conditioning_to, conditioning_from, conditioning_to_strength):
    from diffusion.latent import Conditioning
    source = _first_context("ConditioningAverage", conditioning_from)
    return Conditioning(tuple(_average(e, source, conditioning_to_strength) for e in conditioning_to.entries))


def _average(entry, source, strength: float):
    import torch

    t1, t0 = entry.context, source.context[:, : entry.context.shape[1]]
    if t0.shape[2] != t1.shape[2]:
        raise ValueError(f"ConditioningAverage: contexts of width {t1.shape[2]} and {t0.shape[2]} cannot be "
                         f"averaged; use prompts from the same text encoder")
    if t0.shape[1] < t1.shape[1]:
        t0 = torch.cat([t0, torch.zeros((t0.shape[0], t1.shape[1] - t0.shape[1], t1.shape[2]))], dim=1)
    context = torch.mul(t1, strength) + torch.mul(t0, 1.0 - strength)
    pooled_to, pooled_from = entry.pooled, source.pooled  # a None pooled counts as ComfyUI's key set to None
    pooled = pooled_to if pooled_from is None else pooled_from
    if pooled_from is not None and pooled_to is not None:
        pooled = torch.mul(pooled_to, strength) + torch.mul(pooled_from, 1.0 - strength)
    return entry.replace(context=context, pooled=pooled)


def _inpaint_conditioning_size(pixels):
    """The latent's size (whole latent cells of the image); it is also given to the two conditionings."""
    return Size(pixels.batch, pixels.height // LATENT_FACTOR * LATENT_FACTOR,
                            pixels.width // LATENT_FACTOR * LATENT_FACTOR)


@node("InpaintModelConditioning", category="conditioning/inpaint",
      description="For inpainting models: attach the masked image (masked pixels grey, VAE-encoded) and the "
                  "mask to both conditionings, and encode the image as the latent to sample (with the mask as "
                  "its noise mask when noise_mask is on). Ordinary models ignore the attached image.",
      size_rule=_inpaint_conditioning_size,
      inputs=[Input("positive", "CONDITIONING"), Input("negative", "CONDITIONING"), Input("vae", "VAE"),
              Input("pixels", "IMAGE"), Input("mask", "MASK"),
              Input("noise_mask", BOOLEAN, default=True,
                    tooltip="add the mask to the latent so sampling only changes the masked area")],
      outputs=[Output("positive", "CONDITIONING"), Output("negative", "CONDITIONING"), Output("latent", "LATENT")])
def inpaint_model_conditioning(ctx, positive, negative, vae, pixels, mask, noise_mask):
    from diffusion.latent import Latent

    from .latent import vae_encode_pixels
    masked, mask = masked_pixels(pixels, mask, vae.downscale)
    concat_latent = vae_encode_pixels(ctx, vae, masked)
    latent = Latent(vae_encode_pixels(ctx, vae, pixels), noise_mask=mask if noise_mask else None)
    fields = {"concat_latent_image": concat_latent, "concat_mask": mask}
    return _set(positive, **fields), _set(negative, **fields), latent


def masked_pixels(pixels, mask, factor: int):
    """InpaintModelConditioning's pixel prep: the mask resized (bilinear) to the image, both centre-cropped to
    a multiple of `factor`, and the pixels under the (rounded) mask set to 0.5. Returns (pixels, mask [B,1,H,W])."""
    import torch.nn.functional as F

    from diffusion.components import crop_to_multiple
    mask = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float(),
                         size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
    pixels = crop_to_multiple(pixels, factor).clone()
    mask = crop_to_multiple(mask.movedim(1, -1), factor).movedim(-1, 1)
    keep = (1.0 - mask.round()).movedim(1, -1)
    pixels[..., :3] = (pixels[..., :3] - 0.5) * keep + 0.5
    return pixels, mask


NODES = [clip_text_encode, clip_text_encode_sdxl, clip_text_encode_sdxl_refiner, clip_set_last_layer,
         conditioning_combine, conditioning_set_area,
         conditioning_set_area_percentage, conditioning_set_area_strength, conditioning_set_mask,
         conditioning_set_timestep_range, conditioning_zero_out, conditioning_concat, conditioning_average,
         inpaint_model_conditioning]
