"""The parts of a checkpoint as they flow between nodes: MODEL, CLIP and VAE values.

A value holds a `ModelHandle` (file, size, mtime, part, dtype, device) and the part's config, never the weights:
the process's `ModelManager` loads, places and evicts the networks, and a node borrows one for the duration of a
call (`with models.use(value.handle, working=...) as network`). So the output cache holding a MODEL value pins
no memory, and `nbytes` reports what it does hold: the handle and the key list its loader keeps.

Each value offers the operation nodes need (predict noise, encode a prompt, encode/decode pixels), given the
borrowed network. Tensors crossing the boundary are float32 on the CPU side of the graph; the wrappers move and
cast them (NCHW inputs go channels_last, the layout oneDNN's convolutions want).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from runtime.models import ModelHandle

from .checkpoint import CheckpointLayout, PartLayout
from .clip_values import TextEncoder, clip_value
from .device import Precision, safe_vae_dtype
from .families import FAMILIES, Family
from .tokenizer import ClipTokenizer
from .unet import UNetConfig, precision_sensitive_prefixes, set_attention_dtype, weight_dtype
from .vae import VAEConfig, folded_extra_elements, folds_upsampling
from .weight_storage import STORAGE_DTYPES, cast_stored_layers, storage_overrides

log = logging.getLogger(__name__)

VAE_DECODE_BATCH = 4
# Working memory per latent element of one call (B x 4 x h x w, the CFG batch included) or per pixel encoded,
# plus a margin: fitted to the peak RSS increase over a whole node (KSampler of 4 steps, VAEDecode, VAEEncode) of
# full-size SD1.5 on the CPU at 256 and 512 px, in fp32 and in the default bf16 policy (bench/sd15_step.py
# --calibrate; docs/performance.md), rounded up. Measured at 512 px: KSampler 514 MB (fp32) / 408 MB (bf16),
# VAEDecode 876 / 566 MB, one VAE encode 640 / 320 MB. The UNet's barely shrinks with the dtype (its last level
# runs in fp32); the VAE's does, by TWO_BYTE_FACTOR. Attention is SDPA (flash) or, for long bf16 attention on
# the CPU, sliced (diffusion/attention.py), so nothing grows with the square of the token count.
UNET_WORKING_PER_ELEMENT = 16_000
UNET_WORKING_MARGIN = 64 << 20
VAE_DECODE_WORKING_PER_ELEMENT = 50_000
VAE_ENCODE_WORKING_PER_PIXEL = 3_000
VAE_WORKING_MARGIN = 128 << 20
TWO_BYTE_FACTOR = 0.65
PATCHABLE_PARTS = ("unet", "text_encoder")  # parts LoRAs patch (diffusion/lora.py)


def _handle_bytes(layout: PartLayout) -> int:
    """What a handle keeps alive: the part's key map (strings) and a few small objects."""
    return 1024 + sum(len(k) + len(v) + 120 for k, v in layout.keys.items())


def _vae_factor(dtype: torch.dtype) -> float:
    return 1.0 if torch.empty(0, dtype=dtype).element_size() >= 4 else TWO_BYTE_FACTOR


def _weight_bytes(layout: PartLayout, dtype: torch.dtype, overrides: dict[str, torch.dtype]) -> int:
    """What the loaded part holds: the file's tensors in `dtype`, plus what folding a 16-bit VAE's upsampling
    layers adds (`diffusion.vae.vae_holding`)."""
    if layout.part != "vae" or not folds_upsampling(dtype):
        return layout.weight_bytes(dtype, overrides)
    elements = {key: layout.float_elements.get(file_key, 0) for key, file_key in layout.keys.items()}
    return layout.weight_bytes(dtype, overrides) + folded_extra_elements(elements) * dtype.itemsize


def part_handle(layout: PartLayout, *, dtype: torch.dtype, device: torch.device, label: str, streamable: bool,
                overrides: dict[str, torch.dtype] | None = None) -> ModelHandle:
    """A handle whose identity is the part's file (path, size, mtime), the part, its dtype(s) and device. A
    storage dtype (fp8) stores the layers' weights only: they compute in the dtype `overrides` give the rest."""
    channels_last = layout.part in ("unet", "vae")
    overrides = overrides or {}
    kept = tuple(sorted((prefix, str(d).removeprefix("torch.")) for prefix, d in overrides.items()))
    return ModelHandle(
        origin=f"{layout.file.path}#{layout.part}",
        version=(layout.file.size, layout.file.mtime_ns),
        variant=(str(dtype).removeprefix("torch."), str(device), kept),
        weight_bytes=_weight_bytes(layout, dtype, overrides),
        device=str(device),
        load=partial(load_part, layout, dtype, channels_last, overrides, str(device)),
        label=f"{label} of {layout.file.path.name}",
        streamable=streamable,
        patch=partial(_set_patches, layout.part) if layout.part in PATCHABLE_PARTS else None,
    )


