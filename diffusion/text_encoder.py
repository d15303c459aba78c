"""CLIP text towers as `transformers` models, built offline: OpenAI CLIP ViT-L/14 (SD1, and SDXL's first encoder)
as a `CLIPTextModel`, OpenCLIP ViT-H (SD2) and ViT-bigG (SDXL) as a `CLIPTextModelWithProjection` (GELU).

The architecture is read from the weights' shapes (nothing is downloaded). Keys are transformers' names, e.g.
those under `cond_stage_model.transformer.` in an SD1 file, with or without the `text_model.` level that older
files lack (OpenCLIP's names are renamed by `diffusion.openclip`); `embeddings.position_ids` may be present or not
(it is a fixed arange, rebuilt here rather than trusted: some merged files carry it as corrupted floats). A
`text_projection.weight` makes the model a `CLIPTextModelWithProjection`.
"""

import re
from collections.abc import Mapping

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

BOS_TOKEN_ID = 49406  # <|startoftext|>
EOS_TOKEN_ID = 49407  # <|endoftext|>; SD1 also pads with it
OPENCLIP_PAD_TOKEN_ID = 0  # OpenCLIP's tokenizer pads with token 0 ("!")
POSITION_IDS = "embeddings.position_ids"
PROJECTION = "text_projection.weight"
OPENAI_ACTIVATION, OPENCLIP_ACTIVATION = "quick_gelu", "gelu"


def strip_text_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys relative to the text model (`embeddings.*`, `encoder.layers.N.*`, `final_layer_norm.*`), whether or
    not they came with a leading `text_model.`."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"text encoder weights lack '{key}', which is needed to read the architecture")
    return tuple(state_dict[key].shape)


def text_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, hidden_act: str = OPENAI_ACTIVATION
) -> CLIPTextConfig:
    """A CLIPTextConfig for a CLIP text tower from weight shapes (only shapes are looked at): OpenAI's
    (quick_gelu, SD1) unless `hidden_act` says "gelu" (OpenCLIP's). A `text_projection.weight` sets projection_dim."""
    sd = strip_text_model_prefix(state_dict)
    vocab_size, width = _shape(sd, "embeddings.token_embedding.weight")
    layers = len({m.group(1) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    if layers == 0:
        raise ValueError("text encoder weights have no 'encoder.layers.N.*' keys")
    return clip_text_config(
        width=width,
        layers=layers,
        intermediate_size=_shape(sd, "encoder.layers.0.mlp.fc1.weight")[0],
        vocab_size=vocab_size,
        positions=_shape(sd, "embeddings.position_embedding.weight")[0],
        hidden_act=hidden_act,
        projection_dim=_shape(sd, PROJECTION)[0] if PROJECTION in sd else None,
    )


def clip_text_config(
    *,
    width: int,
    layers: int,
    intermediate_size: int,
    vocab_size: int = 49408,
    positions: int = 77,
    hidden_act: str = OPENAI_ACTIVATION,
    projection_dim: int | None = None,
) -> CLIPTextConfig:
    """The config of a CLIP text tower: 64-wide heads (at least one), CLIP's token ids, quick_gelu (OpenAI) or
    gelu (OpenCLIP, which also pads with token 0). `projection_dim` set: a model with a text projection."""
    openclip = hidden_act == OPENCLIP_ACTIVATION
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=positions,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=OPENCLIP_PAD_TOKEN_ID if openclip else EOS_TOKEN_ID,
        projection_dim=projection_dim or width,
        projected=projection_dim is not None,
    )


def is_projected(config: CLIPTextConfig) -> bool:
    """Whether a model of this config has a text projection (`clip_text_config(projection_dim=...)`)."""
    return bool(getattr(config, "projected", False))


def _module_prefix(model: torch.nn.Module) -> str:
    """The tower's parts sit under `text_model` (CLIPTextModel in 4.x, CLIPTextModelWithProjection), or on
    CLIPTextModel itself (transformers 5)."""
    return "text_model." if hasattr(model, "text_model") else ""


def text_encoder_on_meta(config: CLIPTextConfig) -> CLIPTextModel | CLIPTextModelWithProjection:
    """An unallocated text model (parameters on the meta device), e.g. to list its expected weights; with a
    projection when the config has one."""
    with torch.device("meta"):
        return CLIPTextModelWithProjection(config) if is_projected(config) else CLIPTextModel(config)


def expected_text_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights keyed as `strip_text_model_prefix` keys them (`text_projection.weight` if any)."""
    return strip_text_model_prefix(model.state_dict())


def build_text_encoder(
    state_dict: Mapping[str, torch.Tensor], config: CLIPTextConfig | None = None
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A text model holding exactly these tensors (no copy; dtype and device as given), in eval mode.

    `state_dict` is what an SD1 file holds under `cond_stage_model.transformer.` (or transformers' names of any
    CLIP text tower); without `config` it is read from the shapes (OpenAI CLIP, quick_gelu).
    """
    sd = strip_text_model_prefix(state_dict)
    sd.pop(POSITION_IDS, None)
    model = text_encoder_on_meta(config or text_config_from_state_dict(sd))
    prefix = _module_prefix(model)
    model.load_state_dict({(k if k == PROJECTION else prefix + k): v for k, v in sd.items()}, strict=True,
                          assign=True)
    embeddings = model.get_submodule(prefix + "embeddings")
    device = embeddings.token_embedding.weight.device
    positions = torch.arange(embeddings.position_embedding.num_embeddings, device=device)[None]
    embeddings.register_buffer("position_ids", positions, persistent=False)
    return model.eval().requires_grad_(False)
