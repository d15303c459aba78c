"""The loaded parts of a checkpoint as they flow between nodes: MODEL, CLIP and VAE values.

Each wraps a network with the device and precision it runs in, and offers the one operation nodes need
(predict noise, encode a prompt, encode/decode pixels). Tensors crossing the boundary are float32 on the CPU
side of the graph; the wrappers move and cast them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import CLIPTextModel

from .latent import CondEntry, Conditioning
from .tokenizer import ClipTokenizer
from .unet import UNetModel
from .vae import AutoencoderKL

VAE_DECODE_BATCH = 4


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass(frozen=True, eq=False)
class DiffusionModel:
    """MODEL: the UNet of an SD1 checkpoint, predicting noise (eps)."""

    unet: UNetModel
    source: str

    @property
    def nbytes(self) -> int:
        return parameter_bytes(self.unet)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def eps_function(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """`eps(x, timesteps, context)` taking and returning tensors of the caller's device and dtype."""
        unet, device, dtype = self.unet, self.device, self.dtype

        def eps(x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                out = unet(x.to(device, dtype), timesteps.to(device), context.to(device, dtype))
            return out.to(x.device, x.dtype)

        return eps


@dataclass(frozen=True, eq=False)
class TextEncoder:
    """CLIP: the text model, its tokenizer, the layer whose output conditions (CLIP skip) and embeddings."""

    text_model: CLIPTextModel
    tokenizer: ClipTokenizer
    source: str
    layer: int = -1
    embeddings_dir: Path | None = None
    allow_pickle: bool = False  # .pt/.bin textual inversions (loaded with weights_only=True)

    @property
    def nbytes(self) -> int:
        return parameter_bytes(self.text_model)

    def with_layer(self, layer: int) -> TextEncoder:
        """CLIPSetLastLayer: -1 is the last layer, -2 the one before ("clip skip 2")."""
        return replace(self, layer=layer)

    def encode(self, text: str) -> Conditioning:
        from .prompt import encode_prompt

        with torch.inference_mode():
            context, pooled = encode_prompt(self.text_model, self.tokenizer, text, layer=self.layer,
                                            embeddings_dir=str(self.embeddings_dir) if self.embeddings_dir else None,
                                            allow_pickle=self.allow_pickle)
        return Conditioning((CondEntry(context.float().cpu(), pooled.float().cpu()),))


@dataclass(frozen=True, eq=False)
class ImageAutoencoder:
    """VAE: pixels [B,H,W,C] in 0..1 <-> unscaled latents [B,4,H/8,W/8]."""

    vae: AutoencoderKL
    source: str

    @property
    def nbytes(self) -> int:
        return parameter_bytes(self.vae)

    @property
    def downscale(self) -> int:
        return self.vae.config.downscale

    def _place(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.vae.parameters())
        return p.device, p.dtype

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode RGB pixels (centre-cropped to a multiple of 8, as ComfyUI does) to the posterior mode."""
        pixels = crop_to_multiple(pixels[..., :3], self.downscale)
        device, dtype = self._place()
        chunks = []
        with torch.inference_mode():
            for start in range(0, pixels.shape[0], VAE_DECODE_BATCH):
                batch = pixels[start:start + VAE_DECODE_BATCH].movedim(-1, 1) * 2.0 - 1.0
                chunks.append(self.vae.encode(batch.to(device, dtype)).float().cpu())
        return torch.cat(chunks)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        device, dtype = self._place()
        chunks = []
        with torch.inference_mode():
            for start in range(0, latent.shape[0], VAE_DECODE_BATCH):
                out = self.vae.decode(latent[start:start + VAE_DECODE_BATCH].to(device, dtype)).float().cpu()
                chunks.append(torch.clamp((out + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1))
        return torch.cat(chunks)


def crop_to_multiple(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    """Centre-crop [B,H,W,C] so H and W are multiples of `multiple`."""
    height, width = pixels.shape[1], pixels.shape[2]
    new_h, new_w = height // multiple * multiple, width // multiple * multiple
    if (new_h, new_w) == (height, width):
        return pixels
    if new_h == 0 or new_w == 0:
        raise ValueError(f"image of {width}x{height} is smaller than {multiple} pixels; the VAE needs at least "
                         f"{multiple}x{multiple}")
    top, left = (height % multiple) // 2, (width % multiple) // 2
    return pixels[:, top:top + new_h, left:left + new_w, :]
