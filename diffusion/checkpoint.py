"""Loading single-file checkpoints (SD1.x, SD2.x, SDXL base and refiner, their inpainting variants), bare UNet
files and separate VAE files into our UNet, VAE and text encoders.

0. The family comes from the keys and shapes (`diffusion.families.detect_family`), never the file name; files
   of other families (SD3, Flux, ...) are refused naming what they look like.

1. The format comes from the file's bytes, not its name: safetensors (8-byte little-endian header length, then
   JSON), or a torch pickle (zip or legacy), which is refused unless the caller opts in with allow_pickle. A
   safetensors header is read and checked here first, within limits (`diffusion.safetensors_header`): a crafted
   one fails with a CheckpointError before any library maps the file.
2. Shapes are read without reading tensors; configs are inferred from them and every expected key is checked
   (`diffusion.checkpoint_checks`), so a wrong file fails fast with the keys that are missing or mismatched.
3. Modules are built on the meta device and tensors are read a chunk at a time (safetensors: memory-mapped with
   `safe_open`, reopened per chunk so mapped pages never pile up), converted one by one to the target dtype and
   device, then assigned: there is never a second full copy of the weights.

`open_checkpoint` does steps 1-2 only and returns a `CheckpointLayout` whose parts are read on demand, one at a
time (that is what the model manager's handles call); `load_checkpoint` reads all three at once. `open_unet`
checks a bare UNet file (models/diffusion_models) the same way.
"""

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from diffusion.checkpoint_checks import check_part, examples, infer_part, meta_state
from diffusion.families import FAMILIES, Family, UnsupportedModelError, detect_family, unet_prefix
from diffusion.safetensors_header import CheckpointError
from diffusion.tensor_file import (  # noqa: F401 (re-exported: the loader's public names)
    CHUNK_BYTES,
    SAFETENSORS_DTYPES,
    FileIdentity,
    TensorFile,
    detect_format,
    read_state_dict,
)
from diffusion.text_encoder import (
    build_text_encoder,
)
from diffusion.text_parts import text_parts
from diffusion.unet import UNetConfig, UNetModel, unet_config_from_state_dict
from diffusion.vae import AutoencoderKL, VAEConfig, vae_config_from_state_dict, vae_holding
from diffusion.weights import module_holding

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
OTHER_FAMILIES = (  # key prefixes of files that are not what was asked for, to say what a refused file probably is
    ("model.diffusion_model.", "a full checkpoint (load it with CheckpointLoaderSimple)"),
    ("input_blocks.", "a bare UNet (load it with UNETLoader)"),
    ("double_blocks.", "a Flux model"),
    ("down_blocks.", "a diffusers-layout UNet"),
    ("encoder.down_blocks.", "a diffusers-layout VAE"),
)


@dataclass(frozen=True, eq=False)
class SD1Checkpoint:
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    unet_config: UNetConfig
    vae_config: VAEConfig
    text_config: CLIPTextConfig
    file: FileIdentity
    vae_file: FileIdentity | None  # set when the VAE came from a separate file


def _keys_under(meta: Mapping[str, torch.Tensor], prefix: str) -> dict[str, str]:
    """{key inside the part: key in the file} for every file key starting with `prefix`."""
    return {k[len(prefix) :]: k for k in meta if k.startswith(prefix)}


def _family_hint(meta: Mapping[str, torch.Tensor]) -> str:
    for prefix, family in OTHER_FAMILIES:
        if any(k.startswith(prefix) for k in meta):
            return f" It looks like {family}."
    tops = sorted({k.split(".", 1)[0] for k in meta})
    return f" Its keys start with: {examples(tops)}."


def load_part(source: TensorFile, keys: Mapping[str, str], build: Callable, dtype, device, *,
               channels_last: bool = False, overrides: Mapping[str, torch.dtype] | None = None):
    """Read the part's tensors one by one, convert each to dtype/device as its own copy, and build the module.

    With `channels_last`, 4-D (convolution) weights are stored NHWC, the layout oneDNN's kernels want.
    `overrides` maps key prefixes (inside the part) to another floating-point dtype for those weights."""
    file_to_part = {v: k for k, v in keys.items()}
    tensors = {}
    overrides = dict(overrides or {})
    for file_key, t in source.read(keys.values()):
        key = file_to_part[file_key]
        wanted = next((d for prefix, d in overrides.items() if key.startswith(prefix)), dtype)
        target = wanted if t.is_floating_point() else t.dtype
        layout = torch.channels_last if channels_last and t.ndim == 4 else torch.preserve_format
        tensors[key] = t.to(device=device, dtype=target, copy=True, memory_format=layout)
        del t
    return build(tensors)


