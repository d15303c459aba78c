"""Which weight of our model a LoRA key names, for every naming scheme LoRA files use.

Our UNet's attribute names are the LDM checkpoint's (`input_blocks.1.1.proj_in`), our text encoder's are
transformers' CLIP names (`encoder.layers.0.mlp.fc1`). LoRA trainers name the same layers in other ways:

- kohya: `lora_unet_` + the diffusers name with `_` for `.` (`lora_unet_down_blocks_0_attentions_0_proj_in`), or
  the LDM name the same way (`lora_unet_input_blocks_1_1_proj_in`); `lora_te_` + the transformers name
  (`lora_te_text_model_encoder_layers_0_mlp_fc1`); SDXL's two encoders are `lora_te1_` (CLIP-L) and `lora_te2_`
  (OpenCLIP bigG);
- diffusers/PEFT: `unet.` + the diffusers name, `text_encoder.text_model.` (SDXL's bigG: `text_encoder_2.`) + the
  transformers name (older
  diffusers files say `...attn1.processor.to_q` for `...attn1.to_q`);
- LDM names as in the checkpoint (`diffusion_model.`, `model.diffusion_model.`).

The maps are computed from the model's config (as ComfyUI's `unet_to_diffusers` does for its models), so any
layout that loads (SD1, SD2, SDXL, tiny test models included) gets its keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import torch
from transformers import CLIPTextConfig

from .unet import UNetConfig, UNetModel

RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
TOP_NAMES = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
PREFIXES_DROPPED = ("base_model.model.",)  # PEFT's wrapper prefix


def _blocks(config: UNetConfig) -> Iterator[tuple[str, str, str]]:
    """(LDM block prefix, diffusers prefix, kind) for every block of the UNet; kind is resnet, attention or the
    name of the sampler's convolution in LDM ("op" for downsamplers, "conv" for upsamplers)."""
    per_level = config.num_res_blocks + 1
    last = len(config.channel_mult) - 1
    for level in range(len(config.channel_mult)):
        for i in range(config.num_res_blocks):
            n = 1 + level * per_level + i
            yield f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{i}", "resnet"
            yield f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{i}", "attention"
        if level != last:
            yield f"input_blocks.{1 + level * per_level + config.num_res_blocks}.0.op", \
                f"down_blocks.{level}.downsamplers.0.conv", "sampler"
    yield "middle_block.0", "mid_block.resnets.0", "resnet"
    yield "middle_block.1", "mid_block.attentions.0", "attention"
    yield "middle_block.2", "mid_block.resnets.1", "resnet"
    for up in range(len(config.channel_mult)):
        level = last - up
        attention = level in config.attention_levels
        for i in range(per_level):
            n = up * per_level + i
            yield f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{i}", "resnet"
            yield f"output_blocks.{n}.1", f"up_blocks.{up}.attentions.{i}", "attention"
            if level != 0 and i == config.num_res_blocks:
                yield f"output_blocks.{n}.{2 if attention else 1}.conv", f"up_blocks.{up}.upsamplers.0.conv", \
                    "sampler"


def diffusers_name(module: str, config: UNetConfig) -> str | None:
    """The diffusers name of one of our UNet's modules (`input_blocks.1.1.proj_in` ->
    `down_blocks.0.attentions.0.proj_in`), or None when diffusers has no such module."""
    if module in TOP_NAMES:
        return TOP_NAMES[module]
    for ldm, diffusers, kind in _blocks(config):
        if kind == "sampler" and module == ldm:
            return diffusers
        if kind != "sampler" and module.startswith(ldm + "."):
            rest = module[len(ldm) + 1:]
            if kind == "resnet":
                rest = RESNET_NAMES.get(rest)
            return None if rest is None else f"{diffusers}.{rest}"
    return None


def unet_weight_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of our UNet for `config`, without allocating it."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in UNetModel(config).state_dict().items()}


def text_weight_shapes(config: CLIPTextConfig) -> dict[str, tuple[int, ...]]:
    """{parameter name relative to the text model (`encoder.layers.0.mlp.fc1.weight`): shape}."""
    from .text_encoder import expected_text_weights, text_encoder_on_meta

    return {k: tuple(v.shape) for k, v in expected_text_weights(text_encoder_on_meta(config)).items()
            if v.is_floating_point()}


