"""`sdgraph replay IMAGE.png`: re-run the graph a saved image carries and say whether the result matches.

The pieces here are pure: `compare_pixels` (identical / within tolerance / different, with PSNR and the share of
8-bit values within 2/255, as the parity checks count), `likely_reasons` (what differs between the manifest the
image carries and the current one: model file hashes, device, dtype policy, node versions, torch and sdgraph
versions) and `changed_keys`. The command itself (run the graph into a temporary folder, find the image the same
SaveImage node made at the same batch index) lives in cli.py. docs/reproducibility.md describes both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IDENTICAL, WITHIN_TOLERANCE, DIFFERENT = "identical", "within tolerance", "different"
TOLERANCE_STEPS = 2  # values within 2/255 count as equal ...
TOLERANCE_SHARE = 0.999  # ... and at least 99.9% of them must be


@dataclass(frozen=True)
class Comparison:
    verdict: str  # IDENTICAL | WITHIN_TOLERANCE | DIFFERENT
    max_difference: int  # in 1/255 steps
    psnr: float  # dB; inf when identical
    within: float  # share of values within 2/255
    note: str = ""

    @property
    def matches(self) -> bool:
        return self.verdict != DIFFERENT

    def describe(self) -> str:
        if self.note:
            return f"{self.verdict}: {self.note}"
        if self.verdict == IDENTICAL:
            return f"{IDENTICAL}: every pixel value is the same"
        return (f"{self.verdict}: PSNR {self.psnr:.1f} dB, {100 * self.within:.2f}% of pixel values within 2/255, "
                f"largest difference {self.max_difference}/255")


def compare_pixels(saved: np.ndarray, replayed: np.ndarray) -> Comparison:
    """Compare two 8-bit images [H,W,C]."""
    if saved.shape != replayed.shape:
        return Comparison(DIFFERENT, 255, 0.0, 0.0, f"the replayed image is {_size(replayed)}, the saved one "
                                                    f"{_size(saved)}")
    difference = np.abs(saved.astype(np.int16) - replayed.astype(np.int16))
    largest = int(difference.max()) if difference.size else 0
    if largest == 0:
        return Comparison(IDENTICAL, 0, math.inf, 1.0)
    mse = float(np.mean(difference.astype(np.float64) ** 2))
    psnr = 10 * math.log10(255**2 / mse)
    within = float(np.mean(difference <= TOLERANCE_STEPS))
    return Comparison(WITHIN_TOLERANCE if within >= TOLERANCE_SHARE else DIFFERENT, largest, psnr, within)


def read_pixels(path: str | Path) -> np.ndarray:
    """A PNG's 8-bit values as [H,W,C] (greyscale gets C=1)."""
    from PIL import Image

    with Image.open(path) as picture:
        pixels = np.asarray(picture)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _size(pixels: np.ndarray) -> str:
    return f"{pixels.shape[1]}x{pixels.shape[0]} with {pixels.shape[2]} channel(s)"


def likely_reasons(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Each difference between the manifest an image carries and the current one that can change pixels."""
    return [*_model_reasons(saved.get("models") or [], now.get("models") or []),
            *_placement_reasons(saved, now), *_node_reasons(saved.get("nodes") or {}, now.get("nodes") or {}),
            *_version_reasons(saved, now)]


def _model_reasons(saved: list, now: list) -> list[str]:
    current = {(m.get("node"), m.get("input"), m.get("name")): m.get("sha256") for m in now}
    reasons = []
    for model in saved:
        where = f"{model.get('kind')}/{model.get('name')} (node {model.get('node')} input {model.get('input')!r})"
        digest = current.get((model.get("node"), model.get("input"), model.get("name")))
        if digest is None:
            reasons.append(f"model file {where} is missing now")
        elif digest != model.get("sha256"):
            reasons.append(f"model file {where} changed: its sha256 was {_short(model.get('sha256'))} when the "
                           f"image was saved, {_short(digest)} now")
    return reasons


def _placement_reasons(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    reasons = []
    if saved.get("device") != now.get("device"):
        reasons.append(f"device: {saved.get('device')} when the image was saved, {now.get('device')} now")
    if saved.get("dtype") != now.get("dtype"):
        reasons.append(f"dtype: {_dtypes(saved.get('dtype'))} when the image was saved, {_dtypes(now.get('dtype'))} "
                       "now (pass --dtype to replay with the saved one)")
    return reasons


def _dtypes(policy: Any) -> str:
    if not isinstance(policy, Mapping):
        return str(policy)
    parts = [f"{part} {policy.get(part)}" for part in ("unet", "text", "vae")]
    return ", ".join(parts) + (" (UNet output layers fp32)" if policy.get("unet_output_fp32") else "")


def _node_reasons(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    reasons = []
    for nid, node in saved.items():
        current = now.get(nid)
        if current is None:
            continue
        if node.get("version") != current.get("version"):
            reasons.append(f"node {nid} ({node.get('type')}) changed version: {node.get('version')} when the image "
                           f"was saved, {current.get('version')} now")
    return reasons


def _version_reasons(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    return [f"{name} version: {saved.get(name)} when the image was saved, {now.get(name)} now"
            for name in ("torch", "sdgraph") if saved.get(name) and now.get(name) and saved[name] != now[name]]


def changed_keys(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Node ids whose content key differs between two manifests (nodes in both)."""
    old, new = saved.get("keys") or {}, now.get("keys") or {}
    return [nid for nid in old if nid in new and old[nid] != new[nid]]


def _short(digest: Any) -> str:
    return f"{digest[:12]}..." if isinstance(digest, str) else str(digest)


def current_manifest(prompt: Mapping[str, Any], runtime: Any, registry: Any) -> dict[str, Any]:
    """The manifest a run of `prompt` would carry now, before running it (no content keys): model hashes, device
    and dtypes as `runtime` resolves them (this imports torch), the registry's node versions."""
    from .manifest import manifest_of

    runtime.placement()
    definitions = {nid: registry.get(entry.get("class_type", "")) for nid, entry in prompt.items()
                   if isinstance(entry, Mapping)}
    found = {nid: definition for nid, definition in definitions.items() if definition is not None}
    return manifest_of(prompt, runtime, keys={}, versions={nid: d.version for nid, d in found.items()},
                       types={nid: d.name for nid, d in found.items()})


def replayed_file(ui: Mapping[str, Any], output: Mapping[str, Any], folders: Any) -> Path | None:
    """The file the saving node (`output["node"]`) wrote at `output["batch_index"]` in a run's UI payloads."""
    images = (ui.get(str(output.get("node"))) or {}).get("images") or []
    index = output.get("batch_index", 0)
    if not isinstance(index, int) or not 0 <= index < len(images):
        return None
    item = images[index]
    return folders.root(item.get("type", "output")) / item.get("subfolder", "") / item["filename"]
