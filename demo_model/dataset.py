"""A synthetic captioned dataset drawn with Pillow, deterministic from a seed.

Each scene is a flat background with one object (sometimes two, side by side): a shape in a named colour, small
or large, at one of five positions. Its caption names every attribute, e.g. "a small red circle at the top on a
blue background". Some (colour, shape) pairs never appear in training (`HELD_OUT`), to test generalisation.

`scene(seed, index)` is a pure function of its arguments, so any sample can be regenerated anywhere; `render`
also returns each object's exact mask, which the evaluation uses to check its own scorer.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # pixels per side

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 18, "large": 30}  # bounding-box side in pixels
POSITIONS = {  # centre of the object, in pixels
    "left": (16, 32),
    "right": (48, 32),
    "top": (32, 16),
    "bottom": (32, 48),
    "centre": (32, 32),
}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "centre": "in the centre"}
HELD_OUT = frozenset({("red", "star"), ("blue", "triangle"), ("green", "square"), ("yellow", "circle"),
                      ("white", "triangle"), ("purple", "circle")})
JITTER = 2  # the centre moves by up to this many pixels either way
TWO_OBJECT_RATE = 0.15


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Thing, ...]
    background: str
    offsets: tuple[tuple[int, int], ...]  # pixel jitter of each object's centre

    @property
    def caption(self) -> str:
        return caption(self.objects, self.background)


def describe(thing: Thing) -> str:
    return f"a {thing.size} {thing.colour} {thing.shape} {POSITION_PHRASES[thing.position]}"


def caption(objects: tuple[Thing, ...], background: str) -> str:
    return " and ".join(describe(t) for t in objects) + f" on a {background} background"


def is_held_out(thing: Thing) -> bool:
    return (thing.colour, thing.shape) in HELD_OUT


def random_scene(rng: random.Random, *, held_out: bool = False) -> Scene:
    """A scene from `rng`: training pairs only, or (with `held_out`) one object whose pair is held out."""
    if held_out:
        colour, shape = rng.choice(sorted(HELD_OUT))
        things = [Thing(colour, shape, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)))]
    elif rng.random() < TWO_OBJECT_RATE:
        things = [_training_thing(rng, "left"), _training_thing(rng, "right")]
        if rng.random() < 0.5:
            things = [_training_thing(rng, "top"), _training_thing(rng, "bottom")]
    else:
        things = [_training_thing(rng, rng.choice(list(POSITIONS)))]
    used = {t.colour for t in things}
    background = rng.choice([c for c in COLOURS if c not in used])
    offsets = tuple((rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)) for _ in things)
    return Scene(tuple(things), background, offsets)


def _training_thing(rng: random.Random, position: str) -> Thing:
    while True:
        thing = Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES)), position)
        if not is_held_out(thing):
            return thing


def scene(seed: int, index: int, *, held_out: bool = False) -> Scene:
    """Scene number `index` of the stream `seed` (a pure function of both)."""
    return random_scene(random.Random(f"{seed}:{index}:{int(held_out)}"), held_out=held_out)


def shape_points(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape filling a `side`-wide box centred on (cx, cy) (circles use an ellipse)."""
    r = side / 2
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + r * 0.1 + radius * math.sin(angle)))
        return points
    raise ValueError(f"no polygon for shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, fill) -> None:
    r = side / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(shape_points(shape, cx, cy, side), fill=fill)


def render(s: Scene) -> tuple[Image.Image, list[np.ndarray]]:
    """The scene as a 64x64 RGB image, and each object's boolean mask [64, 64]."""
    image = Image.new("RGB", (SIZE, SIZE), COLOURS[s.background])
    draw = ImageDraw.Draw(image)
    masks = []
    for thing, (dx, dy) in zip(s.objects, s.offsets, strict=True):
        cx, cy = POSITIONS[thing.position]
        side = SIZES[thing.size]
        draw_shape(draw, thing.shape, cx + dx, cy + dy, side, COLOURS[thing.colour])
        mask = Image.new("L", (SIZE, SIZE), 0)
        draw_shape(ImageDraw.Draw(mask), thing.shape, cx + dx, cy + dy, side, 255)
        masks.append(np.asarray(mask) > 127)
    return image, masks


def to_tensor_array(image: Image.Image) -> np.ndarray:
    """RGB image -> float32 [3, H, W] in [-1, 1] (the VAE's pixel range)."""
    return (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def batch(seed: int, start: int, count: int) -> tuple[np.ndarray, list[str]]:
    """Training scenes start..start+count-1 of stream `seed`: pixels [count, 3, 64, 64] and their captions."""
    scenes = [scene(seed, i) for i in range(start, start + count)]
    pixels = np.stack([to_tensor_array(render(s)[0]) for s in scenes])
    return pixels, [s.caption for s in scenes]
