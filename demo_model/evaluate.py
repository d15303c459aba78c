"""Prompt following without another model: measure the generated picture and compare with the prompt.

`analyse` reads a 64x64 picture the way the dataset draws one: the background is the median of the border
pixels; the object is the largest connected region that differs clearly from it; its colour is the median of
its inner pixels; its position the nearest of the five anchors to its centroid; its shape the template
(circle, square, triangle, star, drawn by the dataset's own code) whose mask, cropped to its bounding box and
resized to 24x24, overlaps it best (IoU). Colours are named by the nearest palette entry in RGB.

`generate` runs prompts through the real node graph (CheckpointLoaderSimple -> CLIPTextEncode -> KSampler ->
VAEDecode), so it measures exactly what a user of the shipped file gets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from demo_model import dataset

ATTRIBUTES = ("colour", "background", "position", "shape", "size")
OBJECT_DISTANCE = 60.0  # RGB distance from the background above which a pixel belongs to an object
TEMPLATE = 24
PALETTE_NAMES = tuple(dataset.COLOURS)
PALETTE = np.array([dataset.COLOURS[n] for n in PALETTE_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None
    position: str | None
    shape: str | None
    size: str | None


def nearest_colour(rgb: np.ndarray) -> str:
    return PALETTE_NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]


def border_pixels(image: np.ndarray, width: int = 2) -> np.ndarray:
    mask = np.ones(image.shape[:2], dtype=bool)
    mask[width:-width, width:-width] = False
    return image[mask]


def crop_resize(mask: np.ndarray, size: int = TEMPLATE) -> np.ndarray:
    """A boolean mask cropped to its bounding box and resized to size x size."""
    rows, cols = np.nonzero(mask)
    crop = mask[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    image = Image.fromarray(crop.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return np.asarray(image) > 127


def shape_templates() -> dict[str, np.ndarray]:
    templates = {}
    for shape in dataset.SHAPES:
        canvas = Image.new("L", (256, 256), 0)
        dataset.draw_shape(ImageDraw.Draw(canvas), shape, 128, 128, 160, 255)
        templates[shape] = crop_resize(np.asarray(canvas) > 127)
    return templates


def classify_shape(mask: np.ndarray, templates: dict[str, np.ndarray]) -> str:
    region = crop_resize(mask)
    scores = {s: (region & t).sum() / max(1, (region | t).sum()) for s, t in templates.items()}
    return max(scores, key=scores.get)


def object_mask(image: np.ndarray, background_rgb: np.ndarray) -> np.ndarray | None:
    """The largest connected region far from the background colour, or None."""
    far = np.sqrt(((image.astype(np.float32) - background_rgb) ** 2).sum(axis=-1)) > OBJECT_DISTANCE
    labels, count = ndimage.label(far)
    if count == 0:
        return None
    sizes = ndimage.sum(far, labels, index=range(1, count + 1))
    largest = labels == (1 + int(np.argmax(sizes)))
    return largest if largest.sum() >= 12 else None


def analyse(image: np.ndarray, templates: dict[str, np.ndarray] | None = None) -> Reading:
    """Read background, object colour, position, shape and size from an RGB uint8 [64, 64, 3] picture."""
    templates = templates or shape_templates()
    background_rgb = np.median(border_pixels(image).astype(np.float32), axis=0)
    background = nearest_colour(background_rgb)
    mask = object_mask(image, background_rgb)
    if mask is None:
        return Reading(background, None, None, None, None)
    inner = ndimage.binary_erosion(mask)
    pixels = image[inner if inner.sum() >= 4 else mask].astype(np.float32)
    rows, cols = np.nonzero(mask)
    centre = np.array([cols.mean(), rows.mean()])
    position = min(dataset.POSITIONS, key=lambda p: float(((np.array(dataset.POSITIONS[p]) - centre) ** 2).sum()))
    side = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
    size = "small" if side < (dataset.SIZES["small"] + dataset.SIZES["large"]) / 2 else "large"
    return Reading(background, nearest_colour(np.median(pixels, axis=0)), position,
                   classify_shape(mask, templates), size)


def score(reading: Reading, thing: dataset.Thing, background: str) -> dict[str, bool]:
    """Which attributes of the prompt the picture shows."""
    return {
        "colour": reading.colour == thing.colour,
        "background": reading.background == background,
        "position": reading.position == thing.position,
        "shape": reading.shape == thing.shape,
        "size": reading.size == thing.size,
    }


def single_object_scenes(seed: int, count: int, *, held_out: bool) -> list[dataset.Scene]:
    """`count` one-object scenes of a stream the training never reads (its own seed), seen or held-out pairs."""
    scenes, index = [], 0
    while len(scenes) < count:
        s = dataset.scene(seed, index, held_out=held_out)
        index += 1
        if len(s.objects) == 1:
            scenes.append(s)
    return scenes


def accuracies(scores: Iterable[dict[str, bool]]) -> dict[str, float]:
    rows = list(scores)
    return {a: sum(r[a] for r in rows) / max(1, len(rows)) for a in ATTRIBUTES}


def txt2img_graph(ckpt_name: str, prompt: str, *, seed: int, steps: int, cfg: float, sampler: str = "euler",
                  scheduler: str = "normal", negative: str = "", size: int = 64) -> dict:
    """The API graph of graphs/txt2img.json with these settings: KSampler is node 3, VAEDecode node 8.
    The benchmarks run it too (bench/)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    }


def generate(base: Path, ckpt_name: str, prompts: Sequence[str], *, seed: int = 0, steps: int = 20,
             cfg: float = 5.0) -> list[np.ndarray]:
    """RGB uint8 pictures for `prompts`, each through the node graph with its own seed (seed + index)."""
    from engine import Executor, validate
    from nodes import build_registry
    from nodes.folders import Folders
    from nodes.runtime import Runtime

    registry = build_registry(entry_points=False)
    runtime = Runtime(Folders.at(base))
    executor = Executor(registry, resources=runtime)
    images = []
    for i, prompt in enumerate(prompts):
        api = txt2img_graph(ckpt_name, prompt, seed=seed + i, steps=steps, cfg=cfg)
        result = validate(api, registry, targets=["8"], resources=runtime)
        if not result.ok:
            raise ValueError("; ".join(str(e) for e in result.errors))
        report = executor.run(result.graph)
        if report.error is not None:
            raise RuntimeError(report.error.traceback)
        pixels = report.outputs["8"][0][0][0].numpy()  # first output, first list item, first image
        images.append((pixels.clip(0, 1) * 255 + 0.5).astype(np.uint8))
    return images


def evaluate_scenes(images: Sequence[np.ndarray], scenes: Sequence[dataset.Scene]) -> dict[str, float]:
    templates = shape_templates()
    pairs = zip(images, scenes, strict=True)
    return accuracies(score(analyse(img, templates), s.objects[0], s.background) for img, s in pairs)

