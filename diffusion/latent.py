"""Typed payloads that flow between nodes: `Latent` and `Conditioning`.

Both convert from and to ComfyUI's untyped shapes (LATENT dict, CONDITIONING list of [tensor, dict]) so custom
nodes written for ComfyUI can read and produce them.
"""

from __future__ import annotations

import dataclasses
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


SIZE_FIELDS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")
Area = tuple  # (h, w, y, x) in latent cells, or ("percentage", h, w, y, x) as fractions of the latent


@dataclass(frozen=True, eq=False)
class CondEntry:
    """One text conditioning: cross-attention context [1 or B, T, D], optional pooled output, and strength.

    The rest mirror ComfyUI's cond-dict keys (ConditioningSetArea/Mask/TimestepRange, ControlNetApply,
    InpaintModelConditioning); their defaults leave sampling as plain text conditioning:
    area: None (whole latent), (h, w, y, x) in latent cells, or ("percentage", h, w, y, x) as fractions.
    mask: [B?, H, W] weights (any size, resized to the latent), times mask_strength; set_area_to_bounds
    restricts the prediction to the mask's bounding box. start_percent/end_percent: the part of the schedule
    where the entry is used. control: a ControlNet chain the model is called with; control_apply_to_uncond
    (ControlNetApply) also gives it to the negative's whole-latent entries. concat_latent_image and
    concat_mask: the inputs of 9-channel inpainting models (ignored by ordinary ones).
    """

    context: Tensor
    pooled: Tensor | None = None
    strength: float = 1.0
    area: Area | None = None
    mask: Tensor | None = None
    mask_strength: float = 1.0
    set_area_to_bounds: bool = False
    start_percent: float = 0.0
    end_percent: float = 1.0
    control: Any = None
    control_apply_to_uncond: bool = False
    concat_latent_image: Tensor | None = None
    concat_mask: Tensor | None = None
    width: int | None = None
    height: int | None = None
    crop_w: int | None = None
    crop_h: int | None = None
    target_width: int | None = None
    target_height: int | None = None
    aesthetic_score: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.context, Tensor) or self.context.ndim != 3:
            raise ValueError(f"CondEntry.context must be a [B, T, D] tensor, got {_describe(self.context)}")
        if self.area is not None:
            object.__setattr__(self, "area", _check_area(self.area))
        for name in ("mask", "concat_latent_image", "concat_mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Tensor):
                raise ValueError(f"CondEntry.{name} must be a tensor or None, got {_describe(value)}")
        if self.mask is not None and not 2 <= self.mask.ndim <= 4:
            raise ValueError(f"CondEntry.mask must be [H, W] or [B, H, W], got {_describe(self.mask)}")
        for name in ("strength", "mask_strength", "start_percent", "end_percent"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool) or value < 0):
                raise ValueError(f"CondEntry.{name} must be a non-negative number of pixels or None, got {value!r}")
            object.__setattr__(self, name, None if value is None else int(value))
        if self.aesthetic_score is not None:
            object.__setattr__(self, "aesthetic_score", float(self.aesthetic_score))
        object.__setattr__(self, "set_area_to_bounds", bool(self.set_area_to_bounds))
        object.__setattr__(self, "control_apply_to_uncond", bool(self.control_apply_to_uncond))

    def replace(self, **changes: Any) -> CondEntry:
        return dataclasses.replace(self, **changes)


def _check_area(area: Any) -> Area:
    """ComfyUI's area tuple, typed: 4 ints, or "percentage" and 4 fractions."""
    values = tuple(area) if isinstance(area, Sequence) and not isinstance(area, str) else ()
    if len(values) == 5 and values[0] == "percentage":
        return ("percentage", *(float(v) for v in values[1:]))
    if len(values) == 4 and all(isinstance(v, int) or (isinstance(v, float) and v.is_integer()) for v in values):
        return tuple(int(v) for v in values)
    raise ValueError(f"CondEntry.area must be (h, w, y, x) in latent cells or ('percentage', h, w, y, x), "
                     f"got {area!r}")


# ComfyUI cond-dict keys read into CondEntry fields (the tensor is the context; strength is its own field).
_FIELD_KEYS = {"pooled_output": "pooled", "area": "area", "mask": "mask", "mask_strength": "mask_strength",
               "set_area_to_bounds": "set_area_to_bounds", "start_percent": "start_percent",
               "end_percent": "end_percent", "control": "control",
               "control_apply_to_uncond": "control_apply_to_uncond", "concat_latent_image": "concat_latent_image",
               "concat_mask": "concat_mask", "strength": "strength", "aesthetic_score": "aesthetic_score",
               **{name: name for name in SIZE_FIELDS}}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CondEntry) if f.name != "context"}

# ComfyUI cond-dict keys that change how sampling works and that we do not implement: refusing them beats
# silently drawing a different image. Other unknown keys are dropped.
UNSUPPORTED_COND_KEYS = frozenset({
    "gligen", "timestep_start", "timestep_end", "hooks", "noise_augmentation",
    "default",
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
            fields = {name: extra[key] for key, name in _FIELD_KEYS.items() if extra.get(key) is not None}
            entries.append(CondEntry(context, **fields))
        return cls(tuple(entries))

    def to_comfy(self) -> list[list[Any]]:
        out = []
        for e in self.entries:
            extra: dict[str, Any] = {"pooled_output": e.pooled}
            for key, name in _FIELD_KEYS.items():
                value, default = getattr(e, name), _DEFAULTS[name]
                if key != "pooled_output" and (value is not None if default is None else value != default):
                    extra[key] = value
            out.append([e.context, extra])
        return out


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor of shape {list(value.shape)}"
    return type(value).__name__
