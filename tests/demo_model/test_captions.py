"""Varied captions (#14, everyday phrasing): the training generator's phrasings, and held-out templates it never
produces."""

from __future__ import annotations

import itertools
import random
import re

from demo_model import captions, dataset, evaluate

HELD_OUT_PATTERNS = [captions.template_pattern(t) for t in captions.HELD_OUT_TEMPLATES]


def _is_held_out_phrasing(text: str) -> bool:
    return any(p.fullmatch(text) for p in HELD_OUT_PATTERNS)


def test_training_captions_never_use_a_held_out_template():
    """Held out by construction and in fact: 20,000 training captions (typos included), and every training
    template filled many times without typos, match no held-out template."""
    for step in range(0, 2000, 7):
        for text in captions.training_captions(3, list(range(step, step + 70)), step):
            assert not _is_held_out_phrasing(text), text
    assert not set(captions.TRAINING_TEMPLATES) & set(captions.HELD_OUT_TEMPLATES)
    scenes = evaluate.single_object_scenes(3, 40, held_out=False)
    for template in captions.TRAINING_TEMPLATES:
        for i, s in enumerate(scenes):
            text = captions.fill(template, s.objects[0], s.background, random.Random(i))
            assert not _is_held_out_phrasing(text), (template, text)


def test_held_out_patterns_recognise_held_out_captions():
    """The check above is not vacuous: every typo-free held-out prompt matches its template's pattern."""
    scenes = evaluate.single_object_scenes(2024, 64, held_out=False)
    prompts = [captions.held_out_caption(s, i) for i, s in enumerate(scenes)]
    clean = [p for i, p in enumerate(prompts) if i % captions.EVAL_TYPO_EVERY != captions.EVAL_TYPO_EVERY - 1]
    assert all(_is_held_out_phrasing(p) for p in clean)
    assert len(set(prompts)) == len(prompts)


def test_held_out_prompts_name_colour_background_and_position_in_known_words():
    scenes = evaluate.single_object_scenes(2024, 64, held_out=False)
    known = ({w for p in captions.POSITION_WORDS.values() for phrase in p for w in phrase.split()}
             | {w for t in captions.TRAINING_TEMPLATES for w in t.replace(",", " ").replace(":", " ").split()}
             | set(dataset.COLOURS) | set(dataset.SHAPES) | set(captions.ARTICLES) | {"small", "large", "big",
                                                                                     "little", "centre", "center"})
    typos = 0
    for i, s in enumerate(scenes):
        text = captions.held_out_caption(s, i)
        thing = s.objects[0]
        words = text.replace(",", " ").replace(":", " ").split()
        assert thing.colour in words and s.background in words, text
        assert any(p in text for p in captions.POSITION_WORDS[thing.position] + captions.POSITION_TAGS[
            thing.position]), text
        unknown = {w for w in words if w not in known and not w.startswith("{")}
        typos += bool(unknown - {"there", "is", "picture", "of", "over", "placed", "the", "backdrop"})
    assert 64 // captions.EVAL_TYPO_EVERY - 2 <= typos <= 64 // captions.EVAL_TYPO_EVERY


def test_training_captions_are_deterministic_and_varied():
    first = captions.training_captions(3, list(range(200)), 11)
    assert first == captions.training_captions(3, list(range(200)), 11)
    assert first != captions.training_captions(3, list(range(200)), 12)
    canonical = [dataset.scene(3, i).caption for i in range(200)]
    share = sum(a == b for a, b in zip(first, canonical, strict=True)) / 200
    assert 0.1 < share < 0.45  # about CANONICAL_RATE in the original grammar, the rest varied
    assert any("center" in c or "middle" in c for c in first) and any(", " in c for c in first)


def test_misspell_changes_one_letter_and_keeps_the_ends():
    rng = random.Random(0)
    for _ in range(50):
        typo = captions.misspell("background", rng)
        assert typo != "background" and typo[0] == "b" and typo[-1] == "d"
        assert abs(len(typo) - len("background")) <= 1


def test_training_templates_name_the_background_in_other_word_orders():
    """#14 held-out gap: the colour after the word "background"/"backdrop" ("..., background blue"), and the
    background named first, are word orders of the second phrasing round's training templates (none of the first
    round's 15 had the colour after the word)."""
    after_word = re.compile(r"(?:background|backdrop)\W+(?:is |colour )?\{bg\}")
    assert not any(after_word.search(t) for t in captions.FIRST_ROUND_TEMPLATES)
    assert sum(bool(after_word.search(t)) for t in captions.MORE_TEMPLATES) >= 5
    assert sum(t.startswith(("{bg}", "background")) for t in captions.MORE_TEMPLATES) >= 3
    assert captions.TRAINING_TEMPLATES == captions.FIRST_ROUND_TEMPLATES + captions.MORE_TEMPLATES


def test_training_templates_cover_every_order_of_object_position_and_background():
    """#14: the first round had no template naming the object last after the position and the background
    ("left, blue background, a red circle"); the training templates now have every order of the three parts."""
    def order(template: str) -> tuple[str, ...]:
        return tuple("pos" if s == "tag" else s for s in re.findall(r"\{(\w+)\}", template))

    orders = set(itertools.permutations(("obj", "pos", "bg")))
    assert {order(t) for t in captions.FIRST_ROUND_TEMPLATES} != orders
    assert {order(t) for t in captions.TRAINING_TEMPLATES} == orders
