"""The shipped demo model through the real node graphs: it follows prompts, and inpainting keeps the rest.

The bars here are below bench/demo_eval.py's targets (16 prompts, so one picture is 6%); the benchmark prints
the full figures (docs/demo-model.md). On these 16 the shipped model scores colour 94%, background, position
and size 100%, shape 81%.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from demo_model import captions, evaluate, showcase
from diffusion.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "models" / "checkpoints" / "sdgraph-demo.safetensors"
BARS = {"colour": 0.8, "background": 0.9, "shape": 0.65, "size": 0.8, "position": 0.8}


def test_shipped_file_is_small_and_loads_as_an_sd1_checkpoint():
    assert CHECKPOINT.stat().st_size < 30_000_000
    checkpoint = load_checkpoint(CHECKPOINT)
    assert checkpoint.text_config.vocab_size == 49408
    assert checkpoint.vae_config.downscale == 8 and checkpoint.vae_config.latent_channels == 4
    assert checkpoint.unet_config.context_dim == checkpoint.text_config.hidden_size


def test_generated_pictures_follow_their_prompts():
    scenes = evaluate.single_object_scenes(4242, 16, held_out=False)
    images = evaluate.generate(ROOT, CHECKPOINT.name, [s.caption for s in scenes], seed=0, steps=20, cfg=3.0)
    accuracy = evaluate.evaluate_scenes(images, scenes)
    missed = {a: accuracy[a] for a, bar in BARS.items() if accuracy[a] < bar}
    assert not missed, accuracy


# Held-out phrasing, 64 prompts (bench/demo_eval.py): colour 95.3%, background 100%, position 93.8% (after stage 3
# alone: 79.7%, 81.2%, 90.6%; before any phrasing stage: 21.9%, 34.4%, 35.9%). These 16 score 100%, 100%, 94% (after
# stage 3 alone: 81%, 75%, 88%); one picture is 6%, so the bars sit two pictures lower.
PHRASING_BARS = {"colour": 0.85, "background": 0.85, "position": 0.8}


def test_shipped_file_was_trained_on_varied_captions():
    """Both phrasing rounds ran (stage 3 and 3b, the second with every order of object, position, background)."""
    with safe_open(str(CHECKPOINT), "pt") as f:
        assert int(f.metadata().get("phrasing_steps", 0)) > 0
        assert int(f.metadata().get("phrasing2_steps", 0)) > 0


def test_generated_pictures_follow_held_out_everyday_phrasing():
    """#14: prompts in phrasings held out of training ("blue background: a red circle at the left", "red circle,
    left, blue background", "there is ...", a typo) still give the right colour, background and position."""
    scenes = evaluate.single_object_scenes(4242, 16, held_out=False)
    prompts = [captions.held_out_caption(s, i, seed=1) for i, s in enumerate(scenes)]
    images = evaluate.generate(ROOT, CHECKPOINT.name, prompts, seed=0, steps=20, cfg=3.0)
    accuracy = evaluate.evaluate_scenes(images, scenes)
    missed = {a: accuracy[a] for a, bar in PHRASING_BARS.items() if accuracy[a] < bar}
    assert not missed, (accuracy, prompts)


def test_inpaint_graph_changes_only_pixels_inside_the_mask():
    api = json.loads((ROOT / "graphs" / "inpaint.json").read_text())
    check = showcase.inpaint_check(api, ROOT)
    assert check["outside_pixels"] > 3000
    assert check["outside_changed"] == 0
    assert check["inside_changed"] > check["inside_pixels"] // 2
