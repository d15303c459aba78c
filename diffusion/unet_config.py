"""The UNet's architecture (`UNetConfig`) and how it is read back from the shapes of a state dict.

One config describes SD1.x, SD2.x and SDXL UNets (diffusion/unet.py builds them): the levels' widths, which
levels have transformers and how deep (per level for SDXL), the heads (SD1: 8 per transformer; SD2/SDXL: 64-wide),
Linear or 1x1-conv projections, and SDXL's label embedding width.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

GROUPS = 32  # every GroupNorm in the UNet uses 32 groups


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of an LDM UNet. The defaults are SD1.5's."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels (indices into channel_mult) with a transformer
    transformer_depth: int | tuple[int, ...] = 1  # one depth for every attention level, or one per level (SDXL)
    context_dim: int = 768
    num_heads: int | None = 8  # SD1: a fixed head count per level...
    head_dim: int | None = None  # ...SD2/SDXL: a fixed head width (64); exactly one of the two is set
    linear_projection: bool = False  # proj_in/proj_out as Linear (SD2.1, SDXL) instead of 1x1 convs (SD1)
    middle_depth: int | None = None  # the middle block's transformer depth; None: transformer_depth (an int)
    adm_in_channels: int | None = None  # SDXL: width of the label vector y (2816 base, 2560 refiner)

    def __post_init__(self):
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(f"set exactly one of num_heads and head_dim, got {self.num_heads} and {self.head_dim}")
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} outside the {len(self.channel_mult)} levels of channel_mult")
        if isinstance(self.transformer_depth, tuple):
            if len(self.transformer_depth) != len(self.channel_mult):
                raise ValueError(f"transformer_depth {self.transformer_depth} needs one depth per level of "
                                 f"channel_mult {self.channel_mult}")
            with_attention = tuple(i for i, d in enumerate(self.transformer_depth) if d > 0)
            if with_attention != tuple(self.attention_levels):
                raise ValueError(f"attention_levels {self.attention_levels} disagree with the levels of nonzero "
                                 f"transformer_depth {self.transformer_depth}")
            if self.middle_depth is None:
                raise ValueError("a transformer_depth per level needs middle_depth too")
            if len({d for d in self.transformer_depth if d} | {self.middle_depth}) == 1:  # one depth: the int form
                object.__setattr__(self, "transformer_depth", self.middle_depth)
                object.__setattr__(self, "middle_depth", None)
        for level, width in enumerate(self.level_channels):
            if width % GROUPS:
                raise ValueError(f"channel width {width} is not divisible by the {GROUPS} GroupNorm groups")
            heads, dim = self.heads_for(width)
            if (self.depth_at(level) or level == len(self.channel_mult) - 1) and (heads == 0 or heads * dim != width):
                raise ValueError(f"channel width {width} cannot be split into {heads} heads")

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def embed_dim(self) -> int:
        return 4 * self.model_channels

    def depth_at(self, level: int) -> int:
        """The transformer depth after each res block of `level` (0: no transformer there)."""
        if level not in self.attention_levels:
            return 0
        return self.transformer_depth[level] if isinstance(self.transformer_depth, tuple) else self.transformer_depth

    @property
    def mid_depth(self) -> int:
        return self.transformer_depth if self.middle_depth is None else self.middle_depth

    @property
    def max_depth(self) -> int:
        return max(self.mid_depth, *(self.depth_at(level) for level in range(len(self.channel_mult))))

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(number of heads, width of one head) for a transformer over `channels`."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        return channels // self.head_dim, self.head_dim


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"UNet weights lack '{key}', which is needed to read the architecture")
    return tuple(state_dict[key].shape)


def _block_ids(state_dict: Mapping[str, torch.Tensor], group: str) -> list[int]:
    pattern = re.compile(rf"{group}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state_dict if (m := pattern.match(k))})


def _transformer_depth(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    inside = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    return len(_block_ids(inside, "transformer_blocks"))


def _single(values: list, what: str):
    distinct = sorted(set(values))
    if len(distinct) != 1:
        raise ValueError(f"UNet has varying {what} {distinct}; only a uniform value is supported")
    return distinct[0]


HEAD_WIDTH = 64  # SD2.x and SDXL split attention into 64-wide heads; SD1 into 8 heads
WIDE_HEAD_CONTEXTS = (1024, 1280, 2048)  # OpenCLIP-H (SD2), OpenCLIP-G (SDXL refiner), CLIP-L + G (SDXL base)


def unet_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], *, has_output: bool = True,
                                wide_heads: bool | None = None) -> UNetConfig:
    """Read a UNetConfig from the shapes of UNet weights (keys without `model.diffusion_model.`); without
    `has_output` (a ControlNet's copy of the input and middle blocks) out_channels is taken as in_channels.

    Only shapes are looked at, so meta tensors do. Heads cannot be seen in shapes: `wide_heads` (64-wide heads,
    SD2/SDXL) comes from the model family when it is known; otherwise, like ComfyUI, a context of OpenCLIP's
    width (1024, 1280, 2048) or a label embedding means 64-wide heads, anything else SD1's 8 heads.
    """
    model_channels, in_channels = _shape(state_dict, "input_blocks.0.0.weight")[:2]
    out_channels = _shape(state_dict, "out.2.weight")[0] if has_output else in_channels

    levels: list[list[tuple[int, int]]] = [[]]  # per level: (output width, transformer depth) per res block
    for n in _block_ids(state_dict, "input_blocks")[1:]:
        if f"input_blocks.{n}.0.op.weight" in state_dict:
            levels.append([])
            continue
        width = _shape(state_dict, f"input_blocks.{n}.0.in_layers.2.weight")[0]
        levels[-1].append((width, _transformer_depth(state_dict, f"input_blocks.{n}.1.")))
    if any(not level for level in levels):
        raise ValueError("UNet weights have a level without res blocks (input_blocks are incomplete)")

    channel_mult = []
    for i, level in enumerate(levels):
        width = _single([w for w, _ in level], f"widths within level {i}")
        if width % model_channels:
            raise ValueError(f"UNet level {i} width {width} is not a multiple of model_channels {model_channels}")
        channel_mult.append(width // model_channels)
    level_depths = tuple(_single([d for _, d in level], f"transformer depths within level {i}")
                         for i, level in enumerate(levels))
    attention_levels = tuple(i for i, d in enumerate(level_depths) if d > 0)
    middle_depth = _transformer_depth(state_dict, "middle_block.1.")
    if middle_depth == 0:
        raise ValueError("UNet weights lack 'middle_block.1.transformer_blocks.*' (no mid-block transformer)")
    uniform = len({d for d in level_depths if d > 0} | {middle_depth}) == 1
    depths = {"transformer_depth": middle_depth} if uniform else \
        {"transformer_depth": level_depths, "middle_depth": middle_depth}

    context_dim = _shape(state_dict, "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    linear_projection = len(_shape(state_dict, "middle_block.1.proj_in.weight")) == 2
    adm_in_channels = _shape(state_dict, "label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in state_dict \
        else None
    if wide_heads is None:
        wide_heads = context_dim in WIDE_HEAD_CONTEXTS or adm_in_channels is not None
    heads = {"num_heads": None, "head_dim": HEAD_WIDTH} if wide_heads else {"num_heads": 8, "head_dim": None}
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=_single([len(level) for level in levels], "res blocks per level"),
        attention_levels=attention_levels,
        context_dim=context_dim,
        linear_projection=linear_projection,
        adm_in_channels=adm_in_channels,
        **depths,
        **heads,
    )
