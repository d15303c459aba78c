"""ControlNets (SD1.x, SD2.x, SDXL): the network, its file loader, and the control a conditioning entry carries.

1. `ControlNet` is the UNet's encoder half (time embedding, input blocks, middle block) plus a hint encoder
   (`input_hint_block`: eight 3x3 convolutions, three of stride 2, pixels -> latent size) and one 1x1 "zero"
   convolution per input block and after the middle block. Attribute names mirror the published single-file
   layout (control_v11p_sd15_*: `control_model.input_hint_block.0.weight`, `control_model.zero_convs.3.0.bias`,
   ...), so loading needs no key map; files without the `control_model.` prefix load too, and diffusers-layout
   files (most SDXL ControlNets) are renamed (diffusion/controlnet_keys.py). An SDXL ControlNet has the UNet's
   label embedding and takes its label vector `y`.
2. `open_controlnet` checks a file from its header (architecture from shapes, every key compared) and returns a
   `ControlNetLayout`; the weights are read when the model manager first loads the handle (`controlnet_value`).
3. `ControlChain` is what `CondEntry.control` holds: a hint, a strength and a start/end range on top of an
   optional previous chain. Called as `control(x_in, timesteps, context, sigma, schedule, y)` by `ModelDenoiser`,
   it returns the summed `ControlResiduals` of every link whose range covers sigma (ComfyUI's chained ControlNets
   add up), or None. Numerics follow ComfyUI's `ControlNet.get_control`: the net sees the same scaled input, timestep
   and context as the UNet, and the hint resized to the latent size x 8 (nearest-exact, centre crop).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.models import ModelHandle

from .checkpoint import FileIdentity, PartLayout, TensorFile, load_part, part_layout
from .checkpoint_checks import MAX_ARCHITECTURE_COUNT, check_part, meta_state
from .controlnet_keys import is_diffusers_controlnet, ldm_keys
from .regions import percent_to_sigma
from .safetensors_header import CheckpointError
from .schedules import DiscreteSchedule, sd1_schedule
from .unet import (
    ControlResiduals,
    UNetConfig,
    check_label,
    encoder_blocks,
    label_embedding,
    set_attention_dtype,
    time_embedding,
    timestep_embedding,
    unet_config_from_state_dict,
    weight_dtype,
)
from .weights import module_holding

PREFIX = "control_model."
HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)  # the hint encoder's widths before its last (zero) convolution
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2, 1)  # per convolution: three halvings make the hint latent-sized
LATENT_SCALE = 8  # the hint is at pixel size: latent size x 8 (ComfyUI's compression_ratio for SD1 ControlNets)
WORKING_PER_ELEMENT = 8_000  # about half the UNet's per latent element (diffusion/components.py)


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet copies the encoder of the UNet it was trained for (`unet`) and reads a `hint_channels` image."""

    unet: UNetConfig
    hint_channels: int = 3


class ControlNet(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        c = config.unet
        self.time_embed = time_embedding(c)
        if c.adm_in_channels is not None:  # SDXL: the same label vector y as the UNet's
            self.label_emb = label_embedding(c)
        widths = (config.hint_channels, *HINT_CHANNELS, c.model_channels)
        layers: list[nn.Module] = []
        for i, stride in enumerate(HINT_STRIDES):
            layers += [nn.Conv2d(widths[i], widths[i + 1], 3, padding=1, stride=stride), nn.SiLU()]
        self.input_hint_block = nn.Sequential(*layers[:-1])  # no SiLU after the last convolution
        self.input_blocks, self.middle_block, skip_channels = encoder_blocks(c)
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(ch, ch, 1)) for ch in skip_channels)
        self.middle_block_out = nn.Sequential(nn.Conv2d(skip_channels[-1], skip_channels[-1], 1))

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor,
                y: Tensor | None = None) -> ControlResiduals:
        """Residuals (before any strength) for latents x [B, C, h, w], a hint [B, 3, 8h, 8w] in 0..1, timesteps [B],
        the UNet's context [B, T, D] and (SDXL) its label vector y [B, adm]; computed in the weights' dtype."""
        dtype = weight_dtype(self.time_embed, x.dtype)
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.unet.model_channels).to(dtype))
        check_label(self.config.unet, y, x.shape[0])
        if y is not None:
            emb = emb + self.label_emb(y.to(device=x.device, dtype=dtype))
        context = context.to(dtype)
        guided_hint = self.input_hint_block(hint.to(dtype))
        h = x.to(dtype)
        skips = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided_hint
            skips.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        return ControlResiduals(tuple(skips), self.middle_block_out(h))


