"""The text encoders of a checkpoint, or of a separate text-encoder file, as part layouts read on demand.

`text_parts(source, identity, meta, family)` gives one `TextPartLayout` per entry of `family.text_encoders`:

| family        | encoder     | keys in the single file                                    |
|---------------|-------------|------------------------------------------------------------|
| SD1           | clip_l      | cond_stage_model.transformer.[text_model.]*  (transformers) |
| SD2           | open_clip_h | cond_stage_model.model.*                     (OpenCLIP)     |
| SDXL base     | clip_l      | conditioner.embedders.0.transformer.text_model.*           |
|               | open_clip_g | conditioner.embedders.1.model.*                            |
| SDXL refiner  | open_clip_g | conditioner.embedders.0.model.*                            |

`open_text_encoder(path)` reads a separate file (models/text_encoders, models/clip): transformers' names
(`text_model.*`, as clip_l.safetensors and clip_g.safetensors are published, with `text_projection.weight` for
bigG) or OpenCLIP's (`transformer.resblocks.*`). Which encoder a file holds is told as ComfyUI tells it, from the
number of layers: 32 or more is OpenCLIP bigG, 23 or more OpenCLIP ViT-H, fewer OpenAI CLIP-L.

Everything is checked from the header's shapes before a tensor is read; `TextPartLayout.load` then reads the
file a chunk at a time (`TensorFile.read`), cutting OpenCLIP's fused q/k/v projection into three and transposing
its text projection tensor by tensor, so there is never a second full copy of the weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from transformers import CLIPTextConfig

from diffusion.checkpoint_checks import MAX_ARCHITECTURE_COUNT, examples
from diffusion.openclip import Source, is_openclip, openclip_sources, read_source, shaped_meta, transformers_sources
from diffusion.safetensors_header import CheckpointError
from diffusion.tensor_file import FileIdentity, TensorFile
from diffusion.text_encoder import (
    OPENAI_ACTIVATION,
    OPENCLIP_ACTIVATION,
    POSITION_IDS,
    build_text_encoder,
    expected_text_weights,
    text_config_from_state_dict,
    text_encoder_on_meta,
)

ENCODER_LABELS = MappingProxyType({
    "clip_l": "CLIP-L (OpenAI CLIP ViT-L/14)",
    "open_clip_h": "OpenCLIP ViT-H/14",
    "open_clip_g": "OpenCLIP ViT-bigG/14",
})  # fmt: skip
CHECKPOINT_PREFIXES = MappingProxyType({
    ("sd1", ("clip_l",)): ("cond_stage_model.transformer.",),
    ("sd2", ("open_clip_h",)): ("cond_stage_model.model.",),
    ("sdxl", ("clip_l", "open_clip_g")): ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
    ("sdxl", ("open_clip_g",)): ("conditioner.embedders.0.model.",),
})  # fmt: skip
BIGG_MIN_LAYERS, VIT_H_MIN_LAYERS = 32, 23  # ComfyUI's rule for a separate file (layers 31 / 22 present)
LAYER = re.compile(r"(?:text_model\.)?(?:encoder\.layers|transformer\.resblocks)\.(\d+)\.")


@dataclass(frozen=True, eq=False)
class TextPartLayout:
    """One checked text encoder whose tensors have not been read: which encoder it is, its config, where each
    weight comes from in the file, and the file's identity. Same interface as `checkpoint.PartLayout`."""

    encoder: str  # "clip_l", "open_clip_h" or "open_clip_g"
    file: FileIdentity
    config: CLIPTextConfig
    sources: Mapping[str, Source]  # {transformers name: Source in the file}
    elements: int  # floating-point elements (converted to the requested dtype)
    other_bytes: int
    allow_pickle: bool = False
    part: str = "text_encoder"

    @property
    def keys(self) -> Mapping[str, str]:
        """{key inside the part: key in the file} (the q/k/v thirds of one tensor name the same file key)."""
        return MappingProxyType({k: s.file_key for k, s in self.sources.items()})

    @property
    def label(self) -> str:
        return ENCODER_LABELS[self.encoder]

    def weight_bytes(self, dtype: torch.dtype, overrides: Mapping[str, torch.dtype] | None = None) -> int:
        """Bytes the encoder takes loaded in `dtype` (`overrides` is accepted for PartLayout's interface; text
        encoders have none)."""
        return self.elements * torch.empty(0, dtype=dtype).element_size() + self.other_bytes

    def load(self, *, dtype: torch.dtype = torch.float32, device="cpu", channels_last: bool = False,
             overrides: Mapping[str, torch.dtype] | None = None) -> torch.nn.Module:
        """Read the encoder into `dtype` on `device`, tensor by tensor, in eval mode. Raises CheckpointError if
        the file changed since it was opened."""
        if FileIdentity.of(self.file.path) != self.file:
            raise CheckpointError(f"{self.file.path} changed on disk since it was opened; load it again")
        wanted: dict[str, list[tuple[str, Source]]] = {}
        for key, source in self.sources.items():
            wanted.setdefault(source.file_key, []).append((key, source))
        tensors = {}
        for file_key, tensor in TensorFile(self.file.path, allow_pickle=self.allow_pickle).read(wanted):
            for key, source in wanted[file_key]:
                weight = read_source(tensor, source)
                target = dtype if weight.is_floating_point() else weight.dtype
                tensors[key] = weight.to(device=device, dtype=target, copy=True, memory_format=torch.contiguous_format)
            del tensor
        return build_text_encoder(tensors, self.config)


