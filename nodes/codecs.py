"""Disk-cache codecs for the Stable Diffusion data types (`engine.codecs`): tensors as safetensors bytes, the
rest (batch indices, strengths) as JSON in the safetensors metadata. No pickle. MODEL, CLIP and VAE hold model
handles and get no codec, so the nodes that make them are never stored on disk.

torch is imported only when a value is written or read.
"""

from __future__ import annotations

import json
from typing import Any

from engine.codecs import Codec, CodecError

_META = "sdgraph"
SDXL_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height", "aesthetic_score")


def _tensors_to_bytes(tensors: dict[str, Any], meta: Any) -> bytes:
    import torch
    from safetensors.torch import save

    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise CodecError(f"{name}: expected a tensor, got {type(value).__name__}")
    return save({name: value.detach().to("cpu").contiguous().clone() for name, value in tensors.items()},
                metadata={_META: json.dumps(meta)})


def _bytes_to_tensors(data: bytes) -> tuple[dict[str, Any], Any]:
    """The tensors and the JSON metadata (read from the safetensors header: 8-byte length, then JSON)."""
    from safetensors.torch import load

    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    return load(data), json.loads(header["__metadata__"][_META])


def _dump_tensor(value: Any) -> bytes:
    return _tensors_to_bytes({"tensor": value}, None)


def _load_tensor(data: bytes) -> Any:
    return _bytes_to_tensors(data)[0]["tensor"]


def _dump_latent(value: Any) -> bytes:
    from diffusion.latent import Latent

    latent = Latent.from_value(value)
    tensors = {"samples": latent.samples}
    if latent.noise_mask is not None:
        tensors["noise_mask"] = latent.noise_mask
    return _tensors_to_bytes(tensors, {"batch_index": latent.batch_index})


def _load_latent(data: bytes) -> Any:
    from diffusion.latent import Latent

    tensors, meta = _bytes_to_tensors(data)
    index = meta["batch_index"]
    return Latent(tensors["samples"], tensors.get("noise_mask"), None if index is None else tuple(index))


def _dump_conditioning(value: Any) -> bytes:
    from diffusion.latent import Conditioning

    tensors, entries = {}, []
    for i, entry in enumerate(Conditioning.from_value(value).entries):
        tensors[f"{i}.context"] = entry.context
        if entry.pooled is not None:
            tensors[f"{i}.pooled"] = entry.pooled
        sizes = {k: getattr(entry, k) for k in SDXL_KEYS if getattr(entry, k) is not None}  # CLIPTextEncodeSDXL's
        entries.append({"strength": entry.strength, "pooled": entry.pooled is not None, **sizes})
    return _tensors_to_bytes(tensors, entries)


def _load_conditioning(data: bytes) -> Any:
    from diffusion.latent import CondEntry, Conditioning

    tensors, entries = _bytes_to_tensors(data)
    return Conditioning(tuple(CondEntry(tensors[f"{i}.context"], tensors[f"{i}.pooled"] if e["pooled"] else None,
                                        float(e["strength"]), **{k: e[k] for k in SDXL_KEYS if k in e})
                              for i, e in enumerate(entries)))


CODECS = {
    "LATENT": Codec(_dump_latent, _load_latent),
    "CONDITIONING": Codec(_dump_conditioning, _load_conditioning),
    "IMAGE": Codec(_dump_tensor, _load_tensor),
    "MASK": Codec(_dump_tensor, _load_tensor),
}
