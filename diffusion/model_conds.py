"""What the network gets beside x and the context, per conditioning entry (ComfyUI's extra_conds, computed as its
`encode_model_conds` does at the start of sampling):

* `y`: SDXL's label vector (diffusion/adm.py). An entry without size keys (plain CLIPTextEncode) gets the
  latent's size in pixels, crop 0 and target = size; a refiner entry without an aesthetic score gets 6 on the
  positive side and 2.5 on the negative.
* `concat`: an inpainting model's 5 extra input channels, the mask then the masked image's latent. The entry's
  concat_mask / concat_latent_image (InpaintModelConditioning) or else the latent's noise mask and the latent
  being sampled (VAEEncodeForInpaint); with no mask at all, mask 1 and the latent of a black image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion.adm import POOLED_DIM, REFINER_AESTHETIC_SCORE, refiner_label, sdxl_label
from diffusion.denoisers import ModelInputs, repeat_to_batch_size
from diffusion.families import Family
from diffusion.latent import CondEntry, Conditioning
from diffusion.resample import center_crop_offsets

PIXELS_PER_CELL = 8  # the VAE's downscale: a plain entry's width/height are the latent's times this
BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)  # a black image's latent (model space), per channel
SIDES = ("positive", "negative")
_ENCODER_BY_WIDTH = {768: "an SD1.x text encoder (CLIP-L)", 1024: "an SD2.x text encoder (OpenCLIP-H)",
                     1280: "the SDXL refiner's text encoder (OpenCLIP-G)",
                     2048: "the SDXL base's text encoders (CLIP-L + OpenCLIP-G)"}


def check_conditioning(family: Family, sides: Sequence[Conditioning]) -> None:
    """A model with a label vector needs every entry's pooled output from an SDXL text encoder (1280 wide)."""
    if family.adm is None:
        return
    for name, conditioning in zip(SIDES, sides, strict=False):
        for i, entry in enumerate(conditioning.entries):
            if entry.pooled is not None and entry.pooled.shape[-1] == POOLED_DIM:
                continue
            width = entry.context.shape[-1]
            source = _ENCODER_BY_WIDTH.get(width, f"a text encoder with {width}-wide outputs")
            got = "no pooled output" if entry.pooled is None else f"a {entry.pooled.shape[-1]}-wide pooled output"
            raise ValueError(f"the {family.label} model needs the {POOLED_DIM}-wide pooled output of an SDXL text "
                             f"encoder, but {name} conditioning entry {i + 1} has {got}; it looks encoded by "
                             f"{source}. Encode the prompt with the CLIP of the {family.label} checkpoint "
                             f"(CLIPTextEncode, CLIPTextEncodeSDXL or CLIPTextEncodeSDXLRefiner)")


def label_vector(family: Family, entry: CondEntry, side: int, latent_size: Sequence[int]) -> Tensor | None:
    """The entry's y for the family ([1 or B, 2816 / 2560]), or None for a family without one."""
    if family.adm is None:
        return None
    height = entry.height if entry.height is not None else latent_size[0] * PIXELS_PER_CELL
    width = entry.width if entry.width is not None else latent_size[1] * PIXELS_PER_CELL
    crop_h, crop_w = entry.crop_h or 0, entry.crop_w or 0
    if family.adm == "sdxl":
        target_h = entry.target_height if entry.target_height is not None else height
        target_w = entry.target_width if entry.target_width is not None else width
        y = sdxl_label(entry.pooled, height=height, width=width, crop_h=crop_h, crop_w=crop_w,
                       target_height=target_h, target_width=target_w)
    elif family.adm == "sdxl_refiner":
        score = entry.aesthetic_score if entry.aesthetic_score is not None else REFINER_AESTHETIC_SCORE[side]
        y = refiner_label(entry.pooled, height=height, width=width, crop_h=crop_h, crop_w=crop_w,
                          aesthetic_score=score)
    else:
        raise ValueError(f"unknown label vector kind {family.adm!r} of {family.label}")
    return y


def resize_centre(t: Tensor, height: int, width: int) -> Tensor:
    """[B, C, h, w] cropped to the target's aspect ratio about its centre, then resized bilinearly (ComfyUI's
    common_upscale with crop "center")."""
    old_h, old_w = t.shape[-2:]
    x, y = center_crop_offsets(old_w, old_h, width, height)
    cropped = t.narrow(-2, y, old_h - 2 * y).narrow(-1, x, old_w - 2 * x)
    return F.interpolate(cropped.float(), size=(height, width), mode="bilinear")


def _mask_at_latent(mask: Tensor, shape: Sequence[int]) -> Tensor:
    if mask.ndim == len(shape):
        mask = mask[:, :1]
    mask = mask.reshape((-1, 1) + tuple(mask.shape[-2:])).float()
    if tuple(mask.shape[-2:]) != tuple(shape[-2:]):
        mask = resize_centre(mask, shape[-2], shape[-1])
    return repeat_to_batch_size(mask.round(), shape[0])


def concat_channels(entry: CondEntry, latent_in: Tensor, denoise_mask: Tensor | None,
                    latent_scale: float) -> Tensor:
    """The entry's [B, 5, h, w] inpainting-model input: mask (rounded) then masked-image latent (model space)."""
    shape = latent_in.shape
    mask = entry.concat_mask if entry.concat_mask is not None else denoise_mask
    if mask is None:
        blank = torch.tensor(BLANK_INPAINT_LATENT, dtype=latent_in.dtype).view(1, -1, 1, 1)
        return torch.cat([torch.ones_like(latent_in[:, :1]), blank.expand(shape[0], -1, *shape[2:])], dim=1)
    image = latent_in if entry.concat_latent_image is None else entry.concat_latent_image.float() * latent_scale
    if tuple(image.shape[1:]) != tuple(shape[1:]):
        image = resize_centre(image, shape[-2], shape[-1])
    image = repeat_to_batch_size(image, shape[0])
    return torch.cat([_mask_at_latent(mask.to(latent_in.device), shape), image.to(latent_in)], dim=1)


def model_inputs(family: Family, latent_in: Tensor, denoise_mask: Tensor | None) -> ModelInputs:
    """(entry, side) -> (y, concat) for sampling `latent_in` (model space) with a model of `family`;
    `denoise_mask` is the latent's noise mask at the latent's shape (prepare_mask), or None."""
    size = tuple(latent_in.shape[2:])

    def inputs(entry: CondEntry, side: int) -> tuple[Tensor | None, Tensor | None]:
        concat = None
        if family.concat_channels:
            concat = concat_channels(entry, latent_in, denoise_mask, family.latent_scale)
        return label_vector(family, entry, side, size), concat

    return inputs
