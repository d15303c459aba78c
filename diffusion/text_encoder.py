"""SD1's text encoder: OpenAI CLIP ViT-L/14's text tower as a `transformers.CLIPTextModel`, built offline.

The architecture is read from the weights' shapes (nothing is downloaded). Keys are those under
`cond_stage_model.transformer.` in an SD1 file, with or without the `text_model.` level that older files lack;
`embeddings.position_ids` may be present or not (it is a fixed arange, rebuilt here rather than trusted: some
merged files carry it as corrupted floats).
"""

import re
from collections.abc import Mapping

import torch
from transformers import CLIPTextConfig, CLIPTextModel

BOS_TOKEN_ID = 49406  # <|startoftext|>
EOS_TOKEN_ID = 49407  # <|endoftext|>; SD1 also pads with it
POSITION_IDS = "embeddings.position_ids"


def strip_text_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys relative to the text model (`embeddings.*`, `encoder.layers.N.*`, `final_layer_norm.*`), whether or
    not they came with a leading `text_model.`."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"text encoder weights lack '{key}', which is needed to read the architecture")
    return tuple(state_dict[key].shape)


def text_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> CLIPTextConfig:
    """A CLIPTextConfig for SD1's OpenAI CLIP text tower from weight shapes (only shapes are looked at)."""
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
    )


def clip_text_config(
    *, width: int, layers: int, intermediate_size: int, vocab_size: int = 49408, positions: int = 77
) -> CLIPTextConfig:
    """The config of an OpenAI-CLIP-style text tower: 64-wide heads (at least one), quick_gelu, SD1 token ids."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=positions,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,
    )


def _module_prefix(model: CLIPTextModel) -> str:
    """transformers 5 puts the tower's parts on CLIPTextModel itself; 4.x nests them under `text_model`."""
    return "text_model." if hasattr(model, "text_model") else ""


def text_encoder_on_meta(config: CLIPTextConfig) -> CLIPTextModel:
    """An unallocated CLIPTextModel (parameters on the meta device), e.g. to list its expected weights."""
    with torch.device("meta"):
        return CLIPTextModel(config)


def expected_text_weights(model: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The model's weights keyed as `strip_text_model_prefix` keys them."""
    return strip_text_model_prefix(model.state_dict())


def build_text_encoder(state_dict: Mapping[str, torch.Tensor]) -> CLIPTextModel:
    """A CLIPTextModel holding exactly these tensors (no copy; dtype and device as given), in eval mode.

    `state_dict` is what an SD1 file holds under `cond_stage_model.transformer.`.
    """
    sd = strip_text_model_prefix(state_dict)
    sd.pop(POSITION_IDS, None)
    model = text_encoder_on_meta(text_config_from_state_dict(sd))
    prefix = _module_prefix(model)
    model.load_state_dict({prefix + k: v for k, v in sd.items()}, strict=True, assign=True)
    embeddings = model.get_submodule(prefix + "embeddings")
    device = embeddings.token_embedding.weight.device
    positions = torch.arange(embeddings.position_embedding.num_embeddings, device=device)[None]
    embeddings.register_buffer("position_ids", positions, persistent=False)
    return model.eval().requires_grad_(False)