def _unet_aliases(module: str, config: UNetConfig) -> list[str]:
    names = [f"lora_unet_{module.replace('.', '_')}", f"diffusion_model.{module}", f"model.diffusion_model.{module}"]
    diffusers = diffusers_name(module, config)
    if diffusers is not None:
        processor = diffusers.replace(".to_", ".processor.to_").removesuffix(".0") \
            if ".attn" in diffusers else diffusers
        names += [f"lora_unet_{diffusers.replace('.', '_')}", f"unet.{diffusers}", diffusers, f"unet.{processor}"]
    return names


# The kohya and diffusers prefixes of each text encoder of a two-encoder CLIP (SDXL base), as ComfyUI maps them:
# te1 / text_encoder is CLIP-L (which also answers to lora_te_), te2 / text_encoder_2 is OpenCLIP bigG.
PAIRED_TEXT_PREFIXES = MappingProxyType({"clip_l": (("lora_te_", "lora_te1_"), "text_encoder."),
                                         "open_clip_g": (("lora_te2_",), "text_encoder_2.")})
SINGLE_TEXT_PREFIXES = (("lora_te_", "lora_te1_"), "text_encoder.")  # te1: ComfyUI accepts it too


def _text_aliases(module: str, prefixes: tuple[tuple[str, ...], str] = SINGLE_TEXT_PREFIXES,
                  bare: bool = True) -> list[str]:
    """A text-encoder module's LoRA key prefixes: kohya (`lora_te_text_model_encoder_layers_0_mlp_fc1`),
    diffusers (`text_encoder.text_model.encoder.layers.0.mlp.fc1`) and, with `bare`, the transformers name."""
    kohya, diffusers = prefixes
    full = module if module == "text_projection" else f"text_model.{module}"  # the projection sits outside
    flat = full.replace(".", "_")
    return [*(f"{k}{flat}" for k in kohya), f"{diffusers}{full}", *([full] if bare else [])]


def lora_targets(unet: UNetConfig | None,
                 text: CLIPTextConfig | Mapping[str, CLIPTextConfig] | None) -> dict[str, tuple[str, str, tuple]]:
    """{LoRA key prefix: (part, parameter name, shape)} for the model's weights (biases get `prefix` + `.bias`
    pseudo-prefixes, used by full-difference `diff_b` patches). `text` is one encoder's config, or {encoder name:
    config} for SDXL base's two, whose parameter names then start with the encoder's name (`clip_l.encoder...`)."""
    targets: dict[str, tuple[str, str, tuple]] = {}
    parts = []
    if unet is not None:
        parts.append(("unet", unet_weight_shapes(unet), lambda m: _unet_aliases(m, unet)))
    if isinstance(text, CLIPTextConfig):
        parts.append(("text_encoder", text_weight_shapes(text), _text_aliases))
    elif text is not None:
        for encoder, config in text.items():
            shapes = {f"{encoder}.{name}": shape for name, shape in text_weight_shapes(config).items()}
            prefixes = PAIRED_TEXT_PREFIXES[encoder]
            parts.append(("text_encoder", shapes,
                          lambda m, p=prefixes: _text_aliases(m.partition(".")[2], p, bare=False)))
    for part, shapes, aliases in parts:
        for name, shape in shapes.items():
            module, _, kind = name.rpartition(".")
            if kind not in ("weight", "bias") or math.prod(shape) == 0:
                continue
            for alias in aliases(module):
                targets[alias if kind == "weight" else f"{alias}#bias"] = (part, name, shape)
    return targets


def strip_wrapper(prefix: str) -> str:
    for dropped in PREFIXES_DROPPED:
        prefix = prefix.removeprefix(dropped)
    return prefix


OTHER_FAMILY_MARKERS = (
    ("lora_te2_", "sdxl", "SDXL (two text encoders)"),
    ("text_encoder_2.", "sdxl", "SDXL (two text encoders)"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_1", "sdxl", "SDXL"),
    ("lora_unet_double_blocks", "flux", "Flux"), ("lora_transformer_", "dit", "a DiT model (Flux, SD3)"),
    ("transformer.transformer_blocks", "dit", "a DiT model (Flux, SD3)"), ("lora_unet_joint_blocks", "sd3", "SD3"),
)  # fmt: skip


def family_hint(keys: list[str], family: str = "sd1", label: str = "SD1.x") -> str:
    """' It looks made for X, not <label>.' from marker key prefixes of another family than `family`, else ''."""
    for marker, made_for, name in OTHER_FAMILY_MARKERS:
        if made_for != family.removesuffix("_inpaint") and any(k.startswith(marker) for k in keys):
            return f" It looks made for {name}, not {label}."
    return ""
