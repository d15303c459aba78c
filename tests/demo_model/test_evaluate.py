"""The scorer reads the dataset's own drawings perfectly, and notices when a picture does not match."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from demo_model import dataset, evaluate


@pytest.mark.parametrize("held_out", [False, True])
def test_scorer_reads_ground_truth_drawings_perfectly(held_out):
    scenes = evaluate.single_object_scenes(11, 120, held_out=held_out)
    images = [np.asarray(dataset.render(s)[0]) for s in scenes]
    assert evaluate.evaluate_scenes(images, scenes) == {a: 1.0 for a in evaluate.ATTRIBUTES}


def test_scorer_catches_a_wrong_colour_shape_and_position():
    truth = dataset.Scene((dataset.Thing("red", "star", "large", "left"),), "blue", ((0, 0),))
    wrong = dataset.Scene((dataset.Thing("green", "square", "large", "right"),), "blue", ((0, 0),))
    reading = evaluate.analyse(np.asarray(dataset.render(wrong)[0]))
    assert evaluate.score(reading, truth.objects[0], truth.background) == {
        "colour": False, "background": True, "position": False, "shape": False, "size": True}


def test_a_flat_picture_has_no_object():
    flat = np.asarray(Image.new("RGB", (64, 64), dataset.COLOURS["purple"]))
    reading = evaluate.analyse(flat)
    assert reading.background == "purple" and reading.colour is None
    assert not any(evaluate.score(reading, dataset.Thing("red", "circle", "small", "top"), "purple")[a]
                   for a in ("colour", "position", "shape", "size"))


def test_accuracies_average_per_attribute():
    rows = [dict.fromkeys(evaluate.ATTRIBUTES, True), {**dict.fromkeys(evaluate.ATTRIBUTES, True), "shape": False}]
    assert evaluate.accuracies(rows)["shape"] == 0.5 and evaluate.accuracies(rows)["colour"] == 1.0
