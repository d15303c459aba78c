"""Every graph in graphs/ runs end to end and writes its image: the SD1.5 graphs with the bundled demo checkpoint
they name, the other families' graphs with tiny generated checkpoints under the published file names they name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import ROOT, run_api

GRAPHS = sorted((ROOT / "graphs").glob("*.json"))
DEMO_CHECKPOINT = ROOT / "models" / "checkpoints" / "sdgraph-demo.safetensors"
# the published checkpoints the model-family graphs name -> the tiny make-checkpoint preset of the same family
FAMILY_CHECKPOINTS = {
    "sd_xl_base_1.0.safetensors": "sdxl-tiny",
    "sd_xl_refiner_1.0.safetensors": "sdxl-refiner-tiny",
    "v2-1_768-ema-pruned.safetensors": "sd21v-tiny",
    "sd-v1-5-inpainting.safetensors": "sd15-inpaint-tiny",
}
TINY_SIDE = 64  # the family graphs' sizes are for the real models; their tiny stand-ins run at this size
TEST_STEPS = 3  # what these tests check (the wiring runs, the file is written) does not need the graphs' 20 steps


@pytest.fixture(scope="module")
def demo_base(tiny_base: Path) -> Path:
    """The session's base folder with the shipped demo model beside the tiny one (the graphs name it)."""
    target = tiny_base / "models" / "checkpoints" / DEMO_CHECKPOINT.name
    if not target.exists():
        shutil.copyfile(DEMO_CHECKPOINT, target)
    lora = tiny_base / "models" / "loras" / "sdgraph-tiny-lora.safetensors"  # graphs/lora.json
    if not lora.exists():
        from diffusion.make_lora import write_lora
        write_lora(lora, preset="tiny", seed=0)
    from diffusion.make_checkpoint import make_checkpoint
    for name, preset in FAMILY_CHECKPOINTS.items():
        path = tiny_base / "models" / "checkpoints" / name
        if not path.exists():
            make_checkpoint(path, preset=preset, seed=0)
    return tiny_base


