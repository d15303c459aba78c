"""Random-weight checkpoints in the exact single-file layouts of SD1.5, SD2.1-v and SDXL, for tests, benchmarks and
parity runs.

The key list comes from our own modules built on the meta device (nothing allocated), so it is the layout that
`load_checkpoint` expects; `sd15` matches the public SD1.5 file key for key, dtype for dtype, shape for shape.
Values follow shared/reference/parity/make_sd15_random.py, so `sd15` with seed 1 is that script's file byte for
byte: each tensor comes from its own generator seeded with (seed, crc32(key)); linear/conv weights and biases
uniform(+-1/sqrt(fan_in)) (torch's default), norm weights 1 + 0.1 N(0,1) and biases 0.1 N(0,1), embeddings
N(0,1); the UNet's output conv is halved so predictions are neither flat nor saturated.

Other families (`sd21v`, `sdxl` full size; `sd21-tiny`, `sd21v-tiny`, `sdxl-tiny`, `sdxl-refiner-tiny`,
`sd15-inpaint-tiny` for tests) write their text encoders in the published layouts too: OpenCLIP towers
(`cond_stage_model.model.*` for SD2, `conditioner.embedders.1.model.*` for SDXL's bigG,
`conditioner.embedders.0.model.*` for the refiner's) with fused `attn.in_proj_weight`, and SDXL's CLIP-L under
`conditioner.embedders.0.transformer.text_model.*`. An SD2 file predicts v or eps as ComfyUI tells it: by the
population std of the UNet's output_blocks.11.1.transformer_blocks.0.norm1.bias (above 0.09: v), drawn with
std 0.2 for v presets and 0.02 for eps ones, as the parity kit's make_sd21_random.py does. OpenCLIP fused
in-projection biases take their weight's fan-in; logit_scale is ln(100). Tiny SDXL presets keep a 1280-wide
pooled projection, so their label vectors have SDXL's real widths (2816, 2560).

CLI: `sdgraph make-checkpoint OUT --preset tiny|sd15|... [--seed N] [--kind checkpoint|lora|controlnet]` calls `main`;
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
from dataclasses import dataclass, replace
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
class OpenClipShape:
    """An OpenCLIP text tower's size: width (64-wide heads), layers, and the width of its pooled projection."""

    width: int
    layers: int
    projection: int
    vocab_size: int = 49408
    positions: int = 77


@dataclass(frozen=True)
class Preset:
    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig | None  # the OpenAI CLIP-L (HF layout) text model, for SD1 and SDXL base
    dtype: torch.dtype
    family: str = "sd1"
    open_clip: OpenClipShape | None = None  # SD2's ViT-H, SDXL's bigG
    v_prediction: bool = False  # SD2: draw the probe bias so ComfyUI's rule reads v


SD21_UNET = UNetConfig(context_dim=1024, num_heads=None, head_dim=64, linear_projection=True)
SDXL_UNET = UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2), transformer_depth=(0, 2, 10), middle_depth=10,
                       context_dim=2048, num_heads=None, head_dim=64, linear_projection=True, adm_in_channels=2816)
WIDE = {"num_heads": None, "head_dim": 64, "linear_projection": True}
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                       context_dim=32)
TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1)
TINY_CLIP_L = clip_text_config(width=32, layers=2, intermediate_size=128)
TINY_OPEN_CLIP = OpenClipShape(width=64, layers=2, projection=64)

