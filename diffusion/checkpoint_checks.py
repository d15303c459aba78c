"""Checking a checkpoint's parts from the shapes of its weights, before any weight is read.

`infer_part` reads a part's architecture from a few shapes and lists the weights a model of it has; shapes no
model can be built from, or an architecture far larger than SD's, are a CheckpointError naming the weights.
`check_part` then compares every weight the loader will use, key by key: missing, unexpected, of another shape
or of a non-floating dtype.
"""

from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
from transformers import CLIPTextConfig

from diffusion.safetensors_header import CheckpointError
from diffusion.text_encoder import POSITION_IDS, clip_text_config, expected_text_weights, text_encoder_on_meta
from diffusion.unet import UNetConfig, UNetModel
from diffusion.vae import AutoencoderKL, VAEConfig

SHOWN_KEYS = 5
MAX_ARCHITECTURE_COUNT = 64  # layers, levels, blocks per level, transformer depth (SD1: at most 12)


def examples(items: list[str]) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > SHOWN_KEYS else ""
    return ", ".join(items[:SHOWN_KEYS]) + more


def check_part(path, part: str, expected, found: Mapping[str, str], meta, prefix: str, fix: str) -> None:
    """Raise CheckpointError unless the file holds exactly the expected weights of one part, shape for shape.

    `expected` maps keys inside the part to meta tensors, `found` maps them to the file's keys."""
    missing = [prefix + k for k in expected if k not in found]
    unexpected = [found[k] for k in found if k not in expected]
    mismatched = [
        f"{found[k]} (model needs {list(expected[k].shape)}, file has {list(meta[found[k]].shape)})"
        for k in expected
        if k in found and tuple(meta[found[k]].shape) != tuple(expected[k].shape)
    ]
    not_float = [  # integer or boolean data where the model has floating-point weights
        f"{found[k]} (model needs floating point, file has {str(meta[found[k]].dtype).removeprefix('torch.')})"
        for k in expected
        if k in found and expected[k].is_floating_point() and not meta[found[k]].is_floating_point()
    ]
    problems = [
        f"{len(keys)} {what}: {examples(keys)}"
        for what, keys in (("missing", missing), ("of another shape", mismatched), ("of another dtype", not_float),
                           ("unexpected", unexpected))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{path}: the {part} weights do not fit the {part} their shapes describe: "
                              f"{'; '.join(problems)}. {fix}")


class _ShapesRead(Mapping):
    """The part's meta tensors, remembering which ones were looked at (to name them when they make no sense)."""

    def __init__(self, meta_part: Mapping[str, torch.Tensor]):
        self._meta, self.read = meta_part, []

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self._meta[key]
        self.read.append(key)
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._meta

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)


def infer_part(path, part: str, infer: Callable, expected_of: Callable, keys: Mapping[str, str],
           meta: Mapping[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    """The part's config read from the shapes of its weights (`keys`: {key in the part: key in the file}) and
    the weights a model of that config has, as meta tensors. Shapes from which no model can be built (a crafted
    or damaged file) are a CheckpointError naming the weights last read and their shapes."""
    shapes = _ShapesRead({k: meta[v] for k, v in keys.items()})
    config = None
    try:
        config = infer(shapes)
        _check_size(path, part, config)
        return config, expected_of(config)
    except CheckpointError:
        raise
    except (ValueError, IndexError, TypeError, ZeroDivisionError, RuntimeError) as e:
        # reading failed: the culprit is among the last weights read; building failed: among the first ones
        order = list(dict.fromkeys(shapes.read if config is not None else reversed(shapes.read)))[:3]
        sd15 = _SD15_WEIGHTS[part]() if order else {}
        named = "; ".join(f"{keys[k]} has shape {list(meta[keys[k]].shape)}"
                          + (f" (SD1.5 has {list(sd15[k].shape)})" if k in sd15 else "") for k in order)
        why = str(e)[:300] if isinstance(e, ValueError) else f"{type(e).__name__}: {str(e)[:200]}"
        if config is not None:
            why = f"no {part} can be built from what they give ({why})"
        raise CheckpointError(
            f"{path}: cannot read the {part} architecture from the shapes of its weights: {why}"
            f"{'. Weights read ' + ('first' if config is not None else 'last') + ': ' + named if named else ''}. "
            "If the file is damaged, fetch it again; other architectures (SD2, SDXL, Flux) are not supported") from e


_SD15_WEIGHTS = MappingProxyType({  # the reference shapes named in errors (built only then)
    "UNet": lambda: meta_state(UNetModel, UNetConfig()),
    "VAE": lambda: meta_state(AutoencoderKL, VAEConfig()),
    "text encoder": lambda: text_weights(clip_text_config(width=768, layers=12, intermediate_size=3072)),
})


def _size_counts(config: Any) -> dict[str, int]:
    """The numbers that make building a model of `config` (even on the meta device) slow and large."""
    if isinstance(config, CLIPTextConfig):
        return {"layers": config.num_hidden_layers}
    counts = {"levels": len(config.channel_mult), "res blocks per level": config.num_res_blocks}
    if isinstance(config, UNetConfig):
        counts["transformer depth"] = config.max_depth
    return counts


def _check_size(path, part: str, config: Any) -> None:
    """Refuse, before building anything, an architecture far larger than any SD model (a crafted file can
    make the shapes say 20,000 layers: building that model on the meta device took 30 s and 1 GB)."""
    for what, count in _size_counts(config).items():
        if count > MAX_ARCHITECTURE_COUNT:
            raise CheckpointError(f"{path}: the {part} weights describe {count} {what}, more than "
                                  f"{MAX_ARCHITECTURE_COUNT}; SD1 has at most 12. The file is damaged or crafted")


def meta_state(model_class: Callable, config: Any) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return model_class(config).state_dict()


def text_weights(config: CLIPTextConfig) -> dict[str, torch.Tensor]:
    expected = expected_text_weights(text_encoder_on_meta(config))
    expected.pop(POSITION_IDS, None)
    return expected
