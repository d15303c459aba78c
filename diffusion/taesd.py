"""TAESD's decoder (madebyollin's tiny autoencoder): a 1.2M-parameter network that turns SD latents into a
rough RGB image in milliseconds, for live previews. The module layout mirrors the published weight files
(`taesd_decoder.safetensors` for SD1/SD2, `taesdxl_decoder.safetensors` for SDXL, in models/vae_approx/), so they
load with no key map. Input: latents in model space (latent * scale factor); output: RGB in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

DECODER_FILES = {"sd1": "taesd_decoder", "sdxl": "taesdxl_decoder"}  # ComfyUI's names, by latent format
WEIGHT_SUFFIXES = (".safetensors", ".pth")


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def decoder(latent_channels: int = 4, width: int = 64) -> nn.Sequential:
    """Clamp, a stem, then three (3 blocks, 2x upsample, conv) stages, a last block and the RGB conv."""
    layers: list[nn.Module] = [Clamp(), _conv(latent_channels, width), nn.ReLU()]
    for _ in range(3):
        layers += [Block(width, width), Block(width, width), Block(width, width), nn.Upsample(scale_factor=2),
                   _conv(width, width, bias=False)]
    layers += [Block(width, width), _conv(width, 3)]
    return nn.Sequential(*layers)


def find_weights(folder: Path, latent_format: str) -> Path | None:
    """The TAESD decoder file for a latent format ("sd1" or "sdxl") in `folder`, or None."""
    stem = DECODER_FILES.get(latent_format)
    if stem is None:
        return None
    return next((folder / (stem + s) for s in WEIGHT_SUFFIXES if (folder / (stem + s)).is_file()), None)


def load_decoder(path: Path) -> nn.Sequential:
    """A TAESD decoder with the weights in `path` (safetensors; .pth only as plain tensors, weights_only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    network = decoder(latent_channels=state["1.weight"].shape[1])
    network.load_state_dict(state)
    return network.eval()


@torch.inference_mode()
def decode(network: nn.Module, latent: torch.Tensor) -> torch.Tensor:
    """[C, h, w] model-space latent -> [h*8, w*8, 3] RGB in [0, 1]."""
    return network(latent[None].float()).clamp(0, 1)[0].movedim(0, -1)