def _vae_keys(path, meta: Mapping[str, torch.Tensor]) -> dict[str, str]:
    if any(k.startswith(VAE_PREFIX) for k in meta):
        return _keys_under(meta, VAE_PREFIX)
    keys = {k: k for k in meta if k.startswith(VAE_PARTS)}
    if not keys or any(k.startswith("encoder.down_blocks.") for k in keys):
        raise CheckpointError(
            f"{path}: no VAE weights in the LDM layout (keys 'first_stage_model.encoder.*' or 'encoder.down.*')."
            f"{_family_hint(meta)} Use a VAE in the original single-file layout, e.g. "
            "vae-ft-mse-840000-ema-pruned.safetensors (SD1/SD2) or sdxl_vae.safetensors (SDXL)."
        )
    return keys


def _check_vae(source: TensorFile, keys: Mapping[str, str], prefix: str) -> VAEConfig:
    config, expected = infer_part(source.path, "VAE", vae_config_from_state_dict,
                              lambda c: meta_state(AutoencoderKL, c), keys, source.meta)
    fix = "Is this a VAE in the original (LDM) layout?"
    check_part(source.path, "VAE", expected, keys, source.meta, prefix, fix)
    return config


def _open_vae(path, allow_pickle: bool) -> tuple[TensorFile, dict[str, str], VAEConfig]:
    """A separate VAE file, listed and checked: its tensors, {key in the VAE: key in the file}, its config."""
    source = TensorFile(path, allow_pickle=allow_pickle)
    keys = _vae_keys(path, source.meta)
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in source.meta) else ""
    return source, keys, _check_vae(source, keys, prefix)


def open_vae(path: str | os.PathLike, *, allow_pickle: bool = False) -> "PartLayout":
    """A separate VAE file (any family: a VAE file carries no family, the MODEL's gives the latent scale), checked
    from shapes alone; nothing read."""
    identity = FileIdentity.of(path)
    source, keys, config = _open_vae(path, allow_pickle)
    return part_layout("vae", source, identity, config, keys, allow_pickle)


def load_vae(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu", allow_pickle: bool = False
) -> AutoencoderKL:
    """A VAE from a separate file (models/vae/), keys `encoder.*`/`decoder.*` or `first_stage_model.*`."""
    return open_vae(path, allow_pickle=allow_pickle).load(dtype=dtype, device=device)


PARTS = ("unet", "text_encoder", "vae")
_MODULES = {"unet": UNetModel}  # built from the layout's config (heads are not in shapes)


def _builder(part: str, config: Any) -> Callable:
    if part == "vae":  # its own builder: in 16-bit dtypes it folds the decoder's upsampling (diffusion/vae.py)
        return lambda tensors: vae_holding(config, tensors)
    if part in _MODULES:
        return lambda tensors: module_holding(lambda: _MODULES[part](config), tensors)
    return build_text_encoder


