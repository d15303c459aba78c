"""The denoising UNet of SD1.x, SD2.x and SDXL (LDM/SGM's `openaimodel.UNetModel` with spatial transformers),
in plain torch.

Module attribute names mirror the checkpoint: `UNetModel(config).state_dict()` has exactly the keys of a
single-file checkpoint after stripping `model.diffusion_model.` (input_blocks.N.M..., middle_block...,
output_blocks..., time_embed..., label_emb... for SDXL, out...), so loading needs no key map.
`unet_config_from_state_dict` reads the architecture back from tensor shapes alone.

What differs between the families is all in `UNetConfig`: SD2 has 64-wide heads and Linear proj_in/proj_out;
SDXL has a transformer depth per level (0, 2, 10: none at the first level), 64-wide heads, a 2048-wide context
and a label embedding (`label_emb`, the size conditioning vector `y` of 2816 values, 2560 for the refiner)
added to the time embedding; inpainting models take 9 input channels.
"""

import itertools
import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.attention import multihead_attention
from diffusion.unet_config import (  # noqa: F401 (re-exported: where the UNet's users import them from)
    GROUPS,
    HEAD_WIDTH,
    WIDE_HEAD_CONTEXTS,
    UNetConfig,
    unet_config_from_state_dict,
)
from diffusion.weight_storage import is_stored
from diffusion.weights import module_holding


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """LDM's sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim] float32: cosines first,
    then sines, frequencies max_period^(-i/half) for i in 0..half-1 (diffusers: flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    # operation order as in LDM/ComfyUI ((-log(p) * i) / half), so float32 rounding matches theirs at t ~ 1000
    exponents = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps.float()[:, None] * torch.exp(exponents)[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(self, channels: int, embed_dim: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, out_channels),
            nn.SiLU(),
            nn.Identity(),  # where LDM keeps its dropout, a no-op at inference
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))
        self.compute_dtype: torch.dtype | None = None  # the attention products' dtype, if not the weights'

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        return self.to_out(multihead_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads,
                                               self.compute_dtype))


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two products on the weight's halves rather than one chunked in two: GELU and the product then run on
        # contiguous tensors (on the CPU that saves ~8% of a 512 px UNet call); the values are the same.
        hidden = self.proj.out_features // 2
        weight, bias = self.proj.weight.to(x.dtype), self.proj.bias.to(x.dtype)  # no copy unless stored in fp8
        gate = F.gelu(F.linear(x, weight[hidden:], bias[hidden:]))
        return F.linear(x, weight[:hidden], bias[:hidden]) * gate


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text context, GEGLU feed-forward; pre-LayerNorm residuals."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # The residual stream keeps x's dtype (fp32 where the loader kept the surrounding layers in fp32: see
        # precision_sensitive_prefixes); each sublayer computes in its weights' dtype.
        dtype = self.norm1.weight.dtype
        x = x + self.attn1(self.norm1(x.to(dtype)))
        x = x + self.attn2(self.norm2(x.to(dtype)), context.to(dtype))
        return x + self.ff(self.norm3(x.to(dtype)))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, config: UNetConfig, depth: int):
        super().__init__()
        heads, head_dim = config.heads_for(channels)
        inner = heads * head_dim
        self.linear_projection = config.linear_projection
        project = (lambda i, o: nn.Linear(i, o)) if config.linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.norm = nn.GroupNorm(GROUPS, channels, eps=1e-6)
        self.proj_in = project(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, config.context_dim, heads, head_dim) for _ in range(depth)
        )
        self.proj_out = project(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # [B, H*W, C]
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_projection:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(batch, -1, height, width)
        if not self.linear_projection:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        """Nearest-neighbour 2x, or to `size` (the next skip's), which keeps odd latent sizes working."""
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


class UNetBlock(nn.ModuleList):
    """One entry of input_blocks/middle_block/output_blocks; each layer gets the inputs it needs."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, skip_size: torch.Size | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, skip_size)
            else:
                x = layer(x)
        return x


def encoder_blocks(c: UNetConfig) -> tuple[nn.ModuleList, UNetBlock, list[int]]:
    """The input blocks, the middle block and the channels of each input block's output (one per skip): the half
    of the UNet a ControlNet copies (diffusion/controlnet.py)."""
    input_blocks = nn.ModuleList([UNetBlock([nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1)])])
    skip_channels = [c.model_channels]
    ch = c.model_channels
    last_level = len(c.channel_mult) - 1
    for level, width in enumerate(c.level_channels):
        for _ in range(c.num_res_blocks):
            layers = [ResBlock(ch, c.embed_dim, width)]
            ch = width
            if c.depth_at(level):
                layers.append(SpatialTransformer(ch, c, c.depth_at(level)))
            input_blocks.append(UNetBlock(layers))
            skip_channels.append(ch)
        if level != last_level:
            input_blocks.append(UNetBlock([Downsample(ch)]))
            skip_channels.append(ch)
    middle_block = UNetBlock([ResBlock(ch, c.embed_dim, ch), SpatialTransformer(ch, c, c.mid_depth),
                              ResBlock(ch, c.embed_dim, ch)])
    return input_blocks, middle_block, skip_channels


def time_embedding(c: UNetConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c.model_channels, c.embed_dim), nn.SiLU(), nn.Linear(c.embed_dim, c.embed_dim))


def label_embedding(c: UNetConfig) -> nn.Sequential:
    """SDXL's `label_emb.0.{0,2}`: the label vector y -> Linear, SiLU, Linear, added to the time embedding."""
    return nn.Sequential(nn.Sequential(nn.Linear(c.adm_in_channels, c.embed_dim), nn.SiLU(),
                                       nn.Linear(c.embed_dim, c.embed_dim)))


def check_label(config: UNetConfig, y: torch.Tensor | None, batch: int) -> None:
    """A clear error unless `y` is given exactly when the UNet takes one, of shape [batch, adm_in_channels]."""
    if config.adm_in_channels is None:
        if y is not None:
            raise ValueError(f"this UNet takes no label vector y (it has no label_emb), got one of shape "
                             f"{list(y.shape)}; y is for SDXL models only")
        return
    if y is None:
        raise ValueError(f"this UNet (SDXL) needs the label vector y of {config.adm_in_channels} values per "
                         "latent (pooled text embedding and size conditioning); none was given")
    if tuple(y.shape) != (batch, config.adm_in_channels):
        raise ValueError(f"label vector y has shape {list(y.shape)}, the UNet needs [{batch}, "
                         f"{config.adm_in_channels}]: the conditioning was made for another model")


class ControlResiduals(NamedTuple):
    """What a ControlNet adds to a UNet call: one tensor (or None) per skip connection, in input-block order,
    added to the skip as the output side takes it, and one added after the middle block (ComfyUI's
    `apply_control` 'output' and 'middle')."""

    skips: tuple[torch.Tensor | None, ...]
    middle: torch.Tensor | None


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        self.time_embed = time_embedding(c)
        if c.adm_in_channels is not None:
            self.label_emb = label_embedding(c)
        self.input_blocks, self.middle_block, skip_channels = encoder_blocks(c)
        ch = skip_channels[-1]

        self.output_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(c.level_channels))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), c.embed_dim, width)]
                ch = width
                if c.depth_at(level):
                    layers.append(SpatialTransformer(ch, c, c.depth_at(level)))
                if level != 0 and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(UNetBlock(layers))

        self.out = nn.Sequential(
            nn.GroupNorm(GROUPS, ch), nn.SiLU(), nn.Conv2d(c.model_channels, c.out_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                control: ControlResiduals | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """The network's prediction (noise or v, as the model was trained) for latents x [B, C, H, W] at
        timesteps [B] (float, 0..999) given context [B, T, D], plus a ControlNet's `control` residuals if given.
        `y` [B, adm_in_channels] is the label vector, required exactly when the config has one (SDXL).

        Works for any H, W (upsampling matches each skip's size). Runs on x's device; each block computes in the
        dtype of its own weights (all one dtype, unless the loader kept some layers in fp32: see
        `precision_sensitive_prefixes`), and the output has the dtype of the output layer.
        """
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        time_dtype = weight_dtype(self.time_embed, x.dtype)
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(time_dtype))
        check_label(self.config, y, x.shape[0])
        if y is not None:
            emb = emb + self.label_emb(y.to(device=x.device, dtype=weight_dtype(self.label_emb, time_dtype)))
        embs: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

        def cast(block: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            dtype = weight_dtype(block, x.dtype)
            if dtype not in embs:
                embs[dtype] = (emb.to(dtype), context.to(dtype))
            return (h.to(dtype), *embs[dtype])

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(*cast(block, h))
            skips.append(h)
        h = self.middle_block(*cast(self.middle_block, h))
        residuals = list(control.skips) if control is not None else []
        if control is not None:
            h = _add_residual(h, control.middle)
        for block in self.output_blocks:
            skip = skips.pop()
            if residuals:
                skip = _add_residual(skip, residuals.pop())
            h = torch.cat([h, skip], dim=1)
            h = block(*cast(block, h), skips[-1].shape[-2:] if skips else None)
        return self.out(h.to(weight_dtype(self.out, h.dtype)))


def _add_residual(h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    if residual is None:
        return h
    if residual.shape != h.shape:
        raise ValueError(f"a ControlNet residual of shape {list(residual.shape)} does not fit the UNet's "
                         f"{list(h.shape)}: the ControlNet was made for another model; use one made for this "
                         "checkpoint's family")
    return h + residual.to(h.device, h.dtype)


def weight_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype a module computes in: that of its first floating-point weight (parameter or buffer) that is not
    only stored (fp8 weights are cast to their layer's bias or norm dtype: diffusion/weight_storage.py), else
    `default`."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point() and not is_stored(tensor):
            return tensor.dtype
    return default


def set_attention_dtype(unet: nn.Module, dtype: torch.dtype | None) -> None:
    """Run every attention's products of `unet` in `dtype` (None: in its inputs' dtype), whatever its weights'."""
    for module in unet.modules():
        if isinstance(module, CrossAttention):
            module.compute_dtype = dtype


def precision_sensitive_prefixes(config: UNetConfig) -> tuple[str, ...]:
    """Key prefixes of the weights where bf16 rounding moves a UNet call's result the most. In the output blocks
    at full latent resolution (after the last upsampling) these are the ResBlocks and each transformer's norm
    and projections in and out, but not its attention and feed-forward, which carry most of its cost. The
    output layer is included too. Keeping these in fp32 brings one SD1.5 call at 512 px from 1.36% of fp32 to
    0.87%, almost as close as keeping whole blocks (0.86%), for 9% less time (docs/performance.md)."""
    count = len(config.channel_mult) * (config.num_res_blocks + 1)
    blocks = range(count - config.num_res_blocks - 1, count)
    prefixes = [f"output_blocks.{i}.0." for i in blocks]
    if config.depth_at(0):  # level 0, the full resolution, has a transformer after each ResBlock
        prefixes += [f"output_blocks.{i}.1.{layer}." for i in blocks for layer in ("norm", "proj_in", "proj_out")]
    return (*prefixes, "out.")


def build_unet(state_dict: Mapping[str, torch.Tensor]) -> UNetModel:
    """A UNetModel holding exactly these tensors (no copy; dtype and device as given), in eval mode."""
    return module_holding(lambda: UNetModel(unet_config_from_state_dict(state_dict)), state_dict)