PRESETS = MappingProxyType({
    "sd15": Preset(
        unet=UNetConfig(),
        vae=VAEConfig(),
        text=clip_text_config(width=768, layers=12, intermediate_size=3072),
        dtype=torch.float16,
    ),
    # A few MB; one 64x64 step (UNet at 8x8 + VAE decode) takes milliseconds. Keeps the real CLIP vocabulary
    # and 77 positions, 8x VAE downsampling, 4 latent channels, and a transformer at every UNet level.
    "tiny": Preset(unet=TINY_UNET, vae=TINY_VAE, text=TINY_CLIP_L, dtype=torch.float16),
    "sd15-inpaint-tiny": Preset(unet=replace(TINY_UNET, in_channels=9), vae=TINY_VAE, text=TINY_CLIP_L,
                                dtype=torch.float16, family="sd1_inpaint"),
    "sd21v": Preset(unet=SD21_UNET, vae=VAEConfig(), text=None, dtype=torch.float16, family="sd2",
                    open_clip=OpenClipShape(width=1024, layers=24, projection=1024), v_prediction=True),
    # SD2's tiny UNet keeps 4 levels of 2 res blocks, so output_blocks.11.1 (ComfyUI's v probe) exists
    "sd21-tiny": Preset(unet=UNetConfig(model_channels=64, channel_mult=(1, 1, 1, 1), attention_levels=(0, 1),
                                        context_dim=64, **WIDE),
                        vae=TINY_VAE, text=None, dtype=torch.float16, family="sd2", open_clip=TINY_OPEN_CLIP),
    "sdxl": Preset(unet=SDXL_UNET, vae=VAEConfig(), text=clip_text_config(width=768, layers=12, intermediate_size=3072),
                   dtype=torch.float16, family="sdxl", open_clip=OpenClipShape(width=1280, layers=32, projection=1280)),
    # SDXL's shape (no transformer at level 0, deeper ones below, a label embedding of 2816) at small widths
    "sdxl-tiny": Preset(unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
                                        attention_levels=(1, 2), transformer_depth=(0, 1, 2), middle_depth=2,
                                        context_dim=96, adm_in_channels=2816, **WIDE),
                        vae=TINY_VAE, text=TINY_CLIP_L, dtype=torch.float16, family="sdxl",
                        open_clip=OpenClipShape(width=64, layers=2, projection=1280)),
    "sdxl-refiner-tiny": Preset(unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                                                attention_levels=(1, 2), transformer_depth=(0, 1, 1, 0),
                                                middle_depth=1, context_dim=64, adm_in_channels=2560, **WIDE),
                                vae=TINY_VAE, text=None, dtype=torch.float16, family="sdxl_refiner",
                                open_clip=OpenClipShape(width=64, layers=2, projection=1280)),
})  # fmt: skip
PRESETS = MappingProxyType({**PRESETS, "sd21v-tiny": replace(PRESETS["sd21-tiny"], v_prediction=True)})

HF_TEXT_PREFIXES = MappingProxyType({"sd1": TEXT_PREFIX, "sdxl": "conditioner.embedders.0.transformer."})
OPEN_CLIP_PREFIXES = MappingProxyType({"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model.",
                                       "sdxl_refiner": "conditioner.embedders.0.model."})
V_PROBE = f"{UNET_PREFIX}output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PROBE_SCALES = (0.2, 2.0)  # x the usual 0.1 N(0,1) of a norm bias: std 0.02 (eps) or 0.2 (v)


def open_clip_layout(shape: OpenClipShape) -> dict[str, tuple[int, ...]]:
    """{key: shape} of an OpenCLIP text tower (open_clip's own names, fused attention in-projection)."""
    w = shape.width
    layout = {"positional_embedding": (shape.positions, w), "token_embedding.weight": (shape.vocab_size, w),
              "ln_final.weight": (w,), "ln_final.bias": (w,), "text_projection": (w, shape.projection),
              "logit_scale": ()}
    for i in range(shape.layers):
        block = {"attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,), "attn.out_proj.weight": (w, w),
                 "attn.out_proj.bias": (w,), "ln_1.weight": (w,), "ln_1.bias": (w,), "ln_2.weight": (w,),
                 "ln_2.bias": (w,), "mlp.c_fc.weight": (4 * w, w), "mlp.c_fc.bias": (4 * w,),
                 "mlp.c_proj.weight": (w, 4 * w), "mlp.c_proj.bias": (w,)}
        layout.update({f"transformer.resblocks.{i}.{k}": v for k, v in block.items()})
    return layout


def _text_layout(p: Preset) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    layout = {}
    if p.text is not None:
        prefix = HF_TEXT_PREFIXES["sdxl" if p.family == "sdxl" else "sd1"] + "text_model."
        text = expected_text_weights(text_encoder_on_meta(p.text))
        text.pop(POSITION_IDS, None)  # a non-persistent buffer in transformers, but SD1 and SDXL files carry it
        layout.update({prefix + k: (p.dtype, tuple(t.shape)) for k, t in text.items()})
        layout[prefix + POSITION_IDS] = (torch.int64, (1, p.text.max_position_embeddings))
    if p.open_clip is not None:
        prefix = OPEN_CLIP_PREFIXES[p.family.removesuffix("_inpaint")]
        layout.update({prefix + k: (p.dtype, shape) for k, shape in open_clip_layout(p.open_clip).items()})
    return layout


