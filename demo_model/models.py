"""Architectures of the demo model (and a micro one for tests), and its export to the SD1 single-file layout.

The networks are the project's own (`diffusion.unet`, `diffusion.vae`, a transformers CLIPTextModel), so a
state dict with SD1's prefixes is all the export needs: `load_checkpoint` reads the architecture back from the
shapes. The UNet keeps SD1's 8 attention heads, which is what `unet_config_from_state_dict` assumes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save
from transformers import CLIPTextConfig, CLIPTextModel

from diffusion.checkpoint import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from diffusion.text_encoder import POSITION_IDS, clip_text_config, expected_text_weights, strip_text_model_prefix
from diffusion.unet import UNetConfig, UNetModel
from diffusion.vae import AutoencoderKL, VAEConfig
from engine.files import atomic_write

LATENT_SCALE = 0.18215  # SD1's factor, applied by the sampler; the exported VAE is rescaled to match it


@dataclass(frozen=True)
class DemoArchitecture:
    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig


def demo_architecture() -> DemoArchitecture:
    """The shipped model: about 24 MB in fp16, most of it the 49,408 x 128 token embedding.

    The VAE is 32 wide at full resolution, the narrowest SD1's 32-group GroupNorms allow. With one channel per
    group the decoder's last norm removes each channel's mean level, so flat colours are slow to learn; wider is
    better but costs 4x per step on 2 cores (see docs/demo-model.md).
    """
    return DemoArchitecture(
        unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                        context_dim=128),
        vae=VAEConfig(base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1),
        text=clip_text_config(width=128, layers=2, intermediate_size=512),
    )  # fmt: skip


def micro_architecture() -> DemoArchitecture:
    """For tests: the same layout with the narrowest widths the GroupNorms allow."""
    return DemoArchitecture(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                        context_dim=64),
        vae=VAEConfig(base_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1),
        text=clip_text_config(width=64, layers=1, intermediate_size=128),
    )  # fmt: skip


ARCHITECTURES = {"demo": demo_architecture, "micro": micro_architecture}


def new_vae(arch: DemoArchitecture, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(arch.vae)


def new_denoiser(arch: DemoArchitecture, seed: int) -> tuple[UNetModel, CLIPTextModel]:
    torch.manual_seed(seed)
    unet = UNetModel(arch.unet)
    text = CLIPTextModel(arch.text)
    return unet, text


def text_state(text: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The text model's weights keyed as SD1 files key them under `cond_stage_model.transformer.text_model.`."""
    return expected_text_weights(text)


def rescale_vae(vae: AutoencoderKL, factor: float) -> None:
    """Multiply the latent space by `factor` without changing what the VAE computes end to end: the encoder's
    mean (and standard deviation) scale up, `post_quant_conv` divides its input back."""
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[:channels] *= factor
        vae.quant_conv.bias[:channels] *= factor
        vae.quant_conv.bias[channels:] += 2 * torch.log(torch.tensor(factor))
        vae.post_quant_conv.weight /= factor


def sd1_state_dict(unet: UNetModel, vae: AutoencoderKL, text: CLIPTextModel,
                   dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """All three parts under SD1's prefixes, floats in `dtype`, plus the int64 position ids SD1 files carry."""
    parts = {UNET_PREFIX: unet.state_dict(), VAE_PREFIX: vae.state_dict()}
    text_weights = text_state(text)
    positions = text_weights.pop(POSITION_IDS, None)
    parts[TEXT_PREFIX + "text_model."] = text_weights
    out = {prefix + k: v.detach().to(dtype).contiguous() for prefix, sd in parts.items() for k, v in sd.items()}
    length = text.config.max_position_embeddings
    ids = positions if positions is not None else torch.arange(length)[None]
    out[f"{TEXT_PREFIX}text_model.{POSITION_IDS}"] = ids.to(torch.int64).reshape(1, length).contiguous()
    return dict(sorted(out.items()))


def export_checkpoint(path: str | os.PathLike, unet: UNetModel, vae: AutoencoderKL, text: CLIPTextModel,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write the SD1 single-file checkpoint (fp16) atomically; returns its path."""
    data = save(sd1_state_dict(unet, vae, text), metadata={"format": "pt", **(metadata or {})})
    path = atomic_write(path, data)
    path.chmod(0o644)  # a file to commit and share, not a private temporary
    return path


def load_parts(path: str | os.PathLike, arch: DemoArchitecture) -> tuple[UNetModel, AutoencoderKL, CLIPTextModel]:
    """The UNet, VAE and text encoder of an exported demo checkpoint, as float32 training modules of `arch`."""
    from safetensors.torch import load_file

    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    unet, text = new_denoiser(arch, 0)
    vae = new_vae(arch, 0)
    try:
        unet.load_state_dict(part(UNET_PREFIX))
        vae.load_state_dict(part(VAE_PREFIX))
    except RuntimeError as error:
        raise ValueError(f"{path}: not a demo checkpoint of this architecture; pass the matching --arch "
                         f"({str(error).splitlines()[0]})") from error
    stored = strip_text_model_prefix(part(TEXT_PREFIX))
    names = dict(zip(text_state(text), text.state_dict(), strict=True))  # stripped key -> module key
    missing = sorted(set(names) - set(stored) - {POSITION_IDS})
    if missing:
        raise ValueError(f"{path}: not a demo checkpoint of this architecture (text weights missing: "
                         f"{missing[:3]}); pass the matching --arch")
    text.load_state_dict({names[k]: v for k, v in stored.items() if k in names and k != POSITION_IDS},
                         strict=False)
    return unet, vae, text


def round_to_fp16(*modules: torch.nn.Module) -> None:
    """Round every weight to float16 and back, in place: the weights an fp16 export holds."""
    with torch.no_grad():
        for module in modules:
            for tensor in module.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half().float())
