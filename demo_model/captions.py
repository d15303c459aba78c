"""Everyday phrasings of a scene: the varied captions the phrasing stage trains on, and held-out paraphrases.

A caption is a sentence template filled with phrases: an object phrase (optional article, optional size word,
colour, shape), a position phrase ("on the left", "at the left", "left side", "in the middle", ...), a tag-style
position ("left", "centre", ...) and the background colour. Synonyms are shared by both sets, so every word the
evaluation uses is one the model can know; the sentence *templates* (word order, connectors, tag style) are split
into `TRAINING_TEMPLATES` and `HELD_OUT_TEMPLATES`, and the training generator only ever draws from the first.
`template_pattern` turns a template into a regular expression of every caption it can produce, which the tests use
to check that no training caption is a held-out phrasing.

Every function is a pure function of its arguments (scene, seed, index), like the dataset.
"""

from __future__ import annotations

import random
import re

from demo_model import dataset

# Phrases, shared by training and held-out phrasings.
ARTICLES = ("a", "one", "")
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_WORDS = {  # everyday phrases for each position
    "left": ("on the left", "at the left", "to the left", "on the left side", "at the left side", "left side"),
    "right": ("on the right", "at the right", "to the right", "on the right side", "at the right side",
              "right side"),
    "top": ("at the top", "on the top", "on top", "at the top side", "top side", "up top"),
    "bottom": ("at the bottom", "on the bottom", "at the bottom side", "bottom side", "down below"),
    "centre": ("in the centre", "in the center", "in the middle", "at the centre", "at the center", "centered",
               "centred", "in the middle of the picture"),
}
POSITION_TAGS = {"left": ("left", "left side"), "right": ("right", "right side"), "top": ("top", "top side"),
                 "bottom": ("bottom", "bottom side"), "centre": ("centre", "center", "middle")}

# Sentence templates: {obj} object phrase, {pos} position phrase, {tag} tag-style position, {bg} background colour.
# The first phrasing round trains on FIRST_ROUND_TEMPLATES; the second adds MORE_TEMPLATES: other word orders, the
# colour after the word "background" or "backdrop", the background named first, "behind it", "is", and every order
# of the three parts (object, position, background), the object last included.
FIRST_ROUND_TEMPLATES = (
    "{obj} {pos} on a {bg} background",
    "{obj} {pos} on {bg}",
    "{obj} on a {bg} background {pos}",
    "{obj} {pos}, {bg} background",
    "{obj}, {bg} background, {tag}",
    "{bg} background, {obj} {pos}",
    "{obj} {pos} against a {bg} background",
    "a {bg} background with {obj} {pos}",
    "{pos}, {obj} on a {bg} background",
    "{obj} {pos} in front of a {bg} background",
    "{obj} {pos} on a plain {bg} background",
    "{bg}, {obj}, {tag}",
    "{obj} {pos} on a {bg} backdrop",
    "{tag}: {obj}, {bg} background",
    "{obj} on {bg}, {pos}",
)
MORE_TEMPLATES = (
    "{obj} {pos}, background {bg}",
    "{obj} {pos}, background colour {bg}",
    "{obj} {pos}; background: {bg}",
    "background {bg}, {obj} {pos}",
    "{tag}, {obj}, background {bg}",
    "{obj} {pos}, the backdrop is {bg}",
    "{obj} is {pos}, the background is {bg}",
    "{bg} backdrop, {obj} {pos}",
    "{obj} {pos} with {bg} behind it",
    "{obj} sitting {pos} on a {bg} background",
    "on a {bg} background, {obj} {pos}",
    "image of {obj} {pos} on a {bg} background",
    "{obj} {pos} and a {bg} background",
    "{obj} {pos} set against {bg}",
    "{tag} {obj}, {bg} colored background",
    "{bg} background and {obj} {pos}",
    "{tag}, {bg} background, {obj}",
    "{pos}, background {bg}: {obj}",
    "{pos} against {bg}, {obj}",
    "{bg} background, {tag}: {obj}",
    "background {bg}, {pos}, {obj}",
    "{bg} backdrop {pos}: {obj}",
)
TRAINING_TEMPLATES = FIRST_ROUND_TEMPLATES + MORE_TEMPLATES
HELD_OUT_TEMPLATES = (
    "{obj} {pos} with a {bg} background",
    "{obj}, {tag}, {bg} background",
    "{bg} backdrop with {obj} {pos}",
    "there is {obj} {pos} on a {bg} background",
    "{bg} background: {obj} {pos}",
    "picture of {obj} {pos} over a {bg} background",
    "{pos} of a {bg} background, {obj}",
    "{obj} placed {pos}, the background {bg}",
)
CANONICAL_RATE = 0.25  # share of training captions kept in the original grammar (dataset.caption)
TYPO_RATE = 0.1  # share of training captions with one typo
TYPO_MIN_LENGTH = 4  # words shorter than this are never misspelt


