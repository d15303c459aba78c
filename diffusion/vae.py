"""The SD1.x KL autoencoder (LDM's `AutoencoderKL` with its `model.py` Encoder/Decoder), in plain torch.

Attribute names mirror the checkpoint keys after stripping `first_stage_model.` (encoder.down.N.block.M...,
decoder.up.N..., mid.attn_1 with 1x1-conv q/k/v, quant_conv, post_quant_conv), so loading needs no key map.
Latents here are unscaled: multiplying by SD1's 0.18215 is the caller's business.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.attention import multihead_attention
from diffusion.phase_upsample import PhaseUpsample
from diffusion.weights import module_holding

GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6)


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of an LDM KL autoencoder. The defaults are SD1's (8x downsampling, 4 latent channels)."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128  # LDM's `ch`
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4  # LDM's `z_channels`; the encoder emits twice as many (mean and log-variance)

    def __post_init__(self):
        for width in self.level_channels:
            if width % GROUPS:
                raise ValueError(f"VAE width {width} is not divisible by the {GROUPS} GroupNorm groups")

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without autograd, activations and the residual sum reuse the tensors just computed: at 512x512 the
        # decoder's tensors are 64-256 MB each, so this lowers the peak as much as it saves time.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return h.add_(shortcut) if inplace else shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convolutions as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # [B, H*W, C]
        h = multihead_attention(q, k, v, heads=1)
        return x + self.proj_out(h.transpose(1, 2).reshape(batch, channels, height, width))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder (`down.N`) or decoder (`up.N`): res blocks, then an optional resampler."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, resample: type[nn.Module] | None):
        super().__init__()
        widths = [in_channels] + [out_channels] * blocks
        self.block = nn.ModuleList(ResnetBlock(i, o) for i, o in zip(widths[:-1], widths[1:], strict=True))
        if resample is Downsample:
            self.downsample = Downsample(out_channels)
        elif resample is Upsample:
            self.upsample = Upsample(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = c.level_channels
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(c.in_channels, c.base_channels, 3, padding=1)
        ins = (c.base_channels, *widths[:-1])
        self.down = nn.ModuleList(
            Level(ins[i], widths[i], c.num_res_blocks, Downsample if i != last else None) for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h)), inplace=not torch.is_grad_enabled()))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = c.level_channels
        self.conv_in = nn.Conv2d(c.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        # up.N works at the resolution of down.N; it receives the width of the level below it (up.N+1)
        ins = (*widths[1:], widths[-1])
        self.up = nn.ModuleList(
            Level(ins[i], widths[i], c.num_res_blocks + 1, Upsample if i != 0 else None) for i in range(len(widths))
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> the posterior's mode (its mean), unscaled, [B, 4, H/8, W/8]."""
        moments = self.quant_conv(self.encoder(pixels))
        mean, _log_variance = moments.chunk(2, dim=1)
        return mean

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, 4, h, w] -> pixels [B, 3, 8h, 8w], roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(latent))


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"VAE weights lack '{key}', which is needed to read the architecture")
    return tuple(state_dict[key].shape)


def _count(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state_dict if (m := pattern.match(k))})


def vae_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> VAEConfig:
    """Read a VAEConfig from the shapes of VAE weights (keys without `first_stage_model.`)."""
    base_channels, in_channels = _shape(state_dict, "encoder.conv_in.weight")[:2]
    levels = _count(state_dict, "encoder.down.")
    if levels == 0:
        raise ValueError("VAE weights have no 'encoder.down.N.*' keys")
    attention = sorted(k for k in state_dict if re.match(r"(en|de)coder\.(down|up)\.\d+\.attn\.", k))
    if attention:
        raise ValueError(f"VAE has attention inside its levels ({attention[0]}, ...), which SD1's VAE does not")
    channel_mult = []
    for i in range(levels):
        width = _shape(state_dict, f"encoder.down.{i}.block.0.conv1.weight")[0]
        if width % base_channels:
            raise ValueError(f"VAE level {i} width {width} is not a multiple of the base width {base_channels}")
        channel_mult.append(width // base_channels)
    latent_channels = _shape(state_dict, "decoder.conv_in.weight")[1]
    encoder_out = _shape(state_dict, "encoder.conv_out.weight")[0]
    if encoder_out != 2 * latent_channels:
        raise ValueError(
            f"VAE encoder emits {encoder_out} channels but the decoder takes {latent_channels}; "
            "a KL autoencoder emits twice the latent channels (mean and log-variance)"
        )
    return VAEConfig(
        in_channels=in_channels,
        out_channels=_shape(state_dict, "decoder.conv_out.weight")[0],
        base_channels=base_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=_count(state_dict, "encoder.down.0.block."),
        latent_channels=latent_channels,
    )


def fold_upsamples(model: AutoencoderKL) -> AutoencoderKL:
    """Replace each decoder Upsample's nearest-2x + 3x3 convolution by its four 2x2 phase convolutions
    (diffusion/phase_upsample.py), in place; returns the model. The same decode up to summation order, 1.8-2x
    faster per upsampling layer on the CPU (docs/performance.md, "VAE decode"). The folded layers' weights no
    longer have the checkpoint's shapes (`decoder.up.N.upsample.conv.weight` is [4C, C, 2, 2])."""
    for level in model.decoder.up:
        if hasattr(level, "upsample") and isinstance(level.upsample, Upsample):
            level.upsample = PhaseUpsample(level.upsample.conv)
    return model


def folds_upsampling(dtype: torch.dtype) -> bool:
    """Whether a VAE loaded in `dtype` gets its upsampling folded (`vae_holding`): 16-bit weights only, so that an
    fp32 VAE keeps LDM's formulation and ComfyUI's pixels exactly."""
    return dtype.itemsize < 4


def folded_extra_elements(elements: Mapping[str, int]) -> int:
    """How many more elements a folded VAE holds than its file's tensors ({model key: elements}): each decoder
    upsampling convolution's 3x3 weight [O, I, 3, 3] becomes [4O, I, 2, 2] (16/9 of it) and its bias [O] [4O]."""
    extra = 0
    for key, count in elements.items():
        if key.startswith("decoder.up.") and ".upsample.conv." in key:
            extra += count * 7 // 9 if key.endswith(".weight") else 3 * count
    return extra


def build_vae(state_dict: Mapping[str, torch.Tensor], fold: bool | None = None) -> AutoencoderKL:
    """An AutoencoderKL holding exactly these tensors (no copy; dtype and device as given), in eval mode; see
    `vae_holding` for `fold`."""
    return vae_holding(vae_config_from_state_dict(state_dict), state_dict, fold)


def vae_holding(config: VAEConfig, state_dict: Mapping[str, torch.Tensor], fold: bool | None = None) -> AutoencoderKL:
    """An AutoencoderKL of `config` holding these tensors (as `build_vae`), the checkpoint loaders' builder.

    With `fold` (by default: when the weights are not fp32), the decoder's upsampling layers are folded
    (`fold_upsamples`, new tensors for those layers only). fp32 stays unfolded: it reproduces ComfyUI's
    pixels exactly, summation order included."""
    model = module_holding(lambda: AutoencoderKL(config), state_dict)
    if fold is None:
        fold = folds_upsampling(model.decoder.conv_in.weight.dtype)
    return fold_upsamples(model) if fold else model