@dataclass(frozen=True, eq=False)
class PartLayout:
    """One checked part of a checkpoint (or a separate VAE file) whose tensors have not been read yet: its config,
    which file keys make it, and the file's identity. Small: this is what a model handle's loader keeps."""

    part: str  # "unet", "text_encoder" or "vae"
    file: FileIdentity
    config: Any  # UNetConfig, CLIPTextConfig or VAEConfig
    keys: Mapping[str, str]  # {key inside the part: key in the file}
    elements: int  # floating-point elements (converted to the requested dtype)
    other_bytes: int  # bytes of the other tensors (kept as they are)
    allow_pickle: bool = False
    float_elements: Mapping[str, int] = field(default_factory=dict)  # {file key: elements} of float tensors
    matrix_keys: frozenset[str] = frozenset()  # part keys of float tensors with 2+ dimensions (layers' weights)

    def weight_bytes(self, dtype: torch.dtype, overrides: Mapping[str, torch.dtype] | None = None) -> int:
        """Bytes the part takes once loaded in `dtype` (with `overrides`: {key prefix: dtype})."""
        if not overrides:
            return self.elements * torch.empty(0, dtype=dtype).element_size() + self.other_bytes
        total = self.other_bytes
        for key, file_key in self.keys.items():
            if file_key in self.float_elements:
                wanted = next((d for prefix, d in overrides.items() if key.startswith(prefix)), dtype)
                total += self.float_elements[file_key] * torch.empty(0, dtype=wanted).element_size()
        return total

    def load(self, *, dtype: torch.dtype = torch.float32, device="cpu", channels_last: bool = False,
             overrides: Mapping[str, torch.dtype] | None = None) -> torch.nn.Module:
        """Read the part into `dtype` on `device`, tensor by tensor, in eval mode; weights whose key starts with
        a prefix in `overrides` get that prefix's dtype instead.

        Raises CheckpointError if the file changed since it was opened (its weights may no longer fit); open it
        again."""
        if FileIdentity.of(self.file.path) != self.file:
            raise CheckpointError(f"{self.file.path} changed on disk since it was opened; load it again")
        source = TensorFile(self.file.path, allow_pickle=self.allow_pickle)
        build = _builder(self.part, self.config)
        return load_part(source, self.keys, build, dtype, device, channels_last=channels_last, overrides=overrides)


@dataclass(frozen=True, eq=False)
class CheckpointLayout:
    """A checked checkpoint, nothing read: its UNet, text encoders (one per entry of family.text_encoders, in
    that order) and VAE, each loadable on its own, and the detected family."""

    unet: PartLayout
    text_encoders: tuple[Any, ...]
    vae: PartLayout
    family: Family = FAMILIES["sd1"]

    @property
    def text_encoder(self) -> PartLayout:
        """The first text encoder (SD1's only one; `text_parts` lays out at least one for every family)."""
        return self.text_encoders[0]

    @property
    def file(self) -> FileIdentity:
        return self.unet.file

    @property
    def vae_file(self) -> FileIdentity | None:
        """Set when the VAE comes from a separate file."""
        return self.vae.file if self.vae.file != self.unet.file else None


def part_layout(part: str, source: TensorFile, identity: FileIdentity, config: Any, keys: Mapping[str, str],
                 allow_pickle: bool) -> PartLayout:
    tensors = {k: source.meta[k] for k in keys.values()}
    floats = {k: t.numel() for k, t in tensors.items() if t.is_floating_point()}
    other = sum(t.numel() * t.element_size() for t in tensors.values() if not t.is_floating_point())
    matrices = frozenset(k for k, file_key in keys.items()
                         if tensors[file_key].is_floating_point() and tensors[file_key].dim() >= 2)
    return PartLayout(part, identity, config, MappingProxyType(dict(keys)), sum(floats.values()), other, allow_pickle,
                      MappingProxyType(floats), matrices)


def family_of(path, source: TensorFile) -> Family:
    """The detected family, as a CheckpointError naming the file when it is not one we run."""
    def read(key: str) -> torch.Tensor:
        return next(iter(source.read([key])))[1].clone()

    try:
        return detect_family(source.meta, read)
    except UnsupportedModelError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _unet_part(path, source: TensorFile, identity: FileIdentity, family: Family, prefix: str,
               allow_pickle: bool) -> PartLayout:
    """The UNet's layout: config read from its shapes (heads from the family), every key checked."""
    keys = _keys_under(source.meta, prefix) if prefix else \
        {k: k for k in source.meta if not k.startswith(("v_pred", "ztsnr"))}
    wide = not family.name.startswith("sd1")
    config, expected = infer_part(path, "UNet", lambda sd: unet_config_from_state_dict(sd, wide_heads=wide),
                                  lambda c: meta_state(UNetModel, c), keys, source.meta)
    fix = f"It was detected as {family.label}; if the file is incomplete, fetch it again."
    check_part(path, "UNet", expected, keys, source.meta, prefix, fix)
    return part_layout("unet", source, identity, config, keys, allow_pickle)