def text_parts(source: TensorFile, identity: FileIdentity, meta: Mapping[str, torch.Tensor],
               family) -> tuple[TextPartLayout, ...]:
    """The checked text encoders of a single-file checkpoint of `family` (a `families.Family`), in the order of
    `family.text_encoders`; nothing read."""
    prefixes = CHECKPOINT_PREFIXES.get((family.clip_type, tuple(family.text_encoders)))
    if prefixes is None:
        raise CheckpointError(f"{identity.path}: no text-encoder layout is known for {family.label}")
    return tuple(encoder_part(source, identity, meta, prefix, encoder, where=f"'{prefix}*'")
                 for prefix, encoder in zip(prefixes, family.text_encoders, strict=True))


def open_text_encoder(path: str | os.PathLike, *, allow_pickle: bool = False) -> TextPartLayout:
    """A separate text-encoder file, told apart and checked from its header; nothing read."""
    identity = FileIdentity.of(path)
    source = TensorFile(path, allow_pickle=allow_pickle)
    names = [k for k in source.meta if not k.startswith(("logit_scale", "attn_mask"))]
    if not any(LAYER.match(k) for k in names):
        tops = sorted({k.split(".", 1)[0] for k in source.meta})
        raise CheckpointError(
            f"{path}: not a CLIP text-encoder file: no 'text_model.encoder.layers.N.*' or "
            f"'transformer.resblocks.N.*' keys (its keys start with: {examples(tops)}). Text encoders in "
            "transformers' layout (clip_l.safetensors, clip_g.safetensors) or OpenCLIP's load here; a full "
            "checkpoint belongs in models/checkpoints.")
    return encoder_part(source, identity, source.meta, "", encoder_of(source.meta), where="the file")


def layer_count(keys) -> int:
    return len({m.group(1) for k in keys if (m := LAYER.match(k))})


def encoder_of(meta: Mapping[str, torch.Tensor]) -> str:
    """Which encoder a separate file holds, from its number of layers (ComfyUI's rule)."""
    layers = layer_count(meta)
    return "open_clip_g" if layers >= BIGG_MIN_LAYERS else "open_clip_h" if layers >= VIT_H_MIN_LAYERS else "clip_l"


def encoder_part(source: TensorFile, identity: FileIdentity, meta: Mapping[str, torch.Tensor], prefix: str,
                 encoder: str, *, where: str) -> TextPartLayout:
    """The `encoder` whose weights are the file's keys under `prefix`, checked shape for shape."""
    path, label = identity.path, ENCODER_LABELS[encoder]
    keys = {k[len(prefix):]: k for k in meta if k.startswith(prefix)}
    if not keys:
        raise CheckpointError(f"{path}: no {label} text-encoder weights (no keys start with '{prefix}')")
    try:
        if is_openclip(keys):
            sources = openclip_sources(keys)
        else:
            sources = transformers_sources(keys, projection=encoder != "clip_l")
        shaped = shaped_meta(sources, meta)
        if layer_count(shaped) > MAX_ARCHITECTURE_COUNT:
            raise ValueError(f"{layer_count(shaped)} layers, more than {MAX_ARCHITECTURE_COUNT}; the file is "
                             "damaged or crafted")
        activation = OPENAI_ACTIVATION if encoder == "clip_l" else OPENCLIP_ACTIVATION
        config = text_config_from_state_dict(shaped, hidden_act=activation)
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot read the {label} text encoder from {where}: {e}") from e
    check_text_weights(path, label, config, sources, shaped)
    floats = {s.file_key: meta[s.file_key] for s in sources.values() if meta[s.file_key].is_floating_point()}
    others = {s.file_key: meta[s.file_key] for s in sources.values() if s.file_key not in floats}
    return TextPartLayout(encoder, identity, config, MappingProxyType(sources),
                          sum(t.numel() for t in floats.values()),
                          sum(t.numel() * t.element_size() for t in others.values()), source.format != "safetensors")


def check_text_weights(path, label: str, config: CLIPTextConfig, sources: Mapping[str, Source],
                       shaped: Mapping[str, torch.Tensor]) -> None:
    """Raise CheckpointError unless the file gives exactly the weights a model of `config` has, shape for shape,
    naming the file's keys."""
    expected = expected_text_weights(text_encoder_on_meta(config))
    expected.pop(POSITION_IDS, None)
    missing = [k for k in expected if k not in sources]
    unexpected = [sources[k].file_key for k in sources if k not in expected]
    mismatched = [f"{sources[k].file_key} (model needs {list(expected[k].shape)}, file has {list(shaped[k].shape)})"
                  for k in expected if k in shaped and shaped[k].shape != expected[k].shape]
    not_float = [sources[k].file_key for k in expected if k in shaped and not shaped[k].is_floating_point()]
    problems = [f"{len(keys)} {what}: {examples(keys)}"
                for what, keys in (("missing", missing), ("of another shape", mismatched),
                                   ("not floating point", not_float), ("unexpected", unexpected)) if keys]
    if problems:
        raise CheckpointError(f"{path}: the weights do not fit a {label} text encoder: {'; '.join(problems)}. "
                              "If the file is incomplete, fetch it again.")