def expected_size(api: dict) -> tuple[int, int]:
    """(height, width) of the saved picture: the empty latent's size, or the size the input is scaled to, then
    grown by an outpainting pad and scaled by a hires-fix latent upscale."""
    height, width = 256, 256
    for node in api.values():
        if node["class_type"] in ("EmptyLatentImage", "ImageScale"):
            height, width = node["inputs"]["height"], node["inputs"]["width"]
    for node in api.values():
        inputs = node["inputs"]
        if node["class_type"] == "ImagePadForOutpaint":
            height, width = height + inputs["top"] + inputs["bottom"], width + inputs["left"] + inputs["right"]
        if node["class_type"] == "LatentUpscaleBy":
            height, width = (round(side // 8 * inputs["scale_by"]) * 8 for side in (height, width))
    return height, width


def test_every_graph_is_covered():
    assert {p.stem for p in GRAPHS} >= {"txt2img", "img2img", "inpaint", "hires_fix", "outpaint", "lora",
                                        "controlnet", "regional_prompt", "sdxl_txt2img", "sdxl_base_refiner",
                                        "sd21_txt2img", "inpaint_model"}


def test_family_graphs_name_published_checkpoints():
    """Issue #13: the model-family graphs name the files people have, and each is a family the test supplies."""
    named = {node["inputs"]["ckpt_name"] for path in GRAPHS for node in json.loads(path.read_text()).values()
             if node["class_type"] == "CheckpointLoaderSimple"}
    assert named >= set(FAMILY_CHECKPOINTS)


def for_tiny_checkpoints(api: dict) -> dict:
    """A graph naming a model-family checkpoint, with its image sizes (not its conditioning sizes) cut to TINY_SIDE:
    the tiny stand-ins keep the real layouts but would take minutes at 1024 px."""
    names = {node["inputs"].get("ckpt_name") for node in api.values()}
    if not names & set(FAMILY_CHECKPOINTS):
        return api
    for node in api.values():
        if node["class_type"] in ("EmptyLatentImage", "ImageScale"):
            node["inputs"].update(width=TINY_SIDE, height=TINY_SIDE)
    return api


def with_few_steps(api: dict) -> dict:
    """The graph with at most TEST_STEPS sampling steps per sampler; a KSamplerAdvanced's start and end steps are
    scaled with its steps, so a base/refiner split stays a split."""
    for node in api.values():
        inputs = node["inputs"]
        steps = inputs.get("steps")
        if node["class_type"] not in ("KSampler", "KSamplerAdvanced") or steps <= TEST_STEPS:
            continue
        inputs["steps"] = TEST_STEPS
        for name in ("start_at_step", "end_at_step"):
            if name in inputs and inputs[name] < steps:
                inputs[name] = round(inputs[name] * TEST_STEPS / steps)
    return api


def test_few_steps_keeps_a_base_refiner_split():
    api = with_few_steps(json.loads((ROOT / "graphs" / "sdxl_base_refiner.json").read_text()))
    base, refiner = api["10"]["inputs"], api["11"]["inputs"]
    assert (base["steps"], base["start_at_step"], base["end_at_step"]) == (3, 0, 2)
    assert (refiner["steps"], refiner["start_at_step"], refiner["end_at_step"]) == (3, 2, 10000)


@pytest.mark.parametrize("path", GRAPHS, ids=lambda p: p.stem)
def test_graph_runs_and_saves_png(path: Path, demo_base: Path):
    api = with_few_steps(for_tiny_checkpoints(json.loads(path.read_text())))
    report, runtime = run_api(api, demo_base)
    images = [item for ui in report.ui.values() for item in ui.get("images", [])]
    assert len(images) == 1
    item = images[0]
    png = runtime.folders.root(item["type"]) / item["subfolder"] / item["filename"]
    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.shape == (*expected_size(api), 3)
    assert pixels.std() > 1.0  # a real picture, not a flat fill


def test_inpaint_graph_keeps_unmasked_latents(demo_base: Path):
    """Through the graph: outside the mask the sampled latent equals the encoded input exactly."""
    api = with_few_steps(json.loads((ROOT / "graphs" / "inpaint.json").read_text()))
    report, _ = run_api(api, demo_base)
    assert report.ok
    from engine import Executor, validate
    from nodes import build_registry
    from nodes.folders import Folders
    from nodes.runtime import Runtime

    registry = build_registry(entry_points=False)
    runtime = Runtime(Folders.at(demo_base))
    sampled = Executor(registry, resources=runtime).run(validate(api, registry, targets=["3", "13"],
                                                                 resources=runtime).graph)
    latent_in = sampled.outputs["13"][0][0]
    latent_out = sampled.outputs["3"][0][0]
    import torch

    from diffusion.denoisers import prepare_mask
    keep = (prepare_mask(latent_in.noise_mask, latent_in.samples.shape) == 0).expand_as(latent_in.samples)
    assert keep.any() and (~keep).any()
    assert torch.equal(latent_out.samples[keep], latent_in.samples[keep])
    assert not torch.equal(latent_out.samples[~keep], latent_in.samples[~keep])


def test_base_refiner_graph_hands_over_with_leftover_noise():
    """Issue #13: the base samples steps [0, k) and returns its leftover noise; the refiner adds none and finishes
    [k, steps) of the same schedule with the refiner checkpoint."""
    api = json.loads((ROOT / "graphs" / "sdxl_base_refiner.json").read_text())
    samplers = {node_id: node["inputs"] for node_id, node in api.items() if node["class_type"] == "KSamplerAdvanced"}
    (base_id, base), (_, refiner) = sorted(samplers.items(), key=lambda item: item[1]["start_at_step"])
    assert base["return_with_leftover_noise"] == "enable" and base["add_noise"] == "enable"
    assert refiner["add_noise"] == "disable" and refiner["start_at_step"] == base["end_at_step"] < base["steps"]
    assert refiner["steps"] == base["steps"] and refiner["latent_image"] == [base_id, 0]
    assert api[refiner["model"][0]]["inputs"]["ckpt_name"] == "sd_xl_refiner_1.0.safetensors"
