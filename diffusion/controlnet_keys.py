"""The diffusers layout of a ControlNet (`ControlNetModel.save_pretrained`'s diffusion_pytorch_model.safetensors,
the form most SDXL ControlNets are published in) under our names, which are the single-file layout's.

diffusers names the encoder half as it names a UNet's (`down_blocks.1.attentions.0...`, `mid_block.resnets.1`,
`time_embedding.linear_1`, SDXL's `add_embedding`), the hint encoder `controlnet_cond_embedding` (`conv_in`,
`blocks.0-5`, `conv_out`) and the zero convolutions `controlnet_down_blocks.N` and `controlnet_mid_block`. The
map is only a renaming: every tensor keeps its shape. It is computed from the keys alone (the number of levels and
of res blocks per level), so the architecture is then read from the renamed shapes as for a single-file ControlNet.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"
RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
         "add_embedding.linear_2": "label_emb.0.2", "controlnet_cond_embedding.conv_in": "input_hint_block.0",
         "controlnet_cond_embedding.conv_out": "input_hint_block.14", "controlnet_mid_block": "middle_block_out.0",
         "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
         "mid_block.resnets.1": "middle_block.2"}
_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)")
_NUMBERED = re.compile(r"(controlnet_down_blocks|controlnet_cond_embedding\.blocks)\.(\d+)")


def is_diffusers_controlnet(keys: Iterable[str]) -> bool:
    return DIFFUSERS_MARKER in set(keys)


def ldm_keys(keys: Iterable[str]) -> dict[str, str]:
    """{our name: the file's key} for a diffusers-layout ControlNet's keys; a key of no module we know keeps its
    own name (the file check then names it as unexpected)."""
    keys = list(keys)
    res_blocks = 1 + max((int(m.group(3)) for m in map(_DOWN.fullmatch, keys)
                          if m and m.group(1) == "0" and m.group(2) == "resnets"), default=0)
    renamed = {}
    for key in keys:
        renamed[ldm_name(key, res_blocks) or key] = key
    return renamed


def ldm_name(key: str, res_blocks: int) -> str | None:
    """Our name for one diffusers key (`down_blocks.1.resnets.0.conv1.weight` -> `input_blocks.4.0.in_layers.2.
    weight` with 2 res blocks per level), or None."""
    module, _, kind = key.rpartition(".")
    for prefix, ours in FIXED.items():
        if module == prefix or module.startswith(prefix + "."):
            return _resnet_rest(ours, module[len(prefix):].lstrip("."), prefix.startswith("mid_block.resnets"), kind)
    if m := _DOWN.fullmatch(module):
        level, what, index, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        first = 1 + level * (res_blocks + 1)
        if what == "downsamplers":
            return f"input_blocks.{first + res_blocks}.0.op.{kind}" if rest == "conv" and index == 0 else None
        block = f"input_blocks.{first + index}.{0 if what == 'resnets' else 1}"
        return _resnet_rest(block, rest, what == "resnets", kind)
    if m := _NUMBERED.fullmatch(module):
        n = int(m.group(2))
        ours = f"zero_convs.{n}.0" if m.group(1) == "controlnet_down_blocks" else f"input_hint_block.{2 * (n + 1)}"
        return f"{ours}.{kind}"
    return None


def _resnet_rest(block: str, rest: str, resnet: bool, kind: str) -> str | None:
    if not rest:
        return f"{block}.{kind}"
    if resnet:
        part = RESNET_PARTS.get(rest)
        return None if part is None else f"{block}.{part}.{kind}"
    return f"{block}.{rest}.{kind}"


def diffusers_keys(names: Iterable[str], res_blocks: int) -> dict[str, str]:
    """{diffusers key: our name}: the inverse of `ldm_keys`, for writing diffusers-layout files (tests, make-
    checkpoint) from our names."""
    resnet_names = {ours: theirs for theirs, ours in RESNET_PARTS.items()}
    out = {}
    for name in names:
        module, _, kind = name.rpartition(".")
        out[f"{_diffusers_module(module, res_blocks, resnet_names)}.{kind}"] = name
    return out


def _diffusers_module(module: str, res_blocks: int, resnet_names: dict[str, str]) -> str:
    for theirs, ours in FIXED.items():
        if module == ours or module.startswith(ours + "."):
            rest = module[len(ours):].lstrip(".")
            if rest and theirs.startswith("mid_block.resnets"):
                rest = resnet_names[rest]
            return f"{theirs}.{rest}" if rest else theirs
    parts = module.split(".")
    if parts[0] == "zero_convs":
        return f"controlnet_down_blocks.{parts[1]}"
    if parts[0] == "input_hint_block":
        return f"controlnet_cond_embedding.blocks.{int(parts[1]) // 2 - 1}"
    n, sub, rest = int(parts[1]), parts[2], ".".join(parts[3:])
    level, index = divmod(n - 1, res_blocks + 1)
    if index == res_blocks:
        return f"down_blocks.{level}.downsamplers.0.conv"
    if sub == "0":
        return f"down_blocks.{level}.resnets.{index}.{resnet_names[rest]}"
    return f"down_blocks.{level}.attentions.{index}.{rest}"