def checkpoint_layout(preset: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{key: (dtype, shape)} of a preset's file, sorted by key, computed without allocating any weights."""
    p = preset_config(preset)
    with torch.device("meta"):
        parts = {UNET_PREFIX: UNetModel(p.unet).state_dict(), VAE_PREFIX: AutoencoderKL(p.vae).state_dict()}
    layout = {prefix + k: (p.dtype, tuple(t.shape)) for prefix, sd in parts.items() for k, t in sd.items()}
    layout.update(_text_layout(p))
    return dict(sorted(layout.items()))


def weight_scales(preset: str) -> dict[str, float]:
    """{key stem or key: factor} applied to the random values (output layers; SD2's v-prediction probe)."""
    p = preset_config(preset)
    scales = dict(OUTPUT_SCALES)
    if p.family.startswith("sd2"):
        scales[V_PROBE] = V_PROBE_SCALES[p.v_prediction]
    return scales


def preset_config(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown checkpoint preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def random_tensor(key: str, shape: tuple[int, ...], weight_shape: tuple[int, ...], seed: int,
                  scales: Mapping[str, float] = OUTPUT_SCALES) -> torch.Tensor:
    """The float32 value of one weight; `weight_shape` is the shape of the `.weight` beside it (or ()).
    `scales` multiplies the values of a key, or of every key of a stem (`out.2` for its weight and bias)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    stem = key.rsplit(".", 1)[0]
    if key.endswith("logit_scale"):
        return torch.full(shape, math.log(100.0))
    if key.endswith(("embedding.weight", "positional_embedding")):
        value = torch.randn(shape, generator=generator)
    elif len(shape) == 1 and len(weight_shape) == 1:  # a norm's scale or shift
        value = 0.1 * torch.randn(shape, generator=generator)
        if key.endswith(".weight"):
            value += 1.0
    else:
        fan_in = math.prod(weight_shape[1:]) if len(weight_shape) >= 2 else shape[0]
        value = (torch.rand(shape, generator=generator) * 2 - 1) * (1.0 / math.sqrt(fan_in))
    return value * scales.get(key, scales.get(stem, 1.0))


def random_weights(layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], seed: int,
                   scales: Mapping[str, float] = OUTPUT_SCALES) -> dict[str, torch.Tensor]:
    """Deterministic values for every key of a {key: (dtype, shape)} layout (int64 tensors are position ids)."""
    out = {}
    for key, (dtype, shape) in layout.items():
        if dtype == torch.int64:
            out[key] = torch.arange(shape[-1], dtype=dtype).reshape(shape)
            continue
        stem, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        weight = f"{stem}.in_proj_weight" if leaf == "in_proj_bias" else f"{stem}.weight"
        weight_shape = layout.get(weight, (None, ()))[1]
        out[key] = random_tensor(key, tuple(shape), tuple(weight_shape), seed, scales).to(dtype).contiguous()
    return out


def random_state_dict(preset: str = "tiny", seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors `make_checkpoint` writes, in memory."""
    return random_weights(checkpoint_layout(preset), seed, weight_scales(preset))


def make_checkpoint(out_path: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight single-file checkpoint of the preset's family, deterministic in (preset, seed);
    returns its path."""
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


def _write_addon(kind: str, out: Path, *, preset: str, seed: int, diffusers: bool = False) -> Path:
    """A LoRA or ControlNet for the preset's checkpoint (imported only when asked for)."""
    if kind == "lora":
        from diffusion.make_lora import write_lora
        return write_lora(out, preset=preset, seed=seed)
    if preset_config(preset).unet.in_channels != 4:
        plain = ", ".join(name for name, p in PRESETS.items() if p.unet.in_channels == 4)
        raise ValueError(f"--kind controlnet is made for presets with a 4-channel UNet ({plain}), not the "
                         f"inpainting preset {preset!r}")
    from diffusion.make_controlnet import write_controlnet
    return write_controlnet(out, preset=preset, seed=seed, diffusers=diffusers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sdgraph make-checkpoint",
        description="Write a random-weight single-file checkpoint (SD1.5, SD2.1-v, SDXL layouts) for tests and "
                    "benchmarks.",
    )
    parser.add_argument("out", type=Path, help="output .safetensors path")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny presets are a few MB; sd15 2 GB, sd21v 2.6 GB, sdxl 6.9 GB")
    parser.add_argument("--seed", type=int, default=0, help="non-negative seed; same seed, same file")
    parser.add_argument("--kind", choices=KINDS, default="checkpoint",
                        help="checkpoint, or a LoRA / ControlNet made for the preset's checkpoint")
    parser.add_argument("--diffusers", action="store_true",
                        help="--kind controlnet: the diffusers layout (diffusion_pytorch_model.safetensors' names)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be non-negative, got {args.seed}")
    if args.kind != "checkpoint":
        try:
            path = _write_addon(args.kind, args.out, preset=args.preset, seed=args.seed,
                                diffusers=args.diffusers)
        except ValueError as e:
            parser.error(str(e))
        print(f"wrote {path}: {args.kind} for preset {args.preset}, seed {args.seed}, {path.stat().st_size:,} bytes")
        return 0
    path = make_checkpoint(args.out, preset=args.preset, seed=args.seed)
    params = sum(math.prod(shape) for _, shape in checkpoint_layout(args.preset).values())
    print(f"wrote {path}: preset {args.preset}, seed {args.seed}, {params:,} values, {path.stat().st_size:,} bytes")
    return 0