def controlnet_config_from_state_dict(state_dict) -> ControlNetConfig:
    """The architecture from shapes alone (keys without `control_model.`)."""
    if "input_hint_block.0.weight" not in state_dict:
        raise ValueError("ControlNet weights lack 'input_hint_block.0.weight' (the hint encoder)")
    return ControlNetConfig(unet_config_from_state_dict(state_dict, has_output=False),
                            hint_channels=tuple(state_dict["input_hint_block.0.weight"].shape)[1])


def build_controlnet(state_dict) -> ControlNet:
    return module_holding(lambda: ControlNet(controlnet_config_from_state_dict(state_dict)), state_dict)


# --- the file --------------------------------------------------------------------------------------------------

OTHER_LAYOUTS = (  # keys of files that are not ControlNets we run, to say what a refused file is
    ("task_embedding", "a ControlNet Union (several control types in one file), which sdgraph does not run; use a "
                       "single-type ControlNet"),
    ("control_add_embedding.", "a ControlNet Union (several control types in one file), which sdgraph does not "
                               "run; use a single-type ControlNet"),
    ("model.diffusion_model.", "a checkpoint, not a ControlNet; put it in models/checkpoints"),
    ("lora_unet_", "a LoRA, not a ControlNet; put it in models/loras"),
)
SUPPORTED = ("ControlNets for SD1.x, SD2.x and SDXL in the single-file layout (control_v11p_sd15_*: control_model.* "
             "keys) or the diffusers layout (diffusion_pytorch_model.safetensors)")


@dataclass(frozen=True, eq=False)
class ControlNetLayout(PartLayout):
    """A checked ControlNet file, nothing read (part "controlnet")."""

    def load(self, *, dtype: torch.dtype = torch.float32, device="cpu", channels_last: bool = False,
             overrides=None) -> nn.Module:
        if FileIdentity.of(self.file.path) != self.file:
            raise CheckpointError(f"{self.file.path} changed on disk since it was opened; load it again")
        source = TensorFile(self.file.path, allow_pickle=self.allow_pickle)
        return load_part(source, self.keys, build_controlnet, dtype, device, channels_last=channels_last)


def _refusal(path, keys) -> str:
    for prefix, what in OTHER_LAYOUTS:
        if any(k.startswith(prefix) for k in keys):
            return f"{path}: not a ControlNet sdgraph runs: it looks like {what}"
    tops = sorted({k.split(".", 1)[0] for k in keys})[:5]
    return (f"{path}: not a ControlNet (no 'control_model.zero_convs.*', 'zero_convs.*' or 'controlnet_down_blocks.*' "
            f"weights; its keys start with {', '.join(tops) or 'nothing'}); sdgraph runs {SUPPORTED}")


def controlnet_keys(meta) -> tuple[dict[str, str], str] | None:
    """({our name: the file's key}, the prefix our names have in the file) for a ControlNet file's keys in either
    layout (the diffusers one renames: no prefix), or None if it is neither."""
    if any(k.startswith(p) for k in meta for p, _ in OTHER_LAYOUTS):
        return None
    if is_diffusers_controlnet(meta):
        return ldm_keys(meta), ""
    prefix = PREFIX if f"{PREFIX}zero_convs.0.0.weight" in meta else ""
    if f"{prefix}zero_convs.0.0.weight" not in meta:
        return None
    return {k[len(prefix):]: k for k in meta if k.startswith(prefix)}, prefix


def open_controlnet(path: str | os.PathLike, *, allow_pickle: bool = False) -> ControlNetLayout:
    """Check a ControlNet file (single-file or diffusers layout; SD1, SD2 or SDXL) from its header, shapes and keys;
    nothing is read."""
    identity = FileIdentity.of(path)
    source = TensorFile(path, allow_pickle=allow_pickle)
    meta = source.meta
    found = controlnet_keys(meta)
    if found is None:
        raise CheckpointError(_refusal(path, meta))
    keys, prefix = found
    try:
        config = controlnet_config_from_state_dict({k: meta[v] for k, v in keys.items()})
    except (ValueError, IndexError, TypeError, ZeroDivisionError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read the ControlNet architecture from the shapes of its weights "
                              f"({str(e)[:300]}); the file is damaged or not a ControlNet sdgraph runs "
                              f"({SUPPORTED})") from e
    if max(len(config.unet.channel_mult), config.unet.num_res_blocks, config.unet.max_depth) > MAX_ARCHITECTURE_COUNT:
        raise CheckpointError(f"{path}: the ControlNet weights describe an architecture far larger than any SD "
                              "model's; the file is damaged or crafted")
    check_part(path, "ControlNet", meta_state(ControlNet, config), keys, meta, prefix,
               f"sdgraph runs {SUPPORTED}.")
    layout = part_layout("controlnet", source, identity, config, keys, allow_pickle)
    return ControlNetLayout(**{f: getattr(layout, f) for f in layout.__dataclass_fields__})