def object_phrase(thing: dataset.Thing, rng: random.Random) -> str:
    words = [rng.choice(ARTICLES)]
    if rng.random() < 0.5:
        words.append(rng.choice(SIZE_WORDS[thing.size]))
    words += [thing.colour, thing.shape]
    return " ".join(w for w in words if w)


def fill(template: str, thing: dataset.Thing, background: str, rng: random.Random) -> str:
    """One caption of `template` for a one-object scene (every slot drawn from `rng`)."""
    text = template.format(obj=object_phrase(thing, rng), pos=rng.choice(POSITION_WORDS[thing.position]),
                           tag=rng.choice(POSITION_TAGS[thing.position]), bg=background)
    return " ".join(text.split())  # an empty article leaves no double space


def misspell(word: str, rng: random.Random) -> str:
    """The word with one typo: a letter dropped, doubled, or swapped with the next."""
    i = rng.randrange(1, len(word) - 1)
    kind = rng.choice(("drop", "double", "swap"))
    if kind == "drop":
        return word[:i] + word[i + 1:]
    if kind == "double":
        return word[:i] + word[i] + word[i:]
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def add_typo(text: str, rng: random.Random, words: frozenset[str] | None = None) -> str:
    """`text` with one word (of at least TYPO_MIN_LENGTH letters, and in `words` if given) misspelt."""
    tokens = text.split(" ")
    candidates = [i for i, t in enumerate(tokens) if len(t) >= TYPO_MIN_LENGTH and t.isalpha()
                  and (words is None or t in words)]
    if not candidates:
        return text
    i = rng.choice(candidates)
    tokens[i] = misspell(tokens[i], rng)
    return " ".join(tokens)


def varied_caption(s: dataset.Scene, rng: random.Random, templates: tuple[str, ...] = TRAINING_TEMPLATES) -> str:
    """A training caption of scene `s`: the original grammar, or one of `templates`, sometimes with a typo.
    Two-object scenes keep the original grammar with varied position phrases."""
    if rng.random() < CANONICAL_RATE:
        text = s.caption
    elif len(s.objects) == 1:
        text = fill(rng.choice(templates), s.objects[0], s.background, rng)
    else:
        parts = [f"{object_phrase(t, rng)} {rng.choice(POSITION_WORDS[t.position])}" for t in s.objects]
        text = " ".join(f"{' and '.join(parts)} on a {s.background} background".split())
    return add_typo(text, rng) if rng.random() < TYPO_RATE else text


def training_captions(seed: int, indices: list[int], step: int) -> list[str]:
    """Captions of training scenes `indices` of stream `seed` at training step `step` (a pure function)."""
    return [varied_caption(dataset.scene(seed, i), random.Random(f"phrasing:{seed}:{step}:{j}:{i}"))
            for j, i in enumerate(indices)]


# Typos of the evaluation only touch words that name no scored attribute.
EVAL_TYPO_WORDS = frozenset({"background", "backdrop", "circle", "square", "triangle", "picture", "placed"})
EVAL_TYPO_EVERY = 6  # one held-out prompt in six has a typo


def held_out_caption(s: dataset.Scene, index: int, seed: int = 0) -> str:
    """Held-out phrasing number `index` of a one-object scene: templates in turn, slots and typos from a seeded
    stream."""
    rng = random.Random(f"held-out:{seed}:{index}")
    text = fill(HELD_OUT_TEMPLATES[index % len(HELD_OUT_TEMPLATES)], s.objects[0], s.background, rng)
    return add_typo(text, rng, EVAL_TYPO_WORDS) if index % EVAL_TYPO_EVERY == EVAL_TYPO_EVERY - 1 else text


def training_phrasing(s: dataset.Scene, index: int, seed: int = 0) -> str:
    """A training-template phrasing of a one-object scene (templates in turn, no typo), to compare with."""
    rng = random.Random(f"training-phrasing:{seed}:{index}")
    return fill(TRAINING_TEMPLATES[index % len(TRAINING_TEMPLATES)], s.objects[0], s.background, rng)


def _alternatives(options) -> str:
    return "(?:" + "|".join(re.escape(o) for o in sorted(set(options), key=len, reverse=True)) + ")"


def template_pattern(template: str) -> re.Pattern:
    """A regular expression matching every caption `fill` can make from `template` (without typos)."""
    sizes = [w for words in SIZE_WORDS.values() for w in words]
    obj = (f"(?:{_alternatives(a for a in ARTICLES if a)} )?(?:{_alternatives(sizes)} )?"
           f"{_alternatives(dataset.COLOURS)} {_alternatives(dataset.SHAPES)}")
    slots = {"obj": obj, "pos": _alternatives(p for ps in POSITION_WORDS.values() for p in ps),
             "tag": _alternatives(p for ps in POSITION_TAGS.values() for p in ps),
             "bg": _alternatives(dataset.COLOURS)}
    parts = re.split(r"\{(\w+)\}", template)
    body = "".join(slots[p] if i % 2 else re.escape(p) for i, p in enumerate(parts))
    return re.compile(body)
