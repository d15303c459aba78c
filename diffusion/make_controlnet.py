"""Random-weight ControlNets in the published single-file layout (control_v11p_sd15_*: `control_model.*` keys,
fp16), or the diffusers layout, for the checkpoints `make_checkpoint` writes: preset `tiny` fits its tiny
checkpoint, `sd15` SD1.5, `sdxl-tiny` / `sdxl` SDXL base (with the label embedding).

The key list comes from our own `ControlNet` built on the meta device; values follow `make_checkpoint`
(one generator per key, torch's default init). The "zero" convolutions, zero in an untrained ControlNet, get the
same init as the others so that the control visibly changes what the model predicts.

CLI: `sdgraph make-checkpoint OUT --kind controlnet --preset tiny|sd15 [--seed N]` calls `write_controlnet`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffusion.controlnet import PREFIX, ControlNet, ControlNetConfig
from diffusion.controlnet_keys import diffusers_keys
from diffusion.make_checkpoint import PRESETS, preset_config, random_weights, sort_header_metadata


def controlnet_layout(preset: str = "tiny") -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{key: (dtype, shape)} of a preset's ControlNet file, sorted by key, without allocating weights."""
    p = preset_config(preset)
    with torch.device("meta"):
        state = ControlNet(ControlNetConfig(p.unet)).state_dict()
    return dict(sorted((PREFIX + k, (p.dtype, tuple(t.shape))) for k, t in state.items()))


def diffusers_layout(preset: str = "tiny") -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The same ControlNet's {key: (dtype, shape)} in the diffusers layout (`ControlNetModel.save_pretrained`'s
    names: `controlnet_cond_embedding.*`, `down_blocks.*`, `controlnet_down_blocks.*`, ...)."""
    ours = {k.removeprefix(PREFIX): v for k, v in controlnet_layout(preset).items()}
    renamed = diffusers_keys(ours, preset_config(preset).unet.num_res_blocks)
    return dict(sorted((theirs, ours[name]) for theirs, name in renamed.items()))


def write_controlnet(path: str | os.PathLike, *, preset: str = "tiny", seed: int = 0,
                     diffusers: bool = False) -> Path:
    """Write the ControlNet for the `preset` checkpoint (see PRESETS), deterministic in (preset, seed); with
    `diffusers`, the same weights under the diffusers layout's names."""
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if preset not in PRESETS:
        raise ValueError(f"unknown ControlNet preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    metadata = {"format": "pt", "note": f"random ControlNet, preset {preset}, seed {seed}"}
    weights = random_weights(controlnet_layout(preset), seed)
    if diffusers:
        renamed = diffusers_keys([k.removeprefix(PREFIX) for k in weights], preset_config(preset).unet.num_res_blocks)
        weights = {theirs: weights[PREFIX + name] for theirs, name in renamed.items()}
    save_file(weights, partial, metadata=metadata)
    sort_header_metadata(partial, metadata)
    os.replace(partial, path)
    return path