# --- the CONTROL_NET value -------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ControlNetModel:
    """CONTROL_NET: a handle on the ControlNet's weights (loaded by the model manager `models` when first used),
    its config and the noise schedule of the models it serves (for start/end percent)."""

    handle: ModelHandle
    config: ControlNetConfig
    dtype: torch.dtype
    source: str
    models: Any  # the runtime's ModelManager, which the control borrows the network from at each call
    global_average_pooling: bool = False  # ComfyUI: only for files whose name ends in "_shuffle"
    schedule: DiscreteSchedule | None = None  # None: SD1's
    nbytes: int = 0

    def model_handles(self) -> tuple[ModelHandle, ...]:
        return (self.handle,)

    def residuals(self, x: Tensor, timesteps: Tensor, context: Tensor, hint: Tensor,
                  y: Tensor | None = None) -> ControlResiduals:
        """The network's raw residuals, on its device in its dtype (channels_last), for the UNet's own inputs (an
        SDXL ControlNet takes the UNet's label vector `y` too; others ignore it, as ComfyUI's)."""
        device = torch.device(self.handle.device)
        self._check_fits(x, context, y)
        working = math.prod(x.shape) * WORKING_PER_ELEMENT
        label = y.to(device, self.dtype) if y is not None and self.config.unet.adm_in_channels else None
        with self.models.use(self.handle, working=working) as net, torch.inference_mode():
            out = net(x.to(device=device, dtype=self.dtype, memory_format=torch.channels_last),
                      hint.to(device=device, dtype=self.dtype, memory_format=torch.channels_last),
                      timesteps.to(device), context.to(device, self.dtype), label)
        if not self.global_average_pooling:
            return out
        return ControlResiduals(tuple(_pooled(r) for r in out.skips), _pooled(out.middle))

    def _check_fits(self, x: Tensor, context: Tensor, y: Tensor | None) -> None:
        unet = self.config.unet
        if unet.adm_in_channels is not None and (y is None or y.shape[-1] != unet.adm_in_channels):
            raise ValueError(f"the ControlNet {self.source} was made for SDXL: it takes the model's "
                             f"{unet.adm_in_channels}-value label vector, which the model "
                             + ("does not give" if y is None else f"gives with {y.shape[-1]} values")
                             + "; use a ControlNet made for this checkpoint's family")
        if x.shape[1] != unet.in_channels or context.shape[-1] != unet.context_dim:
            raise ValueError(f"the ControlNet {self.source} was made for another model family: it takes "
                             f"{unet.in_channels}-channel latents and {unet.context_dim}-wide text features, but "
                             f"the model samples {x.shape[1]} channels with {context.shape[-1]}-wide features; use "
                             "a ControlNet made for this checkpoint's family")


def _pooled(r: Tensor) -> Tensor:
    return r.mean(dim=(2, 3), keepdim=True).expand_as(r)


def controlnet_value(layout: ControlNetLayout, *, device: torch.device, dtype: torch.dtype, models: Any,
                     name: str) -> ControlNetModel:
    """The CONTROL_NET value for a checked file; `name` is the file's name in models/controlnet."""
    handle = ModelHandle(
        origin=f"{layout.file.path}#controlnet",
        version=(layout.file.size, layout.file.mtime_ns),
        variant=(str(dtype).removeprefix("torch."), str(device)),
        weight_bytes=layout.weight_bytes(dtype),
        device=str(device),
        load=partial(_load_network, layout, dtype, str(device)),
        label=f"ControlNet {layout.file.path.name}",
        streamable=True,
    )
    pooling = os.path.splitext(name)[0].endswith("_shuffle")
    return ControlNetModel(handle, layout.config, dtype, str(layout.file.path), models, pooling,
                           nbytes=1024 + sum(len(k) + len(v) + 120 for k, v in layout.keys.items()))


def _load_network(layout: ControlNetLayout, dtype: torch.dtype, computes_on: str, device: str) -> nn.Module:
    """Read the weights channels_last; when it computes on the CPU, pack the 3x3 convolutions for oneDNN as the
    UNet's are (not when it is only kept in RAM to be streamed to an accelerator)."""
    from .onednn import pack_for_cpu

    module = layout.load(dtype=dtype, device=device, channels_last=True)
    set_attention_dtype(module, dtype)
    on_cpu = torch.device(device).type == torch.device(computes_on).type == "cpu"
    return pack_for_cpu(module) if on_cpu else module


# --- the control a conditioning entry carries ------------------------------------------------------------------

