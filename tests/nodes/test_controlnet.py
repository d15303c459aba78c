"""ControlNet and Canny nodes (issue #12) through the real registry and executor, on the tiny checkpoint and the
tiny ControlNet the node fixtures write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import Executor, validate
from nodes import build_registry
from nodes.folders import Folders
from nodes.runtime import Runtime

from .conftest import ROOT, TINY_CONTROLNET

GRAPH = json.loads((ROOT / "graphs" / "controlnet.json").read_text())


def run_nodes(api: dict, base: Path, targets: list[str]):
    """The outputs of `targets` (validated and run as the CLI does)."""
    registry = build_registry(entry_points=False)
    runtime = Runtime(Folders.at(base))
    result = validate(api, registry, targets=targets, resources=runtime)
    assert result.ok, [str(e) for e in result.errors]
    report = Executor(registry, resources=runtime).run(result.graph)
    assert report.error is None, report.error and report.error.traceback
    return report.outputs


def run_error(api: dict, base: Path, targets: list[str]) -> str:
    """The error message of a run that validates but fails."""
    registry = build_registry(entry_points=False)
    runtime = Runtime(Folders.at(base))
    result = validate(api, registry, targets=targets, resources=runtime)
    assert result.ok, [str(e) for e in result.errors]
    report = Executor(registry, resources=runtime).run(result.graph)
    assert report.error is not None
    return str(report.error)


def graph(**changes) -> dict:
    api = json.loads(json.dumps(GRAPH))
    for node_input, value in changes.items():
        node_id, name = node_input.split("__")
        api[node_id]["inputs"][name] = value
    return api


def test_canny_matches_kornia_on_a_simple_image(tiny_base):
    from kornia.filters import canny

    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "controlnet_shapes.png"}},
           "2": {"class_type": "Canny", "inputs": {"image": ["1", 0], "low_threshold": 0.3, "high_threshold": 0.7}}}
    outputs = run_nodes(api, tiny_base, ["1", "2"])
    image, edges = outputs["1"][0][0], outputs["2"][0][0]
    expected = canny(image.movedim(-1, 1), 0.3, 0.7)[1]
    assert edges.shape == (*image.shape[:3], 3)
    assert torch.equal(edges, expected.repeat(1, 3, 1, 1).movedim(1, -1))
    assert 0 < edges.mean() < 0.5 and set(edges.unique().tolist()) <= {0.0, 1.0}


def test_canny_thresholds_in_the_wrong_order_are_refused(tiny_base):
    from nodes.controlnet import canny

    with pytest.raises(ValueError, match="Canny: low_threshold 0.8 is above high_threshold 0.4"):
        canny.fn(None, torch.rand(1, 8, 8, 3), 0.8, 0.4)


def test_advanced_puts_one_control_on_both_sides_and_chains_on_top(tiny_base):
    api = graph()
    api["14"] = {"class_type": "ControlNetApplyAdvanced",
                 "inputs": {"positive": ["13", 0], "negative": ["13", 1], "control_net": ["12", 0],
                            "image": ["10", 0], "strength": 0.5, "start_percent": 0.1, "end_percent": 0.9}}
    api["15"] = {"class_type": "ControlNetApplyAdvanced",
                 "inputs": {"positive": ["6", 0], "negative": ["7", 0], "control_net": ["12", 0],
                            "image": ["10", 0], "strength": 0.0, "start_percent": 0.0, "end_percent": 1.0}}
    outputs = run_nodes(api, tiny_base, ["6", "7", "13", "14", "15"])
    (positive,), (negative,) = outputs["13"][0][0].entries, outputs["13"][1][0].entries
    assert positive.control is negative.control
    first = positive.control
    assert (first.strength, first.start_percent, first.end_percent, first.previous) == (0.9, 0.0, 0.8, None)
    assert first.origin == "ControlNetApplyAdvanced (node 13)" and not first.apply_to_uncond
    (second_pos,), (second_neg,) = outputs["14"][0][0].entries, outputs["14"][1][0].entries
    assert second_pos.control is second_neg.control and second_pos.control.previous is first
    # strength 0: the conditioning comes back unchanged
    assert outputs["15"][0][0].entries == outputs["6"][0][0].entries
    assert outputs["15"][1][0].entries == outputs["7"][0][0].entries


def test_old_apply_gives_each_entry_its_own_control_that_also_serves_the_uncond(tiny_base):
    api = graph()
    api["16"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                                 "conditioning_2": ["6", 0]}}
    api["17"] = {"class_type": "ControlNetApply", "inputs": {"conditioning": ["16", 0], "control_net": ["12", 0],
                                                             "image": ["11", 0], "strength": 1.0}}
    conditioning = run_nodes(api, tiny_base, ["17"])["17"][0][0]
    first, second = (e.control for e in conditioning.entries)
    assert first is not second and first.apply_to_uncond and first.previous is None


def saved_image(api: dict, base: Path) -> torch.Tensor:
    api = json.loads(json.dumps(api))
    api["9"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    return run_nodes(api, base, ["9"])["9"][0][0]


def test_the_control_changes_the_picture_and_strength_zero_does_not(tiny_base):
    without = graph(**{"3__positive": ["6", 0], "3__negative": ["7", 0]})
    plain = saved_image(without, tiny_base)
    assert torch.equal(saved_image(graph(**{"13__strength": 0.0}), tiny_base), plain)
    assert not torch.allclose(saved_image(graph(), tiny_base), plain, atol=1e-3)


def test_a_control_starting_at_100_percent_never_acts_but_at_99_acts_on_the_last_step(tiny_base):
    plain = saved_image(graph(**{"13__strength": 0.0}), tiny_base)
    assert torch.equal(saved_image(graph(**{"13__start_percent": 1.0, "13__end_percent": 1.0}), tiny_base), plain)
    late = saved_image(graph(**{"13__start_percent": 0.99, "13__end_percent": 1.0}), tiny_base)
    assert not torch.equal(late, plain) and torch.allclose(late, plain, atol=0.05)


def test_hint_batch_that_cannot_match_the_latent_names_the_node(tiny_base):
    from PIL import Image

    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    frames[0].save(tiny_base / "input" / "two_hints.gif", save_all=True, append_images=frames[1:])
    # cfg 1: the negative is not run, so the ControlNet sees the 3 latents alone
    api = graph(**{"5__batch_size": 3, "10__image": "two_hints.gif", "13__image": ["10", 0], "3__cfg": 1.0})
    message = run_error(api, tiny_base, ["3"])
    assert "ControlNetApplyAdvanced (node 13): the ControlNet hint has 2 images but the sampler runs 3" in message


def test_loader_refuses_a_checkpoint_naming_the_node_and_the_file(tiny_base):
    target = tiny_base / "models" / "controlnet" / "not_a_controlnet.safetensors"
    target.write_bytes((tiny_base / "models" / "checkpoints" / "sdgraph-tiny.safetensors").read_bytes())
    api = {"1": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": target.name}}}
    message = run_error(api, tiny_base, ["1"])
    target.unlink()
    assert "ControlNetLoader" in message and "not_a_controlnet.safetensors" in message
    assert "a checkpoint, not a ControlNet" in message


def test_loader_lists_the_controlnet_folder_and_fingerprints_the_file(tiny_base):
    registry = build_registry(entry_points=False)
    runtime = Runtime(Folders.at(tiny_base))
    loader = next(d for d in registry if d.name == "ControlNetLoader")
    assert TINY_CONTROLNET in loader.inputs[0].combo_options(runtime)
    identity = loader.fingerprint(runtime, TINY_CONTROLNET)
    path = tiny_base / "models" / "controlnet" / TINY_CONTROLNET
    assert identity[:3] == (str(path), path.stat().st_size, path.stat().st_mtime_ns)


@pytest.fixture(scope="module")
def sdxl_base(tiny_base):
    """The tiny SDXL checkpoint beside the SD1 one, with its ControlNet in the diffusers layout (as most SDXL
    ControlNets are published)."""
    from diffusion.make_checkpoint import make_checkpoint
    from diffusion.make_controlnet import write_controlnet

    make_checkpoint(tiny_base / "models" / "checkpoints" / "xl.safetensors", preset="sdxl-tiny", seed=0)
    write_controlnet(tiny_base / "models" / "controlnet" / "xl_canny.safetensors", preset="sdxl-tiny", seed=0,
                     diffusers=True)
    return tiny_base


def test_an_sdxl_controlnet_in_the_diffusers_layout_changes_an_sdxl_picture(sdxl_base):
    xl = {"4__ckpt_name": "xl.safetensors", "12__control_net_name": "xl_canny.safetensors"}
    plain = saved_image(graph(**xl, **{"3__positive": ["6", 0], "3__negative": ["7", 0]}), sdxl_base)
    assert torch.equal(saved_image(graph(**xl, **{"13__strength": 0.0}), sdxl_base), plain)
    assert not torch.allclose(saved_image(graph(**xl), sdxl_base), plain, atol=1e-3)


def test_a_controlnet_of_another_family_is_a_clear_error(sdxl_base):
    message = run_error(graph(**{"12__control_net_name": "xl_canny.safetensors"}), sdxl_base, ["3"])
    assert "xl_canny.safetensors was made for SDXL" in message and "label vector" in message
    message = run_error(graph(**{"4__ckpt_name": "xl.safetensors"}), sdxl_base, ["3"])
    assert "was made for another model family" in message and "32-wide text features" in message
