"""SDXL's label vectors ("adm"): the pooled text embedding followed by sinusoidal embeddings of the image size,
crop and target size (base) or aesthetic score (refiner), as ComfyUI's model_base.SDXL / SDXLRefiner.encode_adm.

Pure functions of numbers and tensors; which numbers an entry gets (its own, or the latent's size) is decided in
diffusion/model_conds.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EMBED_DIM = 256  # each number's embedding width (ComfyUI's Timestep(256))
POOLED_DIM = 1280  # OpenCLIP-G's projected pooled output
ADM_CHANNELS = {"sdxl": POOLED_DIM + 6 * EMBED_DIM, "sdxl_refiner": POOLED_DIM + 5 * EMBED_DIM}  # 2816, 2560
REFINER_AESTHETIC_SCORE = {0: 6.0, 1: 2.5}  # by side (0 positive, 1 negative) when an entry does not say


def number_embedding(values: list[float], dim: int = EMBED_DIM, max_period: float = 10000.0) -> Tensor:
    """[len(values), dim]: cos then sin of value * exp(-ln(max_period) * i / (dim / 2)), i < dim / 2 (float32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = torch.tensor(values, dtype=torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _label(pooled: Tensor, values: list[float]) -> Tensor:
    flat = number_embedding(values).flatten().unsqueeze(0).repeat(pooled.shape[0], 1)
    return torch.cat([pooled.float().to(flat.device), flat], dim=1)


def sdxl_label(pooled: Tensor, *, height: float, width: float, crop_h: float, crop_w: float, target_height: float,
               target_width: float) -> Tensor:
    """The SDXL base's y: [B, 2816] = pooled, then height, width, crop_h, crop_w, target height and width."""
    return _label(pooled, [height, width, crop_h, crop_w, target_height, target_width])


def refiner_label(pooled: Tensor, *, height: float, width: float, crop_h: float, crop_w: float,
                  aesthetic_score: float) -> Tensor:
    """The SDXL refiner's y: [B, 2560] = pooled, then height, width, crop_h, crop_w and the aesthetic score."""
    return _label(pooled, [height, width, crop_h, crop_w, aesthetic_score])