def _set_patches(part: str, module: torch.nn.Module, patches: tuple) -> None:
    from .lora_patch import set_patches

    set_patches(module, patches, part=part)


def with_patch(handle: ModelHandle, patch, strength: float) -> ModelHandle:
    """The handle with one more (patch, strength) after those it has: the same loaded weights, patched."""
    return replace(handle, patches=(*handle.patches, (patch, float(strength))))


def load_part(layout: PartLayout, dtype: torch.dtype, channels_last: bool, overrides: dict[str, torch.dtype],
              computes_on: str, device: str) -> torch.nn.Module:
    """Read a part onto `device`; when it also computes on the CPU, its convolutions are packed for oneDNN once
    (diffusion/onednn.py). A part that computes on an accelerator but is loaded into RAM (to stream its blocks,
    lowvram) stays unpacked: packed weights cannot move to the accelerator. A UNet's
    attention computes in the part's dtype even in blocks whose weights `overrides` keep in fp32: that moves
    a call's result by 0.001% and makes those blocks' attention 2x faster on the CPU (diffusion/attention.py)."""
    from .onednn import pack_for_cpu

    module = layout.load(dtype=dtype, device=device, channels_last=channels_last, overrides=overrides)
    if dtype in STORAGE_DTYPES:
        cast_stored_layers(module)
    if layout.part == "unet":
        set_attention_dtype(module, weight_dtype(module, dtype))
    on_cpu = torch.device(device).type == torch.device(computes_on).type == "cpu"
    return pack_for_cpu(module) if channels_last and on_cpu else module


