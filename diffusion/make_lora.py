"""Random kohya LoRAs for the random checkpoints of `make_checkpoint` (tests, benchmarks, `graphs/lora.json`).

Like the parity kit's generator (shared/reference/parity-extra/gen/make_lora_kohya.py): every attention-block
layer the kohya trainer targets (each transformer's proj_in/proj_out, attention projections and feed-forward; the
text encoders' attention and MLP projections, SDXL base's two as `lora_te1_`/`lora_te2_`) gets `lora_down`,
`lora_up` and `alpha`, drawn from its own generator seeded with (seed, crc32(key)); down ~ N(0,1)/sqrt(fan_in), up
scaled so that the patch's element spread is `rel` times that of the layer's own weights. Stored in fp16, as
published LoRAs are.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig

from .lora_keys import diffusers_name, text_weight_shapes, unet_weight_shapes
from .make_checkpoint import PRESETS, Preset
from .text_encoder import OPENCLIP_ACTIVATION, clip_text_config

ALPHA = 4.0
UNET_LAYERS = ("proj_in", "proj_out", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
               "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
               "mlp.fc2")


def kohya_layers(preset: str) -> dict[str, tuple[int, ...]]:
    """{kohya layer name: the shape of the weight it patches} for a checkpoint preset."""
    p = PRESETS[preset]
    layers = {}
    for name, shape in unet_weight_shapes(p.unet).items():
        module = name.removesuffix(".weight")
        diffusers = diffusers_name(module, p.unet)
        if name.endswith(".weight") and diffusers and diffusers.endswith(UNET_LAYERS) and ".attentions." in diffusers:
            layers["lora_unet_" + diffusers.replace(".", "_")] = shape
    for prefix, config in text_configs(p).items():
        for name, shape in text_weight_shapes(config).items():
            if name.endswith(".weight") and name.removesuffix(".weight").endswith(TEXT_LAYERS):
                layers[prefix + "text_model_" + name.removesuffix(".weight").replace(".", "_")] = shape
    return dict(sorted(layers.items()))


def text_configs(p: Preset) -> dict[str, CLIPTextConfig]:
    """{kohya prefix: text encoder config}: SDXL base's CLIP-L is `lora_te1_` and its bigG `lora_te2_`; a model
    with one encoder (SD1's CLIP-L, SD2's ViT-H, the SDXL refiner's bigG) is `lora_te_`."""
    towers = [p.text] if p.text is not None else []
    if p.open_clip is not None:
        shape = p.open_clip
        towers.append(clip_text_config(width=shape.width, layers=shape.layers, intermediate_size=4 * shape.width,
                                       hidden_act=OPENCLIP_ACTIVATION, projection_dim=shape.projection))
    if len(towers) == 2:
        return {"lora_te1_": towers[0], "lora_te2_": towers[1]}
    return {"lora_te_": towers[0]} if towers else {}


def _draw(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    return torch.randn(shape, generator=generator)


def random_lora(preset: str = "tiny", seed: int = 0, rank: int = 4, rel: float = 1.0) -> dict[str, torch.Tensor]:
    out = {}
    for layer, shape in kohya_layers(preset).items():
        fan_in = math.prod(shape[1:])
        r = min(rank, shape[0], fan_in)
        down_shape, up_shape = (r, *shape[1:]), (shape[0], r, *[1] * (len(shape) - 2))
        out[f"{layer}.lora_down.weight"] = _draw(f"{layer}.lora_down.weight", down_shape, seed) / math.sqrt(fan_in)
        up_scale = rel * math.sqrt(r) / (ALPHA * math.sqrt(3.0))
        out[f"{layer}.lora_up.weight"] = _draw(f"{layer}.lora_up.weight", up_shape, seed) * up_scale
        out[f"{layer}.alpha"] = torch.tensor(ALPHA)
    return {k: v.to(torch.float16).contiguous() for k, v in out.items()}


def write_lora(path: str | os.PathLike, *, preset: str = "tiny", seed: int = 0, rank: int = 4,
               rel: float = 1.0) -> Path:
    """Write a random kohya LoRA for the checkpoint preset; deterministic in its arguments."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(random_lora(preset, seed, rank, rel), partial,
              metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    os.replace(partial, path)
    return path
