"""Typed payloads that flow between nodes: `Latent` and `Conditioning`.

Both convert from and to ComfyUI's untyped shapes (LATENT dict, CONDITIONING list of [tensor, dict]) so custom
nodes written for ComfyUI can read and produce them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

_LATENT_KEYS = ("samples", "noise_mask", "batch_index")


@dataclass(frozen=True, eq=False)
class Latent(Mapping):
    """A batch of latents.

    samples: [B, 4, h, w], unscaled (as VAEEncode gives it; the 0.18215 factor is applied inside sampling).
    noise_mask: optional [B or 1, 1, H, W] in pixel (or latent) resolution, 1 = repaint, 0 = keep.
    batch_index: optional per-sample index into the seed's noise stream (ComfyUI's LatentFromBatch etc.).
    Read-only mapping access (`latent["samples"]`, `.get`, `in`, `.copy()`) mirrors ComfyUI's LATENT dict.
    """

    samples: Tensor
    noise_mask: Tensor | None = None
    batch_index: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.samples, Tensor) or self.samples.ndim != 4:
            raise ValueError(f"Latent.samples must be a [B, C, h, w] tensor, got {_describe(self.samples)}")
        if self.noise_mask is not None and not isinstance(self.noise_mask, Tensor):
            raise ValueError(f"Latent.noise_mask must be a tensor or None, got {_describe(self.noise_mask)}")
        if self.batch_index is not None:
            index = tuple(int(i) for i in self.batch_index)
            if len(index) != self.samples.shape[0] or any(i < 0 for i in index):
                raise ValueError(f"Latent.batch_index needs {self.samples.shape[0]} non-negative ints, got {index}")
            object.__setattr__(self, "batch_index", index)

    @classmethod
    def from_value(cls, value: Latent | Mapping[str, Any]) -> Latent:
        """Accept a Latent or a ComfyUI LATENT dict (keys other than ours are dropped)."""
        if isinstance(value, Latent):
            return value
        if not isinstance(value, Mapping) or "samples" not in value:
            raise TypeError(f"expected a Latent or a dict with 'samples', got {_describe(value)}")
        index = value.get("batch_index")
        return cls(value["samples"], value.get("noise_mask"), None if index is None else tuple(index))

    def replace(self, **changes: Any) -> Latent:
        fields = {k: getattr(self, k) for k in _LATENT_KEYS}
        return Latent(**{**fields, **changes})

    # --- read-only mapping view, as ComfyUI's dict -------------------------------------------------------------
    def _present(self) -> tuple[str, ...]:
        return tuple(k for k in _LATENT_KEYS if getattr(self, k) is not None)

    def __getitem__(self, key: str) -> Any:
        if key not in self._present():
            raise KeyError(key)
        value = getattr(self, key)
        return list(value) if key == "batch_index" else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._present())

    def __len__(self) -> int:
        return len(self._present())

    def copy(self) -> dict[str, Any]:
        return {k: self[k] for k in self}

    __eq__ = object.__eq__
    __hash__ = object.__hash__


@dataclass(frozen=True, eq=False)
class CondEntry:
    """One text conditioning: cross-attention context [1 or B, T, D], optional pooled output, and strength."""

    context: Tensor
    pooled: Tensor | None = None
    strength: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.context, Tensor) or self.context.ndim != 3:
            raise ValueError(f"CondEntry.context must be a [B, T, D] tensor, got {_describe(self.context)}")


# ComfyUI cond-dict keys that change how sampling works and that we do not implement: refusing them beats
# silently drawing a different image. Other unknown keys are dropped.
UNSUPPORTED_COND_KEYS = frozenset({
    "area", "mask", "mask_strength", "set_area_to_bounds", "control", "control_apply_to_uncond", "gligen",
    "start_percent", "end_percent", "timestep_start", "timestep_end", "hooks", "concat_latent_image",
    "concat_mask", "noise_augmentation", "default",
})


@dataclass(frozen=True, eq=False)
class Conditioning:
    """A positive or negative prompt: one or more entries, each predicted separately and averaged by strength."""

    entries: tuple[CondEntry, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))
        if not all(isinstance(e, CondEntry) for e in self.entries):
            raise TypeError("Conditioning.entries must all be CondEntry")

    def combine(self, other: Conditioning) -> Conditioning:
        """ConditioningCombine: both sets of entries, in order."""
        return Conditioning(self.entries + Conditioning.from_value(other).entries)

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def from_value(cls, value: Conditioning | Sequence[Any]) -> Conditioning:
        """Accept a Conditioning or ComfyUI's `[[context, {"pooled_output": ..., ...}], ...]`."""
        if isinstance(value, Conditioning):
            return value
        if isinstance(value, CondEntry):
            return cls((value,))
        if isinstance(value, Sequence) and value and all(isinstance(v, CondEntry) for v in value):
            return cls(tuple(value))
        entries = []
        for item in value:
            if not isinstance(item, Sequence) or len(item) != 2 or not isinstance(item[1], Mapping):
                raise TypeError(f"expected [tensor, dict] conditioning items, got {_describe(item)}")
            context, extra = item
            bad = sorted(UNSUPPORTED_COND_KEYS.intersection(extra))
            if bad:
                raise ValueError(f"conditioning uses {', '.join(bad)}, which sdgraph's sampler does not support")
            entries.append(CondEntry(context, extra.get("pooled_output"), float(extra.get("strength", 1.0))))
        return cls(tuple(entries))

    def to_comfy(self) -> list[list[Any]]:
        out = []
        for e in self.entries:
            extra: dict[str, Any] = {"pooled_output": e.pooled}
            if e.strength != 1.0:
                extra["strength"] = e.strength
            out.append([e.context, extra])
        return out


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor of shape {list(value.shape)}"
    return type(value).__name__
