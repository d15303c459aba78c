"""The synthetic dataset: deterministic from its seed, captions that name every attribute, held-out pairs."""

from __future__ import annotations

import numpy as np

from demo_model import dataset


def test_same_seed_and_index_give_the_same_scene_and_pixels():
    a, b = dataset.scene(7, 123), dataset.scene(7, 123)
    assert a == b
    assert np.array_equal(np.asarray(dataset.render(a)[0]), np.asarray(dataset.render(b)[0]))
    pixels_a, captions_a = dataset.batch(7, 40, 6)
    pixels_b, captions_b = dataset.batch(7, 40, 6)
    assert captions_a == captions_b and np.array_equal(pixels_a, pixels_b)


def test_other_seeds_and_indices_give_other_scenes():
    captions = {dataset.scene(7, i).caption for i in range(50)}
    assert len(captions) > 40
    assert [dataset.scene(7, i) for i in range(10)] != [dataset.scene(8, i) for i in range(10)]


def test_pixels_are_in_the_vae_range_and_64_square():
    pixels, captions = dataset.batch(0, 0, 4)
    assert pixels.shape == (4, 3, 64, 64) and pixels.dtype == np.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert len(captions) == 4


def test_caption_names_every_attribute():
    thing = dataset.Thing("red", "circle", "small", "top")
    text = dataset.caption((thing,), "blue")
    assert text == "a small red circle at the top on a blue background"


def test_training_stream_never_shows_a_held_out_pair_and_covers_the_rest():
    seen = set()
    for i in range(3000):
        s = dataset.scene(3, i)
        assert s.background not in {t.colour for t in s.objects}
        for thing in s.objects:
            assert not dataset.is_held_out(thing), s.caption
            seen.add((thing.colour, thing.shape))
    all_pairs = {(c, s) for c in dataset.COLOURS for s in dataset.SHAPES}
    assert seen == all_pairs - dataset.HELD_OUT


def test_held_out_stream_shows_only_held_out_pairs():
    for i in range(200):
        s = dataset.scene(3, i, held_out=True)
        assert len(s.objects) == 1 and dataset.is_held_out(s.objects[0])


def test_masks_cover_the_drawn_object_in_its_colour():
    s = dataset.scene(5, 2)
    image, masks = dataset.render(s)
    pixels = np.asarray(image)
    last = s.objects[-1]
    assert (pixels[masks[-1]] == dataset.COLOURS[last.colour]).all(axis=-1).mean() > 0.9
    outside = ~np.any(masks, axis=0)
    assert (pixels[outside] == dataset.COLOURS[s.background]).all()