def open_checkpoint(
    path: str | os.PathLike, *, allow_pickle: bool = False, vae_path: str | os.PathLike | None = None
) -> CheckpointLayout:
    """Check a single-file checkpoint of any supported family (and a separate VAE file) from shapes alone,
    reading no weights (but one small tensor to tell an SD2 v model from an eps one).

    Keys outside the parts (model_ema.*, alphas_cumprod, ...) are ignored. With `vae_path` the VAE comes
    from that file and the checkpoint's own VAE weights (if any) are not read.
    """
    # 1. Open the file, list its tensors without reading them, and tell the family from keys and shapes.
    identity = FileIdentity.of(path)
    source = TensorFile(path, allow_pickle=allow_pickle)
    meta = source.meta
    family = family_of(path, source)
    if not any(k.startswith((VAE_PREFIX, "cond_stage_model.", "conditioner.")) for k in meta):
        raise CheckpointError(f"{path}: a bare UNet ({family.label}) without text encoders or VAE; put it in "
                              "models/diffusion_models and load it with UNETLoader (Load Diffusion Model)")
    if vae_path is None and not _keys_under(meta, VAE_PREFIX):
        raise CheckpointError(
            f"{path}: has no VAE weights (no keys start with '{VAE_PREFIX}'); pass vae_path= a VAE file."
        )

    # 2. Infer the architectures from shapes and check every key before reading any tensor.
    unet = _unet_part(path, source, identity, family, UNET_PREFIX, allow_pickle)
    texts = text_parts(source, identity, meta, family)
    if family.text_encoders == ("clip_l",) and unet.config.context_dim != texts[0].config.hidden_size:
        raise CheckpointError(
            f"{path}: the UNet attends to {unet.config.context_dim}-wide text features but the text encoder "
            f"emits {texts[0].config.hidden_size}; the parts come from different models"
        )
    if vae_path is None:
        vae_file, vae_source, vae_keys = None, source, _keys_under(meta, VAE_PREFIX)
        vae_config = _check_vae(source, vae_keys, VAE_PREFIX)
    else:
        vae_file = FileIdentity.of(vae_path)
        vae_source, vae_keys, vae_config = _open_vae(vae_path, allow_pickle)
    check_latent_channels(vae_file.path if vae_file else path, vae_config, unet.config)
    vae = part_layout("vae", vae_source, vae_file or identity, vae_config, vae_keys, allow_pickle)
    return CheckpointLayout(unet=unet, text_encoders=texts, vae=vae, family=family)


def check_latent_channels(path, vae_config: VAEConfig, unet_config: UNetConfig) -> None:
    if vae_config.latent_channels != unet_config.out_channels:
        raise CheckpointError(
            f"{path}: the VAE has {vae_config.latent_channels} latent channels but the UNet predicts "
            f"{unet_config.out_channels}; use a VAE made for this model's family (SD1, SD2 and SDXL VAEs have 4)"
        )


def open_unet(path: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[Family, PartLayout]:
    """A bare UNet file (keys `input_blocks...`, or with the `model.diffusion_model.` prefix; other parts in
    the file are ignored): its family and checked layout, nothing read."""
    identity = FileIdentity.of(path)
    source = TensorFile(path, allow_pickle=allow_pickle)
    family = family_of(path, source)
    return family, _unet_part(path, source, identity, family, unet_prefix(source.meta), allow_pickle)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    allow_pickle: bool = False,
    vae_path: str | os.PathLike | None = None,
) -> SD1Checkpoint:
    """UNet, VAE and text encoder of an SD1.x single-file checkpoint, in `dtype` on `device`, in eval mode (other
    families: `open_checkpoint`, then load each part).

    Keys outside the three parts (model_ema.*, alphas_cumprod, ...) are ignored. With `vae_path` the VAE comes
    from that file and the checkpoint's own VAE weights (if any) are not read.
    """
    # 1-2. List, infer and check everything before reading any tensor.
    layout = open_checkpoint(path, allow_pickle=allow_pickle, vae_path=vae_path)
    # 3. Read, convert and assign part by part.
    unet = layout.unet.load(dtype=dtype, device=device)
    text_encoder = layout.text_encoder.load(dtype=dtype, device=device)
    vae = layout.vae.load(dtype=dtype, device=device)
    return SD1Checkpoint(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        unet_config=layout.unet.config,
        vae_config=vae.config,
        text_config=layout.text_encoder.config,
        file=layout.file,
        vae_file=layout.vae_file,
    )
