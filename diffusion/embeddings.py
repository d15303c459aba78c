"""Textual-inversion embeddings: find them in an embeddings folder and load them as ``[n_vectors, width]`` tensors.

A prompt word ``embedding:name`` refers to ``name``, ``name.safetensors``, ``name.pt`` or ``name.bin`` in the
embeddings folder or any folder below it (the folder itself first, then sub-folders in sorted order). Names may
contain a sub-path but may not leave the folder.

Layouts understood (the ones in common use, as ComfyUI reads them):

- ``string_to_param`` (Automatic1111 ``.pt``): ``{"string_to_param": {"*": tensor}}``;
- ``clip_l`` (SDXL files carry ``clip_l`` and ``clip_g``; SD1 uses ``clip_l``);
- ``emb_params`` (Automatic1111 ``.safetensors``);
- a single tensor, bare or as the only entry of a mapping (diffusers' ``learned_embeds``).

Pickle files (``.pt``/``.bin``) are only opened when the caller passes ``allow_pickle=True``, and even then with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")
PREFERRED_KEYS = ("clip_l", "emb_params")


class EmbeddingError(ValueError):
    """An embedding file that cannot be used; the message names the file."""


def search_folders(embeddings_dir: str | os.PathLike) -> list[Path]:
    """The embeddings folder followed by every folder below it (symlinks followed), in sorted order."""
    root = Path(embeddings_dir)
    below = sorted(Path(parent) / name for parent, names, _ in os.walk(root, followlinks=True) for name in names)
    return [root, *below]


def find_embedding_file(name: str, embeddings_dir: str | os.PathLike) -> Path | None:
    """The file ``embedding:name`` refers to, or None. The exact name wins over an added extension."""
    for folder in search_folders(embeddings_dir):
        folder = Path(os.path.abspath(folder))
        candidate = Path(os.path.abspath(folder / name))
        if candidate == folder or not candidate.is_relative_to(folder):
            continue
        if candidate.is_file():
            return candidate
        for extension in EMBEDDING_EXTENSIONS:
            with_extension = candidate.with_name(candidate.name + extension)
            if with_extension.is_file():
                return with_extension
    return None


def read_embedding_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> object:
    """The raw content of an embedding file: a mapping of tensors, a tensor, or whatever the pickle holds."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        import safetensors.torch

        from diffusion.safetensors_header import read_safetensors_header

        try:
            read_safetensors_header(path)  # checked within limits first (issue #11: crafted model files)
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as error:
            raise EmbeddingError(f"embedding file {path} could not be read as safetensors: {error}") from error
    if not allow_pickle:
        raise EmbeddingError(
            f"embedding file {path} is a pickle file; convert it to .safetensors, or pass allow_pickle=True "
            "to load it with torch.load(weights_only=True)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise EmbeddingError(f"embedding file {path} could not be loaded with weights_only=True: {error}") from error


def select_embedding_tensor(content: object, *, source: str, key: str | None = None) -> torch.Tensor:
    """Pick the embedding tensor out of a file's content (see the module docstring for the layouts); `key`
    ("clip_l", "clip_g", "clip_h": the encoder's name) comes first when the file has it, as in ComfyUI."""
    if isinstance(content, torch.Tensor):
        return content
    if key is not None and isinstance(content, Mapping) and isinstance(content.get(key), torch.Tensor):
        return content[key]
    if not isinstance(content, Mapping):
        raise EmbeddingError(f"embedding file {source} holds a {type(content).__name__}, not tensors")
    params = content.get("string_to_param")
    if isinstance(params, Mapping) and params:
        chosen = params["*"] if "*" in params else next(iter(params.values()))
        if isinstance(chosen, torch.Tensor):
            return chosen
    for key in PREFERRED_KEYS:
        if isinstance(content.get(key), torch.Tensor):
            return content[key]
    tensors = {key: value for key, value in content.items() if isinstance(value, torch.Tensor)}
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise EmbeddingError(
        f"embedding file {source}: no embedding found; expected 'string_to_param', 'clip_l', 'emb_params' or a "
        f"single tensor, found keys {sorted(map(str, content))}"
    )


def as_vectors(tensor: torch.Tensor, *, width: int, source: str) -> torch.Tensor:
    """``[n_vectors, width]`` float32, or an error naming the file when the width is not the encoder's."""
    if tensor.ndim == 0 or tensor.numel() == 0:
        raise EmbeddingError(f"embedding file {source}: empty or scalar tensor of shape {tuple(tensor.shape)}")
    vectors = tensor.detach().reshape(-1, tensor.shape[-1]).to(torch.float32)
    if vectors.shape[1] != width:
        raise EmbeddingError(
            f"embedding file {source}: vectors have width {vectors.shape[1]} but the text encoder's width is "
            f"{width} (an embedding trained for another model?)"
        )
    return vectors


def load_embedding(
    path: str | os.PathLike, *, width: int, allow_pickle: bool = False, key: str | None = None
) -> torch.Tensor:
    """Load one textual-inversion file as ``[n_vectors, width]`` float32 on the CPU (`key`: the tensor to prefer)."""
    content = read_embedding_file(path, allow_pickle=allow_pickle)
    return as_vectors(select_embedding_tensor(content, source=str(path), key=key), width=width, source=str(path))
