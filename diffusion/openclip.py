"""OpenCLIP's text tower under transformers' names: which file tensor (and which slice of it) each weight is.

SD2 (`cond_stage_model.model.`, ViT-H: width 1024, 24 layers, 16 heads) and SDXL (`conditioner.embedders.1.model.`,
ViT-bigG: 1280, 32 layers, 20 heads; the refiner's `conditioner.embedders.0.model.`) store OpenCLIP's own names:

| OpenCLIP                                        | transformers                                          |
|-------------------------------------------------|-------------------------------------------------------|
| token_embedding.weight, positional_embedding    | embeddings.token_embedding.weight, .position_embedding.weight |
| transformer.resblocks.N.ln_1 / ln_2             | encoder.layers.N.layer_norm1 / layer_norm2            |
| transformer.resblocks.N.attn.in_proj_weight/bias | encoder.layers.N.self_attn.q/k/v_proj (rows cut in 3) |
| transformer.resblocks.N.attn.out_proj           | encoder.layers.N.self_attn.out_proj                   |
| transformer.resblocks.N.mlp.c_fc / c_proj       | encoder.layers.N.mlp.fc1 / fc2 (GELU, not quick_gelu) |
| ln_final                                        | final_layer_norm                                      |
| text_projection [width, proj] (used as x @ P)   | text_projection.weight = P transposed (a Linear)      |

`logit_scale`, an `attn_mask` buffer some exports carry and the image tower (`visual.*`, in whole OpenCLIP model
files) are not weights of the text model and are skipped.
A `Source` says how a weight is read: the whole tensor, one third of its rows, or transposed; the reader
(`diffusion.text_parts`) applies it tensor by tensor as the file is read, so no second copy of the file is made.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import torch

from diffusion.text_encoder import POSITION_IDS, PROJECTION

IN_PROJECTION = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
LAYER_PARTS = {
    "ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
    "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.",
}  # fmt: skip
TOP_LEVEL = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
IGNORED = ("logit_scale", "attn_mask")
IGNORED_PREFIXES = ("visual.",)
QKV = ("q", "k", "v")


class Source(NamedTuple):
    """Where a weight comes from: `file_key`, read whole ("copy"), as the `index`-th third of its rows ("third")
    or transposed ("transpose")."""

    file_key: str
    how: str = "copy"
    index: int = 0


def is_openclip(keys) -> bool:
    """Whether these keys (relative to the text model) are OpenCLIP's names."""
    return any(k.startswith("transformer.resblocks.") for k in keys)


def openclip_sources(keys: Mapping[str, str]) -> dict[str, Source]:
    """{transformers name: Source} for OpenCLIP keys ({key relative to the text model: key in the file}).

    Raises ValueError naming a key that is none of OpenCLIP's text-model names."""
    sources: dict[str, Source] = {}
    for key, file_key in keys.items():
        if key in IGNORED or key.startswith(IGNORED_PREFIXES):
            continue
        if key in TOP_LEVEL:
            sources[TOP_LEVEL[key]] = Source(file_key)
        elif key == "text_projection":
            sources[PROJECTION] = Source(file_key, "transpose")
        elif match := IN_PROJECTION.match(key):
            layer, kind = match.groups()
            for index, name in enumerate(QKV):
                sources[f"encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = Source(file_key, "third", index)
        elif (match := RESBLOCK.match(key)) and (part := _layer_part(match.group(2))):
            sources[f"encoder.layers.{match.group(1)}.{part}"] = Source(file_key)
        else:
            raise ValueError(f"'{file_key}' is not a weight of OpenCLIP's text model")
    return sources


def _layer_part(rest: str) -> str | None:
    for openclip, ours in LAYER_PARTS.items():
        if rest.startswith(openclip):
            return ours + rest[len(openclip) :]
    return None


def transformers_sources(keys: Mapping[str, str], *, projection: bool) -> dict[str, Source]:
    """{transformers name: Source} for keys already in transformers' naming (with or without `text_model.`);
    `position_ids` is dropped (rebuilt on load), and `text_projection.weight` unless `projection`."""
    sources = {k.removeprefix("text_model."): Source(file_key) for k, file_key in keys.items()}
    sources.pop(POSITION_IDS, None)
    if not projection:
        sources.pop(PROJECTION, None)
    return sources


def source_shape(source: Source, meta: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The shape the weight has once read (the file tensor's, a third of its rows, or transposed)."""
    shape = tuple(meta[source.file_key].shape)
    if source.how == "third":
        return (shape[0] // 3, *shape[1:])
    if source.how == "transpose":
        return tuple(reversed(shape))
    return shape


def read_source(tensor: torch.Tensor, source: Source) -> torch.Tensor:
    """The weight `source` names, as a view of the file tensor (the caller copies it into its dtype)."""
    if source.how == "third":
        return tensor.chunk(3, dim=0)[source.index]
    if source.how == "transpose":
        return tensor.t()
    return tensor


def shaped_meta(sources: Mapping[str, Source], meta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{transformers name: meta tensor of the shape and dtype it will have once read}."""
    return {k: torch.empty(source_shape(s, meta), dtype=meta[s.file_key].dtype, device="meta")
            for k, s in sources.items()}


def openclip_layout(*, width: int, layers: int, projection: int | None = None, vocab_size: int = 49408,
                    positions: int = 77) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{OpenCLIP key: (dtype, shape)} of a text tower (MLP 4x wide), e.g. for `make_checkpoint.random_weights`:
    ViT-H is width 1024, 24 layers, projection 1024; bigG 1280, 32 layers, projection 1280."""
    f32 = torch.float32
    layout = {"token_embedding.weight": (f32, (vocab_size, width)), "positional_embedding": (f32, (positions, width)),
              "ln_final.weight": (f32, (width,)), "ln_final.bias": (f32, (width,))}
    for n in range(layers):
        block = f"transformer.resblocks.{n}."
        layout |= {block + "attn.in_proj_weight": (f32, (3 * width, width)),
                   block + "attn.in_proj_bias": (f32, (3 * width,)),
                   block + "attn.out_proj.weight": (f32, (width, width)), block + "attn.out_proj.bias": (f32, (width,)),
                   block + "mlp.c_fc.weight": (f32, (4 * width, width)), block + "mlp.c_fc.bias": (f32, (4 * width,)),
                   block + "mlp.c_proj.weight": (f32, (width, 4 * width)), block + "mlp.c_proj.bias": (f32, (width,))}
        layout |= {block + f"{ln}.{p}": (f32, (width,)) for ln in ("ln_1", "ln_2") for p in ("weight", "bias")}
    if projection is not None:
        layout["text_projection"] = (f32, (width, projection))
    return layout
