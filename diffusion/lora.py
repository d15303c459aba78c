"""LoRA files: reading them, the weight deltas of each format, and patching a loaded network.

Formats (as ComfyUI reads them, comfy/lora.py and comfy/weight_adapter/): LoRA/LoCon (`lora_up`/`lora_down`, the
diffusers and PEFT spellings `lora_B`/`lora_A`, `.lora.up/.down`, `_lora.up/.down`, an optional `lora_mid` for
Tucker convolutions), LoHa (`hada_w1_a/b`, `hada_w2_a/b`, optional `hada_t1/t2`), LoKr (`lokr_w1` or
`lokr_w1_a/b`, `lokr_w2` or `lokr_w2_a/b`, optional `lokr_t2`), full differences (`diff`, `diff_b`), each with an
optional `alpha` and `dora_scale` (DoRA). Key names map to our weights in `diffusion.lora_keys`.

Numerics (ComfyUI's `calculate_weight`): for each weight, an fp32 copy of the stored weight gets every patch in
order, `W += (strength * alpha / rank) * delta` (alpha / rank is 1 without an alpha key), or DoRA's decomposition;
the result is cast back to the stored dtype. Text-encoder results are rounded through fp16 first, because ComfyUI
keeps its text encoder in fp16 (also on the CPU).

Patching a loaded network without writing its weights is diffusion/lora_patch.py's (docs/lora.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch

from .families import FAMILIES, Family
from .lora_keys import family_hint, lora_targets, strip_wrapper

# suffix -> (adapter kind, role); the kind None marks roles shared by every kind
SUFFIXES = MappingProxyType({
    ".lora_up.weight": ("lora", "up"), ".lora_down.weight": ("lora", "down"), ".lora_mid.weight": ("lora", "mid"),
    "_lora.up.weight": ("lora", "up"), "_lora.down.weight": ("lora", "down"),
    ".lora_B.weight": ("lora", "up"), ".lora_A.weight": ("lora", "down"),
    ".lora.up.weight": ("lora", "up"), ".lora.down.weight": ("lora", "down"),
    ".lora_linear_layer.up.weight": ("lora", "up"), ".lora_linear_layer.down.weight": ("lora", "down"),
    ".lora_B": ("lora", "up"), ".lora_A": ("lora", "down"),
    ".hada_w1_a": ("loha", "w1a"), ".hada_w1_b": ("loha", "w1b"), ".hada_w2_a": ("loha", "w2a"),
    ".hada_w2_b": ("loha", "w2b"), ".hada_t1": ("loha", "t1"), ".hada_t2": ("loha", "t2"),
    ".lokr_w1": ("lokr", "w1"), ".lokr_w2": ("lokr", "w2"), ".lokr_w1_a": ("lokr", "w1a"),
    ".lokr_w1_b": ("lokr", "w1b"), ".lokr_w2_a": ("lokr", "w2a"), ".lokr_w2_b": ("lokr", "w2b"),
    ".lokr_t2": ("lokr", "t2"),
    ".diff": ("diff", "diff"), ".diff_b": ("diff_b", "diff"),
    ".alpha": (None, "alpha"), ".dora_scale": (None, "dora_scale"),
})  # fmt: skip
REQUIRED = MappingProxyType({"lora": ("up", "down"), "loha": ("w1a", "w1b", "w2a", "w2b"), "diff": ("diff",),
                             "diff_b": ("diff",)})



class LoraError(ValueError):
    """A LoRA file that does not fit the model (another family, other shapes) or cannot be read."""


@dataclass(frozen=True, eq=False)
class Adapter:
    """The patch of one weight: its kind, its tensors (as stored in the file) and alpha."""

    kind: str  # lora, loha, lokr, diff
    tensors: Mapping[str, torch.Tensor]
    alpha: float | None = None

    def _t(self, role: str, device: torch.device) -> torch.Tensor | None:
        tensor = self.tensors.get(role)
        return None if tensor is None else tensor.to(device=device, dtype=torch.float32)

    def delta_numel(self) -> int:
        """Elements of the unscaled delta, from shapes alone (to check a file against a model cheaply)."""
        s = {role: tuple(t.shape) for role, t in self.tensors.items()}
        if self.kind == "lora":
            spatial = math.prod(s["mid"][2:]) if "mid" in s else 1
            return s["up"][0] * math.prod(s["down"][1:]) * spatial
        if self.kind == "loha":
            if "t1" in s:
                return s["w1a"][1] * s["w1b"][1] * math.prod(s["t1"][2:])
            return s["w1a"][0] * s["w1b"][1]
        if self.kind == "lokr":
            w1 = math.prod(s["w1"]) if "w1" in s else s["w1a"][0] * s["w1b"][1]
            if "w2" in s:
                w2 = math.prod(s["w2"])
            elif "t2" in s:
                w2 = s["w2a"][1] * s["w2b"][1] * math.prod(s["t2"][2:])
            else:
                w2 = s["w2a"][0] * s["w2b"][1]
            return w1 * w2
        return math.prod(s["diff"])

    def delta(self, shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, float]:
        """(unscaled fp32 delta shaped like the weight, alpha scale)."""
        t = lambda role: self._t(role, device)  # noqa: E731
        if self.kind == "lora":
            up, down, mid = t("up"), t("down"), t("mid")
            rank = down.shape[0]
            if mid is not None:  # Tucker-decomposed convolution: fold the middle kernel into `down`
                folded = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
                down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1))
                down = down.reshape(folded).transpose(0, 1)
            diff = torch.mm(up.flatten(1), down.flatten(1))
        elif self.kind == "loha":
            rank = self.tensors["w1b"].shape[0]
            if "t1" in self.tensors:
                m1 = torch.einsum("i j k l, j r, i p -> p r k l", t("t1"), t("w1b"), t("w1a"))
                m2 = torch.einsum("i j k l, j r, i p -> p r k l", t("t2"), t("w2b"), t("w2a"))
            else:
                m1, m2 = torch.mm(t("w1a"), t("w1b")), torch.mm(t("w2a"), t("w2b"))
            diff = m1 * m2
        elif self.kind == "lokr":
            diff, rank = self._kronecker(device)
        else:
            diff, rank = t("diff"), None
        scale = self.alpha / rank if self.alpha is not None and rank is not None else 1.0
        return diff.reshape(shape), scale

    def _kronecker(self, device: torch.device) -> tuple[torch.Tensor, int | None]:
        t = lambda role: self._t(role, device)  # noqa: E731
        rank = None
        if "w1" in self.tensors:
            w1 = t("w1")
        else:
            rank = self.tensors["w1b"].shape[0]
            w1 = torch.mm(t("w1a"), t("w1b"))
        if "w2" in self.tensors:
            w2 = t("w2")
        else:
            rank = self.tensors["w2b"].shape[0]
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t("t2"), t("w2b"), t("w2a")) \
                if "t2" in self.tensors else torch.mm(t("w2a"), t("w2b"))
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2), rank

    def apply(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """Patch a contiguous fp32 weight (in place where ComfyUI does) and return it."""
        dora = self.tensors.get("dora_scale")
        if self.kind == "lora" and dora is None and "mid" not in self.tensors:
            # the common case in one pass over the weight: W += (strength * alpha / rank) * up @ down
            down = self._t("down", weight.device).flatten(1)
            scale = self.alpha / down.shape[0] if self.alpha is not None else 1.0
            weight.view(weight.shape[0], -1).addmm_(self._t("up", weight.device).flatten(1), down,
                                                    alpha=strength * scale)
            return weight
        diff, scale = self.delta(weight.shape, weight.device)
        if dora is None:
            weight += (strength * scale) * diff
            return weight
        return decompose(weight, diff * scale, dora.to(weight.device, torch.float32), strength)


def decompose(weight: torch.Tensor, diff: torch.Tensor, dora_scale: torch.Tensor, strength: float) -> torch.Tensor:
    """DoRA: the patched weight's direction with the magnitudes `dora_scale` (per input column, as ComfyUI)."""
    patched = weight + diff
    norm = patched.transpose(0, 1).reshape(patched.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(patched.shape[1], *[1] * (patched.dim() - 1)).transpose(0, 1)
    patched *= dora_scale / norm
    if strength != 1.0:
        patched -= weight
        weight += strength * patched
        return weight
    return patched


def group_keys(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """{layer prefix: {role: tensor, "#keys": the file's keys}} and the keys no known suffix ends."""
    groups: dict[str, dict] = {}
    unknown = []
    by_length = sorted(SUFFIXES, key=len, reverse=True)
    for key, tensor in state.items():
        suffix = next((s for s in by_length if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        kind, role = SUFFIXES[suffix]
        prefix = strip_wrapper(key[: -len(suffix)]) + ("#bias" if kind == "diff_b" else "")
        groups.setdefault(prefix, {"#keys": []})[role] = tensor
        groups[prefix]["#keys"].append(key)
        if kind is not None:
            groups[prefix].setdefault("#kind", kind)
    return groups, unknown


def _adapter(group: Mapping[str, torch.Tensor]) -> Adapter | None:
    kind = group.get("#kind")
    if kind is None:
        return None
    kind = "diff" if kind == "diff_b" else kind
    tensors = {role: t for role, t in group.items() if not role.startswith("#") and role != "alpha"}
    if kind == "lokr":
        complete = ("w1" in tensors or {"w1a", "w1b"} <= tensors.keys()) and \
            ("w2" in tensors or {"w2a", "w2b"} <= tensors.keys())
    else:
        complete = set(REQUIRED[kind]) <= tensors.keys() and (kind != "loha" or ("t1" in tensors) == ("t2" in tensors))
    if not complete:
        return None
    alpha = group.get("alpha")
    return Adapter(kind, MappingProxyType(tensors), None if alpha is None else float(alpha.float().item()))


@dataclass(frozen=True, eq=False)
class PartPatch:
    """One LoRA file's patches for one part, {parameter name: Adapter}. Equal when file and part are."""

    source: tuple  # (path, size, mtime_ns)
    part: str
    adapters: Mapping[str, Adapter] = field(repr=False)
    nbytes: int = 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PartPatch) and (self.source, self.part) == (other.source, other.part)

    def __hash__(self) -> int:
        return hash((self.source, self.part))


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file mapped onto one model: the UNet's and the text encoder's patches, and the keys that matched
    nothing (reported, not silently dropped)."""

    path: Path
    unet: PartPatch
    text_encoder: PartPatch
    unmatched: tuple[str, ...]


def read_lora_state(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The file's tensors: safetensors, or a torch pickle loaded weights-only when the user allowed pickles."""
    from .checkpoint import read_state_dict
    from .safetensors_header import CheckpointError

    try:
        return read_state_dict(path, allow_pickle=allow_pickle)
    except CheckpointError as exc:
        raise LoraError(str(exc)) from exc


def map_lora(path: str | os.PathLike, state: Mapping[str, torch.Tensor], unet_config, text_config,
             family: Family = FAMILIES["sd1"]) -> LoraFile:
    """Match a LoRA's tensors to the model's weights (`text_config`: see `lora_keys.lora_targets`); a file for
    another model (no key matches, or shapes that do not fit) is refused with a LoraError naming the file and the
    model's family."""
    path = Path(path)
    stat = path.stat()
    source = (str(path), stat.st_size, stat.st_mtime_ns)
    targets = lora_targets(unet_config, text_config)
    groups, unmatched = group_keys(state)
    found: dict[str, dict[str, Adapter]] = {"unet": {}, "text_encoder": {}}
    mismatched = []
    for prefix, group in groups.items():
        adapter = _adapter(group)
        target = targets.get(prefix)
        if adapter is None or target is None:
            unmatched += group["#keys"]
            continue
        part, name, shape = target
        if adapter.delta_numel() != math.prod(shape):
            mismatched.append(f"{prefix} (patches {name} of shape {list(shape)})")
            continue
        found[part][name] = adapter
    hint = family_hint(list(state), family.name, family.label) + f" Use a LoRA made for {family.label} models."
    if mismatched:
        shown = ", ".join(mismatched[:3]) + (f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else "")
        raise LoraError(f"{path.name}: {len(mismatched)} of its layers do not fit this model's shapes: {shown}."
                        f"{hint}")
    if state and not found["unet"] and not found["text_encoder"]:
        raise LoraError(f"{path.name}: none of its {len(state)} tensors names a layer of this {family.label} model "
                        f"(e.g. {sorted(state)[0]}).{hint}")
    parts = {part: PartPatch(source, part, MappingProxyType(adapters), _bytes(adapters))
             for part, adapters in found.items()}
    return LoraFile(path, parts["unet"], parts["text_encoder"], tuple(sorted(unmatched)))


def _bytes(adapters: Mapping[str, Adapter]) -> int:
    return sum(t.numel() * t.element_size() for a in adapters.values() for t in a.tensors.values())


def load_lora(path: str | os.PathLike, unet_config, text_config, *, family: Family = FAMILIES["sd1"],
              allow_pickle: bool = False) -> LoraFile:
    return map_lora(path, read_lora_state(Path(path), allow_pickle=allow_pickle), unet_config, text_config, family)