def crop_to_aspect(image: Tensor, width: int, height: int) -> Tensor:
    """Cut [B, C, H, W] evenly on two sides to the aspect ratio width:height (common_upscale's "center")."""
    old_h, old_w = image.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = round((old_w - old_w * (new_aspect / old_aspect)) / 2) if old_aspect > new_aspect else 0
    y = round((old_h - old_h * (old_aspect / new_aspect)) / 2) if old_aspect < new_aspect else 0
    return image[..., y:old_h - y, x:old_w - x]


def prepare_hint(hint: Tensor, height: int, width: int, batch: int) -> Tensor:
    """The hint [b, 3, H, W] resized to height x width (nearest-exact after a centre crop) and repeated to `batch`.

    A single hint serves every sample; b hints serve a batch that is a multiple of b (ComfyUI repeats them)."""
    if hint.shape[-2:] != (height, width):
        hint = F.interpolate(crop_to_aspect(hint, width, height), size=(height, width), mode="nearest-exact")
    if hint.shape[0] == batch or hint.shape[0] == 1:
        return hint.expand(batch, -1, -1, -1) if hint.shape[0] == 1 else hint
    if batch % hint.shape[0]:
        raise ValueError(f"the ControlNet hint has {hint.shape[0]} images but the sampler runs {batch} latents at "
                         "a time: give one hint image, or as many as the latent batch")
    return hint.repeat(batch // hint.shape[0], 1, 1, 1)


def add_residuals(a: ControlResiduals | None, b: ControlResiduals | None) -> ControlResiduals | None:
    """a + b, residual by residual (None counts as nothing)."""
    if a is None or b is None:
        return a if b is None else b

    def add(x: Tensor | None, y: Tensor | None) -> Tensor | None:
        return x if y is None else y if x is None else x + y

    return ControlResiduals(tuple(add(x, y) for x, y in zip(a.skips, b.skips, strict=True)),
                            add(a.middle, b.middle))


@dataclass(frozen=True, eq=False)
class ControlChain:
    """One ControlNet applied with a hint, a strength and a start/end range, on top of `previous` links.

    Immutable and compared by identity: entries holding the same chain object can share a UNet batch.
    hint: [b, C, H, W] float in 0..1 (ComfyUI's IMAGE moved to channels-first), resized at each call.
    apply_to_uncond: set by ControlNetApply (not the Advanced node): an uncond without any control gets it too
    (`diffusion.regions.share_controls_with_uncond`)."""

    net_handle: ControlNetModel
    hint: Tensor
    strength: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: ControlChain | None = None
    apply_to_uncond: bool = False
    origin: str = "ControlNet"  # who applied it, for errors: "ControlNetApplyAdvanced (node 13)"

    def __post_init__(self) -> None:
        channels = self.net_handle.config.hint_channels
        if self.hint.ndim != 4 or self.hint.shape[1] != channels or 0 in self.hint.shape:
            raise ValueError(f"{self.origin}: the hint must be a non-empty image with {channels} channels, got "
                             f"one of shape {list(self.hint.shape)} ([B, C, H, W]); convert it to RGB")

    def active(self, sigma: Tensor, schedule: DiscreteSchedule | None = None) -> bool:
        """Whether this link runs at `sigma` (ComfyUI: skipped when sigma > sigma(start) or < sigma(end)); percents
        on the sampled model's `schedule` (the SD1 table when none is given)."""
        schedule = schedule or self.net_handle.schedule or sd1_schedule()
        s = float(sigma.reshape(-1)[0])
        return not (s > percent_to_sigma(schedule, self.start_percent)
                    or s < percent_to_sigma(schedule, self.end_percent))

    def __call__(self, x_in: Tensor, timesteps: Tensor, context: Tensor, sigma: Tensor,
                 schedule: DiscreteSchedule | None = None, y: Tensor | None = None) -> ControlResiduals | None:
        previous = self.previous(x_in, timesteps, context, sigma, schedule, y) if self.previous is not None else None
        if not self.active(sigma, schedule):
            return previous
        height, width = x_in.shape[-2] * LATENT_SCALE, x_in.shape[-1] * LATENT_SCALE
        try:
            hint = prepare_hint(self.hint, height, width, x_in.shape[0])
        except ValueError as e:
            raise ValueError(f"{self.origin}: {e}") from None
        raw = self.net_handle.residuals(x_in, timesteps, context, hint, y)
        own = ControlResiduals(tuple(r * self.strength for r in raw.skips), raw.middle * self.strength)
        return add_residuals(previous, own)

    def links(self) -> int:
        return 1 + (self.previous.links() if self.previous is not None else 0)
