"""Random-weight checkpoints in the exact SD1 single-file layout, for tests, benchmarks and parity runs.

The key list comes from our own modules built on the meta device (nothing allocated), so it is the layout that
`load_checkpoint` expects; `sd15` matches the public SD1.5 file key for key, dtype for dtype, shape for shape.
Values follow shared/reference/parity/make_sd15_random.py, so `sd15` with seed 1 is that script's file byte for
byte: each tensor comes from its own generator seeded with (seed, crc32(key)); linear/conv weights and biases
uniform(+-1/sqrt(fan_in)) (torch's default), norm weights 1 + 0.1 N(0,1) and biases 0.1 N(0,1), embeddings
N(0,1); the UNet's output conv is halved so predictions are neither flat nor saturated.

CLI: `sdgraph make-checkpoint OUT --preset tiny|sd15 [--seed N] [--kind checkpoint|lora|controlnet]` calls `main`;
`--kind lora` writes a random kohya LoRA for the preset's checkpoint (diffusion/make_lora.py), `--kind controlnet`
a random ControlNet for it (diffusion/make_controlnet.py).
"""

import argparse
import itertools
import json
import math
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig

from diffusion.checkpoint import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from diffusion.text_encoder import POSITION_IDS, clip_text_config, expected_text_weights, text_encoder_on_meta
from diffusion.unet import UNetConfig, UNetModel
from diffusion.vae import AutoencoderKL, VAEConfig

OUTPUT_SCALES = MappingProxyType({f"{UNET_PREFIX}out.2": 0.5, f"{VAE_PREFIX}decoder.conv_out": 1.0})


@dataclass(frozen=True)
class Preset:
    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig
    dtype: torch.dtype


PRESETS = MappingProxyType({
    "sd15": Preset(
        unet=UNetConfig(),
        vae=VAEConfig(),
        text=clip_text_config(width=768, layers=12, intermediate_size=3072),
        dtype=torch.float16,
    ),
    # A few MB; one 64x64 step (UNet at 8x8 + VAE decode) takes milliseconds. Keeps the real CLIP vocabulary
    # and 77 positions, 8x VAE downsampling, 4 latent channels, and a transformer at every UNet level.
    "tiny": Preset(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                        context_dim=32),
        vae=VAEConfig(base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1),
        text=clip_text_config(width=32, layers=2, intermediate_size=128),
        dtype=torch.float16,
    ),
})  # fmt: skip


def checkpoint_layout(preset: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{key: (dtype, shape)} of a preset's file, sorted by key, computed without allocating any weights."""
    p = preset_config(preset)
    with torch.device("meta"):
        parts = {UNET_PREFIX: UNetModel(p.unet).state_dict(), VAE_PREFIX: AutoencoderKL(p.vae).state_dict()}
    text = expected_text_weights(text_encoder_on_meta(p.text))
    text.pop(POSITION_IDS, None)  # a non-persistent buffer in transformers, but SD1 files carry it
    parts[TEXT_PREFIX + "text_model."] = text
    layout = {prefix + k: (p.dtype, tuple(t.shape)) for prefix, sd in parts.items() for k, t in sd.items()}
    layout[f"{TEXT_PREFIX}text_model.{POSITION_IDS}"] = (torch.int64, (1, p.text.max_position_embeddings))
    return dict(sorted(layout.items()))


def preset_config(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown checkpoint preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def random_tensor(key: str, shape: tuple[int, ...], weight_shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The float32 value of one weight; `weight_shape` is the shape of the `.weight` beside it (or ())."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    stem = key.rsplit(".", 1)[0]
    if key.endswith("embedding.weight"):
        value = torch.randn(shape, generator=generator)
    elif len(shape) == 1 and len(weight_shape) == 1:  # a norm's scale or shift
        value = 0.1 * torch.randn(shape, generator=generator)
        if key.endswith(".weight"):
            value += 1.0
    else:
        fan_in = math.prod(weight_shape[1:]) if len(weight_shape) >= 2 else shape[0]
        value = (torch.rand(shape, generator=generator) * 2 - 1) * (1.0 / math.sqrt(fan_in))
    return value * OUTPUT_SCALES.get(stem, 1.0)


def random_weights(layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic values for every key of a {key: (dtype, shape)} layout (int64 tensors are position ids)."""
    out = {}
    for key, (dtype, shape) in layout.items():
        if dtype == torch.int64:
            out[key] = torch.arange(shape[-1], dtype=dtype).reshape(shape)
            continue
        weight_shape = layout.get(key.rsplit(".", 1)[0] + ".weight", (None, ()))[1]
        out[key] = random_tensor(key, tuple(shape), tuple(weight_shape), seed).to(dtype).contiguous()
    return out


def random_state_dict(preset: str = "tiny", seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors `make_checkpoint` writes, in memory."""
    return random_weights(checkpoint_layout(preset), seed)


def make_checkpoint(out_path: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight SD1-layout safetensors file, deterministic in (preset, seed); returns its path."""
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = random_state_dict(preset, seed)
    partial = out_path.with_name(out_path.name + ".partial")
    metadata = {"format": "pt", "note": f"random weights, seed {seed}"}
    save_file(state, partial, metadata=metadata)
    sort_header_metadata(partial, metadata)
    os.replace(partial, out_path)
    return out_path


def sort_header_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """Rewrite the header's `__metadata__` with sorted keys, in place and at the same length.

    safetensors writes metadata in hash-map order, which changes from process to process; sorted, the same
    (preset, seed) gives the same bytes every time (and `sd15` seed 1 the parity reference's bytes).
    """
    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        header = f.read(length)
        for order in itertools.permutations(metadata):
            written = json.dumps({k: metadata[k] for k in order}, separators=(",", ":")).encode()
            if header.count(written) == 1:
                break
        else:
            raise RuntimeError(f"{path}: safetensors wrote the metadata in an unexpected form")
        canonical = json.dumps(dict(sorted(metadata.items())), separators=(",", ":")).encode()
        f.seek(8 + header.index(written))
        f.write(canonical)


KINDS = ("checkpoint", "lora", "controlnet")


def _write_addon(kind: str, out: Path, *, preset: str, seed: int) -> Path:
    """A LoRA or ControlNet for the preset's checkpoint (imported only when asked for)."""
    if kind == "lora":
        from diffusion.make_lora import write_lora
        return write_lora(out, preset=preset, seed=seed)
    from diffusion.make_controlnet import write_controlnet
    return write_controlnet(out, preset=preset, seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sdgraph make-checkpoint",
        description="Write a random-weight checkpoint in the SD1 single-file layout (for tests and benchmarks).",
    )
    parser.add_argument("out", type=Path, help="output .safetensors path")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="tiny (a few MB) or sd15 (2 GB)")
    parser.add_argument("--seed", type=int, default=0, help="non-negative seed; same seed, same file")
    parser.add_argument("--kind", choices=KINDS, default="checkpoint",
                        help="checkpoint, or a LoRA / ControlNet made for the preset's checkpoint")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be non-negative, got {args.seed}")
    if args.kind != "checkpoint":
        path = _write_addon(args.kind, args.out, preset=args.preset, seed=args.seed)
        print(f"wrote {path}: {args.kind} for preset {args.preset}, seed {args.seed}, {path.stat().st_size:,} bytes")
        return 0
    path = make_checkpoint(args.out, preset=args.preset, seed=args.seed)
    params = sum(math.prod(shape) for _, shape in checkpoint_layout(args.preset).values())
    print(f"wrote {path}: preset {args.preset}, seed {args.seed}, {params:,} values, {path.stat().st_size:,} bytes")
    return 0