@dataclass(frozen=True, eq=False)
class DiffusionModel:
    """MODEL: the UNet of a checkpoint (or a bare UNet file) and its family, which says what the network
    predicts (eps or v), the latent scale and the conditioning it takes (SDXL's label vector y)."""

    handle: ModelHandle
    config: UNetConfig
    dtype: torch.dtype
    source: str
    nbytes: int = 0
    family: Family = FAMILIES["sd1"]

    def model_handles(self) -> tuple[ModelHandle, ...]:
        return (self.handle,)

    def with_lora(self, patch, strength: float) -> DiffusionModel:
        """This model with a LoRA's UNet patch added (applied when the manager hands out the network)."""
        return replace(self, handle=with_patch(self.handle, patch, strength), nbytes=self.nbytes + patch.nbytes)

    def working_bytes(self, latent_shape: tuple[int, ...], batch_multiplier: int = 2) -> int:
        """Memory one UNet call needs beside its weights, for latents of `latent_shape` [B, C, h, w] run
        `batch_multiplier` at a time (2 with CFG: cond and uncond batched together)."""
        elements = math.prod(latent_shape) * batch_multiplier
        return elements * UNET_WORKING_PER_ELEMENT + UNET_WORKING_MARGIN

    def forward_function(self, unet: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """`f(x, timesteps, context, control=None, y=None)` with the borrowed `unet`: the raw network output
        (noise or v, as `family.sampling.prediction` says), taking and returning tensors of the caller's device
        and dtype (the network computes in its own, channels_last; ControlNet residuals are added in it). `y`,
        the label vector, is required exactly when the UNet has one (SDXL)."""
        device, dtype = torch.device(self.handle.device), self.dtype  # weights may be elsewhere when streamed

        def forward(x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, control=None,
                    y: torch.Tensor | None = None) -> torch.Tensor:
            with torch.inference_mode():
                x_in = x.to(device=device, dtype=dtype, memory_format=torch.channels_last)
                y_in = None if y is None else y.to(device, dtype)
                out = unet(x_in, timesteps.to(device), context.to(device, dtype), control, y_in)
                return out.to(device=x.device, dtype=x.dtype, memory_format=torch.contiguous_format)

        return forward



@dataclass(frozen=True, eq=False)
class ImageAutoencoder:
    """VAE: pixels [B,H,W,C] in 0..1 <-> unscaled latents [B,4,H/8,W/8]."""

    handle: ModelHandle
    config: VAEConfig
    dtype: torch.dtype
    source: str
    nbytes: int = 0

    def model_handles(self) -> tuple[ModelHandle, ...]:
        return (self.handle,)

    @property
    def downscale(self) -> int:
        return self.config.downscale

    def decode_working_bytes(self, latent_shape: tuple[int, ...]) -> int:
        """Memory a decode needs beside the weights (batches of VAE_DECODE_BATCH at a time)."""
        batch = min(latent_shape[0], VAE_DECODE_BATCH)
        elements = batch * math.prod(latent_shape[1:])
        return int(elements * VAE_DECODE_WORKING_PER_ELEMENT * _vae_factor(self.dtype)) + VAE_WORKING_MARGIN

    def encode_working_bytes(self, pixel_shape: tuple[int, ...]) -> int:
        batch = min(pixel_shape[0], VAE_DECODE_BATCH)
        pixels = batch * pixel_shape[1] * pixel_shape[2]
        return int(pixels * VAE_ENCODE_WORKING_PER_PIXEL * _vae_factor(self.dtype)) + VAE_WORKING_MARGIN

    def encode(self, pixels: torch.Tensor, vae: torch.nn.Module) -> torch.Tensor:
        """Encode RGB pixels (centre-cropped to a multiple of 8, as ComfyUI does) to the posterior mode."""
        pixels = crop_to_multiple(pixels[..., :3], self.downscale)
        device, dtype = torch.device(self.handle.device), self.dtype
        chunks = []
        with torch.inference_mode():
            for start in range(0, pixels.shape[0], VAE_DECODE_BATCH):
                batch = pixels[start:start + VAE_DECODE_BATCH].movedim(-1, 1) * 2.0 - 1.0
                batch = batch.to(device=device, dtype=dtype, memory_format=torch.channels_last)
                chunks.append(vae.encode(batch).to(device="cpu", dtype=torch.float32,
                                                   memory_format=torch.contiguous_format))
            return torch.cat(chunks)

    def decode(self, latent: torch.Tensor, vae: torch.nn.Module) -> torch.Tensor:
        """Pixels [B,H,W,3] in 0..1. A batch whose decode overflows (non-finite values, as SDXL's VAE gives in
        fp16) is decoded again in fp32, with a warning."""
        device, dtype = torch.device(self.handle.device), self.dtype
        chunks = []
        with torch.inference_mode():
            for start in range(0, latent.shape[0], VAE_DECODE_BATCH):
                z = latent[start:start + VAE_DECODE_BATCH].to(device=device, dtype=dtype,
                                                             memory_format=torch.channels_last)
                out = vae.decode(z)
                if dtype != torch.float32 and not torch.isfinite(out).all():
                    out = decode_in_fp32(vae, z, self.source, dtype)
                # NCHW channels_last is NHWC in memory: movedim gives a contiguous image without a copy
                chunks.append(torch.clamp((out.float() + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1).cpu())
            return torch.cat(chunks) if len(chunks) > 1 else chunks[0].contiguous()


def decode_in_fp32(vae: torch.nn.Module, z: torch.Tensor, source: str, dtype: torch.dtype) -> torch.Tensor:
    """The decode of `z` by an fp32 copy of the borrowed `vae` (the manager's copy stays as it is)."""
    log.warning("VAE decode in %s overflowed (non-finite pixels) with %s; decoding again in fp32", dtype, source)
    return copy.deepcopy(vae).float().decode(z.float())


def model_value(layout: PartLayout, family: Family, *, device: torch.device, precision: Precision,
                storage: torch.dtype | None = None) -> DiffusionModel:
    """MODEL for a checked UNet part (of a checkpoint or a bare UNet file); nothing read. With `storage` (an fp8
    dtype: UNETLoader's weight_dtype) the layers' weights are kept in it and computed in the policy's dtype
    (diffusion/weight_storage.py)."""
    kept = {prefix: torch.float32 for prefix in precision_sensitive_prefixes(layout.config)} \
        if precision.unet_output_fp32 else {}
    dtype = precision.unet
    if storage is not None:
        kept = storage_overrides(layout.matrix_keys, layout.keys, precision.unet, kept)
        dtype = storage
    unet = part_handle(layout, dtype=dtype, device=device, label="UNet", streamable=True, overrides=kept)
    return DiffusionModel(unet, layout.config, precision.unet, str(layout.file.path), _handle_bytes(layout),
                          family=family)


def checkpoint_values(layout: CheckpointLayout, *, device: torch.device, precision: Precision,
                      tokenizer: ClipTokenizer, embeddings_dir: Path | None = None,
                      allow_pickle: bool = False) -> tuple[DiffusionModel, TextEncoder, ImageAutoencoder]:
    """MODEL, CLIP and VAE values for a checked checkpoint; nothing is read until the manager loads a part."""
    clip = clip_value(layout.text_encoders, layout.family.clip_type, device=device, dtype=precision.text,
                      tokenizer=tokenizer, embeddings_dir=embeddings_dir, allow_pickle=allow_pickle)
    vae_dtype = safe_vae_dtype(precision.vae, device, layout.family)
    return (model_value(layout.unet, layout.family, device=device, precision=precision),
            clip,
            vae_value(layout.vae, device=device, dtype=vae_dtype))


def vae_value(layout: PartLayout, *, device: torch.device, dtype: torch.dtype) -> ImageAutoencoder:
    handle = part_handle(layout, dtype=dtype, device=device, label="VAE", streamable=True)
    return ImageAutoencoder(handle, layout.config, dtype, str(layout.file.path), _handle_bytes(layout))


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
